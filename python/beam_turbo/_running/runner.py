"""The batch runner: running one gathered batch, the one home of what that takes.

:class:`BatchRunner` runs a batch through an :data:`Infer` (the handler through the model
cache, :class:`HandlerInference`; or Beam's own inference DoFn's step, on the path that keeps
it) and owns everything around it: dead letters and isolating failing elements, splitting a
batch that runs out of memory (and telling the sizer its ceiling), the batch-size and
stack-time metrics. It returns what happened as a :class:`BatchOutcome`; the DoFn gives the
outputs their timestamps and windows.

:class:`ModelSource` owns the model as Beam's inference DoFn holds it: from the process's cache,
loaded with retries, a failed load not retried for its backoff, Beam's load metrics.
:class:`HandlerInference` runs the handler on a part of a batch with it, as Beam's inference
DoFn does: the time to the sizer, Beam's metrics (``_MetricsCollector``) and beam-turbo's.
(Tables have an infer of their own, ``_running/tables.py``.)
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import apache_beam as beam
from apache_beam.metrics.metric import Metrics

from beam_turbo._arrays.inputs import report_stack_time
from beam_turbo._beam import internals
from beam_turbo._gathering.gatherer import SizedBatch
from beam_turbo._gathering.sizing import Sizing
from beam_turbo._running.dead_letters import dead_letter, isolating
from beam_turbo._running.loading import CachedModels, SharedModels, retrying
from beam_turbo._running.oom import run_owning_oom

if TYPE_CHECKING:  # it imports torch where installed, which BatchElements must not do
    from apache_beam.ml.inference import base

__all__ = [
    "BATCH_SIZE_METRIC",
    "BATCH_TARGET_METRIC",
    "STACK_TIME_METRIC",
    "BatchOutcome",
    "BatchRunner",
    "HandlerInference",
    "Infer",
    "ModelSource",
]

#: beam-turbo's metrics, in the handler's namespace: the elements each batch run held, what it
#: was gathered for (the sizer's target: a bundle's or window's end closes a batch short of
#: it), and the time the handler spent stacking it.
BATCH_SIZE_METRIC = "beam_turbo_batch_size"
BATCH_TARGET_METRIC = "beam_turbo_batch_target"
STACK_TIME_METRIC = "beam_turbo_stack_micro_secs"

#: Runs a part of a batch (the whole, or a half after a memory failure or while isolating a
#: failing element): its results, in order.
Infer = Callable[[Sequence[Any]], list[Any]]


@dataclasses.dataclass(slots=True)
class BatchOutcome:
    """What happened to one batch: its outputs, results and dead-letter entries in the
    batch's order, and how many of its elements went to the dead letters."""

    outputs: list[Any]
    failed: int = 0


class BatchRunner:
    """Runs gathered batches: see the module docs. Built in a DoFn's ``setup`` (it holds
    metric cells), one per DoFn instance.

    Args:
        namespace: the metrics namespace.
        sizing: told the memory ceiling of a batch (a part) that ran out of memory.
        exc_class: with exception handling, the errors whose batch goes to the dead letters
            (None: errors are raised).
        isolate: the errors for which a failing batch is halved until each failing element is
            alone (its own dead letter); the rest still give results.
        prepare: called before a batch runs, with ``exc_class`` caught: a model that never
            loads fails each batch once, whole, not once per isolated part.
        on_oom: told the weight of each part that ran out of memory (default: the sizing).
    """

    def __init__(
        self,
        *,
        namespace: str,
        sizing: Sizing | None,
        exc_class: type[BaseException] | tuple[type[BaseException], ...] | None = None,
        isolate: type[BaseException] | tuple[type[BaseException], ...] | None = None,
        prepare: Callable[[], Any] | None = None,
        on_oom: Callable[[float], None] | None = None,
    ) -> None:
        self._sizing = sizing
        self._exc_class = exc_class
        self._isolate = isolate
        self._prepare = prepare
        if on_oom is None and sizing is not None:
            on_oom = sizing.record_memory_failure
        self._on_oom = on_oom
        self._target_size = Metrics.distribution(namespace, BATCH_TARGET_METRIC)
        self._stack_time = Metrics.distribution(namespace, STACK_TIME_METRIC)

    def run(self, batch: SizedBatch, infer: Infer) -> BatchOutcome:
        """Run ``batch`` through ``infer``: its results, or (with ``exc_class``) its dead
        letters; a batch that runs out of memory is split until it fits."""
        elements = batch.elements
        if batch.target > 0:  # 0: not known (a bag this process did not see gather)
            self._target_size.update(round(batch.target))

        def out_of_memory(part: Sequence[Any]) -> None:
            if self._on_oom is not None:
                self._on_oom(part_weight(batch, part, self._sizing))

        run = infer
        isolate = self._isolate
        if isolate is not None:

            def run(part: Sequence[Any]) -> list[Any]:
                return isolating(infer, part, isolate)

        fits = None
        sizing = self._sizing
        if sizing is not None and sizing.ceiling is not None:
            # Below a memory ceiling heard of since it was gathered (batches in flight).
            fits = sizing.fitting_length(len(elements), part_weight(batch, elements, sizing))
        try:
            if self._exc_class is None:
                return BatchOutcome(run_owning_oom(run, elements, out_of_memory, fits))
            try:
                if self._prepare is not None:
                    self._prepare()
                outputs = run_owning_oom(run, elements, out_of_memory, fits)
            except self._exc_class as error:
                return BatchOutcome([dead_letter(elements, error)], len(elements))
            return BatchOutcome(outputs, _dead_lettered(outputs) if isolate is not None else 0)
        finally:
            report_stack_time(self._stack_time)


def part_weight(batch: SizedBatch, part: Sequence[Any], sizing: Sizing | None) -> float:
    """A part's weight in the sizer's units: the gathered batch's own, when the part is all of
    it and its weight is known (not NaN); else weighed (elements, without a sizing)."""
    if part is batch.elements and not math.isnan(batch.weight):
        return batch.weight
    return float(len(part)) if sizing is None else sizing.batch_weight(part)


def _dead_lettered(outputs: list[Any]) -> int:
    return sum(
        len(output.value[0]) for output in outputs if isinstance(output, beam.pvalue.TaggedOutput)
    )


class ModelSource:
    """A transform's model in a worker process, as Beam's inference DoFn holds it: from the
    process's cache (one load per process), loaded with retries, a failed load not retried
    for its backoff; Beam's load metrics. Built in a DoFn's ``setup``. A handler that shares
    its model across processes gets it as Beam's DoFn does, served once per machine
    (:class:`~beam_turbo._running.loading.SharedModels`)."""

    def __init__(
        self,
        *,
        handler: base.ModelHandler,
        namespace: str,
        model_tag: str,
        clock: Any,
        retries: int,
        backoff_secs: float,
    ) -> None:
        self._handler = handler
        self._clock = clock
        self._retries = retries
        self._backoff_secs = backoff_secs
        #: Beam's metrics collector (None: the handler reports its own).
        self.metrics = (
            None if handler.override_metrics(namespace) else internals.MetricsCollector(namespace)
        )
        #: Whether the model is served across processes (its calls pickle their arguments).
        self.shared = bool(handler.share_model_across_processes())
        self._models: CachedModels | SharedModels = (
            SharedModels(model_tag, handler.model_copies())
            if self.shared
            else CachedModels(model_tag, namespace)
        )
        self._load_with_retries = retrying(self._load, retries, backoff_secs)
        self._model: Any = None
        self._load_failure: tuple[Exception, float] | None = None  # the error, when to retry

    def acquire_model(self) -> Any:
        """The model (shared across processes: Beam's router over its copies), loaded on first
        use. A load that failed (with its retries) is not tried again for the next batches
        until ``backoff_secs * 2**retries`` seconds have passed: meanwhile they fail at once
        with its error, instead of each waiting out the retries."""
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

    def next_model(self) -> Any:
        """The model a part of a batch runs on: the one acquired, or (shared across processes)
        the next of its copies, round-robin, as Beam's DoFn picks one per batch."""
        return self._models.pick(self.acquire_model())

    def _load(self) -> Any:
        memory_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = self._clock.time_ns()
        model = self._handler.load_model()
        latency_ms = (self._clock.time_ns() - start) // 1_000_000
        if self.metrics is not None:
            memory_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.metrics.cache_load_model_metrics(latency_ms, memory_after - memory_before)
        return model

    def bundle_done(self) -> None:
        """Report what the bundle counted (metrics set in ``setup`` are lost)."""
        self._models.report_hits()
        if self.metrics is not None:
            self.metrics.update_metrics_with_cache()


class HandlerInference:
    """A handler's ``run_inference`` on a part of a batch, as Beam's inference DoFn runs it:
    the model from the :class:`ModelSource`, the time to the sizer, Beam's metrics and
    beam-turbo's. Built in a DoFn's ``setup``. Another way of running a part (tables:
    ``_running/tables.py``) overrides :meth:`run` and :meth:`num_bytes`."""

    def __init__(
        self,
        *,
        handler: base.ModelHandler,
        models: ModelSource,
        namespace: str,
        clock: Any,
        sizing: Sizing,
        inference_args: dict[str, Any] | None,
    ) -> None:
        self._handler = handler
        self._models = models
        self._clock = clock
        self._sizing = sizing
        self._inference_args = inference_args
        self._batch_size = Metrics.distribution(namespace, BATCH_SIZE_METRIC)
        self._batch = SizedBatch(0.0)  # the batch running

    def of(self, batch: SizedBatch) -> Infer:
        """The :data:`Infer` for ``batch``'s parts (its weight known, its parts' weighed)."""
        self._batch = batch
        return self.__call__

    def run(self, part: Sequence[Any], model: Any) -> list[Any]:
        """The part's results (timed)."""
        return list(self._handler.run_inference(part, model, self._inference_args))

    def num_bytes(self, part: Sequence[Any]) -> int:
        """The part's size for Beam's byte metric, after it ran (not timed)."""
        return int(self._handler.get_num_bytes(part))

    def __call__(self, part: Sequence[Any]) -> list[Any]:
        model = self._models.next_model()
        metrics = self._models.metrics
        start = self._clock.time_ns()
        try:
            results = self.run(part, model)
        except Exception as error:
            if metrics is not None:
                metrics.failed_batches_counter.inc()
            pickling = internals.shared_model_pickling_error(error) if self._models.shared else None
            if pickling is not None:
                raise pickling from error
            raise
        elapsed_ns = self._clock.time_ns() - start
        self._sizing.record(part_weight(self._batch, part, self._sizing), elapsed_ns / 1e9)
        self._batch_size.update(len(part))
        if metrics is not None:
            metrics.update(len(part), self.num_bytes(part), elapsed_ns // 1000)
        return results
