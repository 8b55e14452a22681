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
  for every handler, users' own included.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference import base

from beam_turbo import _beam_internals as internals
from beam_turbo._inference import run_owning_oom
from beam_turbo._native import ModelCache
from beam_turbo.batching import BatchElements
from beam_turbo.errors import InvalidInputError, InvalidTypeError, ModelLoadError

__all__ = ["RunInference"]

_LOG = logging.getLogger(__name__)

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


class _CachedModels:
    """Stands where Beam's DoFn keeps its ``Shared`` handle: ``acquire(load, tag)`` answered
    from the process's :class:`ModelCache`, keyed by the transform's model tag."""

    def __init__(self, key: str) -> None:
        self._key = ("beam_turbo.RunInference", key)

    def acquire(self, load: Callable[[], Any], tag: Any = None) -> Any:
        return ModelCache.default().acquire(self._key, load, tag)


class _TurboRunInferenceDoFn(internals.RunInferenceDoFn):
    """Beam's inference DoFn with the model cache, load retries and OOM splitting."""

    def __init__(self, *args: Any, retries: int, backoff_secs: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shared_model_handle = _CachedModels(self._model_tag)
        self._retries = retries
        self._backoff_secs = backoff_secs

    def setup(self) -> None:
        handler = self._model_handler
        # An instance attribute, set after unpickling, so every way Beam loads the model
        # (the cache, multi_process_shared, the model manager) goes through the retries.
        handler.load_model = retrying(handler.load_model, self._retries, self._backoff_secs)
        super().setup()

    def _run_inference(self, batch: Any, inference_args: Any) -> Any:
        run_batch = super()._run_inference
        return run_owning_oom(lambda part: run_batch(part, inference_args), batch)


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
            monitoring_transform=monitoring_transform,
            **kwargs,
        )
        self._model_load_retries = model_load_retries
        self._model_load_backoff_secs = model_load_backoff_secs

    def expand(self, pcoll: beam.PCollection) -> Any:
        # Beam's expand with two parts swapped (marked): read it beside base.RunInference.expand.
        handler = self._model_handler
        handler.validate_inference_args(self._inference_args)
        pcoll, bad_preprocessed = self._apply_fns(
            pcoll, handler.get_preprocess_fns(), "BeamML_RunInference_Preprocess"
        )
        if self._watch_model_pattern:
            self._model_metadata_pcoll = self._get_model_metadata_pcoll(pcoll.pipeline)
        if handler.should_skip_batching():
            batched = pcoll
        else:
            batched = pcoll | BatchElements(**handler.batch_elements_kwargs())  # swapped
        load_model_at_runtime = self._model_metadata_pcoll is not None or self._timeout is not None
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
