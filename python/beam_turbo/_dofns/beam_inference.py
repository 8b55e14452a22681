"""``RunInference``'s path through Beam's own inference DoFn: ``beam_turbo.BatchElements``, then
Beam's DoFn with beam-turbo's model cache and load retries, each batch run through the batch
runner (out-of-memory splitting, failure isolation, the stack-time metric). Taken where a
fused DoFn would change Beam's semantics (see ``RunInference._can_fuse``): Beam's machinery
keeps side inputs, the model manager, timeouts, subprocesses and cross-process models.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from beam_turbo._beam import internals
from beam_turbo._gathering.gatherer import SizedBatch
from beam_turbo._gathering.sizing import Sizing
from beam_turbo._running.collector import cyclic_gc_paused
from beam_turbo._running.loading import CachedModels, RetryingLoad
from beam_turbo._running.runner import BatchRunner

__all__ = ["BeamInferenceDoFn"]


class BeamInferenceDoFn(internals.RunInferenceDoFn):
    """Beam's inference DoFn with the model cache, load retries and the batch runner."""

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
        handle = internals.inference_dofn_parts(self)
        self._namespace = handle.metrics_namespace or handle.handler.get_metrics_namespace()
        handle.set_shared_model_handle(CachedModels(handle.model_tag, self._namespace))
        self._retries = retries
        self._backoff_secs = backoff_secs
        self._isolate = isolate
        self._upstream = upstream

    def setup(self) -> None:
        handler = internals.inference_dofn_parts(self).handler
        # An instance attribute, set after unpickling, so every way Beam loads the model
        # (the cache, multi_process_shared, the model manager) goes through the retries.
        handler.load_model = RetryingLoad(handler, self._retries, self._backoff_secs)
        upstream = self._upstream
        self._runner = BatchRunner(
            namespace=self._namespace,
            sizing=upstream,
            isolate=self._isolate,
            # Tell the BatchElements upstream, whose sizer then backs off below this size.
            on_oom=None if upstream is None else upstream.reporter(),
        )
        super().setup()

    def finish_bundle(self) -> None:
        internals.inference_dofn_parts(self).shared_model_handle.report_hits()
        super().finish_bundle()

    def process(self, batch: Any, inference_args: Any, si_model_metadata: Any) -> Iterator[Any]:
        # Beam's, with the cyclic collector waiting while the batch runs and is emitted.
        with cyclic_gc_paused():
            yield from super().process(batch, inference_args, si_model_metadata)

    def _run_inference(self, batch: Any, inference_args: Any) -> Any:
        # Beam's step for one batch (its model, its metrics), run by the batch runner.
        run_batch = super()._run_inference

        def infer(part: Sequence[Any]) -> Any:
            return run_batch(part, inference_args)

        # Gathered upstream: its weight is not known here, and is weighed only if it runs out of
        # memory (the BatchElements upstream is told it in its units).
        gathered = SizedBatch(0.0, batch, math.nan)
        return self._runner.run(gathered, infer).outputs
