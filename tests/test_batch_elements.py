"""beam_turbo.BatchElements: Beam's arguments, outputs and metrics; every element exactly once,
no batch over its limits, never mixed across windows; Beam's defects fixed; the stateful
streaming mode with TestStream; pipelines in-process and multi-process."""

from __future__ import annotations

import inspect
import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.test_stream import TestStream as BeamTestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from apache_beam.transforms.window import GlobalWindow, IntervalWindow, TimestampedValue
from apache_beam.utils import timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

import beam_turbo
from beam_turbo import BatchElements
from beam_turbo._beam.internals import (
    SUPPORTED_BEAM,
    UnsupportedBeamVersionError,
    check_beam_version,
)
from beam_turbo._dofns.gathering import (
    DownstreamTiming,
    EmitBatches,
    GatheringDoFn,
    WindowedGatheringDoFn,
)
from beam_turbo._gathering.gatherer import by_size
from beam_turbo._gathering.sizing import Sizing, unit_weight
from beam_turbo._native import BatchSizer
from beam_turbo.errors import InvalidInputError


class FakeClock:
    """Beam's test clock: time moves only when told."""

    def __init__(self, now: Any = 0.0) -> None:
        self.now = now

    def __call__(self) -> Any:
        return self.now

    def sleep(self, secs: float) -> None:
        self.now += secs


#: Batches collected by ``collect`` (in-process runners share this module).
COLLECTED: list[list[Any]] = []


def collect(batch: list[Any]) -> None:
    COLLECTED.append(batch)


def collect_and_pass(batch: list[Any]) -> list[Any]:
    COLLECTED.append(batch)
    return batch


def run_batches(transform: beam.PTransform[Any, Any], elements: Iterable[Any]) -> list[list[Any]]:
    """The batches ``transform`` makes of ``elements`` in one in-process pipeline."""
    COLLECTED.clear()
    with beam.Pipeline() as p:
        _ = p | beam.Create(list(elements), reshuffle=False) | transform | beam.Map(collect)
    found = list(COLLECTED)
    COLLECTED.clear()
    return found


# --- the constructor ---------------------------------------------------------------------


def test_takes_every_argument_of_beams_with_the_same_defaults() -> None:
    ours = inspect.signature(BatchElements).parameters
    beams = inspect.signature(beam.BatchElements).parameters
    for name, param in beams.items():
        assert name in ours, name
        assert ours[name].kind == param.kind, name
        if name != "element_size_fn":  # a lambda there, a named function here
            assert ours[name].default == param.default, name
    assert "max_batch_weight" in ours


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_batch_size": 10, "max_batch_size": 5},
        {"target_batch_overhead": 2.5},
        {"target_batch_duration_secs": -1.0},
        {"target_batch_overhead": None, "target_batch_duration_secs": None},
        {"max_batch_duration_secs": 100, "bucket_boundaries": [10, 20]},
        {"length_fn": len, "bucket_boundaries": [50, 10, 100]},
        {"length_fn": len, "bucket_boundaries": [0, 10, 100]},
        {"length_fn": len, "bucket_boundaries": []},
    ],
)
def test_invalid_arguments_raise_beams_messages(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as beams:
        beam.BatchElements(**kwargs)
    with pytest.raises(InvalidInputError) as ours:
        BatchElements(**kwargs)
    assert str(ours.value) == str(beams.value)


def test_max_batch_weight_must_be_positive() -> None:
    with pytest.raises(InvalidInputError, match=r"max_batch_weight \(0\) must be positive"):
        BatchElements(max_batch_weight=0)


def test_default_length_buckets_are_beams() -> None:
    ours = BatchElements(max_batch_duration_secs=100, length_fn=len)
    beams = beam.BatchElements(max_batch_duration_secs=100, length_fn=len)
    assert ours._bucket_boundaries == beams._bucket_boundaries


def test_exported_from_the_package() -> None:
    assert beam_turbo.BatchElements is BatchElements
    assert "BatchElements" in beam_turbo.__all__
    assert "BatchSizer" in beam_turbo.__all__


def test_private_beam_parts_are_behind_a_version_check() -> None:
    for release in SUPPORTED_BEAM:
        check_beam_version(release + ".0")
        check_beam_version(release + ".9")
    with pytest.raises(UnsupportedBeamVersionError, match=r"apache-beam 2\.74\.0 is installed"):
        check_beam_version("2.74.0")
    with pytest.raises(UnsupportedBeamVersionError, match=r"apache-beam 2\.79\.0 is installed"):
        check_beam_version("2.79.0")
    with pytest.raises(ImportError):
        check_beam_version("2.7")


# --- Beam's own expectations (util_test.BatchElementsTest) -----------------------------------


def test_constant_batch_and_metrics() -> None:
    p = BeamTestPipeline()
    output = (
        p
        | beam.Create(range(35))
        | BatchElements(min_batch_size=10, max_batch_size=10)
        | beam.Map(len)
    )
    assert_that(output, equal_to([10, 10, 10, 5]))
    result = p.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_name("batch_size"))["distributions"]
    assert len(metrics) == 1
    assert metrics[0].key.metric.namespace == "BatchElements"
    assert metrics[0].committed.sum == 35
    timing = result.metrics().query(MetricsFilter().with_name("msec_per_batch"))
    assert len(timing["distributions"]) == 1


def test_no_metrics_when_asked() -> None:
    p = BeamTestPipeline()
    output = (
        p
        | beam.Create(range(35))
        | BatchElements(min_batch_size=10, max_batch_size=10, record_metrics=False)
        | beam.Map(len)
    )
    assert_that(output, equal_to([10, 10, 10, 5]))
    result = p.run()
    result.wait_until_finish()
    assert not result.metrics().query(MetricsFilter().with_name("batch_size"))["distributions"]


def test_grows_to_max_batch() -> None:
    sizes = [
        len(b)
        for b in run_batches(
            BatchElements(min_batch_size=1, max_batch_size=50, clock=FakeClock()), range(164)
        )
    ]
    assert sum(sizes) == 164
    assert max(sizes) == 50
    # Growth is monotone up to the maximum, then it holds (the remainder comes last).
    assert sizes[: sizes.index(50)] == sorted(sizes[: sizes.index(50)])
    assert set(sizes[sizes.index(50) : -1]) == {50}


def test_windowed_batches() -> None:
    with BeamTestPipeline() as p:
        res = (
            p
            | beam.Create(range(47), reshuffle=False)
            | beam.Map(lambda t: window.TimestampedValue(t, t))
            | beam.WindowInto(window.FixedWindows(30))
            | BatchElements(min_batch_size=5, max_batch_size=10, clock=FakeClock())
            | beam.Map(lambda batch: (min(batch) // 30, max(batch) // 30, len(batch)))
        )
        # Never mixed across windows; each window's elements all come out.
        assert_that(res | beam.Map(lambda r: r[0] == r[1]), equal_to([True] * 6), label="unmixed")


def test_global_batch_timestamps() -> None:
    with BeamTestPipeline() as p:
        res = (
            p
            | beam.Create(range(3), reshuffle=False)
            | BatchElements(min_batch_size=2, max_batch_size=2)
            | beam.Map(lambda batch, ts=beam.DoFn.TimestampParam: (len(batch), ts))
        )
        end = GlobalWindow().max_timestamp()
        assert_that(res, equal_to([(2, end), (1, end)]))


def test_windowed_batches_are_emitted_at_their_window_end() -> None:
    with BeamTestPipeline() as p:
        res = (
            p
            | beam.Create(range(1, 8), reshuffle=False)
            | beam.Map(lambda t: window.TimestampedValue("a" * t, t))
            | beam.WindowInto(window.FixedWindows(3))
            | BatchElements(min_batch_size=11, max_batch_size=11, element_size_fn=len)
            | beam.Map(lambda batch, ts=beam.DoFn.TimestampParam: ("".join(batch), ts))
        )
        ends = {0: timestamp.Timestamp(3) - timestamp.Duration(micros=1)}
        ends[3] = timestamp.Timestamp(6) - timestamp.Duration(micros=1)
        ends[6] = timestamp.Timestamp(9) - timestamp.Duration(micros=1)
        assert_that(
            res,
            equal_to(
                [
                    ("a" * 3, ends[0]),
                    ("a" * 7, ends[3]),
                    ("a" * 5, ends[3]),
                    ("a" * 6, ends[6]),
                    ("a" * 7, ends[6]),
                ]
            ),
        )


def test_sized_batches() -> None:
    words = ["a", "a", "a" * 10, "a" * 5, "a" * 5, "a", "a" * 7, "a", "a"]
    batches = run_batches(
        BatchElements(min_batch_size=10, max_batch_size=10, element_size_fn=len), words
    )
    assert ["".join(b) for b in batches] == ["aa", "a" * 10, "a" * 10, "a" * 10]


# --- Beam's defects, fixed -------------------------------------------------------------------


def test_an_element_heavier_than_the_target_goes_out_alone() -> None:
    weights = [20, 1, 1, 30, 2]
    ours = run_batches(
        BatchElements(min_batch_size=5, max_batch_size=5, element_size_fn=lambda w: w), weights
    )
    assert ours == [[20], [1, 1], [30], [2]]
    beams = run_batches(
        beam.BatchElements(min_batch_size=5, max_batch_size=5, element_size_fn=lambda w: w),
        weights,
    )
    assert [] in beams, "Beam 2.77 emits an empty batch before a heavy element"


def test_max_batch_weight_caps_the_weight() -> None:
    words = ["aaa", "bb", "c", "dddd", "ee", "f", "gggggg"]
    batches = run_batches(
        BatchElements(
            min_batch_size=100, max_batch_size=100, element_size_fn=len, max_batch_weight=5
        ),
        words,
    )
    assert [w for b in batches for w in b] == words
    assert all(sum(map(len, b)) <= 5 or len(b) == 1 for b in batches)
    assert batches == [["aaa", "bb"], ["c", "dddd"], ["ee", "f"], ["gggggg"]]


# --- memory failures reported downstream ----------------------------------------------------


class SplitsLargeBatches(beam.DoFn):
    """Runs out of memory on batches of 16 and more: reports it, then does them in halves."""

    def __init__(self, report: Callable[[float], None]) -> None:
        self._report = report

    def process(self, batch: list[int]) -> Iterable[int]:
        if len(batch) >= 16:
            self._report(len(batch))
            yield len(batch[: len(batch) // 2])
            yield len(batch[len(batch) // 2 :])
        else:
            yield len(batch)


def test_memory_failures_reported_downstream_set_the_ceiling() -> None:
    batching = BatchElements(min_batch_size=1, max_batch_size=64)
    COLLECTED.clear()
    with beam.Pipeline() as p:
        _ = (
            p
            | beam.Create(range(600), reshuffle=False)
            | batching
            | beam.Map(collect_and_pass)
            | beam.ParDo(SplitsLargeBatches(batching.memory_failure_reporter()))
        )
    sizes = [len(b) for b in COLLECTED]
    COLLECTED.clear()
    assert sum(sizes) == 600
    first = next(i for i, n in enumerate(sizes) if n >= 16)
    assert all(n < sizes[first] for n in sizes[first + 1 :]), sizes
    assert max(sizes[first + 1 :]) >= 8, f"it backs off to just below the ceiling: {sizes}"


def test_memory_failure_reporter_is_picklable_and_harmless_elsewhere() -> None:
    report = BatchElements().memory_failure_reporter()
    again = pickle.loads(pickle.dumps(report))
    assert again == report
    again(100)  # no batching DoFn of that transform here: nothing to tell
    sizing = Sizing(BatchSizer(), key=report.key)
    assert sizing.take_reported_failures()
    assert sizing.sizer.failures == 1


# --- properties, on the DoFns directly (fast) ------------------------------------------------


def batches_of(
    dofn: beam.DoFn,
    items: list[tuple[int, int]],
    windowed: bool,
    clock: FakeClock,
    bundles: int,
) -> list[Any]:
    """Feeds ``(element, window index)`` items through ``dofn`` in ``bundles`` bundles."""
    out: list[Any] = []

    def take(result: Iterable[Any] | None) -> None:
        for value in result or ():
            clock.sleep(0.01 + 1e-4 * len(value.value))
            out.append(value)

    dofn.setup()
    step = max(1, len(items) // bundles)
    for start in range(0, len(items), step):
        dofn.start_bundle()
        for element, w in items[start : start + step]:
            if windowed:
                take(dofn.process(element, IntervalWindow(10 * w, 10 * w + 10)))
            else:
                take(dofn.process(element))
        take(dofn.finish_bundle())
    return out


@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.integers(1, 30), max_size=300),
    windows=st.integers(1, 14),
    bounds=st.tuples(st.integers(1, 40), st.integers(1, 80)).map(sorted),
    cap=st.one_of(st.none(), st.integers(1, 60)),
    weighted=st.booleans(),
    bundles=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_every_element_once_within_limits_never_mixed(
    weights: list[int],
    windows: int,
    bounds: list[int],
    cap: int | None,
    weighted: bool,
    bundles: int,
    seed: int,
) -> None:
    low, high = bounds
    items = [(i, (i * 7 + seed) % windows) for i in range(len(weights))]
    weight_of: Callable[[int], int] = (lambda i: weights[i]) if weighted else unit_weight
    clock = FakeClock()
    transform = BatchElements(
        min_batch_size=low,
        max_batch_size=high,
        element_size_fn=weight_of,
        clock=clock,
        max_batch_weight=cap,
        record_metrics=False,
    )
    timing = DownstreamTiming(clock, record_metrics=False)
    windowed = windows > 1
    dofn_class = WindowedGatheringDoFn if windowed else GatheringDoFn
    dofn = dofn_class(sizing=transform.sizing, action=EmitBatches(timing))
    out = batches_of(dofn, items, windowed, clock, bundles)

    window_of = dict(items)
    emitted = [e for value in out for e in value.value]
    assert Counter(emitted) == Counter(i for i, _ in items), "every element exactly once"
    limit = min(high, cap if cap is not None else high)
    for value in out:
        batch = value.value
        assert batch, "no empty batch"
        assert len(batch) == 1 or sum(map(weight_of, batch)) <= limit
        if windowed:
            (win,) = value.windows
            assert {window_of[e] for e in batch} == {int(win.start) // 10}
            assert value.timestamp == win.max_timestamp()


# --- the stateful (streaming) mode -----------------------------------------------------------


SCIENTISTS = ["Einstein", "Darwin", "Copernicus", "Pasteur", "Curie"] * 2


def test_stateful_constant_batch() -> None:
    p = BeamTestPipeline()
    output = (
        p
        | beam.Create(range(35))
        | BatchElements(min_batch_size=10, max_batch_size=10, max_batch_duration_secs=100)
        | beam.Map(len)
    )
    assert_that(output, equal_to([10, 10, 10, 5]))
    p.run().wait_until_finish()


def test_stateful_flushes_on_size_duration_limit_and_window_end() -> None:
    start = timestamp.Timestamp(0)
    stream = (
        BeamTestStream()
        .add_elements([TimestampedValue(v, start + i) for i, v in enumerate(SCIENTISTS)])
        .advance_processing_time(150)
        .advance_watermark_to(start + 6)
        .advance_watermark_to(start + 7)
        .advance_watermark_to_infinity()
    )
    with BeamTestPipeline(options=PipelineOptions(streaming=True)) as p:
        sizes = (
            p
            | stream
            | "fixed" >> beam.WindowInto(window.FixedWindows(6))
            | BatchElements(
                min_batch_size=5,
                max_batch_size=5,
                max_batch_duration_secs=100,
                clock=FakeClock(now=start),
            )
            | beam.Map(lambda batch: (None, len(batch)))
            | beam.GroupByKey()
            | "global" >> beam.WindowInto(window.GlobalWindows())
            | beam.FlatMapTuple(lambda k, vs: vs)
        )
        # Full at 5; then 1 left in the window when the 100 s limit passes; then the rest
        # (4) when the second window ends.
        assert_that(sizes, equal_to([5, 1, 4]))


def test_stateful_flushes_on_the_duration_limit_in_the_global_window() -> None:
    start = timestamp.Timestamp(0)
    stream = BeamTestStream().advance_watermark_to(start)
    for i, value in enumerate(SCIENTISTS):
        stream.add_elements([TimestampedValue(value, start + i)]).advance_processing_time(5)
    stream.advance_watermark_to(start + len(SCIENTISTS) + 1).advance_watermark_to_infinity()
    with BeamTestPipeline(options=PipelineOptions(streaming=True)) as p:
        sizes = (
            p
            | stream
            | beam.WindowInto(
                window.GlobalWindows(),
                trigger=beam.trigger.Repeatedly(beam.trigger.AfterCount(1)),
                accumulation_mode=beam.trigger.AccumulationMode.DISCARDING,
            )
            | BatchElements(
                min_batch_size=20,
                max_batch_size=20,
                max_batch_duration_secs=42,
                clock=FakeClock(now=start),
            )
            | beam.Map(lambda batch: (None, len(batch)))
            | beam.GroupByKey()
            | beam.FlatMapTuple(lambda k, vs: vs)
        )
        assert_that(sizes, equal_to([9, 1]))


def test_stateful_mode_honours_weights() -> None:
    words = ["a" * n for n in [3, 4, 2, 12, 1, 5, 5, 6]]
    stream = (
        BeamTestStream()
        .add_elements([TimestampedValue(w, i) for i, w in enumerate(words)])
        .advance_watermark_to(100)
        .advance_watermark_to_infinity()
    )
    with BeamTestPipeline(options=PipelineOptions(streaming=True)) as p:
        batches = (
            p
            | stream
            | "fixed" >> beam.WindowInto(window.FixedWindows(100))
            | BatchElements(
                min_batch_size=10,
                max_batch_size=10,
                max_batch_duration_secs=1000,
                element_size_fn=len,
            )
            # Batches flushed at the window's end are on time only in that window.
            | beam.Map(lambda b: (None, b))
            | beam.GroupByKey()
            | "global" >> beam.WindowInto(window.GlobalWindows())
            | beam.FlatMapTuple(lambda k, bs: bs)
        )
        assert_that(
            batches | beam.Map(lambda b: [len(w) for w in b]),
            equal_to([[3, 4, 2], [12], [1, 5], [5], [6]]),
            label="by weight",
        )
        assert_that(batches | beam.FlatMap(lambda b: b), equal_to(words), label="exactly once")


def test_stateful_length_buckets_do_not_mix() -> None:
    short = ["x" * i for i in range(1, 6)] * 4
    long = ["y" * i for i in range(50, 56)] * 4
    batches = run_batches(
        BatchElements(
            min_batch_size=5,
            max_batch_size=10,
            max_batch_duration_secs=100,
            length_fn=len,
            bucket_boundaries=[10, 50],
        ),
        short + long,
    )
    assert sorted(w for b in batches for w in b) == sorted(short + long)
    assert all(max(map(len, b)) - min(map(len, b)) < 50 for b in batches)


# --- pipelines -------------------------------------------------------------------------------


def test_adaptive_pipeline_times_the_downstream_work() -> None:
    def slow(batch: list[int]) -> int:
        time.sleep(0.001)  # a fixed cost per batch, so that bigger batches pay
        return len(batch)

    p = BeamTestPipeline()
    sizes = p | beam.Create(range(3000)) | BatchElements(max_batch_size=500) | beam.Map(slow)
    assert_that(sizes | beam.CombineGlobally(sum), equal_to([3000]))
    result = p.run()
    result.wait_until_finish()
    (dist,) = result.metrics().query(MetricsFilter().with_name("batch_size"))["distributions"]
    assert dist.committed.max > 1, "it grew"


def test_multi_threaded_pipeline_shares_one_sizer() -> None:
    options = PipelineOptions(["--direct_running_mode=multi_threading", "--direct_num_workers=2"])
    words = [f"w{i}" for i in range(3000)]
    with beam.Pipeline(options=options) as p:
        batches = p | beam.Create(words) | BatchElements(min_batch_size=2, max_batch_size=100)
        assert_that(batches | beam.FlatMap(lambda b: b), equal_to(words), label="once")
        assert_that(
            batches | beam.Map(lambda b: 0 < len(b) <= 100),
            lambda found: all(found) or pytest.fail("over the limit"),
            label="limits",
        )


@pytest.mark.slow
def test_multi_process_pipeline() -> None:
    options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    words = [f"w{i}" * (1 + i % 7) for i in range(2000)]
    with beam.Pipeline(options=options) as p:
        batches = (
            p
            | beam.Create(words)
            | BatchElements(
                min_batch_size=4, max_batch_size=64, element_size_fn=len, max_batch_weight=100
            )
        )
        assert_that(batches | beam.FlatMap(lambda b: b), equal_to(words), label="once")
        assert_that(
            batches | beam.Map(lambda b: len(b) == 1 or sum(map(len, b)) <= 64),
            lambda found: all(found) or pytest.fail("over the limit"),
            label="limits",
        )


@pytest.mark.slow
def test_multi_process_stateful_pipeline() -> None:
    options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    with beam.Pipeline(options=options) as p:
        sizes = (
            p
            | beam.Create(range(500))
            | BatchElements(min_batch_size=8, max_batch_size=8, max_batch_duration_secs=10)
            | beam.Map(len)
        )
        assert_that(sizes | beam.CombineGlobally(sum), equal_to([500]))


# SortAndBatchElements (Beam 2.77's own tests run in scripts/conformance.py).


def _dofn_batches(dofn: Any, data: list[str], windows: list[Any]) -> list[tuple[Any, list[str]]]:
    """Run a batching DoFn's bundle by hand: (window, batch) in the order emitted."""
    if hasattr(dofn, "setup"):
        dofn.setup()
    dofn.start_bundle()
    emitted = []
    takes_window = "window" in inspect.signature(dofn.process).parameters
    for element, win in zip(data, windows, strict=True):
        emitted += list(
            (dofn.process(element, win) if takes_window else dofn.process(element)) or ()
        )
    emitted += list(dofn.finish_bundle() or ())
    return [(value.windows[0], value.value) for value in emitted]


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(st.text(alphabet="ab", max_size=12), max_size=60),
    max_batch_size=st.integers(1, 8),
    max_batch_weight=st.integers(1, 30),
    windowed=st.booleans(),
)
def test_sort_and_batch_gives_beams_batches(
    data: list[str], max_batch_size: int, max_batch_weight: int, windowed: bool
) -> None:
    from apache_beam.transforms import util as beam_util

    windows = [
        IntervalWindow(len(s) // 4 * 4, len(s) // 4 * 4 + 4) if windowed else GlobalWindow()
        for s in data
    ]
    ours = WindowedGatheringDoFn(
        sizing=Sizing.from_batching_args(
            {"min_batch_size": max_batch_size, "max_batch_size": max_batch_size}
        ),
        action=EmitBatches(DownstreamTiming(time.perf_counter, record_metrics=False)),
        pool=float("inf"),
        cut=by_size(max_batch_size, max_batch_weight, None),
    )
    beams_class = (
        beam_util._WindowAwareSortAndBatchElementsDoFn
        if windowed
        else beam_util._SortAndBatchElementsDoFn
    )
    theirs = beams_class(1, max_batch_size, max_batch_weight, None)
    assert _dofn_batches(ours, data, windows) == _dofn_batches(theirs, data, windows)


def test_sort_and_batch_sized_by_the_sizer_grows_and_keeps_every_element() -> None:
    """Given a target, the number per batch is the sizer's: it grows from the minimum while
    the work downstream is cheap, within the bounds; each batch is sorted; nothing is lost."""
    data = ["x" * (i % 17) for i in range(600)]

    def slow(batch: list[str]) -> tuple[int, bool]:
        time.sleep(0.001)
        return len(batch), [len(s) for s in batch] == sorted(len(s) for s in batch)

    def check(sizes: list[tuple[int, bool]]) -> None:
        assert sum(n for n, _ in sizes) == len(data)
        assert all(in_order for _, in_order in sizes)
        assert max(n for n, _ in sizes) == 64
        assert len(sizes) > len(data) / 64  # it started small

    with beam.Pipeline() as pipeline:
        out = (
            pipeline
            | beam.Create(data, reshuffle=False)
            | beam_turbo.SortAndBatchElements(
                min_batch_size=2,
                max_batch_size=64,
                max_batch_weight=10_000,
                target_batch_duration_secs=0.05,
            )
            | beam.Map(slow)
        )
        assert_that(out, check)


def test_sort_and_batch_holds_few_windows_and_loses_none() -> None:
    data = [("w" * (i % 5), i) for i in range(300)]  # 300 windows of one second
    with beam.Pipeline() as pipeline:
        batches = (
            pipeline
            | beam.Create(data, reshuffle=False)
            | beam.Map(lambda pair: TimestampedValue(pair[0], pair[1]))
            | beam.WindowInto(window.FixedWindows(1))
            | beam_turbo.SortAndBatchElements(
                min_batch_size=1, max_batch_size=4, max_batch_weight=99
            )
            | beam.FlatMap(lambda batch: batch)
        )
        assert_that(batches, equal_to([s for s, _ in data]))


def test_sort_and_batch_checks_its_arguments_as_beam_does() -> None:
    with pytest.raises(ValueError, match="min_batch_size must be >= 1, got 0"):
        beam_turbo.SortAndBatchElements(min_batch_size=0, max_batch_size=1, max_batch_weight=1)
    with pytest.raises(TypeError, match="element_size_fn must be callable"):
        beam_turbo.SortAndBatchElements(1, 2, 3, element_size_fn=3)  # type: ignore[arg-type]
