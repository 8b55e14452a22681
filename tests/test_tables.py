"""RunInference over tables (``with_tables``): pyarrow Tables and RecordBatches, pandas
DataFrames scored column-wise on the DirectRunner, every row out once, as a result or a dead
letter, with the model's own predictions."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LinearRegression

from beam_turbo import RunInference
from beam_turbo._arrays.tables import TableRows, TableSpec
from beam_turbo.errors import InvalidTypeError
from beam_turbo.sklearn import SklearnModelHandlerNumpy, SklearnModelHandlerPandas

FEATURES = [f"f{i}" for i in range(4)]
MULTI_PROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def table(start: int, rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed + start)
    columns = {"id": pa.array(np.arange(start, start + rows, dtype=np.int64))}
    for name in FEATURES:
        columns[name] = pa.array(rng.standard_normal(rows).astype(np.float32))
    return pa.table(columns)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, LinearRegression]:
    data = table(0, 200, seed=99)
    x = np.column_stack([data[name].to_numpy() for name in FEATURES])
    model = LinearRegression().fit(x, x @ np.arange(1.0, 5.0) + 0.5)
    path = tmp_path_factory.mktemp("model") / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    return str(path), model


def expected(tables: list[Any], model: LinearRegression) -> dict[int, float]:
    """Each row's prediction by the model alone, on float32 features as stored."""
    found = {}
    for t in tables:
        frame = t.to_pandas() if not isinstance(t, pd.DataFrame) else t
        if frame.empty:
            continue
        x = frame[FEATURES].to_numpy(np.float32)
        for row_id, value in zip(frame["id"], model.predict(x), strict=True):
            found[int(row_id)] = float(value)
    return found


def rows_of(output: Any) -> list[tuple[str, list[str], int, float]]:
    """``(kind, columns, id, prediction)`` per row of an output table."""
    frame = output if isinstance(output, pd.DataFrame) else output.to_pandas()
    kind = type(output).__name__
    return [
        (kind, list(frame.columns), int(i), float(v))
        for i, v in zip(frame["id"], frame["prediction"], strict=True)
    ]


def matches(want: dict[int, float], kind: str) -> Any:
    """A matcher for ``assert_that``: every row once, of ``kind``, with its prediction."""

    def check(actual: list[tuple[str, list[str], int, float]]) -> None:
        ids = [row[2] for row in actual]
        assert sorted(ids) == sorted(want), "rows lost or duplicated"
        for row_kind, columns, row_id, value in actual:
            assert (row_kind, columns) == (kind, ["id", "prediction"])
            assert value == pytest.approx(want[row_id], rel=1e-5, abs=1e-5)

    return check


def check_scored(tables: list[Any], handler: Any, model: LinearRegression, kind: str) -> None:
    with beam.Pipeline() as p:
        results = (
            p
            | beam.Create(tables, reshuffle=False)
            | RunInference(handler).with_tables(feature_columns=FEATURES, keep_columns=["id"])
        )
        assert_that(results | beam.FlatMap(rows_of), matches(expected(tables, model), kind))


@settings(max_examples=12, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6), batch=st.integers(1, 5000))
def test_tables_are_cut_and_joined_and_every_row_scored_once(
    model_file: tuple[str, LinearRegression], sizes: list[int], batch: int
) -> None:
    path, model = model_file
    starts = np.cumsum([0, *sizes])
    tables = [table(int(start), size) for start, size in zip(starts, sizes, strict=False)]
    handler = SklearnModelHandlerNumpy(model_uri=path, min_batch_size=batch, max_batch_size=batch)
    check_scored(tables, handler, model, "Table")


def test_record_batches_and_data_frames_come_out_as_they_went_in(
    model_file: tuple[str, LinearRegression],
) -> None:
    path, model = model_file
    handler = SklearnModelHandlerNumpy(model_uri=path, min_batch_size=64, max_batch_size=64)
    batches = [t.to_batches()[0] for t in (table(0, 100), table(100, 30))]
    check_scored(batches, handler, model, "RecordBatch")
    frames = [table(0, 100).to_pandas(), table(100, 30).to_pandas()]
    check_scored(frames, handler, model, "DataFrame")


def test_pandas_handler_scores_tables_too(model_file: tuple[str, LinearRegression]) -> None:
    path, model = model_file
    tables = [table(0, 500), table(500, 20)]
    check_scored(tables, SklearnModelHandlerPandas(model_uri=path), model, "Table")


def test_a_torch_model_scores_tables(tmp_path: Path) -> None:
    import torch

    from beam_turbo.pytorch import PytorchModelHandlerTensor

    linear = torch.nn.Linear(len(FEATURES), 1)
    path = tmp_path / "linear.pt"
    torch.save(linear.state_dict(), path)
    handler = PytorchModelHandlerTensor(
        state_dict_path=str(path),
        model_class=torch.nn.Linear,
        model_params={"in_features": len(FEATURES), "out_features": 1},
    )
    tables = [table(0, 300), table(300, 7)]
    weights = linear.weight.detach().numpy()[0]
    bias = float(linear.bias.detach()[0])
    frame = pa.concat_tables(tables).to_pandas()
    want = dict(
        zip(frame["id"], frame[FEATURES].to_numpy(np.float32) @ weights + bias, strict=True)
    )

    def check(actual: list[tuple[int, list[float]]]) -> None:
        assert sorted(row_id for row_id, _ in actual) == sorted(want)
        for row_id, value in actual:
            assert value == pytest.approx(want[row_id], rel=1e-5, abs=1e-5)

    with beam.Pipeline() as p:
        results = (
            p
            | beam.Create(tables, reshuffle=False)
            | RunInference(handler).with_tables(FEATURES, keep_columns=["id"])
            | beam.FlatMap(
                lambda t: zip(t["id"].to_pylist(), t["prediction"].to_pylist(), strict=True)
            )
        )
        assert_that(results, check)


@pytest.mark.slow
def test_tables_multi_process(model_file: tuple[str, LinearRegression]) -> None:
    path, model = model_file
    tables = [table(i * 1000, 1000) for i in range(6)]
    handler = SklearnModelHandlerNumpy(model_uri=path)
    with beam.Pipeline(argv=MULTI_PROCESS) as p:
        results = (
            p
            | beam.Create(tables)
            | RunInference(handler).with_tables(feature_columns=FEATURES, keep_columns=["id"])
        )
        assert_that(results | beam.FlatMap(rows_of), matches(expected(tables, model), "Table"))


def test_rows_with_nan_reach_the_dead_letters_as_rows_and_the_rest_are_scored(
    model_file: tuple[str, LinearRegression],
) -> None:
    """scikit-learn refuses NaN: isolated, exactly the rows holding one are dead letters."""
    path, _ = model_file
    data = table(0, 300).to_pandas()
    data.loc[[7, 150, 151], "f2"] = np.nan
    tables = [pa.Table.from_pandas(data, preserve_index=False)]
    handler = SklearnModelHandlerNumpy(model_uri=path, min_batch_size=128, max_batch_size=128)
    with beam.Pipeline() as p:
        results, errors = (
            p
            | beam.Create(tables)
            | RunInference(handler)
            .with_tables(feature_columns=FEATURES, keep_columns=["id"])
            .with_exception_handling(isolate_failures=True)
        )
        ids = results | beam.FlatMap(lambda t: t.column("id").to_pylist())
        bad = errors.failed_inferences | beam.FlatMap(lambda entry: [r["id"] for r in entry[0]])
        assert_that(ids, equal_to([i for i in range(300) if i not in (7, 150, 151)]))
        assert_that(bad, equal_to([7, 150, 151]), label="dead letters")


def test_a_handler_that_cannot_score_columns_is_refused_at_construction() -> None:
    from apache_beam.ml.inference.sklearn_inference import (
        SklearnModelHandlerNumpy as BeamsHandler,
    )

    with pytest.raises(InvalidTypeError, match="SklearnModelHandlerNumpy cannot score tables"):
        RunInference(BeamsHandler(model_uri="unused.pkl")).with_tables()


def test_a_missing_column_names_it(model_file: tuple[str, LinearRegression]) -> None:
    path, _ = model_file
    handler = SklearnModelHandlerNumpy(model_uri=path)
    with pytest.raises(Exception, match="f9"), beam.Pipeline() as p:
        _ = (
            p
            | beam.Create([table(0, 10)])
            | RunInference(handler).with_tables(feature_columns=[*FEATURES[:3], "f9"])
        )


def test_elements_that_are_not_tables_are_named() -> None:
    rows = TableRows([table(0, 5)])
    assert len(rows[1:3]) == 2
    assert [r["id"] for r in rows[3:]] == [3, 4]
    spec = TableSpec(keep_columns=("id",))
    assert spec.features_of(table(0, 1)) == FEATURES


def test_parquet_in_parquet_out(tmp_path: Path, model_file: tuple[str, LinearRegression]) -> None:
    """docs/tables.md's pipeline: ReadFromParquetBatched, RunInference, WriteToParquetBatched."""
    path, model = model_file
    source = tmp_path / "in"
    source.mkdir()
    tables = [table(i * 700, 700) for i in range(3)]
    for i, t in enumerate(tables):
        pq.write_table(t, source / f"part-{i}.parquet")
    schema = pa.schema([("id", pa.int64()), ("prediction", pa.float64())])
    handler = SklearnModelHandlerNumpy(model_uri=path)
    with beam.Pipeline() as p:
        _ = (
            p
            | beam.io.ReadFromParquetBatched(str(source / "*.parquet"))
            | RunInference(handler).with_tables(
                FEATURES, keep_columns=["id"], prediction_dtype="float64"
            )
            | beam.io.WriteToParquetBatched(str(tmp_path / "out" / "scored"), schema)
        )
    written = pq.read_table(tmp_path / "out")
    got = dict(zip(written["id"].to_pylist(), written["prediction"].to_pylist(), strict=True))
    want = expected(tables, model)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5, atol=1e-5)
