"""RunInference over tables (``with_tables``) on real Flink and Spark clusters: Parquet in,
every row's prediction equal to stock Beam's row-by-row RunInference on the same rows, within
bundles and across them in keyed state; rows that fail alone in the dead letters, as rows.

One pipeline per cluster holds every branch (``workloads.build_tables``); each test checks one
part of its output.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cluster import workloads
from tests.cluster.conftest import Cluster, run_job

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

#: Rows, in 4 files of row groups of 300 (tables of 300 rows) scored in batches of 256: tables
#: are cut and joined.
N = 3000
BATCH = 256


@pytest.fixture(scope="session")
def tables_output(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[tuple[int, Any]]]:
    folder = tmp_path_factory.mktemp(f"tables-{cluster.runner}")
    pattern = workloads.write_parquet(folder / "in", N, files=4, row_group_rows=300)
    model = workloads.make_sklearn_model(folder)
    out = workloads.pipeline_output(pattern)
    run_job(
        cluster.options(),
        lambda pipeline: workloads.build_tables(pipeline, pattern, model, BATCH),
        [Path(out).parent],
        cluster,
    )
    return workloads.read_output(out)


def by_id(pairs: list[tuple[int, Any]]) -> dict[int, Any]:
    """The payloads by row id; every id once."""
    counts = Counter(row_id for row_id, _ in pairs)
    duplicated = [row_id for row_id, count in counts.items() if count > 1]
    assert not duplicated, f"rows output more than once: {duplicated[:10]}"
    return dict(pairs)


@pytest.mark.parametrize("branch", ["tables_turbo", "tables_stateful"])
def test_tables_results_equal_stock_beams_per_row(
    tables_output: dict[str, list[tuple[int, Any]]], branch: str
) -> None:
    stock, turbo = by_id(tables_output["tables_stock"]), by_id(tables_output[branch])
    assert sorted(stock) == list(range(N)), "stock: not every row has a result"
    assert sorted(turbo) == list(range(N)), f"{branch}: not every row has a result"
    np.testing.assert_allclose(
        [turbo[i] for i in range(N)], [stock[i] for i in range(N)], rtol=1e-9
    )


def test_tables_failing_rows_alone_are_dead_letters(
    tables_output: dict[str, list[tuple[int, Any]]],
) -> None:
    stock = by_id(tables_output["tables_stock"])
    good = by_id(tables_output["tables_dlq_good"])
    dead = by_id(tables_output["tables_dlq_dead"])
    marked = {i for i in range(N) if workloads.is_marked(i)}
    assert set(dead) == marked, "exactly the NaN rows are dead letters"
    assert set(good) == set(range(N)) - marked, "every other row is scored"
    assert all("NaN" in error for error in dead.values())
    np.testing.assert_allclose([good[i] for i in sorted(good)], [stock[i] for i in sorted(good)])


def test_tables_parquet_is_as_written(tmp_path: Path) -> None:
    """The workload's input (no cluster): ids and features as ``sklearn_inputs``."""
    import pyarrow.parquet as pq

    pattern = workloads.write_parquet(tmp_path, 100, files=3, row_group_rows=7)
    read = pq.read_table(Path(pattern).parent).sort_by("id")
    assert read["id"].to_pylist() == list(range(100))
    np.testing.assert_array_equal(
        np.column_stack([read[name].to_numpy() for name in workloads.TABLE_FEATURES]),
        np.stack(workloads.sklearn_inputs(100)),
    )
