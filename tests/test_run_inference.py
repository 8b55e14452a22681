"""beam_turbo.RunInference in real DirectRunner pipelines: Beam's results, the model cache,
load retries, OOM splitting, exception handling, metrics, and patch()/unpatch()."""

from __future__ import annotations

import io
import pickle
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.io.filesystem import FileSystem
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference import base
from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy as BeamSklearn
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LinearRegression

import beam_turbo
from beam_turbo import RunInference
from beam_turbo.errors import InvalidInputError, InvalidTypeError, ModelLoadError
from beam_turbo.sklearn import SklearnModelHandlerNumpy
from tests.side_inputs import in_fixed_windows


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = np.random.default_rng(0)
    x = rng.random((50, 3))
    path = tmp_path_factory.mktemp("models") / "linear.pkl"
    path.write_bytes(pickle.dumps(LinearRegression().fit(x, x @ [1.0, 2.0, 3.0])))
    return str(path)


def inputs(n: int = 60) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(n)
    return [rng.random(3) for _ in range(n)]


def predictions(pcoll: beam.PCollection) -> beam.PCollection:
    return pcoll | beam.Map(lambda r: (tuple(np.round(r.example, 9)), round(float(r.inference), 9)))


def test_results_equal_stock_beam_with_beams_and_our_handlers(model_path: str) -> None:
    data = inputs()
    model = pickle.loads(Path(model_path).read_bytes())
    expected = [
        (tuple(np.round(x, 9)), round(float(y), 9))
        for x, y in zip(data, model.predict(data), strict=True)
    ]
    with beam.Pipeline() as pipeline:
        stock = predictions(
            pipeline | beam.Create(data) | base.RunInference(BeamSklearn(model_path))
        )
        assert_that(stock, equal_to(expected))
    for handler in (BeamSklearn(model_path), SklearnModelHandlerNumpy(model_path)):
        with beam.Pipeline() as pipeline:
            out = predictions(pipeline | beam.Create(data) | RunInference(handler))
            assert_that(out, equal_to(expected))


def test_keyed_and_maybe_keyed_handlers(model_path: str) -> None:
    data = inputs(20)
    keyed = [(f"k{i}", x) for i, x in enumerate(data)]
    model = pickle.loads(Path(model_path).read_bytes())
    expected = [(k, round(float(model.predict(x[None])[0]), 9)) for k, x in keyed]
    with beam.Pipeline() as pipeline:
        out = (
            pipeline
            | beam.Create(keyed)
            | RunInference(base.KeyedModelHandler(SklearnModelHandlerNumpy(model_path)))
            | beam.MapTuple(lambda k, r: (k, round(float(r.inference), 9)))
        )
        assert_that(out, equal_to(expected))
    for elements, labels in [(keyed, [k for k, _ in keyed]), (data, ["unkeyed"] * len(data))]:
        with beam.Pipeline() as pipeline:
            out = (
                pipeline
                | beam.Create(elements)
                | RunInference(base.MaybeKeyedModelHandler(SklearnModelHandlerNumpy(model_path)))
                | beam.Map(lambda r: "unkeyed" if isinstance(r, base.PredictionResult) else r[0])
            )
            assert_that(out, equal_to(labels))


class Doubler(base.ModelHandler[float, base.PredictionResult, Any]):
    """A user's own handler: the model doubles numbers; failures are scripted."""

    def __init__(
        self,
        *,
        fail_loads: int = 0,
        load_error: type[Exception] = ConnectionError,
        oom_above: int | None = None,
        bad_value: float | None = None,
        record: str | None = None,
    ) -> None:
        super().__init__()
        self.fail_loads = fail_loads
        self.load_error = load_error
        self.oom_above = oom_above
        self.bad_value = bad_value
        self.record = record

    def _note(self, line: str) -> None:
        if self.record:
            with open(self.record, "a") as f:
                f.write(line + "\n")

    def load_model(self) -> Any:
        self._note("load")
        if self.fail_loads > 0:
            self.fail_loads -= 1
            raise self.load_error("model store unavailable")
        return 2.0

    def run_inference(
        self, batch: Sequence[float], model: Any, inference_args: Any = None
    ) -> Iterable[base.PredictionResult]:
        self._note(f"batch {len(batch)}")
        if self.oom_above is not None and len(batch) > self.oom_above:
            raise MemoryError(f"batch of {len(batch)} does not fit")
        if self.bad_value is not None and self.bad_value in batch:
            raise ValueError(f"cannot score {self.bad_value}")
        return [base.PredictionResult(x, x * model) for x in batch]

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": 8, "max_batch_size": 8}


def doubled(pcoll: beam.PCollection) -> beam.PCollection:
    return pcoll | beam.Map(lambda r: r.inference)


def test_user_defined_handler(tmp_path: Path) -> None:
    with beam.Pipeline() as pipeline:
        out = doubled(pipeline | beam.Create([1.0, 2.0, 3.0]) | RunInference(Doubler()))
        assert_that(out, equal_to([2.0, 4.0, 6.0]))


def test_passing_load_errors_are_retried(tmp_path: Path) -> None:
    record = tmp_path / "calls"
    handler = Doubler(fail_loads=2, record=str(record))
    with beam.Pipeline() as pipeline:
        out = doubled(
            pipeline
            | beam.Create([1.0, 2.0])
            | RunInference(handler, model_load_retries=2, model_load_backoff_secs=0.0)
        )
        assert_that(out, equal_to([2.0, 4.0]))
    assert record.read_text().count("load") == 3


def test_a_model_that_never_loads_fails_the_pipeline(tmp_path: Path) -> None:
    record = tmp_path / "calls"
    handler = Doubler(fail_loads=100, record=str(record))
    with pytest.raises(Exception, match="model store unavailable"), beam.Pipeline() as pipeline:
        _ = (
            pipeline
            | beam.Create([1.0])
            | RunInference(handler, model_load_retries=1, model_load_backoff_secs=0.0)
        )
    assert record.read_text().count("load") >= 2


class AttemptCounter(Doubler):
    """Notes each load as ``attempt N``, N counted on this handler object: a DoFn's retries
    call the same object again, while each set-up after a failed bundle has its own copy."""

    def load_model(self) -> Any:
        self.attempts = getattr(self, "attempts", 0) + 1
        self._note(f"attempt {self.attempts}")
        return super().load_model()


def test_a_missing_model_file_is_not_retried(tmp_path: Path) -> None:
    record = tmp_path / "calls"
    handler = AttemptCounter(fail_loads=100, load_error=FileNotFoundError, record=str(record))
    with pytest.raises(Exception, match="model store unavailable"), beam.Pipeline() as pipeline:
        _ = pipeline | beam.Create([1.0]) | RunInference(handler, model_load_backoff_secs=0.0)
    # Beam's DoFn may set up more than once after a failure, each with its own handler: every
    # set-up loads once, where a retry (two by default) would note attempt 2 and 3.
    attempts = [line for line in record.read_text().splitlines() if line.startswith("attempt")]
    assert attempts, "the model was never loaded"
    assert set(attempts) == {"attempt 1"}, attempts


class AttemptedSklearn(SklearnModelHandlerNumpy):
    """Notes each load as ``attempt N`` in ``record``, N counted on this handler object."""

    def __init__(self, model_uri: str, record: str) -> None:
        super().__init__(model_uri)
        self.record = record

    def load_model(self) -> Any:
        self.attempts = getattr(self, "attempts", 0) + 1
        with open(self.record, "a") as f:
            f.write(f"attempt {self.attempts}\n")
        return super().load_model()


#: Pickles of a model class the worker cannot import: its module, or the class in its module.
NEEDS_A_MISSING_MODULE = b"cno_such_module_for_beam_turbo\nModel\n."
NEEDS_A_MISSING_CLASS = b"cjson\nNoSuchModelClass\n."


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (NEEDS_A_MISSING_MODULE, "needs the module 'no_such_module_for_beam_turbo'"),
        (NEEDS_A_MISSING_CLASS, "Can't get attribute 'NoSuchModelClass' on <module 'json'"),
    ],
)
def test_a_model_that_needs_a_module_the_worker_lacks_is_named_and_not_retried(
    tmp_path: Path, payload: bytes, named: str
) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(payload)
    with pytest.raises(ModelLoadError, match=re.escape(named)):
        SklearnModelHandlerNumpy(str(path)).load_model()
    record = tmp_path / "calls"
    handler = AttemptedSklearn(str(path), str(record))
    transform = RunInference(handler, model_load_retries=2, model_load_backoff_secs=0.0)
    with pytest.raises(Exception, match=re.escape(named)), beam.Pipeline() as pipeline:
        _ = pipeline | beam.Create([np.ones(3)]) | transform
    assert set(record.read_text().splitlines()) == {"attempt 1"}


def test_a_users_loader_missing_a_module_is_not_retried(tmp_path: Path) -> None:
    record = tmp_path / "calls"
    handler = AttemptCounter(fail_loads=100, load_error=ModuleNotFoundError, record=str(record))
    with pytest.raises(Exception, match="model store unavailable"), beam.Pipeline() as pipeline:
        _ = pipeline | beam.Create([1.0]) | RunInference(handler, model_load_backoff_secs=0.0)
    attempts = [line for line in record.read_text().splitlines() if line.startswith("attempt")]
    assert set(attempts) == {"attempt 1"}, attempts


class UnsureFileSystem(FileSystem):
    """A Beam file system (scheme ``unsure-fs``) whose files hold no model and whose
    ``exists`` fails, as a store behind a flaky metadata server does."""

    @classmethod
    def scheme(cls) -> str:
        return "unsure-fs"

    def open(self, path: str, *args: Any, **kwargs: Any) -> Any:
        return io.BytesIO(b"not a pickle")

    def exists(self, path: str) -> bool:
        raise ConnectionError("metadata server unreachable")

    def _unused(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    join = split = mkdirs = has_dirs = _list = create = copy = rename = _unused
    size = last_updated = metadata = delete = checksum = _unused


def test_a_file_system_that_cannot_tell_whether_the_model_exists_is_surfaced(
    tmp_path: Path,
) -> None:
    """The failed check is in the error, and the load is retried (the store may come back);
    it was taken for "the file is there", which made the bytes read a corrupt model."""
    uri = "unsure-fs://models/linear.pkl"
    with pytest.raises(OSError, match="metadata server unreachable") as error:
        SklearnModelHandlerNumpy(uri).load_model()
    assert uri in str(error.value)
    assert not isinstance(error.value, ModelLoadError)
    record = tmp_path / "calls"
    transform = RunInference(
        AttemptedSklearn(uri, str(record)), model_load_retries=2, model_load_backoff_secs=0.0
    )
    with pytest.raises(Exception, match="could not be checked"), beam.Pipeline() as pipeline:
        _ = pipeline | beam.Create([np.ones(3)]) | transform
    assert "attempt 3" in record.read_text().splitlines()


def test_out_of_memory_batches_are_split_for_any_handler(tmp_path: Path) -> None:
    record = tmp_path / "calls"
    handler = Doubler(oom_above=3, record=str(record))
    data = [float(i) for i in range(16)]
    with beam.Pipeline() as pipeline:
        out = doubled(pipeline | beam.Create(data) | RunInference(handler))
        assert_that(out, equal_to([2 * x for x in data]))
    sizes = [
        int(line.split()[1]) for line in record.read_text().split("\n") if line.startswith("batch")
    ]
    assert max(sizes) == 8
    assert sum(s for s in sizes if s <= 3) == len(data)


def test_exception_handling_sends_failing_batches_to_the_dead_letter_output() -> None:
    data = [float(i) for i in range(16)]
    with beam.Pipeline() as pipeline:
        results, dlq = (
            pipeline
            | beam.Create(data)
            | RunInference(Doubler(bad_value=5.0)).with_exception_handling()
        )
        failed = dlq.failed_inferences | beam.FlatMap(lambda failure: failure[0])
        everything = (doubled(results) | "halve" >> beam.Map(lambda x: x / 2), failed)
        assert_that(everything | beam.Flatten(), equal_to(data))
        assert_that(failed | "has 5" >> beam.Filter(lambda x: x == 5.0), equal_to([5.0]), label="5")


def test_metrics_have_beams_names(model_path: str) -> None:
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create(inputs(30)) | RunInference(SklearnModelHandlerNumpy(model_path))
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_name("num_inferences"))["counters"]
    assert sum(c.committed for c in counters) == 30
    assert counters[0].key.metric.namespace == "BeamML_Sklearn"


@pytest.mark.parametrize("two_step", [False, True])
def test_beam_turbos_metrics_stack_time_and_cache_hits(model_path: str, two_step: bool) -> None:
    """The stacking time per batch, and a second pipeline's model answered by the cache."""

    def run() -> Any:
        pipeline = beam.Pipeline()
        transform = RunInference(
            SklearnModelHandlerNumpy(model_path), model_identifier=f"metrics-{two_step}"
        )
        if two_step:
            transform = transform.with_exception_handling(timeout=60)
        _ = pipeline | beam.Create(inputs(30)) | transform
        result = pipeline.run()
        result.wait_until_finish()
        return result.metrics()

    def query(metrics: Any, name: str, kind: str) -> list[Any]:
        return list(metrics.query(MetricsFilter().with_name(name))[kind])

    first = run()
    stacking = query(first, "beam_turbo_stack_micro_secs", "distributions")
    assert sum(d.committed.count for d in stacking) >= 1
    assert stacking[0].key.metric.namespace == "BeamML_Sklearn"
    assert sum(c.committed for c in query(first, "beam_turbo_model_cache_hits", "counters")) == 0
    second = run()  # the same model identifier: the model is in this process's cache
    assert sum(c.committed for c in query(second, "beam_turbo_model_cache_hits", "counters")) >= 1


def test_models_come_from_the_model_cache(model_path: str) -> None:
    before = beam_turbo.ModelCache.default().stats()
    with beam.Pipeline() as pipeline:
        _ = pipeline | beam.Create(inputs(10)) | RunInference(SklearnModelHandlerNumpy(model_path))
    after = beam_turbo.ModelCache.default().stats()
    assert after["loads"] == before["loads"] + 1


def test_max_batch_weight_works_where_beam_fails(model_path: str) -> None:
    def weighted() -> SklearnModelHandlerNumpy:
        return SklearnModelHandlerNumpy(
            model_path, max_batch_weight=10, element_size_fn=lambda x: 3
        )

    with pytest.raises(TypeError), beam.Pipeline() as pipeline:
        _ = pipeline | beam.Create(inputs(5)) | base.RunInference(weighted())
    with beam.Pipeline() as pipeline:
        out = pipeline | beam.Create(inputs(12)) | RunInference(weighted())
        assert_that(out | beam.combiners.Count.Globally(), equal_to([12]))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(InvalidTypeError, match="model_handler must be an apache_beam ModelHandler"):
        RunInference(lambda x: x)
    with pytest.raises(InvalidInputError, match="model_load_retries"):
        RunInference(Doubler(), model_load_retries=-1)
    with pytest.raises(InvalidInputError, match="model_load_backoff_secs"):
        RunInference(Doubler(), model_load_backoff_secs=float("nan"))


def test_patch_and_unpatch_round_trip() -> None:
    from apache_beam.ml.inference import sklearn_inference

    originals = (beam.BatchElements, base.RunInference, sklearn_inference.SklearnModelHandlerNumpy)
    replaced = beam_turbo.patch()
    try:
        assert "apache_beam.ml.inference.base.RunInference" in replaced
        assert base.RunInference is beam_turbo.RunInference
        assert beam.BatchElements is beam_turbo.BatchElements
        assert sklearn_inference.SklearnModelHandlerNumpy is SklearnModelHandlerNumpy
        assert beam_turbo.patch() == replaced  # idempotent
    finally:
        beam_turbo.unpatch()
    assert (beam.BatchElements, base.RunInference, sklearn_inference.SklearnModelHandlerNumpy) == (
        originals
    )
    beam_turbo.unpatch()  # a second unpatch is a no-op
    assert base.RunInference is originals[1]


class SizedDoubler(Doubler):
    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": 8}


def batch_sizes(record: Path) -> list[int]:
    return [
        int(line.split()[1]) for line in record.read_text().splitlines() if line.startswith("batch")
    ]


def test_fused_batches_respect_the_size_bounds(tmp_path: Path) -> None:
    record = tmp_path / "calls"
    data = [float(i) for i in range(200)]
    with beam.Pipeline() as pipeline:
        out = doubled(pipeline | beam.Create(data) | RunInference(SizedDoubler(record=str(record))))
        assert_that(out, equal_to([2 * x for x in data]))
    sizes = batch_sizes(record)
    assert sum(sizes) == len(data)
    assert max(sizes) <= 8


def test_fused_dofns_in_one_process_share_what_the_sizer_learned() -> None:
    """Each worker process has one sizer per fused transform: a second DoFn instance (a Flink
    subtask, a Spark task, a DoFn rebuilt after a failed bundle) starts at the learned size
    instead of climbing from 1 again."""
    from apache_beam.internal import pickler

    from beam_turbo._dofns.gathering import GatheringDoFn, RunBatches
    from beam_turbo._gathering.sizing import Sizing

    def instance(template: bytes) -> GatheringDoFn:
        dofn: GatheringDoFn = pickler.loads(template)
        dofn.setup()
        return dofn

    handler = SizedDoubler()
    action = RunBatches(
        handler=handler,
        clock=time,
        metrics_namespace=None,
        model_tag="shared-sizer",
        inference_args=None,
        retries=0,
        backoff_secs=0,
        exc_class=None,
        isolate_failures=False,
    )
    sizing = Sizing.from_batching_args(handler.batch_elements_kwargs())
    fused = GatheringDoFn(sizing=sizing, action=action)
    template = pickler.dumps(fused)
    first, second = instance(template), instance(template)
    assert first._sizing is second._sizing
    first.start_bundle()
    for x in range(100):
        list(first.process(float(x)))
    list(first.finish_bundle())
    assert second._sizing.target() == first._sizing.target() == 8  # max_batch_size
    other = instance(pickler.dumps(fused))  # another copy of the same transform's DoFn
    assert other._sizing is first._sizing


def test_fused_oom_teaches_the_sizer_a_ceiling(tmp_path: Path) -> None:
    record = tmp_path / "calls"
    data = [float(i) for i in range(300)]
    handler = SizedDoubler(oom_above=5, record=str(record))
    with beam.Pipeline() as pipeline:
        out = doubled(pipeline | beam.Create(data) | RunInference(handler))
        assert_that(out, equal_to([2 * x for x in data]))
    sizes = batch_sizes(record)
    failed = [s for s in sizes if s > 5]
    # The sizer never proposes a size at or above one that failed: each failure is smaller
    # than the last, so of 6, 7 and 8 (the sizes above 5 it may try) at most three fail.
    assert failed, sizes
    assert failed == sorted(set(failed), reverse=True), sizes
    assert sum(s for s in sizes if s <= 5) == len(data)


def test_fused_results_keep_their_windows() -> None:
    from apache_beam.transforms import window

    data = [(float(i), i * 10) for i in range(12)]  # (value, timestamp in seconds)
    with beam.Pipeline() as pipeline:
        out = (
            pipeline
            | beam.Create(data)
            | beam.MapTuple(lambda value, ts: window.TimestampedValue(value, ts))
            | beam.WindowInto(window.FixedWindows(60))
            | RunInference(SizedDoubler())
            | beam.Map(
                lambda r, w=beam.DoFn.WindowParam, t=beam.DoFn.TimestampParam: (
                    int(w.start),
                    r.inference,
                    t == w.max_timestamp(),
                )
            )
        )
        expected = [(int(ts // 60 * 60), 2 * value, True) for value, ts in data]
        assert_that(out, equal_to(expected))


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        ["--direct_running_mode=multi_threading", "--direct_num_workers=2"],
        ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
    ],
    ids=["multi-process", "multi-thread", "portable"],
)
def test_other_runners_give_stock_beams_results(model_path: str, options: list[str]) -> None:
    data = inputs(80)
    model = pickle.loads(Path(model_path).read_bytes())
    expected = [
        (tuple(np.round(x, 9)), round(float(y), 9))
        for x, y in zip(data, model.predict(data), strict=True)
    ]
    for handler in (SklearnModelHandlerNumpy(model_path), Doubler()):
        with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
            if isinstance(handler, Doubler):
                out = doubled(pipeline | beam.Create([1.0, 2.0]) | RunInference(handler))
                assert_that(out, equal_to([2.0, 4.0]))
            else:
                out = predictions(pipeline | beam.Create(data) | RunInference(handler))
                assert_that(out, equal_to(expected))
    import gc

    assert gc.isenabled()  # every pause of the collector in this process was given back


class PlusOne:
    def predict(self, x: int) -> int:
        return x + 1


class PathModelHandler(base.ModelHandler[int, base.PredictionResult, Any]):
    """Beam's test handler for model refresh: results name the model path they came from."""

    def __init__(self) -> None:
        super().__init__()
        self.model_id = "fake_model_id_default"

    def load_model(self) -> Any:
        return PlusOne()

    def run_inference(
        self, batch: Sequence[int], model: Any, inference_args: Any = None
    ) -> Iterable[base.PredictionResult]:
        return [base.PredictionResult(x, model.predict(x), self.model_id) for x in batch]

    def update_model_path(self, model_path: str | None = None) -> None:
        self.model_id = model_path or self.model_id


def test_model_refresh_through_a_side_input() -> None:
    """Beam's test_run_inference_side_input_in_batch, with beam-turbo's RunInference."""
    import math
    import time as clock

    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.transforms import window

    first_ts = math.floor(clock.time()) - 30
    interval = 7
    main = [first_ts - 2, first_ts + 1, first_ts + 8, first_ts + 15, first_ts + 22]
    side = [
        (first_ts + 1, base.ModelMetadata(model_id="", model_name="")),
        (first_ts + 8, base.ModelMetadata(model_id="fake_model_id_1", model_name="m1")),
        (first_ts + 15, base.ModelMetadata(model_id="fake_model_id_2", model_name="m2")),
    ]

    with TestPipeline("FnApiRunner") as pipeline:
        side_input = in_fixed_windows(pipeline, side, interval, "Side")
        results = (
            pipeline
            | "Main" >> beam.Create(main)
            | "MainTs" >> beam.Map(lambda x: window.TimestampedValue(x, x))
            | "MainWin" >> beam.WindowInto(window.FixedWindows(interval))
            | "MainKey" >> beam.Map(lambda x: ("key", x))
            | "MainGbk" >> beam.GroupByKey()
            | "MainEmit" >> beam.FlatMap(lambda grouped: grouped[1])
            | RunInference(PathModelHandler(), model_metadata_pcoll=side_input)
        )
        ids = ["fake_model_id_default"] * 2 + ["fake_model_id_1"] + ["fake_model_id_2"] * 2
        expected = [base.PredictionResult(x, x + 1, i) for x, i in zip(main, ids, strict=True)]
        assert_that(results, equal_to(expected))


def test_isolated_failures_reach_the_dead_letter_output_alone() -> None:
    data = [float(i) for i in range(16)]
    with beam.Pipeline() as pipeline:
        results, dlq = (
            pipeline
            | beam.Create(data)
            | RunInference(Doubler(bad_value=5.0)).with_exception_handling(isolate_failures=True)
        )
        assert_that(doubled(results), equal_to([2 * x for x in data if x != 5.0]))
        failed = dlq.failed_inferences | beam.Map(lambda failure: (failure[0], failure[1][0]))
        assert_that(failed, equal_to([([5.0], ValueError)]), label="dead letters")


def test_a_model_that_never_loads_sends_elements_to_the_dead_letter_output() -> None:
    data = [float(i) for i in range(10)]
    handler = Doubler(fail_loads=10_000)
    with beam.Pipeline() as pipeline:
        results, dlq = (
            pipeline
            | beam.Create(data)
            | RunInference(handler, model_load_retries=0).with_exception_handling()
        )
        assert_that(results, equal_to([]))
        failed = dlq.failed_inferences | beam.FlatMap(lambda failure: failure[0])
        assert_that(failed, equal_to(data), label="every element dead-lettered")


class Scripted(SizedDoubler):
    """Fails as a test scripts it: elements that raise, batches that run out of memory."""

    def __init__(
        self,
        *,
        bad: frozenset[int],
        oom_above: int | None,
        fail_loads: int,
        streaming: bool = False,
    ) -> None:
        super().__init__(fail_loads=fail_loads)
        self.bad = bad
        self.scripted_oom_above = oom_above
        self.streaming = streaming

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # max_batch_duration_secs: batches gathered across bundles, in keyed state.
        streaming = {"max_batch_duration_secs": 30} if self.streaming else {}
        return super().batch_elements_kwargs() | streaming

    def run_inference(
        self, batch: Sequence[float], model: Any, inference_args: Any = None
    ) -> Iterable[base.PredictionResult]:
        if self.scripted_oom_above is not None and len(batch) > self.scripted_oom_above:
            raise MemoryError("too big")
        if any(int(x) in self.bad for x in batch):
            raise ValueError("bad element")
        return [base.PredictionResult(x, x * model) for x in batch]


def check_no_loss(
    n: int,
    bad: set[int],
    oom_above: int | None,
    fail_loads: int,
    isolate: bool,
    two_step: bool,
    streaming: bool,
    options: Sequence[str] = (),
    serial: bool = False,
) -> None:
    """Every element comes out once, as a result or a dead letter, on the fused paths (batches
    in flight, serial, stateful) and on the two-step one (which a timeout selects)."""
    with tempfile.TemporaryDirectory(prefix="no-loss-") as folder:
        out = Path(folder)
        data = [float(i) for i in range(n)]
        handler = Scripted(
            bad=frozenset(bad), oom_above=oom_above, fail_loads=fail_loads, streaming=streaming
        )
        with beam.Pipeline(options=PipelineOptions(list(options))) as pipeline:
            results, dlq = (
                pipeline
                | beam.Create(data)
                | RunInference(handler, model_load_backoff_secs=0.0)
                # In flight, every batch (not adaptive: the scripted model is quick).
                .with_batches_in_flight(0 if serial else 1, adaptive=False)
                .with_exception_handling(isolate_failures=isolate, timeout=60 if two_step else None)
            )
            good = results | beam.Map(lambda r: r.example)
            failed = dlq.failed_inferences | beam.FlatMap(lambda failure: failure[0])
            # Written down, not flattened for assert_that: with max_batch_duration_secs's
            # processing-time timers Beam's DirectRunner takes its older runner, which fails a
            # Flatten of a stateful DoFn's outputs (an AssertionError in its GroupByKey; stock
            # Beam's RunInference too).
            good | "good" >> beam.Map(_append, str(out / "good"))
            failed | "failed" >> beam.Map(_append, str(out / "failed"))
        came_out = {name: _read(out / name) for name in ("good", "failed")}
        assert sorted(came_out["good"] + came_out["failed"]) == data, "each element once"
        if isolate:
            # A model that never loads fails every batch whole, so every element is dead.
            never_loads = fail_loads > 2  # more failures than RunInference's 2 retries
            dead = data if never_loads else [x for x in data if int(x) in bad]
            assert sorted(came_out["failed"]) == dead, "only the bad ones"


def _append(value: float, path: str) -> None:
    with open(path, "a") as f:
        f.write(f"{value}\n")


def _read(path: Path) -> list[float]:
    return [float(line) for line in path.read_text().split()] if path.exists() else []


FAILURE_PATTERNS = {
    "n": st.integers(1, 40),
    "bad": st.sets(st.integers(0, 39), max_size=4),
    "oom_above": st.one_of(st.none(), st.integers(1, 8)),
    "fail_loads": st.sampled_from([0, 1, 2, 1_000]),  # 1,000: a loader that never recovers
}

#: The ways through RunInference (isolate_failures, two steps, stateful; the fused path with
#: batches in flight and serial), each run, not drawn: random draws of 8 examples over all
#: seven dimensions left whole paths untried.
PATHS = [
    pytest.param(isolate, two_step, streaming, False, id=f"{isolate=}-{two_step=}-{streaming=}")
    for isolate in (False, True)
    for two_step in (False, True)
    for streaming in (False, True)
] + [
    pytest.param(isolate, False, False, True, id=f"{isolate=}-serial") for isolate in (False, True)
]


@pytest.mark.parametrize(("isolate", "two_step", "streaming", "serial"), PATHS)
@settings(max_examples=3, deadline=None)
@given(**FAILURE_PATTERNS)
def test_no_element_is_lost_or_duplicated(
    isolate: bool,
    two_step: bool,
    streaming: bool,
    serial: bool,
    n: int,
    bad: set[int],
    oom_above: int | None,
    fail_loads: int,
) -> None:
    """Elements that raise, batches that run out of memory, a loader that fails then
    recovers: every element comes out once, as a result or a dead letter.

    Each of the ten paths gets three failure patterns (30 pipelines, 20 to 30 s on the
    shared development machine): the four dimensions drawn interact only through the batches
    they fail, and each has a few values that matter (no fault, one, several; a loader that
    recovers or never does), which 24 draws reach, and hypothesis keeps any failing pattern
    it finds to replay first."""
    check_no_loss(n, bad, oom_above, fail_loads, isolate, two_step, streaming, serial=serial)


@pytest.mark.slow
@pytest.mark.parametrize("two_step", [False, True], ids=["fused", "two steps"])
@settings(max_examples=2, deadline=None)
@given(isolate=st.booleans(), **FAILURE_PATTERNS)
def test_no_element_is_lost_or_duplicated_multi_process(
    two_step: bool,
    isolate: bool,
    n: int,
    bad: set[int],
    oom_above: int | None,
    fail_loads: int,
) -> None:
    """The same across two worker processes (handlers pickled between them): two patterns a
    path, since each pipeline costs about 20 s in process start-up here; the in-process test
    above covers the patterns. Not the stateful path: its processing-time timers send Beam's
    DirectRunner to its older, in-process runner whatever the options say."""
    check_no_loss(
        n,
        bad,
        oom_above,
        fail_loads,
        isolate,
        two_step,
        False,
        ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    )


def test_two_step_path_teaches_batch_elements_the_memory_ceiling(tmp_path: Path) -> None:
    record = tmp_path / "calls"
    data = [float(i) for i in range(300)]
    handler = SizedDoubler(oom_above=5, record=str(record))
    # A timeout selects the two-step path (BatchElements, then inference).
    transform = RunInference(handler).with_exception_handling(timeout=60)
    assert not transform._can_fuse()
    with beam.Pipeline() as pipeline:
        results, _ = pipeline | beam.Create(data) | transform
        assert_that(doubled(results), equal_to([2 * x for x in data]))
    sizes = batch_sizes(record)
    assert 1 <= len([s for s in sizes if s > 5]) <= 4, sizes
    assert sum(s for s in sizes if s <= 5) == len(data)


class GcRecorder(SizedDoubler):
    """Notes whether the cyclic collector is enabled while each batch runs."""

    def run_inference(
        self, batch: Sequence[float], model: Any, inference_args: Any = None
    ) -> Iterable[base.PredictionResult]:
        import gc

        self._note(f"gc {gc.isenabled()}")
        return super().run_inference(batch, model, inference_args)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_cyclic_collector_pauses_for_a_batch_and_comes_back_as_it_was(
    tmp_path: Path, enabled: bool
) -> None:
    import gc

    record = tmp_path / "calls"
    data = [float(i) for i in range(50)]
    if not enabled:
        gc.disable()
    try:
        with beam.Pipeline() as pipeline:
            out = doubled(
                pipeline | beam.Create(data) | RunInference(GcRecorder(record=str(record)))
            )
            assert_that(out, equal_to([2 * x for x in data]))
        assert gc.isenabled() is enabled
    finally:
        gc.enable()
    states = {line for line in record.read_text().splitlines() if line.startswith("gc")}
    assert states == {"gc False"}


def test_cyclic_gc_pauses_nest_and_restore_the_state() -> None:
    import gc

    from beam_turbo._running.collector import cyclic_gc_paused

    assert gc.isenabled()
    with cyclic_gc_paused():
        assert not gc.isenabled()
        with cyclic_gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()
    with pytest.raises(KeyError), cyclic_gc_paused():
        raise KeyError("a failing batch")
    assert gc.isenabled()


def test_a_batch_failing_in_finish_bundle_reaches_the_dead_letter_output_whole() -> None:
    """13 elements in batches of 8: the last 5 run when the bundle finishes, and fail there."""
    data = [float(i) for i in range(13)]
    with beam.Pipeline() as pipeline:
        results, dlq = (
            pipeline
            | beam.Create(data, reshuffle=False)
            | RunInference(Doubler(bad_value=12.0)).with_exception_handling()
        )
        assert_that(doubled(results), equal_to([2 * x for x in data[:8]]))
        failed = dlq.failed_inferences | beam.Map(
            lambda failure: (
                sorted(failure[0]),
                failure[1][0],
                "cannot score 12.0" in failure[1][1],
            )
        )
        assert_that(failed, equal_to([(data[8:], ValueError, True)]), label="dead letters")


def test_dead_letters_keep_their_windows() -> None:
    from apache_beam.transforms import window

    data = [float(i) for i in range(20)]
    with beam.Pipeline() as pipeline:
        _, dlq = (
            pipeline
            | beam.Create(data)
            | beam.Map(lambda x: window.TimestampedValue(x, x))
            | beam.WindowInto(window.FixedWindows(10))
            | RunInference(Doubler(bad_value=3.0)).with_exception_handling(isolate_failures=True)
        )
        in_windows = dlq.failed_inferences | beam.Map(
            lambda failure, w=beam.DoFn.WindowParam: (failure[0], w.start)
        )
        assert_that(in_windows, equal_to([([3.0], 0)]))


@pytest.mark.parametrize(("bad", "fails"), [(5, True), (1, False)])
def test_the_threshold_fails_the_pipeline_when_too_many_elements_fail(
    bad: int, fails: bool
) -> None:
    """threshold=0.25 of 16 elements, isolated: 5 failing elements fail the pipeline, 1 not."""

    class FailsBelow(Doubler):
        def run_inference(
            self, batch: Sequence[float], model: Any, inference_args: Any = None
        ) -> Iterable[base.PredictionResult]:
            if any(x < bad for x in batch):
                raise ValueError("below the line")
            return super().run_inference(batch, model, inference_args)

    transform = RunInference(FailsBelow()).with_exception_handling(
        threshold=0.25, isolate_failures=True
    )
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create([float(i) for i in range(16)]) | transform
    if fails:
        with pytest.raises(Exception, match="exceeded threshold: 5 / 16"):
            pipeline.run().wait_until_finish()
    else:
        pipeline.run().wait_until_finish()


def test_a_timeout_keeps_beams_per_batch_wrapper() -> None:
    """With a timeout, batches go through Beam's timed wrapper (two steps), as in Beam."""
    data = [float(i) for i in range(16)]
    transform = RunInference(Doubler(bad_value=5.0)).with_exception_handling(timeout=60)
    assert not transform._can_fuse()
    with beam.Pipeline() as pipeline:
        results, dlq = pipeline | beam.Create(data) | transform
        failed = dlq.failed_inferences | beam.FlatMap(lambda failure: failure[0])
        assert_that(
            (doubled(results) | beam.Map(lambda x: x / 2), failed) | beam.Flatten(), equal_to(data)
        )
        assert_that(failed | beam.Filter(lambda x: x == 5.0), equal_to([5.0]), label="5")


def test_a_failing_pipeline_leaves_the_cyclic_collector_enabled() -> None:
    """A batch that fails without exception handling fails the pipeline; the pause that the
    batch being gathered held is given back all the same."""
    import gc

    with pytest.raises(Exception, match=r"cannot score 3\.0"), beam.Pipeline() as pipeline:
        _ = (
            pipeline
            | beam.Create([float(i) for i in range(20)])
            | RunInference(Doubler(bad_value=3.0))
        )
    assert gc.isenabled()


def test_a_gc_hold_is_taken_and_given_back_once() -> None:
    import gc

    from beam_turbo._running.collector import GcHold, resume_cyclic_gc

    hold = GcHold()
    hold.take()
    hold.take()  # already held: no second pause
    assert not gc.isenabled()
    hold.give_back()
    assert gc.isenabled()
    hold.give_back()  # not held: nothing to give back
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="without a pause"):
        resume_cyclic_gc()


def test_a_failed_load_is_not_retried_for_every_batch(tmp_path: Path) -> None:
    """A model that never loads, batches of one to eight: the next load waits out the
    backoff (0.5 s, doubled for the one retry) instead of every batch retrying at once."""
    record = tmp_path / "calls"
    data = [float(i) for i in range(200)]
    handler = SizedDoubler(fail_loads=10**9, record=str(record))
    transform = RunInference(handler, model_load_retries=1, model_load_backoff_secs=0.5)
    with beam.Pipeline() as pipeline:
        results, dlq = pipeline | beam.Create(data) | transform.with_exception_handling()
        assert_that(results, equal_to([]))
        failed = dlq.failed_inferences | beam.FlatMap(lambda failure: failure[0])
        assert_that(failed, equal_to(data), label="every element dead-lettered")
    loads = record.read_text().splitlines().count("load")
    assert 2 <= loads <= 8, loads  # at least 25 batches, two attempts each, without the wait


def test_overlapping_pauses_still_collect_now_and_then(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pauses that overlap without end (threads gathering batches in turn) get a full
    collection once they have kept the collector off for MAX_GC_PAUSE_SECS."""
    import gc

    from beam_turbo._running import collector as _gc

    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        first, second = _gc.GcHold(), _gc.GcHold()
        first.take()
        second.take()  # within the limit: no collection
        assert collections == []
        monkeypatch.setattr(_gc, "MAX_GC_PAUSE_SECS", 0.0)
        second.give_back()
        second.take()  # the pause has gone on past the limit
        assert collections == [2]
        assert not gc.isenabled()
        first.give_back()
        second.give_back()
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(count)


def test_a_batch_gathered_upstream_is_weighed_in_its_units_when_it_runs_out_of_memory() -> None:
    """Beam's inference DoFn gets batches whose weight it did not gather (NaN): the part that
    runs out of memory is weighed with the upstream sizing's element_size_fn, not counted."""
    from beam_turbo._gathering.gatherer import SizedBatch
    from beam_turbo._gathering.sizing import Sizing
    from beam_turbo._running.runner import part_weight

    weighted = Sizing.from_batching_args({"element_size_fn": len})
    elements = ["aaa", "bb"]
    assert part_weight(SizedBatch(0.0, elements, float("nan")), elements, weighted) == 5.0
    assert part_weight(SizedBatch(0.0, elements, 7.0), elements, weighted) == 7.0
    assert part_weight(SizedBatch(0.0, elements, 7.0), elements[:1], weighted) == 3.0
    assert part_weight(SizedBatch(0.0, elements, float("nan")), elements, None) == 2.0
