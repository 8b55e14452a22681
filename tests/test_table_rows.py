"""RunInference(...).with_tables() on Beam's schema'd rows: Beam's Arrow batches through
``process_batch`` (``ReadFromParquet(as_rows=True)``), rows one by one through ``process``
(``beam.Row`` from a ``Map``, ``beam.Select``), outputs as schema'd rows whose batches are Arrow
tables; every row out once, as a result or a dead letter; the columns checked against the
schema when the pipeline is built.

(No ``from __future__ import annotations`` here: Beam reads ``process_batch``'s annotations.)"""

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.typehints.row_type import RowTypeConstraint
from apache_beam.utils.timestamp import Timestamp
from sklearn.linear_model import LinearRegression

from beam_turbo import RunInference
from beam_turbo.errors import InvalidInputError, InvalidTypeError, MissingColumnError
from beam_turbo.sklearn import SklearnModelHandlerNumpy

FEATURES = [f"f{i}" for i in range(4)]
MULTI_PROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


class ToTables(beam.DoFn):
    """docs/tables.md's batched way out: each Arrow batch of rows as one table element."""

    @beam.DoFn.yields_elements
    def process_batch(self, batch: pa.Table) -> Iterator[pa.Table]:
        yield batch


def table(start: int, rows: int) -> pa.Table:
    rng = np.random.default_rng(start)
    columns = {"id": pa.array(np.arange(start, start + rows, dtype=np.int64))}
    for name in FEATURES:
        columns[name] = pa.array(rng.standard_normal(rows).astype(np.float32))
    columns["label"] = pa.array([f"row {i}" for i in range(start, start + rows)])
    return pa.table(columns)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, LinearRegression]:
    data = table(10_000, 200)
    x = np.column_stack([data[name].to_numpy() for name in FEATURES])
    model = LinearRegression().fit(x, x @ np.arange(1.0, 5.0) + 0.5)
    path = tmp_path_factory.mktemp("model") / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    return str(path), model


def parquet(directory: Path, tables: list[pa.Table]) -> str:
    directory.mkdir()
    for i, t in enumerate(tables):
        pq.write_table(t, directory / f"part-{i}.parquet")
    return str(directory / "*.parquet")


def predicted(tables: list[pa.Table], model: LinearRegression) -> dict[int, float]:
    """Each row's prediction by the model alone, on float32 features as stored."""
    frame = pa.concat_tables(tables).to_pandas()
    values = model.predict(frame[FEATURES].to_numpy(np.float32))
    return dict(zip(frame["id"].tolist(), values.tolist(), strict=True))


def each_once(want: dict[int, float]) -> Any:
    """A matcher: ``(id, prediction)`` for every row once, with the model's prediction."""

    def check(actual: list[tuple[int, float]]) -> None:
        ids = [row_id for row_id, _ in actual]
        assert sorted(ids) == sorted(want), "rows lost or duplicated"
        for row_id, value in actual:
            assert value == pytest.approx(want[row_id], rel=1e-5, abs=1e-5)

    return check


def test_parquet_rows_are_scored_in_beams_batches_and_leave_as_batches(
    tmp_path: Path, model_file: tuple[str, LinearRegression]
) -> None:
    """ReadFromParquet(as_rows=True) hands the DoFn Arrow batches; its outputs are rows with
    the prediction, whose batches a batched step gets as tables (Beam's WriteToParquet of a
    schema'd PCollection; the recipe's ToTables), and a per-row step as rows."""
    path, model = model_file
    tables = [table(0, 3000), table(3000, 500), table(3500, 2000)]
    handler = SklearnModelHandlerNumpy(model_uri=path, min_batch_size=1024, max_batch_size=1024)
    with beam.Pipeline() as p:
        rows = p | beam.io.ReadFromParquet(parquet(tmp_path / "in", tables), as_rows=True)
        scored = rows | RunInference(handler).with_tables(FEATURES, keep_columns=["id"])
        fields = [name for name, _ in scored.element_type._fields]
        assert fields == ["id", "prediction"]
        _ = scored | beam.io.WriteToParquet(str(tmp_path / "out" / "scored"))
        sizes = scored | beam.ParDo(ToTables()) | beam.Map(lambda t: t.num_rows)
        # Batches of the target, cut from the files' tables (3000 = 1024 + 1024 + 952), none
        # joined across them: the rows never went one by one.
        assert_that(sizes, equal_to([1024, 1024, 952, 500, 1024, 976]), label="batches")
        per_row = scored | beam.Map(lambda row: (row.id, row.prediction))
        assert_that(per_row, each_once(predicted(tables, model)), label="rows")
    written = pq.read_table(tmp_path / "out")
    got = dict(zip(written["id"].to_pylist(), written["prediction"].to_pylist(), strict=True))
    want = predicted(tables, model)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5, atol=1e-5)


def test_rows_one_by_one_are_gathered_and_keep_their_fields(
    model_file: tuple[str, LinearRegression],
) -> None:
    """beam.Row from a Map, then beam.Select (per-row producers): ``process`` gathers rows
    into batches (the last, at the end of the bundle, comes out row by row); every field is
    kept, and the output's schema lets ``beam.Select`` pick from it."""
    path, model = model_file
    data = table(0, 300)
    dicts = data.to_pylist()
    handler = SklearnModelHandlerNumpy(model_uri=path, min_batch_size=64, max_batch_size=64)
    with beam.Pipeline() as p:
        rows = (
            p
            | beam.Create(dicts, reshuffle=False)
            | beam.Map(
                lambda d: beam.Row(
                    id=int(d["id"]),
                    f0=float(d["f0"]),
                    f1=float(d["f1"]),
                    f2=float(d["f2"]),
                    f3=float(d["f3"]),
                    label=str(d["label"]),
                    unused=1.0,
                )
            )
            | beam.Select("id", *FEATURES, "label")
        )
        scored = rows | RunInference(handler).with_tables(FEATURES, keep_columns=None)
        fields = [name for name, _ in scored.element_type._fields]
        assert fields == ["id", *FEATURES, "label", "prediction"]
        labels = scored | "Labels" >> beam.Map(lambda row: (row.id, row.label))
        assert_that(labels, equal_to([(d["id"], d["label"]) for d in dicts]), label="kept")
        picked = scored | beam.Select("id", "prediction") | beam.Map(tuple)
        # Features as float64 here (Python floats): the model sees them so.
        frame = data.to_pandas()
        want = dict(zip(frame["id"], model.predict(frame[FEATURES].to_numpy()), strict=True))
        assert_that(picked, each_once(want), label="predictions")


def test_windowed_rows_are_gathered_per_window_and_stay_in_it(
    model_file: tuple[str, LinearRegression],
) -> None:
    path, _ = model_file
    handler = SklearnModelHandlerNumpy(model_uri=path, min_batch_size=32, max_batch_size=32)

    def timestamped(d: dict[str, Any]) -> Any:
        row = beam.Row(id=int(d["id"]), **{name: float(d[name]) for name in FEATURES})
        return beam.window.TimestampedValue(row, 100 * (d["id"] % 2))

    with beam.Pipeline() as p:
        scored = (
            p
            | beam.Create(table(0, 200).to_pylist(), reshuffle=False)
            | beam.Map(timestamped).with_output_types(
                RowTypeConstraint.from_fields([("id", int), *[(name, float) for name in FEATURES]])
            )
            | beam.WindowInto(beam.window.FixedWindows(50))
            | RunInference(handler).with_tables(FEATURES, keep_columns=["id"])
        )
        # In their window, at its end, as the row path places batches' results.
        placed = scored | beam.Map(
            lambda row, w=beam.DoFn.WindowParam, t=beam.DoFn.TimestampParam: (
                int(w.start),
                t == w.max_timestamp(),
                row.id,
            )
        )
        want = [(100 * (i % 2), True, i) for i in range(200)]
        assert_that(placed, equal_to(want))


def test_failing_rows_reach_the_dead_letters_as_rows_nothing_lost_nothing_twice(
    tmp_path: Path, model_file: tuple[str, LinearRegression]
) -> None:
    """scikit-learn refuses NaN: isolated, exactly the rows holding one are dead letters, as
    rows of the input's type, on both roads (Beam's batches; rows one by one)."""
    path, _ = model_file
    data = table(0, 700)
    bad = [3, 250, 251, 699]
    f1 = data["f1"].to_numpy().copy()
    f1[bad] = np.nan
    data = data.set_column(data.schema.get_field_index("f1"), "f1", pa.array(f1))
    source = parquet(tmp_path / "in", [data])
    handler = SklearnModelHandlerNumpy(model_uri=path, min_batch_size=128, max_batch_size=128)
    with beam.Pipeline() as p:
        batched = p | beam.io.ReadFromParquet(source, as_rows=True)
        one_by_one = batched | "OneByOne" >> beam.Reshuffle()  # per-row producer
        for name, rows in (("batched", batched), ("rows", one_by_one)):
            scored, errors = rows | name >> RunInference(handler).with_tables(
                FEATURES, keep_columns=["id"]
            ).with_exception_handling(isolate_failures=True)
            ids = scored | f"{name}Ids" >> beam.Map(lambda row: row.id)
            dead = errors.failed_inferences | f"{name}Dead" >> beam.FlatMap(
                lambda entry: [(row.id, np.isnan(row.f1), type(entry[1][1])) for row in entry[0]]
            )
            good = [i for i in range(700) if i not in bad]
            assert_that(ids, equal_to(good), label=f"{name} scored")
            assert_that(dead, equal_to([(i, True, str) for i in bad]), label=f"{name} dead")


def test_a_missing_column_is_named_when_the_pipeline_is_built(
    model_file: tuple[str, LinearRegression],
) -> None:
    path, _ = model_file
    handler = SklearnModelHandlerNumpy(model_uri=path)
    p = beam.Pipeline()
    rows = p | beam.Create([beam.Row(id=1, f0=1.0, f1=2.0, label="a")])
    with pytest.raises(MissingColumnError, match=r"'f7' is not in the table.*'id', 'f0', 'f1'"):
        _ = rows | "Features" >> RunInference(handler).with_tables(["f0", "f7"])
    with pytest.raises(MissingColumnError, match=r"'key' is not in the table.*'label'"):
        _ = rows | "Kept" >> RunInference(handler).with_tables(["f0"], keep_columns=["key"])
    with pytest.raises(
        InvalidTypeError, match=r"column 'label' has type string.*schema: id: int64"
    ):
        _ = rows | "Label" >> RunInference(handler).with_tables(["f0", "label"])
    with pytest.raises(InvalidInputError, match="prediction column 'f1' is also a kept"):
        _ = rows | "Clash" >> RunInference(handler).with_tables(["f0"], prediction_column="f1")
    timed = p | "Timed" >> beam.Create([beam.Row(id=1, f0=1.0, when=Timestamp(5))])
    with pytest.raises(InvalidTypeError, match=r"no Arrow type for a field.*when: Timestamp"):
        _ = timed | "NoArrow" >> RunInference(handler).with_tables(["f0"])


def test_tables_are_still_checked_at_the_first_batch(
    model_file: tuple[str, LinearRegression],
) -> None:
    """Tables have no schema at construction: the same rule, at the first batch."""
    path, _ = model_file
    handler = SklearnModelHandlerNumpy(model_uri=path)
    with pytest.raises(Exception, match=r"'key' is not in the table"), beam.Pipeline() as p:
        _ = (
            p
            | beam.Create([table(0, 10)])
            | RunInference(handler).with_tables(FEATURES, keep_columns=["key"])
        )


def test_a_model_with_several_outputs_per_row_is_named(tmp_path: Path) -> None:
    """A schema'd row's prediction is one value: two outputs per row are refused, naming the
    field."""
    data = table(0, 50)
    x = np.column_stack([data[name].to_numpy() for name in FEATURES])
    path = tmp_path / "two.pkl"
    path.write_bytes(pickle.dumps(LinearRegression().fit(x, np.column_stack([x[:, 0], x[:, 1]]))))
    handler = SklearnModelHandlerNumpy(model_uri=str(path))
    with (
        pytest.raises(Exception, match=r"column 'prediction' came out as fixed_size_list"),
        beam.Pipeline() as p,
    ):
        _ = (
            p
            | beam.io.ReadFromParquet(parquet(tmp_path / "in", [data]), as_rows=True)
            | RunInference(handler).with_tables(FEATURES, keep_columns=["id"])
        )


@pytest.mark.slow
def test_rows_multi_process(tmp_path: Path, model_file: tuple[str, LinearRegression]) -> None:
    path, model = model_file
    tables = [table(i * 1000, 1000) for i in range(4)]
    handler = SklearnModelHandlerNumpy(model_uri=path)
    with beam.Pipeline(argv=MULTI_PROCESS) as p:
        scored = (
            p
            | beam.io.ReadFromParquet(parquet(tmp_path / "in", tables), as_rows=True)
            | RunInference(handler).with_tables(FEATURES, keep_columns=["id"])
        )
        per_row = scored | beam.Map(lambda row: (row.id, row.prediction))
        assert_that(per_row, each_once(predicted(tables, model)))
