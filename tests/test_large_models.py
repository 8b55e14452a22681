"""RunInference with a model shared across processes (``large_model=True``, ``model_copies``)
on the fused path: the model served once per machine through Beam's own machinery
(``_running/loading.py``, ``SharedModels``), results and metrics as stock Beam's, errors and
dead letters as on the fused path. Real sklearn and torch models, made small here; Beam's
DirectRunner in this process, and (slow) with two worker processes.
"""

from __future__ import annotations

import glob
import os
import pickle
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference import base
from apache_beam.ml.inference import pytorch_inference as beam_pytorch
from apache_beam.ml.inference import sklearn_inference as beam_sklearn
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from sklearn.linear_model import LinearRegression

from beam_turbo import RunInference
from beam_turbo.errors import ModelNotFoundError
from beam_turbo.pytorch import PytorchModelHandlerTensor
from beam_turbo.sklearn import SklearnModelHandlerNumpy
from tests.test_model_refresh import NUMBERS, AddingHandler, copy_of

MULTI_PROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]

SHARING = [
    pytest.param({"large_model": True}, id="large_model"),
    pytest.param({"model_copies": 2}, id="model_copies=2"),
]


@pytest.fixture
def tag() -> Iterator[str]:
    """A model identifier of the test's own; Beam's address and lock files for its copies
    (in the temp folder, as Beam leaves them) are removed afterwards."""
    identifier = f"beam-turbo-test-{uuid.uuid4().hex}"
    yield identifier
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{identifier}*")):
        os.remove(path)


def rows(n: int = 24, width: int = 3) -> list[np.ndarray]:
    return [np.random.default_rng(i).random(width) for i in range(n)]


def save_sklearn(folder: Path) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    x = np.random.default_rng(0).random((30, 3))
    model = LinearRegression().fit(x, x @ [1.0, -2.0, 0.5] + 3.0)
    path = folder / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    return str(path), model.predict


def save_torch(folder: Path) -> tuple[dict[str, Any], Callable[[np.ndarray], np.ndarray]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    path = folder / "linear.pt"
    torch.save(model.state_dict(), path)
    arguments = {
        "state_dict_path": str(path),
        "model_class": torch.nn.Linear,
        "model_params": {"in_features": 3, "out_features": 2},
    }

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            output: np.ndarray = model(torch.from_numpy(x).float()).numpy()
        return output

    return arguments, predict


def handlers(framework: str, folder: Path, **sharing: Any) -> tuple[Any, Any, Callable[..., Any]]:
    """(stock Beam's handler, beam-turbo's, the model's own predict) for ``framework``."""
    batching: dict[str, Any] = {"min_batch_size": 4, "max_batch_size": 4}
    if framework == "sklearn":
        path, predict = save_sklearn(folder)
        return (
            beam_sklearn.SklearnModelHandlerNumpy(path, **batching, **sharing),
            SklearnModelHandlerNumpy(path, **batching, **sharing),
            predict,
        )
    arguments, predict = save_torch(folder)
    return (
        beam_pytorch.PytorchModelHandlerTensor(**arguments, **batching, **sharing),
        PytorchModelHandlerTensor(**arguments, **batching, **sharing),
        predict,
    )


def inputs(framework: str) -> list[Any]:
    data = rows()
    return data if framework == "sklearn" else [torch.from_numpy(x).float() for x in data]


def rounded(result: base.PredictionResult) -> tuple[tuple[float, ...], tuple[float, ...]]:
    example = np.asarray(result.example, dtype=np.float64)
    inference = np.atleast_1d(np.asarray(result.inference, dtype=np.float64))
    return (tuple(np.round(example, 5)), tuple(np.round(inference, 4)))


def expected(predict: Callable[[np.ndarray], np.ndarray]) -> list[Any]:
    data = rows()
    predictions = predict(np.stack(data))
    return [
        (tuple(np.round(x, 5)), tuple(np.round(np.atleast_1d(y).astype(np.float64), 4)))
        for x, y in zip(data, predictions, strict=True)
    ]


def run(
    transform: beam.PTransform, elements: Sequence[Any], want: list[Any], options: Sequence[str]
) -> dict[str, int]:
    """Run ``transform``, assert its results are ``want``; Beam's counters and how many times
    the model loaded (the load-latency distribution's count), by name."""
    pipeline = beam.Pipeline(options=PipelineOptions(list(options)))
    results = pipeline | beam.Create(elements) | transform
    assert_that(results | beam.Map(rounded), equal_to(want))
    result = pipeline.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter())
    found = {m.key.metric.name: m.committed for m in metrics["counters"]}
    for m in metrics["distributions"]:
        found[m.key.metric.name] = m.committed.count
    return found


def check_against_stock_beam(
    framework: str, folder: Path, tag: str, sharing: dict[str, Any], options: Sequence[str]
) -> tuple[dict[str, int], dict[str, int]]:
    stock_handler, handler, predict = handlers(framework, folder, **sharing)
    want = expected(predict)
    elements = inputs(framework)
    fused = RunInference(handler, model_identifier=f"{tag}-turbo")
    assert fused._can_fuse()
    stock = run(
        base.RunInference(stock_handler, model_identifier=f"{tag}-stock"), elements, want, options
    )
    ours = run(fused, elements, want, options)
    assert "beam_turbo_batch_size" in ours, "the fused path ran"  # only HandlerInference's
    # Beam's MultiProcessShared served each copy: its address file, by copy tag.
    copies = handler.model_copies()
    for served in (f"{tag}-stock", f"{tag}-turbo"):
        found = sorted(
            Path(p).name for p in glob.glob(f"{tempfile.gettempdir()}/{served}[0-9]*.address")
        )
        assert found == [f"{served}{i}.address" for i in range(copies)]
    assert ours["num_inferences"] == stock["num_inferences"] == len(elements)
    # Batches of four (min = max), so the same batches: one latency each.
    batches = len(elements) // 4
    assert ours["inference_batch_latency_micro_secs"] == batches
    assert stock["inference_batch_latency_micro_secs"] == batches
    return stock, ours


def stock_and_turbo(name: str, stock: dict[str, int], ours: dict[str, int]) -> tuple[int, int]:
    return stock.get(name, 0), ours.get(name, 0)


@pytest.mark.parametrize("sharing", SHARING)
@pytest.mark.parametrize("framework", ["sklearn", "torch"])
def test_shared_models_fuse_and_give_stock_beams_results_and_metrics(
    tmp_path: Path, tag: str, framework: str, sharing: dict[str, Any]
) -> None:
    """In one process. (Beam's collector keeps one load's figures per worker until its bundle
    ends, so two copies' loads count once, for stock Beam as for beam-turbo.)"""
    stock, ours = check_against_stock_beam(framework, tmp_path, tag, sharing, [])
    assert stock_and_turbo("load_model_latency_milli_secs", stock, ours) == (1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["sklearn", "torch"])
def test_two_worker_processes_share_one_copy_as_in_stock_beam(
    tmp_path: Path, tag: str, framework: str
) -> None:
    """Two SDK worker processes (about 20 s a pipeline here, in start-up): the model loads
    once on the machine, in whichever worker asked first, and the other calls it there."""
    stock, ours = check_against_stock_beam(
        framework, tmp_path, tag, {"large_model": True}, MULTI_PROCESS
    )
    assert stock_and_turbo("load_model_latency_milli_secs", stock, ours) == (1, 1)


@pytest.mark.slow
def test_two_worker_processes_without_sharing_load_two_copies(tmp_path: Path, tag: str) -> None:
    """The control for the test above: without ``large_model`` each worker loads its own."""
    _, handler, predict = handlers("sklearn", tmp_path)
    ours = run(RunInference(handler), inputs("sklearn"), expected(predict), MULTI_PROCESS)
    assert ours["load_model_latency_milli_secs"] == 2


@pytest.mark.slow
def test_two_worker_processes_hold_one_copy_of_the_weights(tmp_path: Path) -> None:
    """The memory itself (``beam-turbo bench large-model``'s sampler, about 30 s a
    pipeline): with ``large_model=True`` one worker holds the weights (an anonymous mapping of
    their size, resident); without, both."""
    from apache_beam.ml.inference.sklearn_inference import ModelFileType

    from beam_turbo.bench import large_model as bench

    model_mb, features = 100.0, 200  # weights over glibc's 64 MB arenas: told apart
    path = str(bench.build_model(tmp_path, model_mb, features))
    weights_bytes = bench.first_layer_bytes(model_mb, features)
    data = list(np.random.default_rng(1).random((64, features)))
    holders = {}
    for large_model in (True, False):
        handler = SklearnModelHandlerNumpy(
            path,
            model_file_type=ModelFileType.JOBLIB,
            large_model=large_model,
            min_batch_size=8,
            max_batch_size=8,
        )
        result = bench.one_run("", RunInference, handler, data, tmp_path, weights_bytes)
        holders[large_model] = len(result.peaks.holders)
    assert holders == {True: 1, False: 2}


# -- errors -----------------------------------------------------------------------------------


def test_a_bad_element_reaches_the_dead_letters_alone_through_the_shared_model(
    tmp_path: Path, tag: str
) -> None:
    """The model raises in the process that serves it; the error comes back through Beam's
    proxy as itself, and isolation finds the element (LinearRegression refuses NaN)."""
    _, handler, predict = handlers("sklearn", tmp_path, large_model=True)
    data = rows()
    bad = np.array([1.0, np.nan, 2.0])
    transform = RunInference(handler, model_identifier=tag).with_exception_handling(
        isolate_failures=True
    )
    with beam.Pipeline() as pipeline:
        results, dlq = pipeline | beam.Create([*data[:10], bad, *data[10:]]) | transform
        assert_that(results | beam.Map(rounded), equal_to(expected(predict)))
        failed = dlq.failed_inferences | beam.Map(
            lambda failure: (len(failure[0]), bool(np.isnan(failure[0][0]).any()), failure[1][0])
        )
        assert_that(failed, equal_to([(1, True, ValueError)]), label="dead letters")


class FlakySklearn(SklearnModelHandlerNumpy):
    """A real model whose store fails the first ``fail_loads`` loads (in the serving
    process: the copy of the handler there counts them)."""

    def __init__(self, path: str, fail_loads: int, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.fail_loads = fail_loads

    def load_model(self) -> Any:
        if self.fail_loads > 0:
            self.fail_loads -= 1
            raise ConnectionError("model store unavailable")
        return super().load_model()


def test_a_shared_model_whose_first_load_fails_is_loaded_again(tmp_path: Path, tag: str) -> None:
    path, predict = save_sklearn(tmp_path)
    handler = FlakySklearn(path, fail_loads=1, large_model=True)
    transform = RunInference(handler, model_identifier=tag, model_load_backoff_secs=0.0)
    ours = run(transform, rows(), expected(predict), [])
    assert ours["load_model_latency_milli_secs"] == 1


def test_a_shared_model_that_never_loads_sends_every_element_to_the_dead_letters(
    tmp_path: Path, tag: str
) -> None:
    missing = str(tmp_path / "nowhere.pkl")
    data = rows(10)
    handler = SklearnModelHandlerNumpy(missing, large_model=True)
    transform = RunInference(handler, model_identifier=tag, model_load_retries=0)
    with beam.Pipeline() as pipeline:
        results, dlq = pipeline | beam.Create(data) | transform.with_exception_handling()
        assert_that(results, equal_to([]))
        failed = dlq.failed_inferences | beam.FlatMap(
            lambda failure: [(tuple(x), failure[1][0]) for x in failure[0]]
        )
        want = [(tuple(x), ModelNotFoundError) for x in data]
        assert_that(failed, equal_to(want), label="every element dead-lettered")


def test_a_shared_model_that_never_loads_fails_the_pipeline_naming_the_file(
    tmp_path: Path, tag: str
) -> None:
    missing = str(tmp_path / "nowhere.pkl")
    handler = SklearnModelHandlerNumpy(missing, large_model=True)
    transform = RunInference(handler, model_identifier=tag, model_load_retries=0)
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create(rows(4)) | transform
    with pytest.raises(Exception, match=r"nowhere\.pkl does not exist"):
        pipeline.run().wait_until_finish()


def test_copies_take_turns_with_exception_handling_too() -> None:
    """With exception handling, the runner makes sure of the model before each batch: that
    must not take a turn, or with two copies in one process every batch would get the same."""
    handler = AddingHandler(min_batch_size=2, max_batch_size=2, model_copies=2)
    transform = RunInference(handler).with_exception_handling()
    with beam.Pipeline() as pipeline:
        results, _ = pipeline | beam.Create(NUMBERS) | transform
        copies = results | beam.Map(copy_of) | beam.Distinct() | beam.combiners.Count.Globally()
        assert_that(copies, equal_to([2]))


def test_tables_score_through_the_shared_model(tmp_path: Path) -> None:
    """``with_tables`` fuses with ``large_model`` too: the table's feature matrix goes to the
    shared model through the proxy."""
    from tests.test_tables import FEATURES, check_scored, table

    data = table(0, 300, seed=7)
    x = np.column_stack([data[name].to_numpy() for name in FEATURES])
    model = LinearRegression().fit(x, x @ np.arange(1.0, 5.0) + 0.5)
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    handler = SklearnModelHandlerNumpy(
        str(path), large_model=True, min_batch_size=64, max_batch_size=64
    )
    served = os.path.join(tempfile.gettempdir(), "[0-9a-f]" * 32 + "0.address")
    before = set(glob.glob(served))  # the transform's tag: a uuid's 32 hex digits
    check_scored([table(0, 100), table(100, 150)], handler, model, "Table")
    new = set(glob.glob(served)) - before
    assert new, "Beam's MultiProcessShared served the model"
    for path_served in new:
        os.remove(path_served)


def test_batches_kept_in_keyed_state_run_on_the_shared_model(tmp_path: Path, tag: str) -> None:
    """``max_batch_duration_secs`` (batches across bundles, in keyed state) with
    ``large_model``: the stateful inference DoFn takes the model from the same source."""
    path, predict = save_sklearn(tmp_path)
    handler = SklearnModelHandlerNumpy(
        path, large_model=True, min_batch_size=4, max_batch_size=4, max_batch_duration_secs=60
    )
    transform = RunInference(handler, model_identifier=tag)
    assert transform._can_fuse()
    ours = run(transform, rows(), expected(predict), [])
    assert ours["num_inferences"] == len(rows())
    served = glob.glob(f"{tempfile.gettempdir()}/{tag}[0-9]*.address")
    assert [Path(p).name for p in served] == [f"{tag}0.address"]


class SmallBatchesOnly:
    """A model that runs out of memory on a batch of more than two."""

    def predict(self, batch: list[int]) -> list[int]:
        if len(batch) > 2:
            raise MemoryError(f"a batch of {len(batch)}")
        return [x * 10 for x in batch]


class SmallBatchesHandler(base.ModelHandler[int, base.PredictionResult, SmallBatchesOnly]):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(min_batch_size=8, max_batch_size=8, large_model=True, **kwargs)

    def load_model(self) -> SmallBatchesOnly:
        return SmallBatchesOnly()

    def run_inference(
        self, batch: Sequence[int], model: SmallBatchesOnly, inference_args: Any = None
    ) -> list[base.PredictionResult]:
        return [
            base.PredictionResult(x, y)
            for x, y in zip(batch, model.predict(list(batch)), strict=True)
        ]


def test_a_shared_model_out_of_memory_splits_the_batch(tag: str) -> None:
    """The model's MemoryError comes back through the proxy as itself: the batch is split
    until it fits, and every element gets its result."""
    data = list(range(20))
    with beam.Pipeline() as pipeline:
        results = (
            pipeline
            | beam.Create(data)
            | RunInference(SmallBatchesHandler(), model_identifier=tag)
            | beam.Map(lambda r: (r.example, r.inference))
        )
        assert_that(results, equal_to([(x, x * 10) for x in data]))
    served = glob.glob(f"{tempfile.gettempdir()}/{tag}[0-9]*.address")
    assert [Path(p).name for p in served] == [f"{tag}0.address"]
