"""``RunInference``'s two-step path: ``beam_turbo.BatchElements``, then Beam's own inference DoFn
with beam-turbo's model cache, load retries, out-of-memory splitting and failure isolation.
Taken where a fused DoFn would change Beam's semantics (see ``RunInference._can_fuse``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from apache_beam.metrics.metric import Metrics

from beam_turbo import _beam_internals as internals
from beam_turbo._batch import report_stack_time
from beam_turbo._dead_letters import isolating
from beam_turbo._gc import cyclic_gc_paused
from beam_turbo._loading import CachedModels, RetryingLoad
from beam_turbo._oom import run_owning_oom
from beam_turbo._sizing import Sizing

__all__ = ["TurboRunInferenceDoFn"]


class TurboRunInferenceDoFn(internals.RunInferenceDoFn):
    """Beam's inference DoFn with the model cache, load retries and OOM splitting."""

    def __init__(
        self,
        *args: Any,
        retries: int,
        backoff_secs: float,
        isolate: tuple[type[BaseException], ...] | None,
        upstream: Sizing | None,
        **kwargs: Any,
    ) -> None:
        """Beam's DoFn's arguments, and: model load ``retries`` from ``backoff_secs``; the
        exceptions whose failing elements are ``isolate``d; the sizing of the
        ``BatchElements`` ``upstream``, told of batches that run out of memory."""
        super().__init__(*args, **kwargs)
        self._namespace = self._metrics_namespace or self._model_handler.get_metrics_namespace()
        self._shared_model_handle = CachedModels(self._model_tag, self._namespace)
        self._retries = retries
        self._backoff_secs = backoff_secs
        self._isolate = isolate
        self._upstream = upstream

    def setup(self) -> None:
        handler = self._model_handler
        # An instance attribute, set after unpickling, so every way Beam loads the model
        # (the cache, multi_process_shared, the model manager) goes through the retries.
        handler.load_model = RetryingLoad(handler, self._retries, self._backoff_secs)
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
            report_stack_time(self._stack_time)

    def _ran_out_of_memory(self, part: Sequence[Any]) -> None:
        """Tell the BatchElements upstream, whose sizer then backs off below this size."""
        if self._upstream is not None:
            self._upstream.reporter()(self._upstream.weight(part))
