"""RunInference over tables (``with_tables``) everywhere rows run: batches kept in keyed state
across bundles (``max_batch_duration_secs``), windows, failing rows isolated into the dead
letters, the DirectRunner in-process and multi-process. Every row comes out once, as a result
(in its window, with the model's prediction) or as a dead letter. (The Flink and Spark
clusters: tests/cluster/test_beam_runners.py.)

Outputs are written to files, row by row, rather than checked with ``assert_that``: Beam's
DirectRunner takes its older runner for the processing-time timers of
``max_batch_duration_secs``, which fails a Flatten of a stateful DoFn's outputs, and
``assert_that`` drops what a window-end timer emits at the end of the global window.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms import window
from apache_beam.transforms.window import TimestampedValue
from sklearn.linear_model import LinearRegression

from beam_turbo import RunInference
from beam_turbo._arrays.tables import row_count, table_from_bytes, table_to_bytes
from beam_turbo._dofns.keyed_state import TablePieceCoder
from beam_turbo.errors import InvalidInputError
from beam_turbo.sklearn import SklearnModelHandlerNumpy
from tests.test_tables import FEATURES, MULTI_PROCESS, expected, model_file, table

__all__ = ["model_file"]  # the fixture, shared with test_tables


class Recorded(SklearnModelHandlerNumpy):
    """beam-turbo's scikit-learn handler with batches of ``size`` rows (across bundles, with
    ``duration``), writing the rows of each batch it scores, and its process, to ``record``."""

    def __init__(self, model_uri: str, record: Path, *, size: int, duration: float | None):
        super().__init__(model_uri=model_uri, min_batch_size=size, max_batch_size=size)
        self.record, self.duration = str(record), duration

    def batch_elements_kwargs(self) -> dict[str, Any]:
        kwargs = dict(super().batch_elements_kwargs())
        if self.duration is not None:
            kwargs["max_batch_duration_secs"] = self.duration
        return kwargs

    def predict_matrix(self, matrix: Any, model: Any, *args: Any) -> Any:
        predictions = super().predict_matrix(matrix, model, *args)  # may raise: NaN
        with open(self.record, "a") as f:
            f.write(f"{len(matrix)} {os.getpid()}\n")
        return predictions


class Written(beam.DoFn):
    """Writes each row of each output table, with its window and timestamp, to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def process(
        self,
        scored: Any,
        win: Any = beam.DoFn.WindowParam,
        timestamp: Any = beam.DoFn.TimestampParam,
    ) -> None:
        assert isinstance(scored, pa.Table), type(scored)
        span = [None, None] if isinstance(win, window.GlobalWindow) else [win.start, win.end]
        with open(self.path, "a") as f:
            ids, values = scored["id"].to_pylist(), scored["prediction"].to_pylist()
            where = [float(t) if t is not None else None for t in span]
            for row_id, value in zip(ids, values, strict=True):
                f.write(json.dumps([*where, timestamp.micros, row_id, value]) + "\n")


class DeadRows(beam.DoFn):
    """Writes the id of each row of each dead letter, with its error, to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def process(self, entry: Any) -> None:
        rows, (_, error, _) = entry
        with open(self.path, "a") as f:
            for row in rows:
                assert isinstance(row, dict), row
                assert set(row) == {"id", *FEATURES}, row
                f.write(json.dumps([row["id"], error]) + "\n")


def read(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def batch_sizes(record: Path) -> list[int]:
    return [int(line.split()[0]) for line in record.read_text().splitlines()]


def processes(record: Path) -> set[int]:
    return {int(line.split()[1]) for line in record.read_text().splitlines()}


def tables_of(sizes: list[int]) -> list[pa.Table]:
    starts = np.cumsum([0, *sizes])
    return [table(int(start), size) for start, size in zip(starts, sizes, strict=False)]


def check_predictions(rows: list[Any], want: dict[int, float]) -> None:
    """Every row once, with the model's own prediction."""
    ids = [row[3] for row in rows]
    assert sorted(ids) == sorted(want), "rows lost or duplicated"
    for row in rows:
        assert row[4] == pytest.approx(want[row[3]], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(
    ("sizes", "size"),
    [
        ([700, 3, 250, 0, 1200, 40], 256),  # large tables cut, small ones joined
        ([5] * 30, 64),  # many small tables, one batch of them across bundles
    ],
)
def test_tables_batch_across_bundles_in_keyed_state(
    tmp_path: Path, model_file: tuple[str, LinearRegression], sizes: list[int], size: int
) -> None:
    """max_batch_duration_secs: pieces of tables wait in keyed state; batches are cut at the
    target rows (full ones exactly at it), every row scored once."""
    path, model = model_file
    tables = tables_of(sizes)
    handler = Recorded(path, tmp_path / "batches", size=size, duration=30)
    pipeline = beam.Pipeline()
    _ = (
        pipeline
        | beam.Create(tables)  # a reshuffle: the tables in several bundles
        | RunInference(handler).with_tables(FEATURES, keep_columns=["id"])
        | beam.ParDo(Written(tmp_path / "out"))
    )
    pipeline.run().wait_until_finish()
    names = {t.unique_name for t in pipeline.to_runner_api().components.transforms.values()}
    assert any(name.endswith("BeamML_RunInference_Key") for name in names)  # the keyed path
    check_predictions(read(tmp_path / "out"), expected(tables, model))
    batches = batch_sizes(tmp_path / "batches")
    total = sum(sizes)
    # One worker, one key: the batches are full but the last, run by the window's end.
    assert sorted(batches, reverse=True) == [size] * (total // size) + (
        [total % size] if total % size else []
    )


def test_a_batch_of_tables_runs_when_its_duration_passes(
    tmp_path: Path, model_file: tuple[str, LinearRegression]
) -> None:
    """A batch that never fills runs by its timers (the duration limit, or the window's
    end): every row out, from a batch that ran short of its target."""
    from apache_beam.testing.test_stream import TestStream

    path, model = model_file
    tables = tables_of([3, 4, 5])
    stream = (
        TestStream()
        .advance_watermark_to(0)
        .add_elements([TimestampedValue(tables[0], 0)])
        .add_elements([TimestampedValue(tables[1], 1)])
        .advance_processing_time(11)  # past the 10 s limit: the first two tables run
        .add_elements([TimestampedValue(tables[2], 2)])
        .advance_watermark_to_infinity()
    )

    class Clock:
        def time(self) -> float:
            return 0.0

        def time_ns(self) -> int:
            return 0

    handler = Recorded(path, tmp_path / "batches", size=1000, duration=10)
    with beam.Pipeline(options=PipelineOptions(streaming=True)) as pipeline:
        _ = (
            pipeline
            | stream
            | RunInference(handler, clock=Clock()).with_tables(FEATURES, keep_columns=["id"])
            | beam.ParDo(Written(tmp_path / "out"))
        )
    check_predictions(read(tmp_path / "out"), expected(tables, model))
    assert batch_sizes(tmp_path / "batches") == [7, 5]


WINDOWINGS = {
    "fixed": window.FixedWindows(10),
    "sliding": window.SlidingWindows(20, 10),
}


@pytest.mark.parametrize("duration", [None, 30], ids=["in-bundle", "keyed-state"])
@pytest.mark.parametrize("windowing", sorted(WINDOWINGS))
def test_tables_in_windows_land_in_their_windows(
    tmp_path: Path,
    model_file: tuple[str, LinearRegression],
    windowing: str,
    duration: float | None,
) -> None:
    """Each row comes out once in each window its table is in, with its prediction, at a
    timestamp of that window (its end: the batch gathered per window), never mixed with
    another window's rows."""
    path, model = model_file
    tables = tables_of([40, 7, 300, 25, 90, 1, 60, 200])
    stamps = [3.0, 8.0, 12.0, 19.5, 21.0, 35.0, 36.0, 59.0]  # seconds
    windowfn = WINDOWINGS[windowing]
    handler = Recorded(path, tmp_path / "batches", size=64, duration=duration)
    with beam.Pipeline() as pipeline:
        _ = (
            pipeline
            | beam.Create(list(zip(tables, stamps, strict=True)))
            | beam.Map(lambda pair: TimestampedValue(*pair))
            | beam.WindowInto(windowfn)
            | RunInference(handler).with_tables(FEATURES, keep_columns=["id"])
            | beam.ParDo(Written(tmp_path / "out"))
        )
    predictions = expected(tables, model)
    want = []
    for t, stamp in zip(tables, stamps, strict=True):
        for win in windowfn.assign(window.WindowFn.AssignContext(stamp)):
            for row_id in t["id"].to_pylist():
                want.append((float(win.start), float(win.end), row_id))
    rows = read(tmp_path / "out")
    assert sorted((start, end, row_id) for start, end, _, row_id, _ in rows) == sorted(want)
    for start, end, micros, row_id, value in rows:
        if duration is None:  # at the end of its window, as Beam's two steps place it
            assert micros == round(end * 1e6) - 1, "a result outside its window's end"
        else:  # the row that completed the batch's, or the window end timer's
            assert start * 1e6 <= micros <= end * 1e6, "a result outside its window"
        assert value == pytest.approx(predictions[row_id], rel=1e-5, abs=1e-5)
    # Batches never join windows: each window's rows ran in batches of their own.
    assert max(batch_sizes(tmp_path / "batches")) <= 64


def run_with_nan_rows(
    tmp_path: Path,
    path: str,
    tables: list[pa.Table],
    *,
    size: int,
    duration: float | None,
    options: list[str] | None = None,
) -> tuple[list[Any], list[Any]]:
    handler = Recorded(path, tmp_path / "batches", size=size, duration=duration)
    with beam.Pipeline(options=PipelineOptions(options or [])) as pipeline:
        results, errors = (
            pipeline
            | beam.Create(tables)
            | RunInference(handler)
            .with_tables(FEATURES, keep_columns=["id"])
            .with_exception_handling(isolate_failures=True)
        )
        _ = results | beam.ParDo(Written(tmp_path / "out"))
        _ = errors.failed_inferences | beam.ParDo(DeadRows(tmp_path / "dead"))
    return read(tmp_path / "out"), read(tmp_path / "dead")


def with_nan(tables: list[pa.Table], ids: set[int]) -> list[pa.Table]:
    """``tables`` with ``f2`` of the rows ``ids`` missing: NaN for even ids, an Arrow null
    for odd ones (a null becomes NaN in the float matrix; LinearRegression refuses NaN)."""
    import pyarrow.compute as pc

    poisoned = []
    for t in tables:
        row_ids = t["id"].to_numpy()
        nan = pa.array(np.isin(row_ids, list(ids)) & (row_ids % 2 == 0))
        null = pa.array(np.isin(row_ids, list(ids)) & (row_ids % 2 == 1))
        f2 = pc.if_else(nan, pa.scalar(np.float32("nan")), t["f2"])
        f2 = pc.if_else(null, pa.scalar(None, pa.float32()), f2)
        poisoned.append(t.set_column(t.schema.get_field_index("f2"), "f2", f2))
    return poisoned


#: Rows with NaN or a null: in one table and across tables, at a batch's first and last row,
#: adjacent.
NAN_IDS = {0, 63, 64, 65, 300, 301, 899, 1000, 1599}


@pytest.mark.parametrize("duration", [None, 30], ids=["in-bundle", "keyed-state"])
def test_failing_rows_alone_reach_the_dead_letters_and_every_other_row_is_scored(
    tmp_path: Path, model_file: tuple[str, LinearRegression], duration: float | None
) -> None:
    path, model = model_file
    tables = with_nan(tables_of([300, 600, 1, 99, 600]), NAN_IDS)
    scored, dead = run_with_nan_rows(tmp_path, path, tables, size=64, duration=duration)
    want = {i: p for i, p in expected(tables_of([300, 600, 1, 99, 600]), model).items()}
    check_predictions(scored, {i: p for i, p in want.items() if i not in NAN_IDS})
    assert sorted(row_id for row_id, _ in dead) == sorted(NAN_IDS), "exactly the NaN rows, once"
    assert all("NaN" in error for _, error in dead)
    assert sum(t["f2"].null_count for t in tables) == 5  # the odd ones are nulls


@pytest.mark.slow
def test_failing_rows_multi_process(
    tmp_path: Path, model_file: tuple[str, LinearRegression]
) -> None:
    """The same on the DirectRunner's multi-process mode: tables spread over two workers.
    (Not with ``max_batch_duration_secs``: for a processing-time timer Beam's DirectRunner
    takes its older runner, in this process whatever ``direct_num_workers`` says.)"""
    path, model = model_file
    sizes = [300, 600, 1, 99, 600, 400, 400]
    tables = with_nan(tables_of(sizes), NAN_IDS)
    scored, dead = run_with_nan_rows(
        tmp_path, path, tables, size=64, duration=None, options=MULTI_PROCESS
    )
    want = expected(tables_of(sizes), model)
    check_predictions(scored, {i: p for i, p in want.items() if i not in NAN_IDS})
    assert sorted(row_id for row_id, _ in dead) == sorted(NAN_IDS)
    assert os.getpid() not in processes(tmp_path / "batches"), "scored in this process"


@pytest.mark.parametrize(
    ("threshold", "fails"), [(0.05, False), (0.005, True)], ids=["under", "over"]
)
def test_threshold_counts_rows(
    model_file: tuple[str, LinearRegression], threshold: float, fails: bool
) -> None:
    """with_exception_handling's threshold, with tables, is a share of rows: 9 NaN rows of
    1,600 (0.56%) pass 5% and fail 0.5% (counted in tables, 9 of 5 would fail both)."""
    path, _ = model_file
    tables = with_nan(tables_of([300, 600, 1, 99, 600]), NAN_IDS)
    handler = SklearnModelHandlerNumpy(model_uri=path, min_batch_size=64, max_batch_size=64)

    def run() -> None:
        with beam.Pipeline() as pipeline:
            _ = (
                pipeline
                | beam.Create(tables)
                | RunInference(handler)
                .with_tables(FEATURES, keep_columns=["id"])
                .with_exception_handling(isolate_failures=True, threshold=threshold)
            )

    if fails:
        with pytest.raises(Exception, match="exceeded threshold: 9 / 1600"):
            run()
    else:
        run()


@pytest.mark.parametrize("exception_handling", [False, True])
@pytest.mark.parametrize(
    ("column", "values", "error"),
    [
        ("f9", None, "f9"),  # missing
        ("f1", ["x"] * 50, r"f1.*string"),  # of the wrong type
    ],
    ids=["missing", "wrong-type"],
)
def test_a_bad_column_is_named_at_the_first_batch(
    tmp_path: Path,
    model_file: tuple[str, LinearRegression],
    column: str,
    values: list[Any] | None,
    error: str,
    exception_handling: bool,
) -> None:
    """A feature column missing from a table, or not numeric: without exception handling the
    pipeline fails at the first batch, naming the column; with it (isolated), that table's
    rows are one dead letter with that error (not halved row by row: no row of it can be
    scored), while a row failing on its own in another table of the batch is isolated alone,
    and the rest are scored."""
    path, _ = model_file
    good = with_nan([table(0, 50)], {7})[0]
    bad = table(50, 50)
    if values is not None:
        bad = bad.set_column(bad.schema.get_field_index(column), column, pa.array(values))
    features = [*FEATURES[:3], column] if values is None else FEATURES
    if values is None:
        good = good.append_column(column, pa.array(np.zeros(50, np.float32)))
    handler = SklearnModelHandlerNumpy(model_uri=path, min_batch_size=100, max_batch_size=100)
    transform = RunInference(handler).with_tables(features, keep_columns=["id"])
    if not exception_handling:
        with pytest.raises(Exception, match=error), beam.Pipeline() as pipeline:
            _ = pipeline | beam.Create([bad]) | transform
        return
    with beam.Pipeline() as pipeline:
        results, errors = (
            pipeline
            | beam.Create([good, bad], reshuffle=False)
            | transform.with_exception_handling(isolate_failures=True)
        )
        _ = results | beam.ParDo(Written(tmp_path / "out"))
        _ = errors.failed_inferences | beam.ParDo(DeadEntries(tmp_path / "dead"))
    entries = sorted(read(tmp_path / "dead"))
    assert [ids for ids, _ in entries] == [[7], list(range(50, 100))]  # one batch of 100
    assert "NaN" in entries[0][1]
    assert re.search(error, entries[1][1])
    assert sorted(row[3] for row in read(tmp_path / "out")) == [i for i in range(50) if i != 7]


class DeadEntries(DeadRows):
    """Each dead letter: its rows' ids, and its error."""

    def process(self, entry: Any) -> None:
        rows, (_, error, _) = entry
        with open(self.path, "a") as f:
            f.write(json.dumps([[row["id"] for row in rows], error]) + "\n")


def test_a_batch_length_fn_is_refused_saying_why(model_file: tuple[str, LinearRegression]) -> None:
    path, _ = model_file
    handler = SklearnModelHandlerNumpy(model_uri=path, batch_length_fn=len)
    with pytest.raises(InvalidInputError, match=r"batch_length_fn.*rectangular"):
        RunInference(handler).with_tables(FEATURES)


@pytest.mark.parametrize("kind", ["arrow", "batch", "pandas"])
def test_pieces_in_state_are_coded_alone(kind: str) -> None:
    """The bag's coder: a piece of a table comes back equal, and costs its rows, not its
    table's (a pickled pyarrow slice carries its whole table)."""
    whole = table(0, 100_000)
    piece: Any = whole.slice(10, 100)
    if kind == "batch":
        piece = piece.combine_chunks().to_batches()[0]
    elif kind == "pandas":
        piece = whole.to_pandas().iloc[10:110]
    coder = TablePieceCoder()
    encoded = coder.encode(piece)
    back = coder.decode(encoded)
    assert type(back) is type(piece)
    assert back.equals(piece)
    assert row_count(back) == 100
    assert len(encoded) < 10_000
    assert table_from_bytes(table_to_bytes(whole.slice(0, 0))).num_rows == 0


def test_the_keyed_state_holds_tables_with_their_coder(
    model_file: tuple[str, LinearRegression],
) -> None:
    """The stateful DoFn's bag codes tables with TablePieceCoder, not the input's coder
    (which pickles, and a pickled slice carries its whole table)."""
    from apache_beam.pipeline import PipelineVisitor
    from apache_beam.transforms.userstate import get_dofn_specs

    path, _ = model_file
    handler = SklearnModelHandlerNumpy(model_uri=path, max_batch_duration_secs=5)
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create([table(0, 5)]) | RunInference(handler).with_tables(FEATURES)
    coders: list[Any] = []

    class Visitor(PipelineVisitor):
        def visit_transform(self, node: Any) -> None:
            dofn = getattr(node.transform, "dofn", None)
            if dofn is not None:
                coders.extend(spec.coder for spec in get_dofn_specs(dofn)[0])

    pipeline.visit(Visitor())
    assert [type(coder) for coder in coders] == [TablePieceCoder]
