# Beam's DoFn API declares state and timers as call defaults (DoFn.StateParam(...)).
# ruff: noqa: B008
"""``beam_turbo.BatchElements``: Beam's ``BatchElements``, sized by :class:`~beam_turbo.BatchSizer`.

Same arguments, defaults and meaning as ``apache_beam.BatchElements``, the same outputs (lists,
emitted at the end of their window), the same metrics, and the same stateful mode for
streaming (``max_batch_duration_secs``), plus ``max_batch_weight``. Batch sizes come from
:class:`~beam_turbo.BatchSizer` (through ``_sizing.Sizing``): they settle on the target and
stay there, and back off after memory failures that the downstream work reports. The
deliberate differences from Beam are listed in one place, the README's "Differences from
Beam" table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam import coders
from apache_beam.coders import typecoders
from apache_beam.metrics.metric import Metrics
from apache_beam.pvalue import PCollection
from apache_beam.transforms.combiners import CountCombineFn
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    CombiningValueStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)

from beam_turbo import _beam_internals as internals
from beam_turbo._sizing import (
    NO_OUTPUT,
    MemoryFailureReporter,
    SizedBatch,
    Sizing,
    WindowBatches,
    unit_weight,
)
from beam_turbo.errors import InvalidInputError

__all__ = ["BatchElements", "SortAndBatchElements"]

_LOG = logging.getLogger(__name__)


class _Timing:
    """Times batches for the sizer and records Beam's batching metrics.

    Beam's distributions take integers, so milliseconds below one are carried over to the
    next batch, as Beam does.
    """

    def __init__(self, clock: Callable[[], Any], record_metrics: bool) -> None:
        self._clock = clock
        self._record_metrics = record_metrics
        self._remainder_msecs = 0.0
        self._sizes: Any = None
        self._times: Any = None

    def setup(self) -> None:
        if self._record_metrics:
            self._sizes = Metrics.distribution(
                internals.METRICS_NAMESPACE, internals.BATCH_SIZE_METRIC
            )
            self._times = Metrics.distribution(
                internals.METRICS_NAMESPACE, internals.MSEC_PER_BATCH_METRIC
            )

    def now(self) -> Any:
        return self._clock()

    def done(self, sizing: Sizing | None, weight: float, start: Any) -> None:
        """A batch of ``weight`` emitted at ``start`` was processed downstream; ``sizing``
        learns its time (None: the time says nothing, as after a memory failure)."""
        elapsed = float(self._clock() - start)
        msecs = 1e3 * elapsed + self._remainder_msecs
        self._remainder_msecs = msecs - int(msecs)
        if self._sizes is not None:
            self._sizes.update(int(weight))
            self._times.update(int(msecs))
        if sizing is not None:
            sizing.record(weight, elapsed)

    def __getstate__(self) -> dict[str, Any]:
        # Metric cells are per worker: made again in setup().
        return {**self.__dict__, "_sizes": None, "_times": None}


class _BatchingDoFn(beam.DoFn):
    """Batches the elements of a bundle in the global window."""

    def __init__(self, *, sizing: Sizing, timing: _Timing) -> None:
        self._sizing = sizing
        self._timing = timing
        self._untimed = True
        self._batch: list[Any] = []
        self._weight: float = 0
        self._target: float = 1

    def setup(self) -> None:
        self._timing.setup()
        self._sizing = self._sizing.shared()
        # Downstream setup (loading a model) would make the first timing meaningless.
        self._untimed = True

    def _next_target(self) -> None:
        self._target = self._sizing.target()

    def start_bundle(self) -> None:
        self._batch = []
        self._weight = 0
        self._next_target()

    def _timed(self, batch: Any, weight: float) -> Iterator[Any]:
        """Emit ``batch`` (of ``weight``), then tell the sizer how long the work fused
        downstream took on it, or of the memory failures that work reported."""
        start = self._timing.now()
        yield batch
        failed = self._sizing.take_reported_failures()
        self._timing.done(None if self._untimed or failed else self._sizing, weight, start)
        self._untimed = False

    def _emit(self, batch: list[Any], weight: float) -> Iterator[Any]:
        yield from self._timed(internals.at_end_of_global_window(batch), weight)
        self._next_target()

    def process(self, element: Any) -> Iterable[Any]:
        weight = self._sizing.element_weight(element)
        if self._batch and self._weight + weight > self._target:
            full, full_weight = self._batch, self._weight
            self._batch, self._weight = [], 0
            return self._emit_then_add(full, full_weight, element, weight)
        self._batch.append(element)
        self._weight += weight
        if self._weight >= self._target:
            full, full_weight = self._batch, self._weight
            self._batch, self._weight = [], 0
            return self._emit(full, full_weight)
        return NO_OUTPUT

    def _emit_then_add(
        self, full: list[Any], full_weight: float, element: Any, weight: float
    ) -> Iterator[Any]:
        """The batch that ``element`` does not fit in goes out; the element starts the next,
        and goes out alone at once if it alone reaches the (new) target."""
        yield from self._emit(full, full_weight)
        self._batch.append(element)
        self._weight += weight
        if self._weight >= self._target:
            full, full_weight = self._batch, self._weight
            self._batch, self._weight = [], 0
            yield from self._emit(full, full_weight)

    def finish_bundle(self) -> Iterator[Any]:
        if self._batch:
            batch, weight = self._batch, self._weight
            self._batch, self._weight = [], 0
            yield from self._emit(batch, weight)


class _UnitBatchingDoFn(_BatchingDoFn):
    """:class:`_BatchingDoFn` for elements that all weigh 1: no per-element call."""

    def process(self, element: Any) -> Iterable[Any]:
        batch = self._batch
        batch.append(element)
        if len(batch) >= self._target:
            self._batch = []
            return self._emit(batch, len(batch))
        return NO_OUTPUT

    def finish_bundle(self) -> Iterator[Any]:
        if self._batch:
            batch, self._batch = self._batch, []
            yield from self._emit(batch, len(batch))


class _WindowAwareBatchingDoFn(_BatchingDoFn):
    """Batches per window (:class:`WindowBatches`)."""

    def start_bundle(self) -> None:
        self._windows = WindowBatches(self._sizing)

    def _emit_in(self, win: Any, batch: SizedBatch) -> Iterator[Any]:
        value = internals.WindowedValue(batch.elements, win.max_timestamp(), (win,))
        return self._timed(value, batch.weight)

    def process(self, element: Any, win: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        for full_window, batch in self._windows.add(element, win):
            yield from self._emit_in(full_window, batch)

    def finish_bundle(self) -> Iterator[Any]:
        for win, batch in self._windows.drain():
            yield from self._emit_in(win, batch)


class _SumWeights(beam.CombineFn):
    """Sums element weights in a float accumulator (the state's coder is FloatCoder)."""

    def create_accumulator(self) -> float:
        return 0.0

    def add_input(self, total: float, weight: float) -> float:
        return total + weight

    def merge_accumulators(self, totals: Any) -> float:
        return float(sum(totals))

    def extract_output(self, total: float) -> float:
        return total


def _stateful_batching_dofn(
    *, input_coder: coders.Coder, sizing: Sizing, max_buffering_secs: float, timing: _Timing
) -> beam.DoFn:
    """Beam's stateful batching (batches across bundles, flushed by size, window end or a
    processing-time limit), with the sizer kept in state and element weights honoured."""
    elements_state = BagStateSpec("values", input_coder)
    count_state = CombiningValueStateSpec("count", coders.VarIntCoder(), CountCombineFn())
    weight_state = CombiningValueStateSpec("weight", coders.FloatCoder(), _SumWeights())
    target_state = ReadModifyWriteStateSpec("batch_size", coders.FloatCoder())
    sizer_state = ReadModifyWriteStateSpec("batch_estimator", coders.PickleCoder())
    window_timer = TimerSpec("window_end", TimeDomain.WATERMARK)
    buffering_timer = TimerSpec("buffering_end", TimeDomain.REAL_TIME)

    class _StatefulBatchingDoFn(beam.DoFn):
        def setup(self) -> None:
            timing.setup()

        def process(
            self,
            element: Any,
            win: Any = beam.DoFn.WindowParam,
            elements: Any = beam.DoFn.StateParam(elements_state),
            count: Any = beam.DoFn.StateParam(count_state),
            weight: Any = beam.DoFn.StateParam(weight_state),
            target: Any = beam.DoFn.StateParam(target_state),
            sizer_in_state: Any = beam.DoFn.StateParam(sizer_state),
            window_end: Any = beam.DoFn.TimerParam(window_timer),
            buffering_end: Any = beam.DoFn.TimerParam(buffering_timer),
        ) -> Iterator[Any]:
            window_end.set(win.end)
            value = element[1]  # the key only spreads the work; batches hold the values
            element_weight = sizing.element_weight(value)
            goal = target.read()
            if goal is None:
                sizer_in_state.write(sizing.sizer)
                goal = sizing.target()
                target.write(goal)
            state = (elements, count, weight, target, sizer_in_state, buffering_end)
            if count.read() and weight.read() + element_weight > goal:
                yield from self._flush(*state)
                goal = target.read()
            elements.add(value)
            count.add(1)
            weight.add(element_weight)
            if count.read() == 1 and max_buffering_secs > 0:
                buffering_end.set(timing.now() + max_buffering_secs)
            if weight.read() >= goal:
                yield from self._flush(*state)

        @on_timer(window_timer)
        def on_window_end(
            self,
            elements: Any = beam.DoFn.StateParam(elements_state),
            count: Any = beam.DoFn.StateParam(count_state),
            weight: Any = beam.DoFn.StateParam(weight_state),
            target: Any = beam.DoFn.StateParam(target_state),
            sizer_in_state: Any = beam.DoFn.StateParam(sizer_state),
            buffering_end: Any = beam.DoFn.TimerParam(buffering_timer),
        ) -> Iterator[Any]:
            yield from self._flush(elements, count, weight, target, sizer_in_state, buffering_end)

        @on_timer(buffering_timer)
        def on_buffering_end(
            self,
            elements: Any = beam.DoFn.StateParam(elements_state),
            count: Any = beam.DoFn.StateParam(count_state),
            weight: Any = beam.DoFn.StateParam(weight_state),
            target: Any = beam.DoFn.StateParam(target_state),
            sizer_in_state: Any = beam.DoFn.StateParam(sizer_state),
            buffering_end: Any = beam.DoFn.TimerParam(buffering_timer),
        ) -> Iterator[Any]:
            yield from self._flush(elements, count, weight, target, sizer_in_state, buffering_end)

        def _flush(
            self,
            elements: Any,
            count: Any,
            weight: Any,
            target: Any,
            sizer_in_state: Any,
            buffering_end: Any,
        ) -> Iterator[Any]:
            batch = list(elements.read())
            if not batch:
                return
            batch_weight = weight.read()
            elements.clear()
            count.clear()
            weight.clear()
            in_state = sizing.using(sizer_in_state.read() or sizing.sizer)
            start = timing.now()
            yield batch
            failed = in_state.take_reported_failures()
            timing.done(None if failed else in_state, batch_weight, start)
            target.write(in_state.target())
            sizer_in_state.write(in_state.sizer)
            buffering_end.clear()

    return _StatefulBatchingDoFn()


def _pardo(fn: beam.DoFn) -> Any:
    """``beam.ParDo(fn)``, which Beam does not annotate."""
    return beam.ParDo(fn)


class BatchElements(beam.PTransform[PCollection[Any], PCollection[list[Any]]]):
    """Batch elements for amortized processing, sized adaptively by :class:`BatchSizer`.

    A drop-in for ``apache_beam.BatchElements``: it consumes a ``PCollection[T]`` and produces
    a ``PCollection[list[T]]``, batched per window (each batch at the end of its window), with
    batch sizes chosen from the time the downstream (fused) work takes on each batch, so that
    the fixed cost per batch stays under ``target_batch_overhead`` and a batch under
    ``target_batch_duration_secs``.

    Args:
        min_batch_size: the smallest size of a batch.
        max_batch_size: the largest size of a batch.
        target_batch_overhead: a target for fixed cost / total time of a batch.
        target_batch_duration_secs: a target for a batch's time, excluding its fixed cost.
        target_batch_duration_secs_including_fixed_cost: a target for a batch's total time.
        max_batch_duration_secs: the longest a batch may be buffered before it is emitted.
            Setting it uses the stateful implementation, which batches across bundles
            (streaming): elements are keyed per worker (or per length bucket), held in state,
            and flushed when the batch is full, its window ends, or this much processing time
            has passed since its first element.
        element_size_fn: an element's weight (default 1). With it, the batch-size bounds and
            targets are in total weight, and batches hold a varying number of elements.
        variance: accepted for compatibility; Beam jitters sizes by this much, beam-turbo
            does not.
        clock: an alternative to ``time.time`` to time downstream work (for tests).
        record_metrics: record Beam's ``BatchElements`` distributions ``batch_size`` and
            ``msec_per_batch``.
        length_fn: in the stateful mode with ``bucket_boundaries``, an element's length:
            elements of similar length are batched together (less padding).
        bucket_boundaries: sorted positive length boundaries, lower-inclusive; default
            ``[16, 32, 64, 128, 256, 512]`` when ``length_fn`` is set.
        max_batch_weight: a cap on a batch's total weight (``element_size_fn``). An element
            heavier than the cap goes out alone.

    Raises:
        InvalidInputError (a ValueError): invalid targets, bounds or bucket boundaries, with
            Beam's messages.

    Example:
        >>> import apache_beam as beam
        >>> from beam_turbo import BatchElements
        >>> with beam.Pipeline() as p:
        ...     _ = (
        ...         p
        ...         | beam.Create(range(10))
        ...         | BatchElements(min_batch_size=4, max_batch_size=4)
        ...         | beam.Map(len)
        ...         | beam.Map(print)
        ...     )
        4
        4
        2
    """

    def __init__(
        self,
        min_batch_size: int = 1,
        max_batch_size: int = 10000,
        target_batch_overhead: float | None = 0.05,
        target_batch_duration_secs: float | None = 10,
        target_batch_duration_secs_including_fixed_cost: float | None = None,
        max_batch_duration_secs: float | None = None,
        *,
        element_size_fn: Callable[[Any], float] = unit_weight,
        variance: float = 0.25,
        clock: Callable[[], Any] = time.time,
        record_metrics: bool = True,
        length_fn: Callable[[Any], int] | None = None,
        bucket_boundaries: Sequence[float] | None = None,
        max_batch_weight: float | None = None,
    ) -> None:
        super().__init__()
        if bucket_boundaries is not None and length_fn is None:
            raise InvalidInputError("bucket_boundaries requires length_fn to be set.")
        if bucket_boundaries is not None and (
            not bucket_boundaries
            or any(b <= 0 for b in bucket_boundaries)
            or list(bucket_boundaries) != sorted(bucket_boundaries)
        ):
            raise InvalidInputError(
                "bucket_boundaries must be a non-empty sorted list of positive values."
            )
        if max_batch_weight is not None and not max_batch_weight > 0:
            raise InvalidInputError(f"max_batch_weight ({max_batch_weight}) must be positive")
        self._sizing = Sizing.from_batching_args(
            {
                "min_batch_size": min_batch_size,
                "max_batch_size": max_batch_size,
                "target_batch_overhead": target_batch_overhead,
                "target_batch_duration_secs": target_batch_duration_secs,
                "target_batch_duration_secs_including_fixed_cost": (
                    target_batch_duration_secs_including_fixed_cost
                ),
                "variance": variance,
                "element_size_fn": element_size_fn,
                "max_batch_weight": max_batch_weight,
            }
        )
        self._max_batch_dur = max_batch_duration_secs
        self._clock = clock
        self._record_metrics = record_metrics
        self._length_fn = length_fn
        if length_fn is not None and bucket_boundaries is None:
            self._bucket_boundaries: list[float] | None = list(internals.DEFAULT_BUCKET_BOUNDARIES)
        else:
            self._bucket_boundaries = None if bucket_boundaries is None else list(bucket_boundaries)

    def memory_failure_reporter(self) -> MemoryFailureReporter:
        """A picklable callable through which the work downstream reports a batch that ran out
        of memory, so that the sizer backs off and does not propose that size again.

        Example:
            >>> from beam_turbo import BatchElements
            >>> batching = BatchElements()
            >>> report = batching.memory_failure_reporter()
            >>> report(512)  # where a batch of 512 raised CUDA's out-of-memory error
        """
        return self._sizing.reporter()

    def expand(self, pcoll: PCollection[Any]) -> PCollection[list[Any]]:
        timing = _Timing(self._clock, self._record_metrics)
        batches: PCollection[list[Any]]
        if self._max_batch_dur is not None:
            coder = typecoders.registry.get_coder(pcoll)
            if self._length_fn is not None:
                keying = internals.length_bucket_key_dofn(self._length_fn, self._bucket_boundaries)
            else:
                keying = internals.shared_key_dofn()
            batches = (
                pcoll
                | "Key" >> _pardo(keying)
                | "Batch"
                >> _pardo(
                    _stateful_batching_dofn(
                        input_coder=coder,
                        sizing=self._sizing,
                        max_buffering_secs=self._max_batch_dur,
                        timing=timing,
                    )
                )
            )
            return batches
        if not pcoll.windowing.is_default():
            dofn_class: type[_BatchingDoFn] = _WindowAwareBatchingDoFn
        elif self._sizing.weigh is None:
            dofn_class = _UnitBatchingDoFn
        else:
            dofn_class = _BatchingDoFn
        batches = pcoll | _pardo(dofn_class(sizing=self._sizing, timing=timing))
        return batches


class _SortingBatchingDoFn(beam.DoFn):
    """Holds a bundle's elements per window, then emits each window's sorted by size and cut
    into batches; at most ``MAX_LIVE_WINDOWS`` windows are held, then the largest goes out."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_weight: float,
        element_size_fn: Callable[[Any], float] | None,
        sizing: Sizing | None,
    ) -> None:
        self._max_batch_size = max_batch_size
        self._max_batch_weight = max_batch_weight
        self._element_size_fn = element_size_fn
        self._sizing = sizing
        self._warned = False
        self._windows: dict[Any, list[Any]] = {}

    def setup(self) -> None:
        if self._sizing is not None:
            self._sizing = self._sizing.shared()
        self._untimed = True  # the first batch's downstream time includes its set-up

    def _size(self, element: Any) -> float:
        if self._element_size_fn is not None:
            return self._element_size_fn(element)
        try:
            return len(element)
        except TypeError:
            if not self._warned:
                # Beam's words.
                _LOG.warning(
                    "Element of type %s does not support len(). Falling back to size 1. "
                    "Consider providing a custom element_size_fn to SortAndBatchElements for "
                    "meaningful size-based batching.",
                    type(element).__name__,
                )
                self._warned = True
            return 1

    def start_bundle(self) -> None:
        self._windows = {}

    def process(self, element: Any, win: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        held = self._windows.get(win)
        if held is None:
            held = self._windows[win] = []
        held.append(element)
        if len(self._windows) > internals.MAX_LIVE_WINDOWS:
            largest = max(self._windows, key=lambda w: len(self._windows[w]))
            yield from self._flush(largest)

    def finish_bundle(self) -> Iterator[Any]:
        for win in list(self._windows):
            yield from self._flush(win)

    def _limit(self) -> int:
        if self._sizing is None:
            return self._max_batch_size
        return min(self._max_batch_size, max(1, int(self._sizing.target())))

    def _flush(self, win: Any) -> Iterator[Any]:
        sized = [(self._size(element), element) for element in self._windows.pop(win)]
        sized.sort(key=lambda pair: pair[0])  # stable: equal sizes keep their order
        batch: list[Any] = []
        weight = 0.0
        limit = self._limit()
        for size, element in sized:
            # Beam's rule: a batch stays below max_batch_weight unless one element exceeds it.
            if batch and (len(batch) >= limit or weight + size >= self._max_batch_weight):
                yield from self._emit(batch, win)
                batch, weight, limit = [], 0.0, self._limit()
            batch.append(element)
            weight += size
        if batch:
            yield from self._emit(batch, win)

    def _emit(self, batch: list[Any], win: Any) -> Iterator[Any]:
        start = time.perf_counter()
        yield internals.WindowedValue(batch, win.max_timestamp(), (win,))
        if self._sizing is not None:
            failed = self._sizing.take_reported_failures()
            if not (self._untimed or failed):
                self._sizing.record(len(batch), time.perf_counter() - start)
            self._untimed = False


class SortAndBatchElements(beam.PTransform[PCollection[Any], PCollection[list[Any]]]):
    """Batch the elements of each bundle sorted by size, so that each batch holds elements of
    similar size (less padding for ragged inputs): a drop-in for Beam 2.77's
    ``apache_beam.transforms.util.SortAndBatchElements``, with the same arguments, batches,
    windows and timestamps.

    Each bundle's elements are held per window, sorted by ``element_size_fn`` (default
    ``len(element)``, or 1 for elements without a length) and cut into batches of at most
    ``max_batch_size`` elements whose sizes sum below ``max_batch_weight`` (an element heavier
    than that goes alone). Each batch is emitted at the end of its window.

    Not Beam's: given any of :class:`BatchSizer`'s targets (``target_batch_overhead``,
    ``target_batch_duration_secs``, ``target_batch_duration_secs_including_fixed_cost``),
    the number of elements per batch is chosen by a :class:`BatchSizer` between
    ``min_batch_size`` and ``max_batch_size`` from the time the work downstream (fused)
    takes on each batch, as :class:`BatchElements` does; without them, batches fill to
    ``max_batch_size`` as in Beam.

    Raises:
        ValueError: ``min_batch_size`` < 1, ``max_batch_size`` < ``min_batch_size``,
            ``max_batch_weight`` < 1 (Beam's messages).
        TypeError: an ``element_size_fn`` that is not callable.

    Example:
        >>> import apache_beam as beam
        >>> from beam_turbo import SortAndBatchElements
        >>> with beam.Pipeline() as p:
        ...     _ = (
        ...         p
        ...         | beam.Create(["ccc", "a", "dddd", "bb"], reshuffle=False)
        ...         | SortAndBatchElements(min_batch_size=1, max_batch_size=2, max_batch_weight=100)
        ...         | beam.Map(print)
        ...     )
        ['a', 'bb']
        ['ccc', 'dddd']
    """

    def __init__(
        self,
        min_batch_size: int,
        max_batch_size: int,
        max_batch_weight: int,
        element_size_fn: Callable[[Any], int] | None = None,
        *,
        target_batch_overhead: float | None = None,
        target_batch_duration_secs: float | None = None,
        target_batch_duration_secs_including_fixed_cost: float | None = None,
    ) -> None:
        super().__init__()
        # Beam's checks, Beam's words.
        if min_batch_size < 1:
            raise ValueError(f"min_batch_size must be >= 1, got {min_batch_size}")
        if max_batch_size < min_batch_size:
            raise ValueError(
                f"max_batch_size ({max_batch_size}) must be >= min_batch_size ({min_batch_size})"
            )
        if max_batch_weight < 1:
            raise ValueError(f"max_batch_weight must be >= 1, got {max_batch_weight}")
        if element_size_fn is not None and not callable(element_size_fn):
            raise TypeError("element_size_fn must be callable")
        self._max_batch_size = max_batch_size
        self._max_batch_weight = max_batch_weight
        self._element_size_fn = element_size_fn
        targets = {
            "target_batch_overhead": target_batch_overhead,
            "target_batch_duration_secs": target_batch_duration_secs,
            "target_batch_duration_secs_including_fixed_cost": (
                target_batch_duration_secs_including_fixed_cost
            ),
        }
        self._sizing = None
        if any(value is not None for value in targets.values()):
            args = {"min_batch_size": min_batch_size, "max_batch_size": max_batch_size}
            self._sizing = Sizing.from_batching_args({**args, **targets})

    def expand(self, pcoll: PCollection[Any]) -> PCollection[list[Any]]:
        batches: PCollection[list[Any]] = pcoll | _pardo(
            _SortingBatchingDoFn(
                max_batch_size=self._max_batch_size,
                max_batch_weight=self._max_batch_weight,
                element_size_fn=self._element_size_fn,
                sizing=self._sizing,
            )
        )
        return batches
