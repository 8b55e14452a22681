"""Batches in flight (``RunInference(...).with_batches_in_flight(n)``): the model runs on an
inference thread while the DoFn gathers the next batch; results, metrics, errors and memory
failures as when each batch runs as it is gathered."""

from __future__ import annotations

import gc
import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference import base
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_turbo import RunInference
from beam_turbo._gathering.gatherer import SizedBatch
from beam_turbo._gathering.sizing import Sizing
from beam_turbo._running.flight import (
    KEEP_BATCHES,
    SETTLING,
    TRIAL_BATCHES,
    WARM_UP_BATCHES,
    Chooser,
)
from beam_turbo._running.runner import BatchRunner
from beam_turbo.errors import InvalidInputError

#: Set when the DoFn gathers the element that opens the second batch (the step before
#: RunInference sees it): the DirectRunner runs a pipeline in this process.
_SECOND_BATCH_GATHERING = threading.Event()
_SEEN: list[tuple[str, bool]] = []  # (the thread a batch ran on, whether the event was set)


class Fours(base.ModelHandler[float, base.PredictionResult, int]):
    """Doubles, four at a time; the first batch waits (up to ``wait`` seconds) for the DoFn
    to gather the second, which it can only do while this one runs on another thread. Each
    batch takes at least ``batch_secs`` (a sleep, as a device's wait)."""

    def __init__(self, wait: float = 0.0, batch_secs: float = 0.0) -> None:
        self._wait = wait
        self._batch_secs = batch_secs

    def load_model(self) -> int:
        return 2

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": 4, "max_batch_size": 4}

    def run_inference(
        self, batch: Sequence[float], model: int, inference_args: Any = None
    ) -> Iterable[base.PredictionResult]:
        overlapped = True
        if batch[0] == 0 and self._wait:
            overlapped = _SECOND_BATCH_GATHERING.wait(self._wait)
        time.sleep(self._batch_secs)
        _SEEN.append((threading.current_thread().name, overlapped))
        return [base.PredictionResult(x, x * model) for x in batch]


def _note_gathering(x: float) -> float:
    if x == 4:  # the first element of the second batch
        _SECOND_BATCH_GATHERING.set()
    return x


def _doubled(in_flight: int, wait: float, n: int = 16, **flight: Any) -> None:
    _SECOND_BATCH_GATHERING.clear()
    _SEEN.clear()
    data = [float(i) for i in range(n)]
    with beam.Pipeline() as pipeline:
        out = (
            pipeline
            | beam.Create(data, reshuffle=False)
            | beam.Map(_note_gathering)
            | RunInference(Fours(wait)).with_batches_in_flight(in_flight, **flight)
            | beam.Map(lambda r: (r.example, r.inference))
        )
        assert_that(out, equal_to([(x, 2 * x) for x in data]))


def _in_flight(seen: list[tuple[str, bool]]) -> list[bool]:
    return [name.startswith("beam-turbo-inference") for name, _ in seen]


def test_the_model_runs_while_the_next_batch_is_gathered() -> None:
    # Serially, the first batch would wait out its 30 s and note that nothing overlapped.
    _doubled(in_flight=1, wait=30.0, adaptive=False)
    assert _SEEN[0] == (_SEEN[0][0], True), _SEEN
    assert all(_in_flight(_SEEN)), _SEEN


def test_serial_runs_each_batch_on_the_dofns_thread_as_it_is_gathered() -> None:
    _doubled(in_flight=0, wait=0.2)
    assert _SEEN[0][1] is False, "serially, nothing is gathered while a batch runs"
    assert not any(_in_flight(_SEEN)), _SEEN


def _ways(handler: Fours, n: int, **flight: Any) -> list[bool]:
    """Whether each batch of ``handler`` over ``n`` elements ran in flight; a busy Map before
    RunInference (1 ms an element, Beam's per-element work made heavy) gives the model time
    to overlap."""
    _SEEN.clear()
    data = [float(i) for i in range(n)]

    def busy(x: float) -> float:
        end = time.perf_counter() + 1e-3
        while time.perf_counter() < end:
            pass
        return x

    with beam.Pipeline() as pipeline:
        out = (
            pipeline
            | beam.Create(data, reshuffle=False)
            | beam.Map(busy)
            | RunInference(handler).with_batches_in_flight(1, **flight)
            | beam.Map(lambda r: r.inference)
        )
        assert_that(out, equal_to([2 * x for x in data]))
    return _in_flight(_SEEN)


def test_a_device_bound_model_stays_in_flight_after_its_trial() -> None:
    # 4 ms of Beam's work and 4 ms of the model's a batch: in flight, 4 ms a batch; here, 8.
    # A device-bound model: each batch waits 4 ms outside the GIL.
    ways = _ways(Fours(batch_secs=0.004), 4 * (WARM_UP_BATCHES + 2 * TRIAL_BATCHES + 8))
    trial = WARM_UP_BATCHES + 2 * TRIAL_BATCHES
    warm_up_here = [False] * WARM_UP_BATCHES
    assert ways[:trial] == warm_up_here + [True] * TRIAL_BATCHES + [False] * TRIAL_BATCHES
    assert ways[trial:] == [True] * 8, ways


def test_not_adaptive_hands_every_batch_over() -> None:
    assert _ways(Fours(), 40, adaptive=False) == [True] * 10


def test_the_chooser_keeps_the_faster_way_longer_each_time_it_wins_again() -> None:
    chooser = Chooser()
    now, ways = 0.0, []
    for _ in range(WARM_UP_BATCHES + 3 * 2 * TRIAL_BATCHES + KEEP_BATCHES * 3):
        way = chooser.next(now, 100.0)
        ways.append(way)
        now += 1.0 if way else 2.0  # handed over: half the time per element
    runs = [len(list(group)) for _, group in itertools.groupby(ways)]
    # warm-up here, trial handed over, trial here, kept 64 + trial handed over, trial here,
    # kept 128 + trial handed over (cut)
    assert runs[:6] == [
        WARM_UP_BATCHES,
        TRIAL_BATCHES,
        TRIAL_BATCHES,
        KEEP_BATCHES + TRIAL_BATCHES,
        TRIAL_BATCHES,
        runs[5],
    ]
    assert runs[5] >= 2 * KEEP_BATCHES, runs
    assert chooser.chosen is True


def test_the_chooser_picks_here_when_it_is_faster_and_skips_the_gaps_between_bundles() -> None:
    chooser = Chooser()
    here_trial = WARM_UP_BATCHES + TRIAL_BATCHES
    # Bundles end after three of the four counted batches of the trial run here: counted, the
    # hour to the next launch would make here the slower way.
    bundle_ends = {here_trial + SETTLING, here_trial + SETTLING + 1, here_trial + SETTLING + 2}
    now = 0.0
    for n in range(WARM_UP_BATCHES + 2 * TRIAL_BATCHES + 1):
        way = chooser.next(now, 10.0)
        now += 3.0 if way else 1.0  # here: a third of the time
        if n in bundle_ends:
            chooser.pause()
            now += 3600.0
    assert chooser.chosen is False


@pytest.mark.parametrize(("in_flight", "adaptive"), [(0, True), (1, False), (3, False), (1, True)])
def test_beams_metrics_count_every_element_whichever_thread_runs_it(
    in_flight: int, adaptive: bool
) -> None:
    data = [float(i) for i in range(50)]
    pipeline = beam.Pipeline()
    inference = RunInference(Fours(), metrics_namespace="in_flight")
    _ = (
        pipeline
        | beam.Create(data)
        | inference.with_batches_in_flight(in_flight, adaptive=adaptive)
    )
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace("in_flight"))["counters"]
    by_name = {c.key.metric.name: c.committed for c in counters}
    assert by_name.get("num_inferences") == len(data), by_name


class Raising(Fours):
    def run_inference(
        self, batch: Sequence[float], model: int, inference_args: Any = None
    ) -> Iterable[base.PredictionResult]:
        if 9 in batch:
            raise ValueError("element 9 is bad")
        return super().run_inference(batch, model, inference_args)


# The batch with 9 runs in flight (adaptive=False), or where it is gathered (a chooser that
# chose that way).
WHERE_IT_RUNS = pytest.mark.parametrize("adaptive", [False, True], ids=["in-flight", "here"])


@pytest.fixture
def runs_here(adaptive: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if adaptive:
        monkeypatch.setattr(Chooser, "next", lambda self, now, weight: False)


@WHERE_IT_RUNS
@pytest.mark.usefixtures("runs_here")
def test_an_error_in_flight_fails_the_pipeline_with_its_message(adaptive: bool) -> None:
    inference = RunInference(Raising()).with_batches_in_flight(1, adaptive=adaptive)
    with pytest.raises(Exception, match="element 9 is bad"), beam.Pipeline() as pipeline:
        _ = pipeline | beam.Create([float(i) for i in range(20)]) | inference


@WHERE_IT_RUNS
@pytest.mark.usefixtures("runs_here")
def test_an_error_in_flight_goes_to_the_dead_letters_with_its_batch(adaptive: bool) -> None:
    data = [float(i) for i in range(20)]
    inference = RunInference(Raising()).with_batches_in_flight(1, adaptive=adaptive)
    with beam.Pipeline() as pipeline:
        results, dlq = (
            pipeline
            | beam.Create(data, reshuffle=False)
            | inference.with_exception_handling(isolate_failures=True)
        )
        assert_that(results | beam.Map(lambda r: r.example), equal_to(data[:9] + data[10:]))
        dead = dlq.failed_inferences | beam.FlatMap(lambda failure: failure[0])
        assert_that(dead, equal_to([9.0]), label="dead")


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        ["--direct_running_mode=multi_threading", "--direct_num_workers=2"],
    ],
    ids=["multi-process", "multi-thread"],
)
def test_results_equal_serial_on_the_direct_runners_parallel_modes(options: list[str]) -> None:
    from sklearn.linear_model import LinearRegression

    from beam_turbo.sklearn import SklearnModelHandlerNumpy

    rng = np.random.default_rng(0)
    features = rng.random((64, 4))
    model = LinearRegression().fit(features, features @ [1.0, 2.0, 3.0, 4.0])
    data = [rng.random(4) for _ in range(3000)]
    expected = [round(float(p), 9) for p in model.predict(np.stack(data))]
    handler = SklearnModelHandlerNumpy(model_uri="unused", max_batch_size=64)
    handler.load_model = lambda: model  # type: ignore[method-assign]
    with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
        out = (
            pipeline
            | beam.Create(data)
            | RunInference(handler).with_batches_in_flight(2, adaptive=False)
            | beam.Map(lambda r: round(float(r.inference), 9))
        )
        assert_that(out, equal_to(expected))


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, None])
def test_batches_in_flight_must_be_a_count(bad: Any) -> None:
    with pytest.raises(InvalidInputError, match="with_batches_in_flight takes an int >= 0"):
        RunInference(Fours()).with_batches_in_flight(bad)


@pytest.mark.parametrize("bad", [0, 1, "yes", None])
def test_adaptive_must_be_a_bool(bad: Any) -> None:
    with pytest.raises(InvalidInputError, match="adaptive takes True or False, got"):
        RunInference(Fours()).with_batches_in_flight(1, adaptive=bad)


def test_a_batch_gathered_before_a_memory_failure_runs_in_parts_below_it() -> None:
    """In flight, the next batch is gathered before the one running fails for memory: it is
    run in parts below the ceiling the failure set, not tried whole."""
    sizing = Sizing.from_batching_args({"min_batch_size": 1, "max_batch_size": 64})
    sizing.record_memory_failure(16)
    runner = BatchRunner(namespace="t", sizing=sizing)
    parts: list[int] = []

    def infer(part: Sequence[int]) -> list[int]:
        parts.append(len(part))
        return [2 * x for x in part]

    elements = list(range(40))
    outcome = runner.run(SizedBatch(40.0, elements, 40.0), infer)
    assert outcome.outputs == [2 * x for x in elements]
    assert parts == [15, 15, 10], parts


_COLLECTOR_ON: list[bool] = []  # whether the cyclic collector was on as each result came out


def _note_collector(result: base.PredictionResult) -> float:
    time.sleep(0.002)
    _COLLECTOR_ON.append(gc.isenabled())
    return float(result.inference)


@pytest.mark.parametrize("in_flight", [0, 1], ids=["serial", "in-flight"])
def test_no_collection_runs_while_a_batchs_results_are_emitted(in_flight: int) -> None:
    """A batch's results are alive from its run until the last is emitted; a collection in
    between moves them all to an older generation (in flight, that ran a free model at 0.87 of
    serial). The step after RunInference runs as each result is emitted, on the same thread;
    it sleeps, so that in flight the next batch's run, which pauses the collector too, ends
    while results are still being emitted."""
    assert gc.isenabled()
    _COLLECTOR_ON.clear()
    data = [float(i) for i in range(40)]
    with beam.Pipeline() as pipeline:
        out = (
            pipeline
            | beam.Create(data, reshuffle=False)
            | RunInference(Fours()).with_batches_in_flight(in_flight, adaptive=False)
            | beam.Map(_note_collector)
        )
        assert_that(out, equal_to([2 * x for x in data]))
    assert len(_COLLECTOR_ON) == len(data)
    assert not any(_COLLECTOR_ON), f"on for {sum(_COLLECTOR_ON)} of {len(data)} results"
    assert gc.isenabled(), "the collector is still paused after the pipeline"
