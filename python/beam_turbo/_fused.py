"""``RunInference``'s fused path: batching and inference in one DoFn, sized from the inference
time itself. Taken where Beam's semantics allow it (see ``RunInference._can_fuse``)."""

from __future__ import annotations

import resource
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics.metric import Metrics
from apache_beam.ml.inference import base
from apache_beam.transforms import window as beam_window

from beam_turbo import _beam_internals as internals
from beam_turbo._batch import report_stack_time
from beam_turbo._dead_letters import dead_letter, isolating
from beam_turbo._gc import GcHold, cyclic_gc_paused
from beam_turbo._loading import CachedModels, retrying
from beam_turbo._oom import run_owning_oom
from beam_turbo._sizing import (
    NO_OUTPUT,
    POOL_BATCHES,
    SizedBatch,
    Sizing,
    WindowBatches,
    by_length,
)

__all__ = ["FusedInferenceDoFn", "WindowedFusedInferenceDoFn"]

_GLOBAL = beam_window.GlobalWindow()
#: Its end: the timestamp and windows of results emitted at the end of a bundle.
_END_OF_GLOBAL_WINDOW = internals.at_end_of_global_window(None)


class FusedInferenceDoFn(beam.DoFn):
    """Batching and inference in one DoFn: elements are gathered per window until the batch
    sizer's target (by :class:`~beam_turbo._sizing.WindowBatches`, the policy
    ``BatchElements`` batches by), then run through the handler at once; what is left is run
    at the end of the bundle. With the handler's ``batch_length_fn`` (ragged inputs), it
    gathers ``POOL_BATCHES`` batches' worth, sorts them by length and runs them as batches of
    similar lengths (:func:`~beam_turbo._sizing.by_length`). Batch sizes are learned from the
    inference time itself, and a batch that runs out of memory is split and teaches the sizer
    its ceiling.

    Results carry the timestamps and windows Beam's two steps give them: in the global
    window, the element that completed the batch's (the end of the window for the batch run
    at the end of a bundle); in other windows, the end of the window.
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
    ) -> None:
        self._handler = handler
        self._clock = clock
        self._metrics_namespace = metrics_namespace
        self._model_tag = model_tag
        self._inference_args = inference_args
        self._retries = retries
        self._backoff_secs = backoff_secs
        self._batching_args = dict(handler.batch_elements_kwargs())
        self._sizing = Sizing.from_batching_args(self._batching_args)  # its key travels along
        # Beam's batch_length_fn: what is gathered is sorted by length, then batched.
        self._length_fn = self._batching_args.get("length_fn")
        self._exc_class = exc_class
        self._isolate_failures = isolate_failures

    def setup(self) -> None:
        handler = self._handler
        handler.set_environment_vars()
        namespace = self._metrics_namespace or handler.get_metrics_namespace()
        self._metrics = (
            None if handler.override_metrics(namespace) else internals.MetricsCollector(namespace)
        )
        self._chosen_size = Metrics.distribution(namespace, "beam_turbo_batch_size")
        # What each batch was gathered for (elements, or weight with an element_size_fn), to
        # set beside what it holds: a bundle's or window's end closes a batch short of it.
        self._target_size = Metrics.distribution(namespace, "beam_turbo_batch_target")
        self._stack_time = Metrics.distribution(namespace, "beam_turbo_stack_micro_secs")
        self._length = None if self._length_fn is None else unkeyed_length(self._length_fn, handler)
        # Every instance of this DoFn in a worker process (Flink subtasks, Spark tasks, a DoFn
        # rebuilt after a failed bundle) sizes with one sizer: the next starts where it is.
        self._sizing = self._sizing.shared()
        self._load_with_retries = retrying(self._load, self._retries, self._backoff_secs)
        self._models = CachedModels(self._model_tag, namespace)
        self._model: Any = None
        self._load_failure: tuple[Exception, float] | None = None  # the error, when to retry
        self._batch: tuple[Sequence[Any], float] = ((), 0.0)  # the batch running, its weight
        # Held while the global window's batch is gathered; given back when it has run, when
        # a bundle ends or starts, at teardown, and (a failed bundle) when this DoFn is freed.
        self._gc_hold = GcHold()
        weakref.finalize(self, self._gc_hold.give_back)
        if self._exc_class is None:
            self._acquire_model()  # fail at once; with exception handling, per batch instead

    def _acquire_model(self) -> Any:
        """The model, loaded on first use. A load that failed (with its retries) is not tried
        again for the next batches until ``backoff_secs * 2**retries`` seconds have passed:
        meanwhile they fail at once with its error, instead of each waiting out the retries."""
        if self._model is None:
            failed = self._load_failure
            if failed is not None and time.monotonic() < failed[1]:
                raise failed[0].with_traceback(None)
            try:
                self._model = self._models.acquire(self._load_with_retries)
            except Exception as error:
                retry_at = time.monotonic() + self._backoff_secs * 2**self._retries
                self._load_failure = (error, retry_at)
                raise
            self._load_failure = None
        return self._model

    def _load(self) -> Any:
        memory_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = self._clock.time_ns()
        model = self._handler.load_model()
        latency_ms = (self._clock.time_ns() - start) // 1_000_000
        if self._metrics is not None:
            memory_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self._metrics.cache_load_model_metrics(latency_ms, memory_after - memory_before)
        return model

    def start_bundle(self) -> None:
        self._gc_hold.give_back()  # a bundle that failed while gathering
        self._windows = WindowBatches(
            self._sizing, pool=1 if self._length_fn is None else POOL_BATCHES
        )
        # The global window's batch, also in _windows; a window's hash is a Python call.
        self._global_batch: SizedBatch | None = None

    def process(self, element: Any) -> Iterable[Any]:
        # No window parameter: Beam invokes such a DoFn on its fast path (global window only;
        # see _WindowedFusedInferenceDoFn). Unweighted elements take a short path that builds
        # no generator unless a batch is due.
        if self._sizing.weigh is not None:
            return self._add(element, _GLOBAL)
        batch = self._global_batch
        if batch is None:
            batch = self._global_batch = self._windows.start(_GLOBAL)
            self._gc_hold.take()
        elements = batch.elements
        elements.append(element)
        if len(elements) >= batch.target:
            del self._windows.batches[_GLOBAL]
            self._global_batch = None
            return self._emit(_GLOBAL, batch)
        return NO_OUTPUT

    def _add(self, element: Any, window: Any) -> Iterator[Any]:
        for full_window, batch in self._windows.add(element, window):
            yield from self._emit(full_window, batch)

    def finish_bundle(self) -> Iterator[Any]:
        self._global_batch = None
        for window, batch in self._windows.drain():
            yield from self._emit(window, batch, at_end=True)
        self._gc_hold.give_back()
        self._models.report_hits()
        if self._metrics is not None:
            self._metrics.update_metrics_with_cache()

    def teardown(self) -> None:
        self._gc_hold.give_back()

    def _emit(self, window: Any, batch: SizedBatch, at_end: bool = False) -> Iterator[Any]:
        """Run one batch and give its results (and dead letters) their timestamp and windows."""
        if self._sizing.weigh is None:
            batch.weight = len(batch.elements)  # not kept up on process()'s short path
        with cyclic_gc_paused():
            try:
                if self._length is None:
                    outputs = self._outputs(batch)
                else:
                    outputs = []
                    for part in by_length(batch.elements, self._sizing, self._length):
                        outputs += self._outputs(part)
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
            for output in outputs:
                if isinstance(output, beam.pvalue.TaggedOutput):
                    value = internals.WindowedValue(output.value, timestamp, windows)
                    yield beam.pvalue.TaggedOutput(output.tag, value)
                else:
                    yield internals.WindowedValue(output, timestamp, windows)

    def _outputs(self, gathered: SizedBatch) -> list[Any]:
        """The batch's results; with exception handling, dead letters for what failed."""
        batch = gathered.elements
        self._batch = (batch, gathered.weight)
        if gathered.target > 0:  # 0: not known (a bag this process did not see gather)
            self._target_size.update(round(gathered.target))
        exc_class = self._exc_class
        if exc_class is None:
            return run_owning_oom(self._run, batch, self._ran_out_of_memory)

        def isolated(part: Sequence[Any]) -> list[Any]:
            return isolating(self._run, part, exc_class)

        run = isolated if self._isolate_failures else self._run
        try:
            self._acquire_model()  # a model that never loads fails the batch once, whole
            return run_owning_oom(run, batch, self._ran_out_of_memory)
        except exc_class as error:
            return [dead_letter(batch, error)]

    def _part_weight(self, part: Sequence[Any]) -> float:
        whole, weight = self._batch
        return weight if part is whole else self._sizing.weight(part)

    def _run(self, batch: Sequence[Any]) -> list[Any]:
        model = self._acquire_model()
        start = self._clock.time_ns()
        try:
            results = list(self._handler.run_inference(batch, model, self._inference_args))
        except Exception:
            if self._metrics is not None:
                self._metrics.failed_batches_counter.inc()
            raise
        finally:
            report_stack_time(self._stack_time)
        elapsed_ns = self._clock.time_ns() - start
        self._sizing.record(self._part_weight(batch), elapsed_ns / 1e9)
        self._chosen_size.update(len(batch))
        if self._metrics is not None:
            self._metrics.update(len(batch), self._handler.get_num_bytes(batch), elapsed_ns // 1000)
        return results

    def _ran_out_of_memory(self, part: Sequence[Any]) -> None:
        self._sizing.record_memory_failure(self._part_weight(part))


def unkeyed_length(length_fn: Callable[[Any], float], handler: Any) -> Callable[[Any], float]:
    """The inner handler's ``batch_length_fn`` for the elements the fused DoFn sees: a
    ``KeyedModelHandler`` passes its inner handler's batching arguments on, but gets
    ``(key, example)`` pairs; a ``MaybeKeyedModelHandler`` gets either. From Beam 2.78 they
    pass it on already applying to the example: then it is used as it is."""
    if internals.applies_to_example(length_fn):
        return length_fn
    if isinstance(handler, base.KeyedModelHandler):
        return lambda element: length_fn(element[1])
    if isinstance(handler, base.MaybeKeyedModelHandler):

        def length(element: Any) -> float:
            try:
                return length_fn(element)
            except Exception:
                if isinstance(element, tuple) and len(element) == 2:
                    return length_fn(element[1])
                raise

        return length
    return length_fn


class WindowedFusedInferenceDoFn(FusedInferenceDoFn):
    """The fused DoFn for windowed input: one batch per window (at most
    ``MAX_LIVE_WINDOWS`` live, then the fullest goes), results at the end of their window."""

    def process(self, element: Any, window: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        return self._add(element, window)
