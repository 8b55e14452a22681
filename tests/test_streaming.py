"""``RunInference`` with ``max_batch_duration_secs``: batching and inference fused in one
stateful DoFn (``beam_turbo._streaming``), batches gathered across bundles in keyed state, on
the DirectRunner (in-process, streaming with ``TestStream``, and multi-process). Flink's
streaming mode runs it in tests/cluster."""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference import base
from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy as BeamSklearn
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from apache_beam.transforms.window import TimestampedValue
from sklearn.linear_model import LinearRegression

from beam_turbo import RunInference
from beam_turbo.sklearn import SklearnModelHandlerNumpy


class Clock:
    """RunInference's ``clock`` for ``TestStream``, whose processing time starts at 0 and
    moves only when the stream advances it: the DoFn sets its timers from ``time()``."""

    def time(self) -> float:
        return 0.0

    def time_ns(self) -> int:
        return 0


class Doubler(base.ModelHandler[float, base.PredictionResult, Any]):
    """Doubles numbers; writes each batch it runs to ``record``; fails on ``bad`` values."""

    def __init__(
        self,
        record: str,
        *,
        size: int = 4,
        duration: float = 10,
        bad: frozenset[float] = frozenset(),
        weigh: bool = False,
        buckets: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.buckets = buckets
        self.record, self.size, self.duration, self.bad, self.weigh = (
            record,
            size,
            duration,
            bad,
            weigh,
        )

    def load_model(self) -> Any:
        return 2.0

    def run_inference(
        self, batch: Sequence[float], model: Any, inference_args: Any = None
    ) -> Iterable[base.PredictionResult]:
        with open(self.record, "a") as f:
            f.write(" ".join(str(int(x)) for x in batch) + "\n")
        if any(x in self.bad for x in batch):
            raise ValueError(f"cannot score {sorted(self.bad)}")
        return [base.PredictionResult(x, x * model) for x in batch]

    def batch_elements_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "min_batch_size": self.size,
            "max_batch_size": self.size,
            "max_batch_duration_secs": self.duration,
        }
        if self.weigh:
            kwargs["element_size_fn"] = lambda x: 1 + x % 3
        if self.buckets is not None:  # a number's "length" is its value; NaN has none
            kwargs["length_fn"] = _length
            kwargs["bucket_boundaries"] = self.buckets
        return kwargs


def _length(x: float) -> int:
    return int(x)  # ValueError for NaN


class Written(beam.DoFn):
    """Writes each result's inference and timestamp to ``path``. (``assert_that`` would drop
    the results that a window-end timer emits in the global window, at its end.)"""

    def __init__(self, path: Path) -> None:
        self.path = path

    def process(self, result: Any, timestamp: Any = beam.DoFn.TimestampParam) -> None:
        with open(self.path, "a") as f:
            f.write(f"{result.inference} {timestamp.micros}\n")


class Lines(beam.DoFn):
    """Appends each element, a line, to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def process(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line + "\n")


def written(path: Path) -> list[tuple[float, int]]:
    pairs = (line.split() for line in path.read_text().splitlines())
    return sorted((float(value), int(micros)) for value, micros in pairs)


def run_stream(
    stream: TestStream, folder: Path, size: int = 4, windowing: Any = None
) -> tuple[list[list[int]], list[tuple[float, int]]]:
    """``stream`` through beam-turbo's ``RunInference`` (a ``Doubler`` of batch ``size``, with a
    10 s duration limit) in a streaming pipeline: the batches run, and the results written."""
    record, out = folder / "batches", folder / "results"
    with beam.Pipeline(options=PipelineOptions(streaming=True)) as pipeline:
        elements = pipeline | stream
        if windowing is not None:
            elements = elements | beam.WindowInto(windowing)
        _ = (
            elements
            | RunInference(Doubler(str(record), size=size), clock=Clock())
            | beam.ParDo(Written(out))
        )
    return batches(record), written(out)


def batches(record: Path) -> list[list[int]]:
    return [[int(x) for x in line.split()] for line in record.read_text().splitlines()]


def labels(pipeline: beam.Pipeline) -> set[str]:
    return {t.unique_name for t in pipeline.to_runner_api().components.transforms.values()}


def test_results_equal_stock_beams_and_inference_is_fused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((50, 3))
    path = tmp_path / "linear.pkl"
    model = LinearRegression().fit(x, x @ [1.0, 2.0, 3.0])
    path.write_bytes(pickle.dumps(model))
    data = [rng.random(3) for _ in range(500)]
    expected = [
        (tuple(np.round(row, 9)), round(float(y), 9))
        for row, y in zip(data, model.predict(data), strict=True)
    ]

    def scored(results: beam.PCollection, label: str) -> None:
        rounded = results | f"round {label}" >> beam.Map(
            lambda r: (tuple(np.round(r.example, 9)), round(float(r.inference), 9))
        )
        assert_that(rounded, equal_to(expected), label=label)

    pipeline = beam.Pipeline()
    rows = pipeline | beam.Create(data)
    scored(
        rows | "stock" >> base.RunInference(BeamSklearn(str(path), max_batch_duration_secs=1)),
        "stock",
    )
    for handler, label in [
        (SklearnModelHandlerNumpy(str(path), max_batch_duration_secs=1), "ours"),
        (BeamSklearn(str(path), max_batch_duration_secs=1), "Beam's handler"),
    ]:
        scored(rows | label >> RunInference(handler), label)
    pipeline.run().wait_until_finish()
    names = labels(pipeline)
    assert "ours/BeamML_RunInference_Key" in names
    assert not any(n.startswith("ours/") and "BatchElements" in n for n in names)
    assert any(n.startswith("stock/") and "BatchElements" in n for n in names)


def test_batches_span_bundles_and_run_at_the_target_or_the_window_end(tmp_path: Path) -> None:
    stream = TestStream().advance_watermark_to(0)
    for i in range(10):  # one bundle per element
        stream.add_elements([TimestampedValue(float(i), i)])
    stream.advance_watermark_to_infinity()
    ran, results = run_stream(stream, tmp_path)
    assert ran == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # Each result has the timestamp of the element that completed its batch, or the end of
    # the window for the batch its end ran (as with Beam's stateful batching).
    end = window.GlobalWindow().end.micros
    assert results == [(2.0 * i, (i // 4 * 4 + 3) * 10**6 if i < 8 else end) for i in range(10)]


def test_a_batch_runs_when_its_duration_limit_passes(tmp_path: Path) -> None:
    stream = (
        TestStream()
        .advance_watermark_to(0)
        .add_elements([TimestampedValue(0.0, 0)])
        .add_elements([TimestampedValue(1.0, 1)])
        .advance_processing_time(5)  # not yet: the limit is 10 s
        .add_elements([TimestampedValue(2.0, 2)])
        .advance_processing_time(6)  # 11 s after the first element: the batch of 3 runs
        .add_elements([TimestampedValue(3.0, 3)])
        .advance_watermark_to(4)
        .advance_watermark_to_infinity()
    )
    ran, results = run_stream(stream, tmp_path)
    assert ran == [[0, 1, 2], [3]]
    # (Their timestamps are the runner's: a processing-time timer's results carry the time it
    # fired on this runner, the first element's timestamp on the portable runners.)
    assert [value for value, _ in results] == [0.0, 2.0, 4.0, 6.0]


def test_windows_are_batched_apart_and_keep_their_results(tmp_path: Path) -> None:
    stream = TestStream().advance_watermark_to(0)
    for i in range(12):
        stream.add_elements([TimestampedValue(float(i), i)])
    stream.advance_watermark_to_infinity()
    ran, results = run_stream(stream, tmp_path, size=3, windowing=window.FixedWindows(5))
    assert sorted(ran) == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9], [10, 11]]
    # A batch its window's end ran: at the end of the window; one full: at its last element.
    seconds = {0: 2, 1: 2, 2: 2, 3: 5, 4: 5, 5: 7, 6: 7, 7: 7, 8: 10, 9: 10, 10: 15, 11: 15}
    assert results == [(2.0 * i, seconds[i] * 10**6) for i in range(12)]


def test_element_weights_size_the_batches(tmp_path: Path) -> None:
    record = tmp_path / "batches"
    data = [float(i) for i in range(30)]
    with beam.Pipeline() as pipeline:
        results = (
            pipeline
            | beam.Create(data)
            | RunInference(Doubler(str(record), size=4, weigh=True))
            | beam.Map(lambda r: r.example)
        )
        assert_that(results, equal_to(data))
    ran = batches(record)
    assert sorted(x for batch in ran for x in batch) == list(range(30))
    # A batch closes at weight 4, or before an element that would take it past 4.
    assert all(len(b) == 1 or sum(1 + x % 3 for x in b) <= 4 for b in ran)


@pytest.mark.parametrize("isolate", [False, True])
def test_failing_batches_reach_the_dead_letter_output(tmp_path: Path, isolate: bool) -> None:
    record = tmp_path / "batches"
    data = [float(i) for i in range(40)]
    with beam.Pipeline() as pipeline:
        results, dlq = (
            pipeline
            | beam.Create(data)
            | RunInference(
                Doubler(str(record), bad=frozenset({7.0, 23.0}))
            ).with_exception_handling(isolate_failures=isolate)
        )
        good = results | beam.Map(lambda r: r.example)
        failed = dlq.failed_inferences | beam.FlatMap(lambda failure: failure[0])
        assert_that((good, failed) | beam.Flatten(), equal_to(data), label="each once")
        if isolate:
            assert_that(failed, equal_to([7.0, 23.0]), label="only the bad")


def test_length_buckets_batch_apart_and_an_unreadable_length_is_a_dead_letter(
    tmp_path: Path,
) -> None:
    """With a batch_length_fn, bags are Beam's length buckets (here [0, 10) and [10, inf)),
    each run whole; an element whose length cannot be read joins the first bucket, and the
    batch it is in (with 4.0) fails into the dead letters, with nothing lost."""
    record, out = tmp_path / "batches", tmp_path / "out"
    data = [1.0, 12.0, 2.0, 14.0, 3.0, 15.0, float("nan"), 4.0]
    with beam.Pipeline() as pipeline:
        results, dlq = (
            pipeline
            | beam.Create(data, reshuffle=False)
            | RunInference(
                Doubler(str(record), size=3, buckets=[10], bad=frozenset({float("nan")}))
            ).with_exception_handling()
        )
        good = results | beam.Map(lambda r: f"good {r.example}")
        failed = dlq.failed_inferences | beam.FlatMap(lambda f: [f"dead {x}" for x in f[0]])
        # (Written to a file: assert_that drops what a window-end timer emits.)
        _ = (good, failed) | beam.Flatten() | beam.ParDo(Lines(out))
    assert sorted(out.read_text().splitlines()) == sorted(
        [f"good {x}" for x in data[:6]] + ["dead nan", "dead 4.0"]
    )
    ran = batches(record)
    assert sorted(map(sorted, ran)) == [[1, 2, 3], [12, 14, 15]]  # NaN's batch failed first


@pytest.mark.slow
def test_multi_process_pipeline(tmp_path: Path) -> None:
    record = tmp_path / "batches"
    data = [float(i) for i in range(500)]
    options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    pipeline = beam.Pipeline(options=options)
    results = (
        pipeline
        | beam.Create(data)
        | RunInference(Doubler(str(record), size=16))
        | beam.Map(lambda r: r.example)
    )
    assert_that(results, equal_to(data))
    result = pipeline.run()
    result.wait_until_finish()
    ran = batches(record)
    assert sorted(x for batch in ran for x in batch) == list(range(500))
    assert max(map(len, ran)) <= 16
    # Every batch reports what it gathered for: the sizer's target, 16 (a key's last batch,
    # run at the window's end, falls short of it). (This runner reports no metrics for the
    # last batch, run by a timer at the pipeline's end: Beam's own metrics miss it too.)
    distributions = result.metrics().query(MetricsFilter())["distributions"]
    reported = {d.key.metric.name: d.committed for d in distributions}
    target, size = reported["beam_turbo_batch_target"], reported["beam_turbo_batch_size"]
    assert target.count == size.count == reported["inference_request_batch_size"].count
    assert len(ran) - 1 <= size.count <= len(ran)
    assert (target.min, target.max) == (16, 16)
