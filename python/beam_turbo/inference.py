"""``beam_turbo.RunInference``: Beam's ``RunInference``, with beam-turbo's batching, model cache,
load retries and out-of-memory recovery. Change the import; nothing else::

    # from apache_beam.ml.inference.base import RunInference
    from beam_turbo import RunInference

It is a subclass of Beam's transform, so it takes every argument Beam 2.77's takes (and
``with_exception_handling``, ``with_monitoring_transform``, keyed, multi-model and maybe-keyed
handlers, pre/post-processing, side-input model refresh, ``watch_model_pattern``,
``use_model_manager``, ``large_model`` and ``model_copies``, all through Beam's own
machinery) and gives Beam's outputs. What it changes:

* batches come from :class:`beam_turbo.BatchElements`, sized by ``BatchSizer`` (which also
  honours the handler's ``max_batch_weight``, which makes Beam 2.72-2.77 fail);
* the model lives in :class:`beam_turbo.ModelCache` (lock-free hits, one load per process,
  refreshed by tag) instead of Beam's ``Shared``; ``large_model`` / ``model_copies`` keep
  Beam's ``multi_process_shared``;
* a model load that fails for a passing reason (I/O, a timeout, a connection) is retried
  ``model_load_retries`` times with exponential backoff from ``model_load_backoff_secs``; a
  missing or undeserializable file fails at once, naming it;
* a batch that runs out of memory (CUDA's error or ``MemoryError``) is split and retried,
  for every handler, users' own included;
* where Beam's semantics allow, batching and inference are one DoFn (``_FusedInferenceDoFn``),
  sized from the inference time itself; under ``with_exception_handling`` it sends every
  element of a failing batch to the dead-letter output itself, batches run when a bundle
  finishes included (Beam's wrapper guards only ``process``);
* the cyclic garbage collector waits while a batch runs and its results are emitted (see
  :func:`beam_turbo._inference.cyclic_gc_paused`).
"""

from __future__ import annotations

import logging
import pickle
import resource
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics.metric import Metrics
from apache_beam.ml.inference import base
from apache_beam.transforms import window as beam_window

from beam_turbo import _beam_internals as internals
from beam_turbo._inference import (
    GcHold,
    cyclic_gc_paused,
    is_out_of_memory,
    run_owning_oom,
    take_stack_time_ns,
)
from beam_turbo._native import BatchSizer, ModelCache
from beam_turbo.batching import BatchElements, SizedBatch, WindowBatches, unit_weight
from beam_turbo.errors import InvalidInputError, InvalidTypeError, ModelLoadError

__all__ = ["RunInference"]

_LOG = logging.getLogger(__name__)

#: The dead-letter and main tags of Beam's ``ParDo.with_exception_handling`` (its defaults).
_DEAD_LETTER_TAG = "bad"
_MAIN_TAG = "good"

#: Errors that retrying a load cannot fix: the file is not there, or is not a model.
_PERMANENT_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    ModelLoadError,
    FileNotFoundError,
    pickle.UnpicklingError,
)


def retrying(load: Callable[[], Any], retries: int, backoff_secs: float) -> Callable[[], Any]:
    """``load``, retried ``retries`` times after passing errors, sleeping ``backoff_secs``,
    then twice that, and so on. Errors that a retry cannot fix are raised at once.

    Example:
        >>> attempts = []
        >>> def flaky():
        ...     attempts.append(1)
        ...     if len(attempts) < 3:
        ...         raise ConnectionError("try again")
        ...     return "model"
        >>> retrying(flaky, retries=2, backoff_secs=0.0)()
        'model'
    """

    def load_with_retries() -> Any:
        for attempt in range(retries + 1):
            try:
                return load()
            except _PERMANENT_LOAD_ERRORS:
                raise
            except Exception as error:
                if attempt == retries:
                    raise
                delay = backoff_secs * 2**attempt
                _LOG.warning(
                    "Loading the model failed (%s: %s); retry %d of %d in %.1f s.",
                    type(error).__name__,
                    error,
                    attempt + 1,
                    retries,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    return load_with_retries


class _RetryingLoad:
    """``handler``'s own ``load_model``, through :func:`retrying`; set as the handler's
    ``load_model`` so that every way Beam loads the model goes through the retries.

    A module-level class rather than a closure, so that the handler still pickles: Beam's
    model manager sends ``handler.load_model`` to a spawned process. It calls the class's
    ``load_model``, not the attribute it replaces, so it never calls itself, pickled or not.
    """

    def __init__(self, handler: base.ModelHandler, retries: int, backoff_secs: float) -> None:
        self._handler = handler
        self._retries = retries
        self._backoff_secs = backoff_secs

    def __call__(self) -> Any:
        handler = self._handler
        load = retrying(
            lambda: type(handler).load_model(handler), self._retries, self._backoff_secs
        )
        return load()


def _weight(part: Sequence[Any], weigh: Callable[[Any], float] | None) -> float:
    """A batch's size in its sizer's units: elements, or total weight with ``element_size_fn``."""
    if weigh is None:
        return float(len(part))
    return float(sum(weigh(element) for element in part))


class _CachedModels:
    """Models from the process's :class:`ModelCache`, keyed by the transform's model tag; it
    also stands where Beam's DoFn keeps its ``Shared`` handle (``acquire(load, tag)``).

    Answers that needed no load are counted, and reported by :meth:`report_hits` as the
    ``beam_turbo_model_cache_hits`` metric (from a bundle: metrics set in ``setup`` are lost).
    """

    def __init__(self, key: str, namespace: str) -> None:
        self._key = ("beam_turbo.RunInference", key)
        self._namespace = namespace
        self._hits = 0

    def acquire(self, load: Callable[[], Any], tag: Any = None) -> Any:
        loaded = False

        def counted_load() -> Any:
            nonlocal loaded
            loaded = True
            return load()

        model = ModelCache.default().acquire(self._key, counted_load, tag)
        if not loaded:
            self._hits += 1
        return model

    def report_hits(self) -> None:
        if self._hits:
            Metrics.counter(self._namespace, "beam_turbo_model_cache_hits").inc(self._hits)
            self._hits = 0


def _report_stack_time(distribution: Any) -> None:
    """The time this thread's handler spent stacking the batch, as a metric."""
    spent_ns = take_stack_time_ns()
    if spent_ns:
        distribution.update(spent_ns // 1000)


class _TurboRunInferenceDoFn(internals.RunInferenceDoFn):
    """Beam's inference DoFn with the model cache, load retries and OOM splitting."""

    def __init__(
        self,
        *args: Any,
        retries: int,
        backoff_secs: float,
        isolate: tuple[type[BaseException], ...] | None = None,
        report_memory_failure: Callable[[float], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._namespace = self._metrics_namespace or self._model_handler.get_metrics_namespace()
        self._shared_model_handle = _CachedModels(self._model_tag, self._namespace)
        self._retries = retries
        self._backoff_secs = backoff_secs
        self._isolate = isolate
        self._report_memory_failure = report_memory_failure
        self._weigh: Callable[[Any], float] | None = dict(
            self._model_handler.batch_elements_kwargs()
        ).get("element_size_fn")

    def setup(self) -> None:
        handler = self._model_handler
        # An instance attribute, set after unpickling, so every way Beam loads the model
        # (the cache, multi_process_shared, the model manager) goes through the retries.
        handler.load_model = _RetryingLoad(handler, self._retries, self._backoff_secs)
        self._stack_time = Metrics.distribution(self._namespace, "beam_turbo_stack_micro_secs")
        super().setup()

    def finish_bundle(self) -> None:
        self._shared_model_handle.report_hits()
        super().finish_bundle()

    def process(self, batch: Any, inference_args: Any, si_model_metadata: Any) -> Iterator[Any]:
        # Beam's, with the cyclic collector waiting while the batch runs and is emitted.
        with cyclic_gc_paused():
            yield from super().process(batch, inference_args, si_model_metadata)

    def _run_inference(self, batch: Any, inference_args: Any) -> Any:
        run_batch = super()._run_inference

        def run(part: Sequence[Any]) -> Any:
            return run_batch(part, inference_args)

        isolate = self._isolate
        try:
            if isolate is None:
                return run_owning_oom(run, batch, self._ran_out_of_memory)
            return run_owning_oom(
                lambda part: isolating(run, part, isolate), batch, self._ran_out_of_memory
            )
        finally:
            _report_stack_time(self._stack_time)

    def _ran_out_of_memory(self, part: Sequence[Any]) -> None:
        """Tell the BatchElements upstream, whose sizer then backs off below this size."""
        if self._report_memory_failure is not None:
            self._report_memory_failure(_weight(part, self._weigh))


def dead_letter(batch: Sequence[Any], error: BaseException) -> beam.pvalue.TaggedOutput:
    """The dead-letter output's entry for a failing batch, in Beam's form
    ``(batch, (exception type, repr, formatted traceback))``."""
    info = (type(error), repr(error), traceback.format_exception(error))
    return beam.pvalue.TaggedOutput(_DEAD_LETTER_TAG, (list(batch), info))


def isolating(
    run: Callable[[Sequence[Any]], Iterable[Any]],
    batch: Sequence[Any],
    exc_class: type[BaseException] | tuple[type[BaseException], ...],
) -> list[Any]:
    """``run(batch)``, halving a failing batch until each failing element is alone; those go
    to the dead-letter output as ``([element], exception_info)``, the rest give results.
    A batch of several that runs out of memory raises, for the splitting around this (which
    teaches the batch sizer); a single element that does is dead-lettered like any other.
    """
    try:
        return list(run(batch))
    except exc_class as error:
        if len(batch) > 1:
            if is_out_of_memory(error):
                raise
            middle = len(batch) // 2
            return isolating(run, batch[:middle], exc_class) + isolating(
                run, batch[middle:], exc_class
            )
        return [dead_letter(batch, error)]


#: The handler's batching arguments that the fused DoFn implements itself; any other (the
#: streaming ``max_batch_duration_secs``, length bucketing) selects Beam's two-step path.
_FUSED_BATCHING_ARGS = frozenset(
    {
        "min_batch_size",
        "max_batch_size",
        "max_batch_weight",
        "element_size_fn",
        "target_batch_overhead",
        "target_batch_duration_secs",
        "target_batch_duration_secs_including_fixed_cost",
        "variance",
    }
)
_SIZER_ARGS = _FUSED_BATCHING_ARGS - {"max_batch_weight", "element_size_fn"}


_GLOBAL = beam_window.GlobalWindow()
#: What process() returns for an element that completes no batch. (Not a literal None:
#: Beam warns about DoFns whose source returns None.)
_NOTHING: tuple[()] = ()
#: Its end: the timestamp and windows of results emitted at the end of a bundle.
_END_OF_GLOBAL_WINDOW = internals.at_end_of_global_window(None)


class _FusedInferenceDoFn(beam.DoFn):
    """Batching and inference in one DoFn: elements are gathered per window until the batch
    sizer's target (by :class:`~beam_turbo.batching.WindowBatches`, the policy
    ``BatchElements`` batches by), then run through the handler at once; what is left is run
    at the end of the bundle. Batch sizes are learned from the inference time itself, and a
    batch that runs out of memory is split and teaches the sizer its ceiling.

    Results carry the timestamps and windows Beam's two steps give them: in the global
    window, the element that completed the batch's (the end of the window for the batch run
    at the end of a bundle); in other windows, the end of the window.
    """

    def __init__(
        self,
        handler: base.ModelHandler,
        clock: Any,
        metrics_namespace: str | None,
        model_tag: str,
        inference_args: dict[str, Any] | None,
        retries: int,
        backoff_secs: float,
        exc_class: type[BaseException] | tuple[type[BaseException], ...] | None = None,
        isolate_failures: bool = False,
    ) -> None:
        self._handler = handler
        self._clock = clock
        self._metrics_namespace = metrics_namespace
        self._model_tag = model_tag
        self._inference_args = inference_args
        self._retries = retries
        self._backoff_secs = backoff_secs
        kwargs = dict(handler.batch_elements_kwargs())
        self._weigh: Callable[[Any], float] | None = kwargs.get("element_size_fn")
        self._max_weight = float(kwargs.get("max_batch_weight") or "inf")
        self._sizer_args = {k: v for k, v in kwargs.items() if k in _SIZER_ARGS}
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
        self._stack_time = Metrics.distribution(namespace, "beam_turbo_stack_micro_secs")
        self._sizer = BatchSizer(**self._sizer_args)
        self._load_with_retries = retrying(self._load, self._retries, self._backoff_secs)
        self._models = _CachedModels(self._model_tag, namespace)
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
        self._windows = WindowBatches(self._weigh or unit_weight, self._next_target)
        # The global window's batch, also in _windows; a window's hash is a Python call.
        self._global_batch: SizedBatch | None = None

    def process(self, element: Any) -> Iterable[Any]:
        # No window parameter: Beam invokes such a DoFn on its fast path (global window only;
        # see _WindowedFusedInferenceDoFn). Unweighted elements take a short path that builds
        # no generator unless a batch is due.
        if self._weigh is not None:
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
        return _NOTHING

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

    def _next_target(self) -> float:
        return min(float(self._sizer.next_size()), self._max_weight)

    def _emit(self, window: Any, batch: SizedBatch, at_end: bool = False) -> Iterator[Any]:
        """Run one batch and give its results (and dead letters) their timestamp and windows."""
        if self._weigh is None:
            batch.weight = len(batch.elements)  # not kept up on process()'s short path
        with cyclic_gc_paused():
            try:
                outputs = self._outputs(batch)
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
        return weight if part is whole else _weight(part, self._weigh)

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
            _report_stack_time(self._stack_time)
        elapsed_ns = self._clock.time_ns() - start
        self._sizer.record(self._part_weight(batch), elapsed_ns / 1e9)
        self._chosen_size.update(len(batch))
        if self._metrics is not None:
            self._metrics.update(len(batch), self._handler.get_num_bytes(batch), elapsed_ns // 1000)
        return results

    def _ran_out_of_memory(self, part: Sequence[Any]) -> None:
        self._sizer.record_failure(self._part_weight(part), memory=True)


class _WindowedFusedInferenceDoFn(_FusedInferenceDoFn):
    """The fused DoFn for windowed input: one batch per window (at most
    ``MAX_LIVE_WINDOWS`` live, then the fullest goes), results at the end of their window."""

    def process(self, element: Any, window: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        return self._add(element, window)


def _check_threshold(examples: beam.PCollection, dead: beam.PCollection, threshold: float) -> None:
    """Beam's ``threshold`` of ``with_exception_handling``, for the fused DoFn: the pipeline
    fails when the elements of failing batches exceed ``threshold`` of the elements in, per
    window. (Beam's two steps count batches; the fused DoFn has no batches to count, and the
    two agree when batches are of one size.)"""

    def check(bad: int, total: int, threshold: float, window: Any = beam.DoFn.WindowParam) -> None:
        if bad > total * threshold:
            raise ValueError(
                f"The number of failing elements within the window {window!r} exceeded "
                f"threshold: {bad} / {total} = {bad / total} > {threshold}"
            )

    total = examples | "CountTotal" >> (
        beam.Map(lambda _: 1) | beam.CombineGlobally(sum).as_singleton_view()
    )
    bad = dead | "CountBad" >> (
        beam.Map(lambda entry: len(entry[0])) | beam.CombineGlobally(sum).without_defaults()
    )
    _ = bad | "CheckThreshold" >> beam.Map(check, total, threshold)


class RunInference(base.RunInference):
    """Beam's ``RunInference`` made faster; see the module docs for what changes.

    Args:
        model_handler: any Beam ``ModelHandler``: beam-turbo's, Beam's, or your own.
        clock, inference_args, metrics_namespace, model_metadata_pcoll, watch_model_pattern,
        model_identifier, use_model_manager, model_manager_args, monitoring_transform, kwargs:
            as in Beam.
        model_load_retries: how many times a failed model load is retried (default 2).
        model_load_backoff_secs: the first retry's delay, doubled for each next one (1.0).

    Example:
        >>> import apache_beam as beam, numpy as np
        >>> from beam_turbo import RunInference
        >>> from beam_turbo.sklearn import SklearnModelHandlerNumpy
        >>> # examples | RunInference(SklearnModelHandlerNumpy(model_uri="model.pkl"))
    """

    def __init__(
        self,
        model_handler: base.ModelHandler,
        clock: Any = time,
        inference_args: dict[str, Any] | None = None,
        metrics_namespace: str | None = None,
        *,
        model_metadata_pcoll: beam.PCollection | None = None,
        watch_model_pattern: str | None = None,
        model_identifier: str | None = None,
        use_model_manager: bool = False,
        model_manager_args: dict[str, Any] | None = None,
        monitoring_transform: beam.PTransform | None = None,
        model_load_retries: int = 2,
        model_load_backoff_secs: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model_handler, base.ModelHandler):
            raise InvalidTypeError(
                f"model_handler must be an apache_beam ModelHandler, got "
                f"{type(model_handler).__name__}"
            )
        if not isinstance(model_load_retries, int) or model_load_retries < 0:
            raise InvalidInputError(
                f"model_load_retries must be an int >= 0, got {model_load_retries!r}"
            )
        if not model_load_backoff_secs >= 0:
            raise InvalidInputError(
                f"model_load_backoff_secs must be >= 0, got {model_load_backoff_secs!r}"
            )
        super().__init__(
            model_handler,
            clock,
            inference_args,
            metrics_namespace,
            model_metadata_pcoll=model_metadata_pcoll,
            watch_model_pattern=watch_model_pattern,
            model_identifier=model_identifier,
            use_model_manager=use_model_manager,
            model_manager_args=model_manager_args,
            **kwargs,
        )
        # Ours on every supported Beam: 2.75 and 2.76 have no monitoring outlet (_finish adds it).
        self._monitoring_transform = monitoring_transform
        self._model_load_retries = model_load_retries
        self._model_load_backoff_secs = model_load_backoff_secs
        self._isolate_failures = False

    def with_exception_handling(
        self,
        *,
        exc_class: Any = Exception,
        use_subprocess: bool = False,
        threshold: float = 1,
        timeout: int | None = None,
        isolate_failures: bool = False,
    ) -> RunInference:
        """Beam's dead-letter output (a ``RunInferenceDLQ`` beside the results), plus
        ``isolate_failures``: a failing batch is split until the failing elements are found;
        the others still give results, and each failing one reaches the dead-letter output
        alone, as ``([element], exception_info)``. No element is lost or duplicated.

        ``exc_class``, ``use_subprocess``, ``threshold`` and ``timeout`` keep Beam's meaning.
        A ``timeout`` or ``use_subprocess`` guards each batch with Beam's own wrappers (Beam's
        two steps); otherwise batching and inference stay fused, every element of a failing
        batch is dead-lettered as ``(batch, exception_info)``, and ``threshold`` bounds the
        share of elements in failing batches (Beam's two steps count batches).

        Example:
            >>> # results, dlq = examples | RunInference(handler).with_exception_handling(
            >>> #     isolate_failures=True)
        """
        super().with_exception_handling(
            exc_class=exc_class, use_subprocess=use_subprocess, threshold=threshold, timeout=timeout
        )
        self._isolate_failures = isolate_failures
        return self

    def with_monitoring_transform(self, monitoring_transform: beam.PTransform) -> RunInference:
        """Beam 2.77's: ``monitoring_transform`` also receives the un-postprocessed results
        (on Beam 2.75 and 2.76 too)."""
        self._monitoring_transform = monitoring_transform
        return self

    def _can_fuse(self) -> bool:
        """Whether batching and inference can be one DoFn with Beam's semantics intact.

        Not with a model side input or file watch (the model changes under the batches),
        ``inference_args`` given as a side input,
        exception handling with a ``timeout`` or ``use_subprocess`` (Beam's wrappers time and
        isolate each ``process`` call, and a fused DoFn buffers across calls), the model
        manager or cross-process models, no batching, or batching options that need Beam's
        streaming or bucketing DoFns. Plain exception handling fuses: the fused DoFn sends
        every element of a failing batch to the dead-letter output itself.
        """
        handler = self._model_handler
        wrapped = self._with_exception_handling and (
            self._use_subprocess or self._timeout is not None
        )
        return (
            self._model_metadata_pcoll is None
            # A side input is resolved by the runner per element: Beam's two steps pass it.
            and not isinstance(self._inference_args, beam.pvalue.AsSideInput)
            and not self._watch_model_pattern
            and not wrapped
            and not self._use_model_manager
            and not handler.share_model_across_processes()
            and not handler.should_skip_batching()
            and set(handler.batch_elements_kwargs()) <= _FUSED_BATCHING_ARGS
        )

    def expand(self, pcoll: beam.PCollection) -> Any:
        # Beam's expand with two parts swapped (marked): read it beside base.RunInference.expand.
        handler = self._model_handler
        handler.validate_inference_args(self._inference_args)
        pcoll, bad_preprocessed = self._apply_fns(
            pcoll, handler.get_preprocess_fns(), "BeamML_RunInference_Preprocess"
        )
        if self._can_fuse():
            global_only = isinstance(pcoll.windowing.windowfn, beam_window.GlobalWindows)
            fused_class = _FusedInferenceDoFn if global_only else _WindowedFusedInferenceDoFn
            fused = fused_class(
                handler,
                self._clock,
                self._metrics_namespace,
                self._model_tag,
                self._inference_args,
                self._model_load_retries,
                self._model_load_backoff_secs,
                exc_class=self._exc_class if self._with_exception_handling else None,
                isolate_failures=self._isolate_failures,
            )
            pardo = beam.ParDo(fused).with_resource_hints(**handler.get_resource_hints())
            if not self._with_exception_handling:
                return self._finish(pcoll | "BeamML_RunInference" >> pardo, None, bad_preprocessed)
            outputs = pcoll | "BeamML_RunInference" >> pardo.with_outputs(
                _DEAD_LETTER_TAG, main=_MAIN_TAG
            )
            bad_inference = outputs[_DEAD_LETTER_TAG]
            if self._threshold < 1:
                _check_threshold(pcoll, bad_inference, self._threshold)
            return self._finish(outputs[_MAIN_TAG], bad_inference, bad_preprocessed)
        if self._watch_model_pattern:
            self._model_metadata_pcoll = self._get_model_metadata_pcoll(pcoll.pipeline)
        report = None
        if handler.should_skip_batching():
            batched = pcoll
        else:
            batching = BatchElements(**handler.batch_elements_kwargs())  # swapped
            report = batching.memory_failure_reporter()
            batched = pcoll | batching
        # With exception handling, the model loads inside process(), so that a model that
        # never loads sends the elements to the dead-letter output with its error.
        load_model_at_runtime = (
            self._model_metadata_pcoll is not None
            or self._timeout is not None
            or self._with_exception_handling
        )
        dofn = _TurboRunInferenceDoFn(  # swapped
            handler,
            self._clock,
            self._metrics_namespace,
            load_model_at_runtime,
            self._model_tag,
            self._use_model_manager,
            self._model_manager_args,
            retries=self._model_load_retries,
            backoff_secs=self._model_load_backoff_secs,
            isolate=self._exc_class if self._isolate_failures else None,
            report_memory_failure=report,
        )
        side_input = (
            beam.pvalue.AsSingleton(self._model_metadata_pcoll)
            if self._model_metadata_pcoll
            else None
        )
        pardo = beam.ParDo(dofn, self._inference_args, side_input).with_resource_hints(
            **handler.get_resource_hints()
        )
        bad_inference = None
        if self._with_exception_handling:
            results, bad_inference = batched | "BeamML_RunInference" >> (
                pardo.with_exception_handling(
                    exc_class=self._exc_class,
                    use_subprocess=self._use_subprocess,
                    threshold=self._threshold,
                    timeout=self._timeout,
                    on_failure_callback=self._timeout_callback(),
                )
            )
        else:
            results = batched | "BeamML_RunInference" >> pardo
        return self._finish(results, bad_inference, bad_preprocessed)

    def _finish(self, results: Any, bad_inference: Any, bad_preprocessed: Any) -> Any:
        """Beam's tail of expand: the monitoring outlet, post-processing, the DLQ."""
        handler = self._model_handler
        if self._monitoring_transform is not None:
            with results.pipeline.transform_annotations(model_identifier=""):
                _ = results | "BeamML_RunInference_MonitoringOutlet" >> self._monitoring_transform
        results, bad_postprocessed = self._apply_fns(
            results, handler.get_postprocess_fns(), "BeamML_RunInference_Postprocess"
        )
        if self._with_exception_handling:
            return results, base.RunInferenceDLQ(bad_inference, bad_preprocessed, bad_postprocessed)
        return results

    def _timeout_callback(self) -> Callable[[Exception, Any], None] | None:
        """Beam's: on a timeout, mark the current model invalid so that it is reloaded."""
        if self._timeout is None or not self._model_handler.should_garbage_collect_on_timeout():
            return None
        model_tag, timeout = self._model_tag, self._timeout
        share = self._model_handler.share_model_across_processes()

        def on_failure(exception: Exception, element: Any) -> None:
            if type(exception) is not TimeoutError:
                return
            base.load_model_status(model_tag, share).try_mark_current_model_invalid(timeout)
            _LOG.warning("Inference failed with a timeout, marking the current model for GC")

        return on_failure
