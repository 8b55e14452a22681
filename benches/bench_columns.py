"""pytest-benchmark suite for feature_matrix: a table's 16 float32 feature columns become the
model's (rows, 16) float32 matrix. Each group holds ours and the alternatives a pipeline would
use, so pytest-benchmark's table shows the ratios of one run.

Run: scripts/bench.sh benches/bench_columns.py
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from beam_turbo._arrays.columns import feature_matrix

pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")

FEATURES = 16
SIZES = {"64k": 65_536, "1M": 1_048_576}


def make_table(rows: int) -> Any:
    rng = np.random.default_rng(0)
    return pa.table({f"f{j}": rng.random(rows, dtype=np.float32) for j in range(FEATURES)})


@pytest.fixture(scope="module", params=list(SIZES), ids=list(SIZES))
def table(request: Any) -> Any:
    return make_table(SIZES[request.param])


def group(request: Any) -> str:
    return f"{FEATURES} x float32[{request.node.callspec.id}]"


def test_feature_matrix(benchmark: Any, table: Any, request: Any) -> None:
    benchmark.group = group(request)
    matrix = benchmark(feature_matrix, table, None, np.float32)
    assert matrix.shape == (table.num_rows, FEATURES)


def test_feature_matrix_reused_out(benchmark: Any, table: Any, request: Any) -> None:
    benchmark.group = group(request)
    out = np.empty((table.num_rows, FEATURES), np.float32)
    benchmark(lambda: feature_matrix(table, None, np.float32, out=out))


def test_numpy_column_stack(benchmark: Any, table: Any, request: Any) -> None:
    """What a hand-written ParDo does: each Arrow column as numpy (zero-copy), then numpy."""
    benchmark.group = group(request)
    benchmark(
        lambda: np.column_stack([c.to_numpy() for c in table.columns]).astype(
            np.float32, copy=False
        )
    )


def test_numpy_column_stack_of_arrays(benchmark: Any, table: Any, request: Any) -> None:
    """numpy alone, the columns already numpy arrays: column_stack(...).astype as written."""
    benchmark.group = group(request)
    columns = [c.to_numpy() for c in table.columns]
    benchmark(lambda: np.column_stack(columns).astype(np.float32))


def test_pyarrow_to_pandas_to_numpy(benchmark: Any, table: Any, request: Any) -> None:
    """pyarrow's own road: Table.to_pandas().to_numpy()."""
    benchmark.group = group(request)
    benchmark(lambda: table.to_pandas().to_numpy(dtype=np.float32))


def test_feature_matrix_from_pandas(benchmark: Any, table: Any, request: Any) -> None:
    benchmark.group = group(request)
    frame = table.to_pandas()
    benchmark(feature_matrix, frame, None, np.float32)
