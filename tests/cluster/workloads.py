"""What the cluster tests run: small models made on the spot, the handlers that record their
loads and batch sizes, and the pipelines, stock Beam's RunInference beside beam-turbo's.

This module is pickled by value (cloudpickle): the SDK workers run the installed beam-turbo
wheel and do not have the tests on their path. Records are lines appended to files in a
folder both sides see (the cluster is on loopback): ``<name>.loads`` holds one pid per model
load, ``<name>.batches`` one ``pid length`` per batch a handler ran, ``bundles`` one
``pid size`` per bundle that reached the inference stage.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.internal.cloudpickle import cloudpickle
from apache_beam.ml.inference import base
from apache_beam.ml.inference import pytorch_inference as beam_pytorch
from apache_beam.ml.inference import sklearn_inference as beam_sklearn

import beam_turbo
from beam_turbo import pytorch as turbo_pytorch
from beam_turbo import sklearn as turbo_sklearn

cloudpickle.register_pickle_by_value(sys.modules[__name__])

FEATURES = 8
#: The second feature of an element that the failing handler refuses.
BAD_MARK = -7.0


def sklearn_inputs(n: int) -> list[np.ndarray[Any, Any]]:
    """``n`` float64 rows; the first feature is the row's index, so results name their input."""
    rng = np.random.default_rng(12)
    rows = rng.normal(size=(n, FEATURES))
    rows[:, 0] = np.arange(n)
    return list(rows)


def torch_inputs(n: int) -> list[Any]:
    import torch

    return [torch.from_numpy(row.astype(np.float32)) for row in sklearn_inputs(n)]


def make_sklearn_model(folder: Path) -> str:
    """A linear regression fitted on the spot, pickled as Beam's sklearn handler reads it."""
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, FEATURES))
    model = LinearRegression().fit(x, x @ rng.normal(size=FEATURES) + 0.5)
    path = folder / "linear.pkl"
    path.write_bytes(pickle.dumps(model))
    return str(path)


def make_torch_model(folder: Path) -> str:
    """A ``torch.nn.Linear(8, 2)`` state dict."""
    import torch

    torch.manual_seed(5)
    path = folder / "linear.pt"
    torch.save(torch.nn.Linear(FEATURES, 2).state_dict(), path)
    return str(path)


TORCH_PARAMS = {"in_features": FEATURES, "out_features": 2}


def append(path: str, line: str) -> None:
    """One line, appended in one write: lines from concurrent workers do not interleave."""
    with open(path, "a", encoding="utf-8") as out:
        out.write(line + "\n")


class Recording:
    """Mixed into a handler: each model load and each batch leaves a line in the record."""

    record_dir: str
    record_name: str

    def load_model(self) -> Any:
        append(os.path.join(self.record_dir, self.record_name + ".loads"), str(os.getpid()))
        return super().load_model()  # type: ignore[misc]

    def run_inference(
        self, batch: Sequence[Any], model: Any, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Any]:
        line = f"{os.getpid()} {len(batch)}"
        append(os.path.join(self.record_dir, self.record_name + ".batches"), line)
        results: Iterable[Any] = super().run_inference(  # type: ignore[misc]
            batch, model, inference_args
        )
        return results


class FailingOnMark:
    """Mixed into a handler: a batch holding an element marked bad fails, whole."""

    def run_inference(
        self, batch: Sequence[Any], model: Any, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Any]:
        for element in batch:
            if float(element[1]) == BAD_MARK:
                raise ValueError(f"element {int(element[0])} is marked bad")
        results: Iterable[Any] = super().run_inference(  # type: ignore[misc]
            batch, model, inference_args
        )
        return results


class TurboSklearn(Recording, turbo_sklearn.SklearnModelHandlerNumpy):
    pass


class StockSklearn(Recording, beam_sklearn.SklearnModelHandlerNumpy):
    pass


class TurboTorch(Recording, turbo_pytorch.PytorchModelHandlerTensor):
    pass


class StockTorch(Recording, beam_pytorch.PytorchModelHandlerTensor):
    pass


class SlowTurboSklearn(TurboSklearn):
    """Each element costs ``seconds_per_element`` more: a job long enough to be hit."""

    seconds_per_element = 0.0

    def run_inference(
        self, batch: Sequence[Any], model: Any, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Any]:
        time.sleep(len(batch) * self.seconds_per_element)
        return super().run_inference(batch, model, inference_args)


class FailingTurboSklearn(FailingOnMark, turbo_sklearn.SklearnModelHandlerNumpy):
    pass


class FailingStockSklearn(FailingOnMark, beam_sklearn.SklearnModelHandlerNumpy):
    pass


def recorded(handler: Any, record_dir: str, name: str) -> Any:
    handler.record_dir = record_dir
    handler.record_name = name
    return handler


class CountBundles(beam.DoFn):
    """Passes elements through; records how many each bundle held (fused into the stage)."""

    def __init__(self, record_dir: str) -> None:
        self._path = os.path.join(record_dir, "bundles")

    def start_bundle(self) -> None:
        self._count = 0

    def process(self, element: Any) -> Iterator[Any]:
        self._count += 1
        yield element

    def finish_bundle(self) -> None:
        if self._count:
            append(self._path, f"{os.getpid()} {self._count}")


class WhereBeamTurboIs(beam.DoFn):
    """Emits, once per bundle, the file beam-turbo is imported from on the worker."""

    def process(self, element: Any) -> Iterator[Any]:
        yield ("where", int(element), [beam_turbo.__file__, sys.executable])


def row_at(timestamp: Any) -> np.ndarray[Any, Any]:
    """A row for an impulse fired at ``timestamp``: its first feature is the time, in seconds."""
    row = np.ones(FEATURES)
    row[0] = float(timestamp)
    return row


class RecordLatency(beam.DoFn):
    """Records, per result, the seconds from its element's time (``row_at``) to now."""

    def __init__(self, record_dir: str) -> None:
        self._path = os.path.join(record_dir, "latency")

    def start_bundle(self) -> None:
        self._latencies: list[str] = []

    def process(self, result: base.PredictionResult) -> None:
        self._latencies.append(f"{time.time() - float(result.example[0]):.4f}")

    def finish_bundle(self) -> None:
        if self._latencies:
            append(self._path, "\n".join(self._latencies))


class ImpulseRow:
    """A row for an impulse fired at ``timestamp``: its first feature is the impulse's index
    (``rate`` impulses a second from ``start``), its second the time it fired, in seconds."""

    def __init__(self, start: float, rate: float) -> None:
        self.start, self.rate = start, rate

    def __call__(self, timestamp: Any) -> np.ndarray[Any, Any]:
        row = np.ones(FEATURES)
        row[0] = round((float(timestamp) - self.start) * self.rate)
        row[1] = float(timestamp)
        return row


class RecordResults(beam.DoFn):
    """Records, per result, ``index prediction latency`` (``ImpulseRow``'s index; seconds from
    the impulse to now) in ``<name>.results``: a streaming job's output, read after it ends."""

    def __init__(self, record_dir: str, name: str) -> None:
        self._path = os.path.join(record_dir, name + ".results")

    def start_bundle(self) -> None:
        self._lines: list[str] = []

    def process(self, result: base.PredictionResult) -> None:
        example = result.example
        latency = time.time() - float(example[1])
        self._lines.append(f"{int(example[0])} {float(result.inference)!r} {latency:.4f}")

    def finish_bundle(self) -> None:
        if self._lines:
            append(self._path, "\n".join(self._lines))


def index_of(example: Any) -> int:
    return int(example[0])


def result_index(result: base.PredictionResult) -> str:
    return str(index_of(result.example))


def values(inference: Any) -> list[float]:
    if hasattr(inference, "detach"):
        inference = inference.detach().cpu().numpy()
    return [float(v) for v in np.asarray(inference, dtype=np.float64).ravel()]


def line(branch: str, index: int, payload: Any) -> str:
    return json.dumps([branch, index, payload])


def to_line(branch: str) -> Any:
    def result(r: base.PredictionResult) -> str:
        return line(branch, index_of(r.example), values(r.inference))

    return beam.Map(result)


def keyed_to_line(branch: str) -> Any:
    def result(kv: tuple[str, base.PredictionResult]) -> str:
        key, r = kv
        return line(branch, index_of(r.example), [key, *values(r.inference)])

    return beam.Map(result)


def dead_to_lines(branch: str) -> Any:
    """A dead letter ``(batch, error info)`` becomes one line per element of its batch."""

    def lines(dead: tuple[Sequence[Any], Any]) -> Iterator[str]:
        batch, info = dead
        for element in batch:
            yield line(branch, index_of(element), str(info[1]))

    return beam.FlatMap(lines)


@dataclass
class Paths:
    """Where the models and the records of one run are."""

    sklearn_model: str
    torch_model: str
    record_dir: str
    output_prefix: str


def build_conformance(pipeline: beam.Pipeline, paths: Paths, n: int) -> None:
    """Every branch the conformance tests check, in one pipeline (one job per cluster):
    sklearn and torch, stock and turbo; keyed; dead letters, batch-whole and isolated; where
    beam-turbo comes from on the workers. Outputs are JSON lines ``[branch, index, payload]``."""
    rec = paths.record_dir
    sk_rows = (
        pipeline
        | "sklearn rows" >> beam.Create(sklearn_inputs(n))
        | "spread sk" >> (beam.Reshuffle())
    )
    sk_rows = sk_rows | "count bundles" >> beam.ParDo(CountBundles(rec))
    torch_rows = (
        pipeline | "torch rows" >> beam.Create(torch_inputs(n)) | "spread torch" >> beam.Reshuffle()
    )
    outputs = []

    sk_model = paths.sklearn_model
    # max_batch_duration_secs: Beam's stateful BatchElements, and beam-turbo's stateful
    # fused DoFn, both keeping batches in keyed state (with timers) on the runner. Their rows
    # come from a source of their own: behind a stateful step, Spark runs the stage that
    # reads sk_rows once more, and "count bundles" would count its bundles twice.
    stateful_rows = (
        pipeline
        | "sklearn rows, stateful" >> beam.Create(sklearn_inputs(n))
        | "spread sk stateful" >> beam.Reshuffle()
    )
    for rows, name, transform, handler in (
        (sk_rows, "sk_stock", base.RunInference, StockSklearn(sk_model)),
        (sk_rows, "sk_turbo", beam_turbo.RunInference, TurboSklearn(sk_model)),
        (
            stateful_rows,
            "sk_stateful_stock",
            base.RunInference,
            StockSklearn(sk_model, max_batch_duration_secs=1),
        ),
        (
            stateful_rows,
            "sk_stateful_turbo",
            beam_turbo.RunInference,
            TurboSklearn(sk_model, max_batch_duration_secs=1),
        ),
    ):
        label = name.replace("_", " ")
        outputs.append(
            rows
            | label >> transform(recorded(handler, rec, name))
            | f"{label} lines" >> to_line(name)
        )

    torch_model = paths.torch_model

    def torch_handler(cls: type[Any], name: str) -> Any:
        handler = cls(state_dict_path=torch_model, model_class=_linear(), model_params=TORCH_PARAMS)
        return recorded(handler, rec, name)

    outputs.append(
        torch_rows
        | "torch stock" >> base.RunInference(torch_handler(StockTorch, "torch_stock"))
        | "torch stock lines" >> to_line("torch_stock")
    )
    outputs.append(
        torch_rows
        | "torch turbo" >> beam_turbo.RunInference(torch_handler(TurboTorch, "torch_turbo"))
        | "torch turbo lines" >> to_line("torch_turbo")
    )

    keyed = sk_rows | "keys" >> beam.Map(lambda row: (f"k{int(row[0]) % 7}", row))
    outputs.append(
        keyed
        | "keyed stock"
        >> base.RunInference(
            base.KeyedModelHandler(beam_sklearn.SklearnModelHandlerNumpy(sk_model))
        )
        | "keyed stock lines" >> keyed_to_line("keyed_stock")
    )
    outputs.append(
        keyed
        | "keyed turbo"
        >> beam_turbo.RunInference(
            base.KeyedModelHandler(turbo_sklearn.SklearnModelHandlerNumpy(sk_model))
        )
        | "keyed turbo lines" >> keyed_to_line("keyed_turbo")
    )

    marked = sk_rows | "mark bad" >> beam.Map(_mark_bad)
    for name, transform in (
        ("dlq_stock", base.RunInference(FailingStockSklearn(sk_model))),
        ("dlq_turbo", beam_turbo.RunInference(FailingTurboSklearn(sk_model))),
        (
            "dlq_isolated",
            beam_turbo.RunInference(FailingTurboSklearn(sk_model)).with_exception_handling(
                isolate_failures=True
            ),
        ),
    ):
        if name != "dlq_isolated":
            transform = transform.with_exception_handling()
        good, dlq = marked | name >> transform
        outputs.append(good | f"{name} good" >> to_line(name + "_good"))
        outputs.append(dlq.failed_inferences | f"{name} dead" >> dead_to_lines(name + "_dead"))

    outputs.append(
        pipeline
        | "probes" >> beam.Create(range(8))
        | "spread probes" >> beam.Reshuffle()
        | "where" >> beam.ParDo(WhereBeamTurboIs())
        | "where lines" >> beam.Map(lambda t: line(*t))
    )
    (
        outputs
        | "all" >> beam.Flatten()
        | "write" >> beam.io.WriteToText(paths.output_prefix, shard_name_template="-SS-of-NN")
    )


def _linear() -> type[Any]:
    import torch

    return torch.nn.Linear


def is_marked(index: int) -> bool:
    return index % 97 == 13


def _mark_bad(row: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if is_marked(int(row[0])):
        row = row.copy()
        row[1] = BAD_MARK
    return row


def read_output(prefix: str) -> dict[str, list[tuple[int, Any]]]:
    """The lines a run wrote, by branch: ``(index, payload)`` in no particular order."""
    by_branch: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    for path in Path(prefix).parent.glob(Path(prefix).name + "*"):
        for text in path.read_text(encoding="utf-8").splitlines():
            branch, index, payload = json.loads(text)
            by_branch[branch].append((index, payload))
    return dict(by_branch)


def read_pairs(path: Path) -> list[tuple[int, int]]:
    """``pid value`` lines of a record file."""
    if not path.exists():
        return []
    return [
        (int(pid), int(value))
        for pid, value in (text.split() for text in path.read_text().splitlines())
    ]


def loads_per_pid(path: Path) -> Counter[int]:
    if not path.exists():
        return Counter()
    return Counter(int(pid) for pid in path.read_text().split())


# --- tables: RunInference(...).with_tables() against stock Beam's row by row ----------------

#: The feature columns of the Parquet rows: ``sklearn_inputs``' features, ``f0`` the index.
TABLE_FEATURES = [f"f{i}" for i in range(FEATURES)]


def write_parquet(folder: Path, n: int, files: int, row_group_rows: int) -> str:
    """``sklearn_inputs(n)`` as Parquet (``id`` and the float64 ``TABLE_FEATURES``) in
    ``files`` files of row groups of ``row_group_rows``: their pattern."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = np.stack(sklearn_inputs(n))
    folder.mkdir(parents=True, exist_ok=True)
    for part, ids in enumerate(np.array_split(np.arange(n), files)):
        columns = {"id": pa.array(ids.astype(np.int64))}
        for j, name in enumerate(TABLE_FEATURES):
            columns[name] = pa.array(rows[ids, j])
        pq.write_table(
            pa.table(columns), folder / f"part-{part}.parquet", row_group_size=row_group_rows
        )
    return str(folder / "part-*.parquet")


def table_lines(branch: str) -> Any:
    """An output table becomes one line per row: ``[branch, id, [prediction]]``."""

    def lines(scored: Any) -> Iterator[str]:
        ids, predictions = scored["id"].to_pylist(), scored["prediction"].to_pylist()
        for row_id, prediction in zip(ids, predictions, strict=True):
            yield line(branch, int(row_id), [float(prediction)])

    return beam.FlatMap(lines)


def dead_rows_to_lines(branch: str) -> Any:
    """A dead letter of rows (dicts) becomes one line per row: ``[branch, id, error]``."""

    def lines(dead: tuple[Sequence[Any], Any]) -> Iterator[str]:
        rows, info = dead
        for row in rows:
            yield line(branch, int(row["id"]), str(info[1]))

    return beam.FlatMap(lines)


def nan_marked(table: Any) -> Any:
    """``table`` with NaN in ``f1`` of its marked rows (``is_marked``): LinearRegression
    refuses NaN, so exactly those rows fail."""
    import pyarrow as pa
    import pyarrow.compute as pc

    marked = pa.array([is_marked(int(i)) for i in table["id"].to_pylist()])
    column = pc.if_else(marked, pa.scalar(float("nan")), table["f1"])
    return table.set_column(table.schema.get_field_index("f1"), "f1", column)


def stock_row(row: dict[str, Any]) -> tuple[int, np.ndarray[Any, Any]]:
    return int(row["id"]), np.array([row[name] for name in TABLE_FEATURES])


def build_tables(pipeline: beam.Pipeline, pattern: str, model: str, batch: int) -> None:
    """The tables workload, in one pipeline: stock Beam row by row (``ReadFromParquet``, a
    keyed sklearn handler); beam-turbo on tables (``ReadFromParquetBatched``,
    ``with_tables``) within bundles, across bundles in keyed state
    (``max_batch_duration_secs``), and with NaN rows isolated into the dead letters. Batches
    of ``batch`` rows. Outputs are JSON lines ``[branch, id, payload]``, each branch from a
    read of its own."""
    outputs = [
        pipeline
        | "stock read" >> beam.io.ReadFromParquet(pattern)
        | "stock rows" >> beam.Map(stock_row)
        | "stock"
        >> base.RunInference(base.KeyedModelHandler(beam_sklearn.SklearnModelHandlerNumpy(model)))
        | "stock lines" >> beam.Map(lambda kv: line("tables_stock", kv[0], values(kv[1].inference)))
    ]
    sizes = {"min_batch_size": batch, "max_batch_size": batch}
    for name, duration in (
        ("tables_turbo", {}),
        ("tables_stateful", {"max_batch_duration_secs": 1}),
    ):
        handler = turbo_sklearn.SklearnModelHandlerNumpy(model, **sizes, **duration)
        outputs.append(
            pipeline
            | f"{name} read" >> beam.io.ReadFromParquetBatched(pattern)
            | name
            >> beam_turbo.RunInference(handler).with_tables(TABLE_FEATURES, keep_columns=["id"])
            | f"{name} lines" >> table_lines(name)
        )
    handler = turbo_sklearn.SklearnModelHandlerNumpy(model, **sizes)
    good, dlq = (
        pipeline
        | "tables_dlq read" >> beam.io.ReadFromParquetBatched(pattern)
        | "mark NaN" >> beam.Map(nan_marked)
        | "tables_dlq"
        >> beam_turbo.RunInference(handler)
        .with_tables(TABLE_FEATURES, keep_columns=["id"])
        .with_exception_handling(isolate_failures=True)
    )
    outputs.append(good | "tables_dlq good" >> table_lines("tables_dlq_good"))
    outputs.append(
        dlq.failed_inferences | "tables_dlq dead" >> dead_rows_to_lines("tables_dlq_dead")
    )
    (
        outputs
        | "all" >> beam.Flatten()
        | "write" >> beam.io.WriteToText(pipeline_output(pattern), shard_name_template="-SS-of-NN")
    )


def pipeline_output(pattern: str) -> str:
    """Where the tables workload writes: beside its input."""
    return str(Path(pattern).parent.parent / "out" / "lines")
