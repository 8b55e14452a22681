"""The gathering DoFn: elements gathered into batches within a bundle (by the one
:class:`~beam_turbo._gathering.gatherer.Gatherer`), and each batch handed to an action:

- :class:`EmitBatches`: the batch goes out as a list, and the time the work fused downstream
  takes on it teaches the sizer (``BatchElements``, ``SortAndBatchElements``);
- :class:`RunBatches`: the batch runs through the :class:`~beam_turbo._running.runner.BatchRunner`
  and its results go out (``RunInference``'s fused path); with batches in flight
  (:mod:`beam_turbo._running.flight`), on an inference thread while the next is gathered.

Outputs carry the timestamps and windows Beam's two steps give them: a batch, the end of its
window; results in the global window, the element's that completed the batch (the end of the
window for what runs at the end of a bundle); in other windows, the end of the window. With
batches in flight, results in the global window come out with the element that completed a
later batch (the DoFn does not ask for each element's timestamp: that would take Beam's
slower invoker for every element), or at the end of the window at the end of a bundle.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import apache_beam as beam
from apache_beam.metrics.metric import Metrics
from apache_beam.transforms import window as beam_window

from beam_turbo._arrays.tables import TableSpec
from beam_turbo._beam import internals
from beam_turbo._gathering.gatherer import NO_OUTPUT, Cut, Gatherer, SizedBatch
from beam_turbo._gathering.sizing import Sizing
from beam_turbo._running.collector import GcHold, cyclic_gc_paused
from beam_turbo._running.flight import Flight
from beam_turbo._running.runner import BatchRunner, HandlerInference, Infer, ModelSource

if TYPE_CHECKING:  # it imports torch where installed, which BatchElements must not do
    from apache_beam.ml.inference import base

__all__ = [
    "DownstreamTiming",
    "EmitBatches",
    "GatheringDoFn",
    "RunBatches",
    "WindowedGatheringDoFn",
    "emit_timed",
]

_GLOBAL = beam_window.GlobalWindow()
#: Its end: the timestamp and windows of results emitted at the end of a bundle.
_END_OF_GLOBAL_WINDOW = internals.at_end_of_global_window(None)


class DownstreamTiming:
    """Times the work fused downstream of an emitted batch, for the sizer, and records Beam's
    batching metrics (``BatchElements``' distributions).

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


def emit_timed(
    value: Any, weight: float, sizing: Sizing, timing: DownstreamTiming, untimed: bool
) -> Iterator[Any]:
    """Emit a batch (``value``, of ``weight``), then tell ``sizing`` how long the work fused
    downstream took on it, or of the memory failures that work reported (through the
    sizing's reporter: the one channel from a DoFn downstream back to this one). The time
    of an ``untimed`` batch (the first after ``setup``, which loaded a model) is not kept."""
    start = timing.now()
    yield value
    failed = sizing.take_reported_failures()
    timing.done(None if untimed or failed else sizing, weight, start)


class EmitBatches:
    """The action of the batching transforms: each batch goes out, then teaches the sizer."""

    def __init__(self, timing: DownstreamTiming) -> None:
        self._timing = timing
        self._untimed = True

    def setup(self, sizing: Sizing) -> None:
        self._sizing = sizing
        self._timing.setup()
        self._untimed = True  # downstream setup (loading a model) makes the first time moot

    def take(self, window: Any, batch: SizedBatch, at_end: bool) -> Iterator[Any]:
        if window is _GLOBAL:
            value = internals.at_end_of_global_window(batch.elements)
        else:
            value = internals.WindowedValue(batch.elements, window.max_timestamp(), (window,))
        yield from emit_timed(value, batch.weight, self._sizing, self._timing, self._untimed)
        self._untimed = False

    def started(self) -> None:
        """A global-window batch started gathering: nothing to do."""

    def flush(self) -> Iterator[Any]:
        """Nothing in flight."""
        return iter(())

    def bundle_done(self) -> None:
        """Nothing to report."""

    def release(self) -> None:
        """Nothing held."""

    def close(self) -> None:
        """Nothing to close."""


class RunBatches:
    """The action of ``RunInference``'s fused path: each batch runs through the handler (the
    :class:`~beam_turbo._running.runner.BatchRunner`), and its results go out.

    With ``in_flight`` > 0, up to that many batches run on an inference thread while the
    next is gathered (:class:`~beam_turbo._running.flight.Flight`; ``adaptive``: where it
    measured that to be faster, on the DoFn's thread); their results go out with a later
    batch's element, or at the end of the bundle (:meth:`flush`). 0: each batch runs as it
    is gathered.

    A global-window batch holds off the cyclic collector while it gathers (its elements,
    torch tensors among them, are tracked: they would be moved to the old generation while
    they wait), given back when it has run (or is launched), when a bundle ends or starts, at
    teardown, and (a failed bundle) when the DoFn is freed.
    """

    def __init__(
        self,
        *,
        handler: base.ModelHandler,
        clock: Any,
        metrics_namespace: str | None,
        model_tag: str,
        inference_args: dict[str, Any] | None,
        retries: int,
        backoff_secs: float,
        exc_class: type[BaseException] | tuple[type[BaseException], ...] | None,
        isolate_failures: bool,
        tables: TableSpec | None = None,
        in_flight: int = 0,
        adaptive: bool = True,
    ) -> None:
        self._handler = handler
        self._tables = tables
        self._in_flight = in_flight
        self._adaptive = adaptive
        self._clock = clock
        self._metrics_namespace = metrics_namespace
        self._model_tag = model_tag
        self._inference_args = inference_args
        self._retries = retries
        self._backoff_secs = backoff_secs
        self._exc_class = exc_class
        self._isolate_failures = isolate_failures

    def setup(self, sizing: Sizing) -> None:
        handler = self._handler
        handler.set_environment_vars()
        namespace = self._metrics_namespace or handler.get_metrics_namespace()
        self._models = ModelSource(
            handler=handler,
            namespace=namespace,
            model_tag=self._model_tag,
            clock=self._clock,
            retries=self._retries,
            backoff_secs=self._backoff_secs,
        )
        inference = dict(
            handler=handler,
            models=self._models,
            namespace=namespace,
            clock=self._clock,
            sizing=sizing,
            inference_args=self._inference_args,
        )
        if self._tables is None:
            self._infer: Callable[[SizedBatch], Infer] = HandlerInference(**inference).of
        else:
            from beam_turbo._running.tables import TableInference

            self._infer = TableInference(**inference, spec=self._tables).of
        exc_class = self._exc_class
        self.runner = BatchRunner(
            namespace=namespace,
            sizing=sizing,
            exc_class=exc_class,
            isolate=exc_class if self._isolate_failures else None,
            prepare=self._models.acquire_model,
        )
        self._gc_hold = GcHold()
        weakref.finalize(self, self._gc_hold.give_back)
        # With batches in flight: held from a launch until what landed is emitted, so that
        # no collection runs while a batch's results are alive (between the run and the
        # emission the collector would move them all to an older generation).
        self._emitting = GcHold()
        weakref.finalize(self, self._emitting.give_back)
        self._flight = Flight(self._in_flight, self._adaptive) if self._in_flight > 0 else None
        if exc_class is None:
            self._models.acquire_model()  # fail at once; with exception handling, per batch

    def started(self) -> None:
        self._gc_hold.take()

    def take(self, window: Any, batch: SizedBatch, at_end: bool) -> Iterator[Any]:
        if self._flight is not None:
            self._emitting.take()
            if window is _GLOBAL:
                self._gc_hold.give_back()  # gathered: the emitting hold pauses it now
            self._flight.launch(window, self._run_paused, batch, batch.weight)
            return self._emitted(self._flight.landed(), at_end)
        return self._run_here(window, batch, at_end)

    def _run_here(self, window: Any, batch: SizedBatch, at_end: bool) -> Iterator[Any]:
        with cyclic_gc_paused():  # while the batch runs and its results are emitted
            try:
                outputs = self.outputs(batch)
            finally:
                if window is _GLOBAL:
                    self._gc_hold.give_back()  # the batch is gathered; the pause above holds
            if window is _GLOBAL:
                if not at_end:
                    yield from outputs
                    return
                timestamp, windows = _END_OF_GLOBAL_WINDOW.timestamp, _END_OF_GLOBAL_WINDOW.windows
            else:
                timestamp, windows = window.max_timestamp(), (window,)
            yield from placed(outputs, timestamp, windows)

    def _run_paused(self, batch: SizedBatch) -> list[Any]:
        with cyclic_gc_paused():
            return self.outputs(batch)

    def _emitted(self, landed: Iterable[tuple[Any, list[Any]]], at_end: bool) -> Iterator[Any]:
        """The outputs of batches that landed: in the global window, with the element being
        processed, or at the end of the window at the end of a bundle; in other windows, at
        the end of theirs. The emitting hold, taken by the caller, is given back after."""
        try:
            for window, outputs in landed:
                if window is _GLOBAL:
                    if not at_end:
                        yield from outputs
                        continue
                    timestamp = _END_OF_GLOBAL_WINDOW.timestamp
                    windows = _END_OF_GLOBAL_WINDOW.windows
                else:
                    timestamp, windows = window.max_timestamp(), (window,)
                yield from placed(outputs, timestamp, windows)
        finally:
            self._emitting.give_back()

    def outputs(self, batch: SizedBatch) -> list[Any]:
        """Run ``batch``: its results and dead-letter entries."""
        return self.runner.run(batch, self._infer(batch)).outputs

    def flush(self) -> Iterator[Any]:
        """At the end of a bundle: the outputs of every batch in flight, each waited for."""
        if self._flight is None or not len(self._flight):
            return iter(())
        self._emitting.take()
        return self._emitted(self._flight.drain(), True)

    def bundle_done(self) -> None:
        self._gc_hold.give_back()
        self._emitting.give_back()
        self._models.bundle_done()

    def release(self) -> None:
        """Give back what a batch being gathered holds, and wait out the batches a failed
        bundle left in flight (a bundle that failed, teardown)."""
        self._gc_hold.give_back()
        self._emitting.give_back()
        if self._flight is not None:
            self._flight.abandon()

    def close(self) -> None:
        """At teardown: the inference thread ends."""
        self.release()
        if self._flight is not None:
            self._flight.close()


def placed(outputs: Iterable[Any], timestamp: Any, windows: Any) -> Iterator[Any]:
    """``outputs`` (results and dead-letter entries) at ``timestamp`` in ``windows``."""
    for output in outputs:
        if isinstance(output, beam.pvalue.TaggedOutput):
            value = internals.WindowedValue(output.value, timestamp, windows)
            yield beam.pvalue.TaggedOutput(output.tag, value)
        else:
            yield internals.WindowedValue(output, timestamp, windows)


Action = EmitBatches | RunBatches


class GatheringDoFn(beam.DoFn):
    """Gathers the elements of a bundle in the global window into batches (the
    :class:`~beam_turbo._gathering.gatherer.Gatherer`, with ``pool`` and ``cut``) and hands
    each to ``action``; what is left runs at the end of the bundle, so a batch never
    crosses a bundle."""

    def __init__(
        self,
        *,
        sizing: Sizing,
        action: Action,
        pool: float = 1,
        cut: Cut | None = None,
        rows: bool = False,
    ) -> None:
        self._sizing = sizing  # its key travels along: the transform's one sizing per process
        self._action = action
        self._pool = pool
        self._cut = cut
        self._rows = rows  # elements are tables, cut and joined into batches of rows

    def setup(self) -> None:
        # Every instance of this DoFn in a worker process (Flink subtasks, Spark tasks, a DoFn
        # rebuilt after a failed bundle) sizes with one sizer: the next starts where it is.
        self._sizing = self._sizing.shared()
        self._action.setup(self._sizing)
        # Elements that all weigh 1 and are not pooled take the gatherer's fast path.
        self._unit = self._sizing.unit and self._cut is None and not self._rows
        self._take = self._action.take

    def start_bundle(self) -> None:
        self._action.release()  # a bundle that failed while gathering
        self._gatherer = Gatherer(
            self._sizing, self._pool, self._cut, on_start=self._action.started, rows=self._rows
        )
        self._add_unit = self._gatherer.add_unit

    def process(self, element: Any) -> Iterable[Any]:
        # No window parameter: Beam invokes such a DoFn on its fast path (global window only;
        # see WindowedGatheringDoFn). Unit weights build no generator unless a batch is due.
        if not self._unit:
            return self._added(element, _GLOBAL)
        batch = self._add_unit(element, _GLOBAL)
        if batch is None:
            return NO_OUTPUT
        return self._take(_GLOBAL, batch, False)

    def _added(self, element: Any, window: Any) -> Iterator[Any]:
        for full_window, batch in self._gatherer.add(element, window):
            yield from self._take(full_window, batch, False)

    def finish_bundle(self) -> Iterator[Any]:
        for window, batch in self._gatherer.drain():
            yield from self._take(window, batch, True)
        yield from self._action.flush()
        self._action.bundle_done()

    def teardown(self) -> None:
        self._action.close()


class WindowedGatheringDoFn(GatheringDoFn):
    """The gathering DoFn for windowed input: one batch per window (at most
    ``MAX_LIVE_WINDOWS`` live, then the fullest goes), outputs at the end of their window."""

    def process(self, element: Any, window: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        return self._added(element, window)
