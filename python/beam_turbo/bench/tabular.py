"""tabular: scoring a table, Parquet in and Parquet out, six ways (issue 22).

The job: 8 Parquet files of an int64 ``id`` and 16 float32 features ``f0``..``f15`` (written
once per size by the bench, seeded), a model fitted here on a small sample, and Parquet out
with ``id`` and ``prediction``. The variants:

- ``stock``: Beam's ``ReadFromParquet`` -> a ``Map`` to ``(id, float32[16])`` ->
  ``RunInference(KeyedModelHandler(<Beam's numpy handler>))`` -> a ``Map`` to a dict ->
  ``WriteToParquet``: the pipeline a Beam user writes today.
- ``patched``: the same pipeline after :func:`beam_turbo.patch`.
- ``turbo``: ``ReadFromParquetBatched`` -> beam-turbo's ``RunInference(...).with_tables(...)``
  -> ``WriteToParquetBatched`` (skipped while ``RunInference`` has no ``with_tables``).
- ``plain``: plain Beam, no RunInference: ``ReadFromParquetBatched`` -> a ``ParDo`` that
  stacks each table's features and calls ``predict`` -> ``WriteToParquetBatched``.
- ``arrow``: pyarrow and numpy alone, no engine: read, predict on 64k-row chunks, write.
- ``spark``: pyspark's ``predict_batch_udf`` on ``local[2]``, batches of 4,096, Arrow on
  (skipped where pyspark is not importable).

Each variant runs in a process of its own (:class:`beam_turbo.bench.real_models.Worker`), so
that ``patch()`` and Spark's JVM stay in theirs and each peak memory is its own; the parent
asks each in turn for a small and a large run, round after round, so that load on a shared
machine falls on all alike. Throughput is the slope between the two (start-up cancels out),
the median over rounds; the first run in each process is a warm-up, untimed (Spark's also
before each round: its Python workers exit after a minute idle). Every run's
output, warm-up included, is read back and checked row by row, by id, against the model's
``predict``; any mismatch makes the command exit non-zero.

Models are :data:`MODELS`, name -> :class:`TabularModel`: a new model (XGBoost, a torch MLP)
is one entry giving how to fit and save it, load it as a ``predict`` function, and Beam's and
beam-turbo's handlers for it.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import math
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np

from beam_turbo.bench._timing import print_markdown_table
from beam_turbo.bench.real_models import Worker

FEATURES = [f"f{i}" for i in range(16)]
FILES = 8
ARROW_CHUNK = 65_536  # rows per predict call in the no-engine variant
SPARK_BATCH = 4_096
SAMPLE = 1_000  # rows the model is fitted on
#: Agreement with ``predict`` "within float32 rounding": predictions here are of order 1 to 10,
#: where a float32 ulp is 1e-7 to 1e-6, and a variant may sum the 16 products in another order.
RTOL = ATOL = 1e-5


# --- models -----------------------------------------------------------------------------------


def _as_is(features: np.ndarray[Any, Any]) -> Any:
    return features


@dataclass(frozen=True)
class TabularModel:
    """A model the bench can score tables with. Functions, not objects, so that a worker
    process finds the same model by its name alone."""

    title: str
    #: (features float32[n, 16], targets, folder) -> the path of the fitted, saved model
    fit: Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any], str], str]
    #: path -> ``predict``: float32[n, 16] -> predictions[n]
    load: Callable[[str], Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]]
    #: path -> Beam's handler on numpy rows (after ``patch()``, beam-turbo's in its place)
    beam_handler: Callable[[str], Any]
    #: path -> beam-turbo's handler, for ``RunInference(...).with_tables``
    turbo_handler: Callable[[str], Any]
    #: a row's features (float32[16]) -> the example Beam's handler takes
    example: Callable[[np.ndarray[Any, Any]], Any] = _as_is
    #: why the model cannot run here (its package is not installed), or None
    unavailable: Callable[[], str | None] = lambda: None


def _fit_linear(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], folder: str) -> str:
    from sklearn.linear_model import LinearRegression

    path = os.path.join(folder, "linear.pkl")
    with open(path, "wb") as f:
        pickle.dump(LinearRegression().fit(x, y), f)
    return path


def _load_pickled_predict(path: str) -> Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
    with open(path, "rb") as f:
        predict: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]] = pickle.load(f).predict
    return predict


def _sklearn_beam_handler(path: str) -> Any:
    # Imported when called: after patch(), this name is beam-turbo's handler.
    from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy

    return SklearnModelHandlerNumpy(model_uri=path)


def _sklearn_turbo_handler(path: str) -> Any:
    from beam_turbo.sklearn import SklearnModelHandlerNumpy

    return SklearnModelHandlerNumpy(model_uri=path)


def _fit_boosted(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], folder: str) -> str:
    from sklearn.ensemble import HistGradientBoostingRegressor

    path = os.path.join(folder, "boosted.pkl")
    with open(path, "wb") as f:
        pickle.dump(HistGradientBoostingRegressor(max_iter=100, random_state=0).fit(x, y), f)
    return path


def _fit_xgboost(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], folder: str) -> str:
    """An ``XGBRegressor``, pickled (for beam-turbo's scikit-learn handler, which scores it
    through its scikit-learn ``predict``) and saved as JSON beside it (for Beam's XGBoost
    handler, which loads ``model_state``)."""
    import xgboost  # type: ignore[import-not-found, unused-ignore]

    model = xgboost.XGBRegressor(n_estimators=100, max_depth=6, random_state=0).fit(x, y)
    path = os.path.join(folder, "xgboost.pkl")
    with open(path, "wb") as f:
        pickle.dump(model, f)
    model.save_model(_xgboost_json(path))
    return path


def _xgboost_json(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def _xgboost_beam_handler(path: str) -> Any:
    import xgboost  # type: ignore[import-not-found, unused-ignore]
    from apache_beam.ml.inference.xgboost_inference import XGBoostModelHandlerNumpy

    return XGBoostModelHandlerNumpy(
        model_class=xgboost.XGBRegressor, model_state=_xgboost_json(path)
    )


def _one_row_matrix(features: np.ndarray[Any, Any]) -> Any:
    """A row as Beam's XGBoost numpy handler takes it: it calls ``predict`` on each element,
    so each is a matrix, of one row."""
    return features.reshape(1, -1)


def _xgboost_unavailable() -> str | None:
    import importlib.util

    for package in ("xgboost", "datatable"):  # Beam's XGBoost handler imports datatable
        if importlib.util.find_spec(package) is None:
            return f"not available: {package} is not importable (pip install xgboost-cpu datatable)"
    return None


#: The torch MLP's layer widths (16 features in, one prediction out).
MLP_WIDTHS = (16, 256, 256, 1)


def _mlp() -> Any:
    import torch

    layers: list[Any] = []
    for width_in, width_out in itertools.pairwise(MLP_WIDTHS):
        layers += [torch.nn.Linear(width_in, width_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _fit_mlp(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], folder: str) -> str:
    """A seeded, untrained MLP: the bench measures scoring, not fitting."""
    import torch

    torch.manual_seed(0)
    path = os.path.join(folder, "mlp.pt")
    torch.save(_mlp().state_dict(), path)
    return path


def _load_mlp_predict(path: str) -> Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
    import torch

    model = _mlp()
    model.load_state_dict(torch.load(path))
    model.eval()

    def predict(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        with torch.no_grad():
            scored: np.ndarray[Any, Any] = model(torch.from_numpy(x)).numpy()[:, 0]
        return scored

    return predict


def _torch_example(features: np.ndarray[Any, Any]) -> Any:
    import torch

    return torch.from_numpy(features)


def _torch_beam_handler(path: str) -> Any:
    # Imported when called: after patch(), this name is beam-turbo's handler.
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

    return PytorchModelHandlerTensor(state_dict_path=path, model_class=_mlp, model_params={})


def _torch_turbo_handler(path: str) -> Any:
    from beam_turbo.pytorch import PytorchModelHandlerTensor

    return PytorchModelHandlerTensor(state_dict_path=path, model_class=_mlp, model_params={})


MODELS: dict[str, TabularModel] = {
    "linear": TabularModel(
        title="scikit-learn LinearRegression on 16 float32 features",
        fit=_fit_linear,
        load=_load_pickled_predict,
        beam_handler=_sklearn_beam_handler,
        turbo_handler=_sklearn_turbo_handler,
    ),
    "boosted": TabularModel(
        title="scikit-learn HistGradientBoostingRegressor (100 trees) on 16 float32 features",
        fit=_fit_boosted,
        load=_load_pickled_predict,
        beam_handler=_sklearn_beam_handler,
        turbo_handler=_sklearn_turbo_handler,
    ),
    "xgboost": TabularModel(
        title="XGBoost XGBRegressor (100 trees, depth 6) on 16 float32 features",
        fit=_fit_xgboost,
        load=_load_pickled_predict,
        beam_handler=_xgboost_beam_handler,
        turbo_handler=_sklearn_turbo_handler,
        example=_one_row_matrix,
        unavailable=_xgboost_unavailable,
    ),
    "mlp": TabularModel(
        title="torch MLP 16-256-256-1 on 16 float32 features",
        fit=_fit_mlp,
        load=_load_mlp_predict,
        beam_handler=_torch_beam_handler,
        turbo_handler=_torch_turbo_handler,
        example=_torch_example,
    ),
}


# --- data and checks --------------------------------------------------------------------------


def _features(rng: np.random.Generator, rows: int) -> np.ndarray[Any, Any]:
    return rng.standard_normal((rows, len(FEATURES)), dtype=np.float32)


def fit_model(model: TabularModel, folder: str, seed: int) -> str:
    """Fit ``model`` on a seeded sample of the data's distribution; the saved model's path."""
    rng = np.random.default_rng([seed, 1])
    x = _features(rng, SAMPLE)
    weights = rng.standard_normal(len(FEATURES))
    y = x @ weights + 0.5 + 0.01 * rng.standard_normal(SAMPLE)
    return model.fit(x, y.astype(np.float32), folder)


def write_inputs(
    folder: str,
    rows: int,
    seed: int,
    predict: Callable[[np.ndarray[Any, Any]], Any],
    row_group: int | None = None,
) -> np.ndarray[Any, Any]:
    """Write ``rows`` rows into ``FILES`` Parquet files in ``folder`` (ids 0..rows-1, seeded
    per size and file), in row groups of ``row_group`` rows (None: pyarrow's default, up to
    1,048,576); the model's predictions for them, indexed by id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    expected: np.ndarray[Any, Any] | None = None
    bounds = [rows * i // FILES for i in range(FILES + 1)]
    for i in range(FILES):
        start, stop = bounds[i], bounds[i + 1]
        x = _features(np.random.default_rng([seed, rows, i]), stop - start)
        columns = {"id": pa.array(np.arange(start, stop, dtype=np.int64))}
        columns.update({name: pa.array(x[:, j]) for j, name in enumerate(FEATURES)})
        pq.write_table(
            pa.table(columns),
            os.path.join(folder, f"part-{i:05d}.parquet"),
            row_group_size=row_group,
        )
        predictions = np.asarray(predict(x)).reshape(-1)
        if expected is None:
            expected = np.empty(rows, dtype=predictions.dtype)
        expected[start:stop] = predictions
    assert expected is not None
    return expected


@dataclass(frozen=True)
class Check:
    """One run's output against ``predict``."""

    rows: int
    problem: str | None  # None: every id once, every prediction within tolerance
    max_abs_diff: float


def output_files(folder: str) -> list[str]:
    """The Parquet files a variant wrote (not Spark's ``_SUCCESS`` nor its ``.crc`` files)."""
    found = glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True)
    return sorted(p for p in found if not os.path.basename(p).startswith((".", "_")))


def check_output(folder: str, expected: np.ndarray[Any, Any]) -> Check:
    """Read a run's output back and compare it with ``expected`` (predictions by id): each id
    exactly once, each prediction ``isclose`` to the expected one (``RTOL``, ``ATOL``)."""
    import pyarrow.parquet as pq

    files = output_files(folder)
    if not files:
        return Check(0, f"no Parquet files under {folder}", math.inf)
    ids_parts, predictions_parts = [], []
    for path in files:
        table = pq.read_table(path)
        if table.num_rows == 0:
            continue
        missing = {"id", "prediction"} - set(table.column_names)
        if missing:
            return Check(0, f"{path} has no column {sorted(missing)}", math.inf)
        ids_parts.append(table.column("id").to_numpy())
        predictions_parts.append(
            np.asarray(table.column("prediction").to_numpy(), dtype=np.float64).reshape(-1)
        )
    ids = np.concatenate(ids_parts) if ids_parts else np.empty(0, np.int64)
    predictions = np.concatenate(predictions_parts) if ids_parts else np.empty(0)
    rows = len(ids)
    if rows and (ids.min() < 0 or ids.max() >= len(expected)):
        return Check(rows, f"ids outside 0..{len(expected) - 1}", math.inf)
    counts = np.bincount(ids, minlength=len(expected))
    if rows != len(expected) or not (counts == 1).all():
        lost, twice = int((counts == 0).sum()), int((counts > 1).sum())
        return Check(
            rows,
            f"{rows:,} rows for {len(expected):,} ids: {lost:,} lost, {twice:,} repeated",
            math.inf,
        )
    want = expected[ids].astype(np.float64)
    diff = np.abs(predictions - want)
    worst = float(np.nanmax(diff)) if rows else 0.0
    wrong = ~np.isclose(predictions, want, rtol=RTOL, atol=ATOL)
    if wrong.any():
        first = int(np.flatnonzero(wrong)[0])
        return Check(
            rows,
            f"{int(wrong.sum()):,} predictions differ from predict's, e.g. id {ids[first]}: "
            f"{predictions[first]!r} != {want[first]!r}",
            worst,
        )
    return Check(rows, None, worst)


# --- the variants (they run in the workers) ---------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What one run of a variant needs."""

    model: str  # a key of MODELS
    model_path: str
    dtype: str  # predict's output dtype
    inputs: str  # a folder of part-*.parquet
    output: str  # a folder to write into
    scratch: str  # the bench's temp dir, for Spark's


def _input_pattern(job: Job) -> str:
    return os.path.join(job.inputs, "part-*.parquet")


def _table_schema(job: Job) -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.int64()), ("prediction", pa.from_numpy_dtype(job.dtype))])


class _KeyedFeatures:
    """A row as Beam's keyed handler takes it: ``(id, example)``."""

    def __init__(self, model: str) -> None:
        self._model = model

    def __call__(self, row: dict[str, Any]) -> tuple[int, Any]:
        features = np.array([row[name] for name in FEATURES], dtype=np.float32)
        return row["id"], MODELS[self._model].example(features)


def _prediction_row(keyed: tuple[int, Any]) -> dict[str, Any]:
    key, result = keyed
    return {"id": key, "prediction": float(np.asarray(result.inference).reshape(-1)[0])}


def _run_rows(job: Job, state: dict[str, Any]) -> None:
    """``stock`` and ``patched``: the row-by-row pipeline with Beam's own classes."""
    import pyarrow as pa
    from apache_beam.ml.inference import base

    handler = base.KeyedModelHandler(MODELS[job.model].beam_handler(job.model_path))
    schema = pa.schema([("id", pa.int64()), ("prediction", pa.float64())])
    with beam.Pipeline() as pipeline:
        _ = (
            pipeline
            | "Read" >> beam.io.ReadFromParquet(_input_pattern(job), columns=["id", *FEATURES])
            | "To arrays" >> beam.Map(_KeyedFeatures(job.model))
            | "RunInference" >> base.RunInference(handler)
            | "To rows" >> beam.Map(_prediction_row)
            | "Write"
            >> beam.io.WriteToParquet(
                os.path.join(job.output, "part"), schema, file_name_suffix=".parquet"
            )
        )


def _run_turbo(job: Job, state: dict[str, Any]) -> None:
    """``turbo``: beam-turbo's RunInference over tables."""
    import beam_turbo

    handler = MODELS[job.model].turbo_handler(job.model_path)
    with beam.Pipeline() as pipeline:
        _ = (
            pipeline
            | "Read"
            >> beam.io.ReadFromParquetBatched(_input_pattern(job), columns=["id", *FEATURES])
            | "RunInference"
            >> beam_turbo.RunInference(handler).with_tables(
                feature_columns=FEATURES, keep_columns=["id"], prediction_column="prediction"
            )
            | "Write"
            >> beam.io.WriteToParquetBatched(
                os.path.join(job.output, "part"), _table_schema(job), file_name_suffix=".parquet"
            )
        )


def _feature_matrix(table: Any) -> np.ndarray[Any, Any]:
    """A table's 16 feature columns as one float32[n, 16] matrix."""
    return np.column_stack([table.column(name).to_numpy() for name in FEATURES]).astype(
        np.float32, copy=False
    )


class _PredictTables(beam.DoFn):
    """The ``plain`` variant's step: a table in, a table (id, prediction) out."""

    def __init__(self, model: str, path: str) -> None:
        self._model, self._path = model, path
        self._predict: Callable[[np.ndarray[Any, Any]], Any] | None = None

    def setup(self) -> None:
        self._predict = MODELS[self._model].load(self._path)

    def process(self, table: Any) -> Any:
        import pyarrow as pa

        assert self._predict is not None
        predictions = np.asarray(self._predict(_feature_matrix(table))).reshape(-1)
        yield pa.table({"id": table.column("id"), "prediction": predictions})


def _run_plain(job: Job, state: dict[str, Any]) -> None:
    """``plain``: plain Beam over tables, a ParDo that calls ``predict``, no RunInference."""
    with beam.Pipeline() as pipeline:
        _ = (
            pipeline
            | "Read"
            >> beam.io.ReadFromParquetBatched(_input_pattern(job), columns=["id", *FEATURES])
            | "Predict" >> beam.ParDo(_PredictTables(job.model, job.model_path))
            | "Write"
            >> beam.io.WriteToParquetBatched(
                os.path.join(job.output, "part"), _table_schema(job), file_name_suffix=".parquet"
            )
        )


def _run_arrow(job: Job, state: dict[str, Any]) -> None:
    """``arrow``: pyarrow and numpy alone, file by file, ``predict`` on 64k-row chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    predict = MODELS[job.model].load(job.model_path)
    os.makedirs(job.output, exist_ok=True)
    schema = _table_schema(job)
    for path in sorted(glob.glob(_input_pattern(job))):
        out = os.path.join(job.output, os.path.basename(path))
        with pq.ParquetWriter(out, schema, compression="none") as writer:
            for batch in pq.ParquetFile(path).iter_batches(
                batch_size=ARROW_CHUNK, columns=["id", *FEATURES]
            ):
                predictions = np.asarray(predict(_feature_matrix(batch))).reshape(-1)
                writer.write_table(
                    pa.table({"id": batch.column("id"), "prediction": predictions}, schema=schema)
                )


def _spark_predict_fn(model: str, path: str) -> Callable[[], Callable[..., Any]]:
    """``predict_batch_udf``'s ``make_predict_fn``: the model, loaded once per Python
    worker, on a batch's features (a ``struct`` of the 16 columns: one float32[n, 16])."""

    def make_predict_fn() -> Callable[..., Any]:
        predict = MODELS[model].load(path)

        def predict_matrix(matrix: np.ndarray[Any, Any]) -> Any:
            return np.asarray(predict(matrix.astype(np.float32, copy=False))).reshape(-1)

        return predict_matrix

    return make_predict_fn


def _spark_session(scratch: str) -> Any:
    """A quiet ``local[2]`` session whose temp files stay under ``scratch``."""
    from pyspark.sql import SparkSession

    temp = os.path.join(scratch, "spark-tmp")
    os.makedirs(temp, exist_ok=True)
    os.environ["TMPDIR"] = temp  # the Python workers' (they inherit it)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    java_options = f"-Djava.io.tmpdir={temp} -XX:-UsePerfData"  # no /tmp/hsperfdata_* file
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("beam-turbo bench tabular")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.local.dir", os.path.join(scratch, "spark-local"))
        .config("spark.sql.warehouse.dir", os.path.join(scratch, "spark-warehouse"))
        .config("spark.driver.extraJavaOptions", java_options)
        .config("spark.executor.extraJavaOptions", java_options)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _run_spark(job: Job, state: dict[str, Any]) -> None:
    """``spark``: ``predict_batch_udf`` on ``local[2]``, Parquet in and out."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.functions import struct
    from pyspark.sql.types import DoubleType, FloatType

    if "spark" not in state:
        state["spark"] = _spark_session(job.scratch)
    spark = state["spark"]
    udf = predict_batch_udf(
        _spark_predict_fn(job.model, job.model_path),
        return_type=FloatType() if np.dtype(job.dtype) == np.float32 else DoubleType(),
        batch_size=SPARK_BATCH,
    )
    table = spark.read.parquet(job.inputs)
    scored = table.select("id", udf(struct(*FEATURES)).alias("prediction"))
    scored.write.mode("overwrite").option("compression", "none").parquet(job.output)


def _stop_spark(state: dict[str, Any]) -> None:
    if "spark" in state:
        state.pop("spark").stop()


def _turbo_unavailable() -> str | None:
    import beam_turbo

    if not hasattr(beam_turbo.RunInference, "with_tables"):
        return "not available: RunInference has no with_tables"
    return None


def _spark_unavailable() -> str | None:
    import importlib.util

    if importlib.util.find_spec("pyspark") is None:
        return "not available: pyspark is not importable (pip install pyspark; Java 17+)"
    return None


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    run: Callable[[Job, dict[str, Any]], None]
    unavailable: Callable[[], str | None] = lambda: None
    patch: bool = False
    #: Run the small run once more, untimed, before each round's timed pair: Spark's Python
    #: workers exit after a minute idle (while the other variants run), and the first job
    #: after that pays for starting them again (some 10 s here) where the next does not.
    rewarm: bool = False


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "stock",
            "Beam's own classes: ReadFromParquet -> RunInference(KeyedModelHandler) -> "
            "WriteToParquet",
            _run_rows,
        ),
        Variant("patched", "the same pipeline after beam_turbo.patch()", _run_rows, patch=True),
        Variant(
            "turbo",
            "beam-turbo columnar: ReadFromParquetBatched -> RunInference.with_tables -> "
            "WriteToParquetBatched",
            _run_turbo,
            _turbo_unavailable,
        ),
        Variant(
            "plain",
            "plain Beam, no RunInference: ReadFromParquetBatched -> ParDo(predict) -> "
            "WriteToParquetBatched",
            _run_plain,
        ),
        Variant("arrow", "pyarrow + numpy alone, no engine (64k-row chunks)", _run_arrow),
        Variant(
            "spark",
            f"Spark predict_batch_udf, local[2], batches of {SPARK_BATCH:,}, Arrow on",
            _run_spark,
            _spark_unavailable,
            rewarm=True,
        ),
    )
}


# --- a worker ---------------------------------------------------------------------------------


def _tree_rss_kib(pid: int) -> int:
    """The resident memory of ``pid`` and all its descendants, summed (KiB); 0 for a process
    that has gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            total = int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
        children: list[int] = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return 0
    return total + sum(_tree_rss_kib(child) for child in children)


def _tree_cpu_seconds(pid: int | None = None) -> float:
    """The CPU time (user and system) of ``pid`` (default: this process) and its live
    descendants, plus that of the children this process has reaped: what a run cost in work,
    where the wall clock of a loaded machine also counts the waits for a core."""
    own = pid is None
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        children: list[int] = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except (OSError, ValueError, IndexError):
        return 0.0
    total += sum(_tree_cpu_seconds(child) for child in children)
    if own:
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += reaped.ru_utime + reaped.ru_stime
    return total


class _TreePeak:
    """Samples the resident memory of this process and its descendants (Spark's JVM and its
    Python workers) every ``interval`` seconds, keeping the largest sum."""

    def __init__(self, interval: float = 0.2) -> None:
        self.peak_kib = 0
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_kib = max(self.peak_kib, _tree_rss_kib(os.getpid()))

    def peak_mib(self) -> float:
        """The larger of this process's own peak and the sampled peak of its process tree.

        Its own is ``VmHWM``, the high-water mark since its own start: ``ru_maxrss`` would do
        but for the fork it started with, whose copy of the parent's pages counts in it (the
        parent's resident memory, some 900 MiB here, in every variant's figure)."""
        own = 0
        with (
            contextlib.suppress(OSError, ValueError, StopIteration),
            open("/proc/self/status") as f,
        ):
            own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        if not own:
            own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(own, self.peak_kib) / 1024


#: The frameworks whose import a worker reports (each costs hundreds of MiB resident).
FRAMEWORKS = ("torch", "tensorflow", "xgboost")


def _frameworks() -> list[str]:
    return [name for name in FRAMEWORKS if name in sys.modules]


def _serve(config_json: str) -> None:
    # Replies go to the real stdout; anything else printing there (Spark's JVM, Beam) goes to
    # stderr, which the parent sends to a log file.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(message: dict[str, Any]) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    state: dict[str, Any] = {}
    try:
        config = json.loads(config_json)
        variant = VARIANTS[config["variant"]]
        spec = config["spec"]
        if variant.patch:
            import beam_turbo

            beam_turbo.patch()
        elif variant.name == "stock":
            # The bench imported beam_turbo, whose hook keeps torch out of Beam's inference
            # module: stock Beam's pipeline imports it (Beam 2.77, where torch is installed).
            from beam_turbo._beam import lazy_torch

            lazy_torch.uninstall()
        import pyarrow.parquet  # noqa: F401

        MODELS[config["framework"]].load(spec["model_path"])  # the framework imported now too
        peak = _TreePeak()
    except Exception:
        reply({"error": traceback.format_exc()})
        return
    reply({"ready": True})
    try:
        for line in sys.stdin:
            command = json.loads(line)
            try:
                if command["op"] == "stop":
                    _stop_spark(state)
                    reply({})
                    return
                if command["op"] == "peak":
                    reply({"peak_mib": peak.peak_mib(), "frameworks": _frameworks()})
                    continue
                job = Job(
                    model=config["framework"],
                    model_path=spec["model_path"],
                    dtype=spec["dtype"],
                    inputs=command["inputs"],
                    output=command["output"],
                    scratch=spec["scratch"],
                )
                start, cpu = time.perf_counter(), _tree_cpu_seconds()
                variant.run(job, state)
                reply(
                    {
                        "seconds": time.perf_counter() - start,
                        "cpu_seconds": _tree_cpu_seconds() - cpu,
                    }
                )
            except Exception:
                reply({"error": traceback.format_exc()})
    finally:
        _stop_spark(state)


# --- the parent -------------------------------------------------------------------------------


@dataclass
class Measured:
    """What the rounds found for one variant."""

    small: int
    large: int
    slopes: list[float] = field(default_factory=list)  # seconds per row
    cpu_slopes: list[float] = field(default_factory=list)  # CPU seconds per row
    peak_mib: float = math.nan
    peak_small_mib: float = math.nan  # after the warm-up, a small run only
    frameworks: list[str] = field(default_factory=list)  # of FRAMEWORKS, imported
    checked_runs: int = 0
    checked_rows: int = 0
    max_abs_diff: float = 0.0
    problems: list[str] = field(default_factory=list)

    def rate(self, which: Callable[[Sequence[float]], float] = statistics.median) -> float:
        """Rows per second of the median slope (or ``min``/``max`` ones); NaN if none."""
        return 1 / which(self.slopes) if self.slopes else math.nan

    def cpu_rate(self) -> float:
        """Rows per CPU second, of the median CPU slope; NaN if none."""
        return 1 / statistics.median(self.cpu_slopes) if self.cpu_slopes else math.nan


def _format_rate(rate: float) -> str:
    if math.isnan(rate):
        return "n/a"
    for scale, unit in ((1e6, "M"), (1e3, "k")):
        if rate >= scale * 0.9995:  # 999,600 is 1M, not 1e+03k
            return f"{rate / scale:.3g}{unit}"
    return f"{rate:.3g}"


def measure_model(
    model_name: str,
    variants: Sequence[str],
    sizes: dict[str, tuple[int, int]],
    rounds: int,
    seed: int,
    say: Callable[[str], None] = print,
    row_group: int | None = None,
) -> dict[str, Measured]:
    """Fit the model, write the inputs of every size once, then run the variants' workers:
    a warm-up run each, then ``rounds`` rounds of a small and a large run, variants in turn,
    every output checked."""
    model = MODELS[model_name]
    found = {v: Measured(*sizes[v]) for v in variants}
    with tempfile.TemporaryDirectory(prefix="beam-turbo-tabular-") as folder:
        model_path = fit_model(model, folder, seed)
        predict = model.load(model_path)
        dtype = str(np.asarray(predict(np.zeros((1, len(FEATURES)), np.float32))).dtype)
        expected: dict[int, np.ndarray[Any, Any]] = {}
        start = time.perf_counter()
        for rows in sorted({n for v in variants for n in sizes[v]}):
            expected[rows] = write_inputs(
                os.path.join(folder, "in", str(rows)), rows, seed, predict, row_group
            )
        say(f"  inputs written in {time.perf_counter() - start:.1f} s: {sorted(expected)} rows")
        spec = {"model_path": model_path, "dtype": dtype, "scratch": folder}
        runs = iter(range(1 << 62))

        def command(rows: int, variant: str) -> dict[str, Any]:
            output = os.path.join(folder, "out", variant, str(next(runs)))
            return {"op": "run", "inputs": os.path.join(folder, "in", str(rows)), "output": output}

        def check(variant: str, sent: dict[str, Any], rows: int) -> None:
            result = check_output(sent["output"], expected[rows])
            measured = found[variant]
            measured.checked_runs += 1
            measured.checked_rows += result.rows
            measured.max_abs_diff = max(measured.max_abs_diff, result.max_abs_diff)
            if result.problem is not None:
                measured.problems.append(f"a run of {rows:,} rows: {result.problem}")
            shutil.rmtree(sent["output"], ignore_errors=True)

        workers: dict[str, Worker] = {}
        try:
            for v in variants:
                log = os.path.join(folder, f"{v}.log")
                workers[v] = Worker(model_name, v, spec, (), log, module=__name__)
            # They start side by side; each runs its small run once, untimed (the first run in
            # a process pays for first calls, JIT and caches), and that output is checked too.
            start = time.perf_counter()
            warm_ups = {v: command(sizes[v][0], v) for v in variants}
            for v, worker in workers.items():
                worker.send(**warm_ups[v])
            alive = []
            for v, worker in workers.items():
                try:
                    worker.receive()  # ready
                    worker.receive()  # warmed up
                    check(v, warm_ups[v], sizes[v][0])
                    found[v].peak_small_mib = worker.ask(op="peak")["peak_mib"]
                    alive.append(v)
                except RuntimeError as error:
                    found[v].problems.append(str(error))
                    say(f"  {v}: FAILED\n{error}")
            say(f"  workers started and warmed up in {time.perf_counter() - start:.1f} s")
            for n in range(rounds):
                for v in list(alive):
                    small, large = sizes[v]
                    start = time.perf_counter()
                    try:
                        if VARIANTS[v].rewarm:
                            sent = command(small, v)
                            workers[v].ask(**sent)
                            check(v, sent, small)
                        seconds, cpu = [], []
                        for rows in (small, large):
                            sent = command(rows, v)
                            reply = workers[v].ask(**sent)
                            seconds.append(reply["seconds"])
                            cpu.append(reply["cpu_seconds"])
                            check(v, sent, rows)
                    except RuntimeError as error:
                        found[v].problems.append(str(error))
                        alive.remove(v)
                        say(f"  round {n + 1}/{rounds}, {v}: FAILED\n{error}")
                        continue
                    slope = (seconds[1] - seconds[0]) / (large - small)
                    cpu_slope = (cpu[1] - cpu[0]) / (large - small)
                    if cpu_slope > 0:
                        found[v].cpu_slopes.append(cpu_slope)
                    rate = "the large run was the faster: no slope"
                    if slope > 0:  # else the machine's load swamped the difference
                        found[v].slopes.append(slope)
                        rate = f"{1 / slope:,.0f} rows/s"
                    say(
                        f"  round {n + 1}/{rounds}, {v}: {rate} ({seconds[0]:.2f} s, "
                        f"{seconds[1]:.2f} s; CPU {cpu[0]:.2f} s, {cpu[1]:.2f} s; "
                        f"{time.perf_counter() - start:.1f} s in all)"
                    )
            for v in alive:
                reply = workers[v].ask(op="peak")
                found[v].peak_mib = reply["peak_mib"]
                found[v].frameworks = reply["frameworks"]
        finally:
            for worker in workers.values():
                worker.close()
    return found


def commit() -> str:
    """The beam-turbo commit that ran (with a mark if the tree had changes), or its version."""
    import beam_turbo

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(beam_turbo.__file__))))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"beam-turbo {beam_turbo.__version__} (not a git checkout)"
    return head + (" with uncommitted changes" if dirty else "")


def print_results(
    model_name: str,
    variants: Sequence[str],
    found: dict[str, Measured],
    skipped: dict[str, str],
    rounds: int,
) -> bool:
    """The table of one model's run; whether every variant ran and every output checked out."""
    print(
        f"\ntabular, {MODELS[model_name].title}: Parquet in ({FILES} files: id and "
        f"{len(FEATURES)} float32 features) and out (id, prediction), on the DirectRunner "
        f"where Beam runs; rows/s is the median over {rounds} interleaved round(s) of the "
        "slope between a small and a large run\n"
    )

    def ratio(value: float, base: float) -> str:
        return "n/a" if math.isnan(value / base) else f"{value / base:.2f}x"

    stock = found["stock"].rate() if "stock" in found else math.nan
    plain = found.get("plain")
    header = [
        "variant",
        "rows/s (median)",
        "spread (min-max)",
        "vs stock Beam",
        "vs plain Beam",
        "rows per CPU s",
        "CPU vs plain",
        "peak MiB: small",
        "peak MiB: all",
        "rows: small, large",
    ]
    rows = []
    for name in VARIANTS:
        if name in skipped:
            rows.append([f"{name}: {VARIANTS[name].label}", skipped[name]] + [""] * 8)
            continue
        if name not in found:
            continue
        measured = found[name]
        rate = measured.rate()
        spread = (
            f"{_format_rate(measured.rate(max))}-{_format_rate(measured.rate(min))}"
            if measured.slopes
            else "n/a"
        )
        rows.append(
            [
                f"{name}: {VARIANTS[name].label}",
                _format_rate(rate) if not measured.problems else "FAILED",
                spread,
                ratio(rate, stock),
                ratio(rate, plain.rate() if plain else math.nan),
                _format_rate(measured.cpu_rate()),
                ratio(measured.cpu_rate(), plain.cpu_rate() if plain else math.nan),
                "n/a" if math.isnan(measured.peak_small_mib) else f"{measured.peak_small_mib:,.0f}",
                "n/a" if math.isnan(measured.peak_mib) else f"{measured.peak_mib:,.0f}",
                f"{measured.small:,}, {measured.large:,}",
            ]
        )
    print_markdown_table(header, rows)
    print(
        "\nrows per CPU s: the same slope on the CPU time (user and system) of the variant's "
        "process tree, the median over rounds: on a loaded machine the wall clock also counts "
        "the waits for a core, the CPU time mostly not"
    )
    print(
        "\npeak MiB: the variant's own process (VmHWM), or its process tree's summed resident "
        "memory sampled every 0.2 s where larger (Spark: JVM and Python workers); 'small' after "
        "its warm-up (one small run), 'all' after every run (large ones included): where the "
        "two are close, peak memory does not grow with the rows"
    )
    sized = {(measured.small, measured.large) for measured in found.values()}
    if len(sized) > 1:
        print(
            "rows: variants ran at different sizes (--sizes-for), the slow ones at smaller "
            "sizes (a run of the large size would take them many minutes); each rate is the "
            "slope between its own two sizes"
        )
    ok = True
    print(
        f"\noutputs, read back and checked by id against predict (isclose rtol={RTOL:g}, "
        f"atol={ATOL:g}):"
    )
    for name in variants:
        measured = found[name]
        if measured.problems:
            ok = False
            print(f"  {name}: FAILED")
            for problem in measured.problems:
                print("    " + problem.replace("\n", "\n    "))
        else:
            print(
                f"  {name}: verified, {measured.checked_runs} runs, {measured.checked_rows:,} "
                f"rows, largest difference {measured.max_abs_diff:.2g}; frameworks imported: "
                f"{', '.join(measured.frameworks) or 'none'}"
            )
    return ok


def _parse_sizes_for(values: Sequence[str]) -> tuple[str, tuple[int, int]]:
    name, small, large = values
    if name not in VARIANTS:
        raise SystemExit(f"--sizes-for: unknown variant {name!r}; one of {', '.join(VARIANTS)}")
    return name, (int(small), int(large))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), default=["linear"], help="the models"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="the variants to run (stock is what the others are compared with)",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs=2,
        metavar=("SMALL", "LARGE"),
        help="rows in the small and the large run (default 100,000 and 1,000,000; --quick "
        "10,000 and 50,000)",
    )
    parser.add_argument(
        "--sizes-for",
        nargs=3,
        action="append",
        default=[],
        metavar=("VARIANT", "SMALL", "LARGE"),
        help="one variant's sizes, e.g. --sizes 100000 10000000 --sizes-for stock 100000 "
        "1000000 (repeatable)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the median is shown)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    parser.add_argument("--seed", type=int, default=0, help="the data's and the model's seed")
    parser.add_argument(
        "--row-group",
        type=int,
        help="rows per Parquet row group of the inputs (default: pyarrow's, up to 1,048,576): "
        "a Beam reader's table is a row group, so a fixed one shows whether peak memory "
        "grows with the rows",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    default = (10_000, 50_000) if args.quick else (100_000, 1_000_000)
    sizes = dict.fromkeys(VARIANTS, tuple(args.sizes) if args.sizes else default)
    sizes.update(_parse_sizes_for(values) for values in args.sizes_for)
    for name, (small, large) in sizes.items():
        if not 0 < small < large:
            raise SystemExit(f"sizes of {name}: need 0 < SMALL < LARGE, got {small}, {large}")
    rounds = 1 if args.quick else args.rounds
    skipped = {}
    for name in args.variants:
        why = VARIANTS[name].unavailable()
        if why is not None:
            skipped[name] = why
            print(f"{name}: {why}")
    variants = [v for v in VARIANTS if v in args.variants and v not in skipped]
    if not variants:
        print("no variant to run")
        return 1
    start = time.perf_counter()
    ok = True
    for model_name in args.models:
        why = MODELS[model_name].unavailable()
        if why is not None:
            print(f"{model_name}: {why}")
            continue
        print(f"{model_name}: {len(variants)} variants, each in a process of its own")
        found = measure_model(
            model_name, variants, sizes, rounds, args.seed, row_group=args.row_group
        )
        ok = print_results(model_name, variants, found, skipped, rounds) and ok
    print(f"\ncommit {commit()}; the whole benchmark took {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    # The package's own module, not this ``__main__`` copy.
    from beam_turbo.bench import tabular

    with contextlib.suppress(KeyboardInterrupt):
        tabular._serve(sys.argv[1])
