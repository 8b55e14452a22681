"""The one home of everything beam-turbo takes from Beam's private internals.

Names here are not in Beam's public API (``__all__`` or documented classes) and may change
between releases, so they are imported only after checking that the installed Beam is a
release they were read from. Another version fails at import with an error that says so.

What beam-turbo relies on, all listed here (a new Beam release is checked against this list):

- the classes and functions imported or named in :data:`_LAZY_NAMES` below;
- ``_RunInferenceDoFn``'s attributes ``_model_handler``, ``_metrics_namespace``,
  ``_model_tag`` and ``_shared_model_handle`` (read and set through :class:`InferenceDoFnParts`)
  and its method ``_run_inference(batch, inference_args)``, which
  ``beam_turbo._dofns.beam_inference.BeamInferenceDoFn`` overrides and calls;
- ``_MetricsCollector``'s ``update``, ``cache_load_model_metrics``,
  ``update_metrics_with_cache`` and ``failed_batches_counter``;
- ``_SharedModelWrapper(models, model_tag)`` and its ``next_model()``, and
  ``_get_tags_for_copies(tag, copies)``: a model shared across processes, as Beam's DoFn
  shares it (``_running/loading.py``, ``SharedModels``).
"""

from __future__ import annotations

import importlib
from typing import Any

import apache_beam

#: The Beam releases (major.minor) whose internals this module was read from and checked
#: against: the names below are the same in each, and Beam's own tests pass with beam-turbo
#: in place on each (scripts/conformance.sh).
SUPPORTED_BEAM = ("2.75", "2.76", "2.77", "2.78")


class UnsupportedBeamVersionError(ImportError):
    """The installed Beam is not a release whose internals beam-turbo knows."""


def check_beam_version(version: str = apache_beam.__version__) -> None:
    """Raise :class:`UnsupportedBeamVersionError` unless ``version`` is a supported release.

    Example:
        >>> check_beam_version("2.78.1")
        >>> check_beam_version("2.75.0")
        >>> check_beam_version("2.79.0")
        Traceback (most recent call last):
        ...
        beam_turbo._beam.internals.UnsupportedBeamVersionError: ...
    """
    if ".".join(version.split(".")[:2]) not in SUPPORTED_BEAM:
        supported = ", ".join(f"{v}.x" for v in SUPPORTED_BEAM)
        raise UnsupportedBeamVersionError(
            f"beam-turbo uses private parts of apache-beam (apache_beam.transforms.util, "
            f"apache_beam.ml.inference.base) that it has checked on {supported}, but "
            f"apache-beam {version} is installed; install one of those, or a beam-turbo "
            f"release made for {version}"
        )


check_beam_version()


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


#: The one check of which Beam release's semantics beam-turbo follows where Beam changed its
#: own: true from Beam 2.78. Each behaviour that hangs on it is named below.
SINCE_2_78 = _release(apache_beam.__version__) >= (2, 78)

#: ``BatchElements``' ``max_batch_weight`` (Beam 2.78): a batch's size (its bounds, the
#: sizer's target) counts its elements, and its total ``element_size_fn`` is bounded apart by
#: ``max_batch_weight``, which requires ``element_size_fn``. Before, beam-turbo's own meaning
#: (Beam refused the argument): the weight is the size, and the cap caps the sizer's target.
MAX_BATCH_WEIGHT_BOUNDS_APART = SINCE_2_78

#: The label of Beam's stateful batching DoFn (``BatchElements`` with
#: ``max_batch_duration_secs``: ``ParDo(_StatefulBatchElementsDoFn)``, after Beam's keying
#: DoFn's ``ParDo(WithSharedKey)``), pinned by Beam 2.78 with its state names (``weight`` only
#: with ``element_size_fn``) for pipeline update; None before: beam-turbo's own (``Key``,
#: ``Batch``, and a ``weight`` state always).
STATEFUL_BATCHING_DOFN_LABEL: str | None = "_StatefulBatchElementsDoFn" if SINCE_2_78 else None

#: Beam 2.78's ``BatchElements`` warns, on its module's logger, that it ignores ``length_fn``
#: and ``bucket_boundaries`` without ``max_batch_duration_secs``; None: it does not.
LENGTH_FN_IGNORED_WARNING: str | None = (
    "BatchElements ignores length_fn and bucket_boundaries unless max_batch_duration_secs is set."
    if SINCE_2_78
    else None
)
#: The logger of Beam's ``BatchElements`` (``apache_beam.transforms.util``).
BATCHING_LOGGER = "apache_beam.transforms.util"

#: Beam's HuggingFace module (Beam 2.78) imports no framework at import (before, TensorFlow,
#: torch and transformers), and its ``HuggingFacePipelineModelHandler`` chooses its device when
#: it loads the model (``cuda:0`` where the workers' torch sees a GPU; before, where the
#: handler was built), and fails with :data:`TRANSFORMERS_REQUIRED` without transformers.
HUGGINGFACE_FRAMEWORKS_AT_LOAD = SINCE_2_78
#: Beam 2.78's error when transformers cannot be imported to load a pipeline.
TRANSFORMERS_REQUIRED = (
    "transformers is required to load Hugging Face pipelines, e.g. for "
    "HuggingFacePipelineModelHandler. Please install it using `pip install transformers` in "
    "the environment where the pipeline is executed (for example, on the workers)."
)

# The checked imports. Keep this list short: each is a promise about Beam's internals.
from apache_beam.runners.worker import statesampler  # noqa: E402
from apache_beam.transforms.util import (  # noqa: E402
    WithLengthBucketKey,
    WithSharedKey,
)
from apache_beam.transforms.util import _BatchSizeEstimator as BatchSizeEstimator  # noqa: E402
from apache_beam.transforms.util import (  # noqa: E402
    _GlobalWindowsBatchingDoFn as GlobalWindowsBatchingDoFn,
)
from apache_beam.transforms.window import GlobalWindows  # noqa: E402
from apache_beam.utils.windowed_value import WindowedValue  # noqa: E402

#: Names imported on first use, as (module, Beam's name): ``apache_beam.ml.inference.base``
#: imports torch wherever it is installed (Beam 2.77's model manager), and a framework's
#: module imports the framework, which ``BatchElements`` and ``patch()`` must not do before
#: the pipeline imports it.
_LAZY_NAMES = {
    "MetricsCollector": ("apache_beam.ml.inference.base", "_MetricsCollector"),
    "RunInferenceDoFn": ("apache_beam.ml.inference.base", "_RunInferenceDoFn"),
    # A model shared across processes (share_model_across_processes()): the copies' tags
    # (``<tag>0``, ``<tag>1``, ...) and the router over their proxies (round-robin, a shared
    # counter when there are several), as ``_RunInferenceDoFn._load_model`` builds them.
    "SharedModelWrapper": ("apache_beam.ml.inference.base", "_SharedModelWrapper"),
    "tags_for_copies": ("apache_beam.ml.inference.base", "_get_tags_for_copies"),
    "sklearn_numpy_inference_fn": (
        "apache_beam.ml.inference.sklearn_inference",
        "_default_numpy_inference_fn",
    ),
    "sklearn_pandas_inference_fn": (
        "apache_beam.ml.inference.sklearn_inference",
        "_default_pandas_inference_fn",
    ),
}


def __getattr__(name: str) -> Any:
    found = _LAZY_NAMES.get(name)
    if found is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, private = found
    value = getattr(importlib.import_module(module), private)
    globals()[name] = value
    return value


class InferenceDoFnParts:
    """The private attributes of Beam's inference DoFn (``_RunInferenceDoFn``) that
    beam-turbo's subclass reads or sets."""

    __slots__ = ("_dofn",)

    def __init__(self, dofn: Any) -> None:
        self._dofn = dofn

    @property
    def handler(self) -> Any:
        return self._dofn._model_handler

    @property
    def metrics_namespace(self) -> str | None:
        namespace: str | None = self._dofn._metrics_namespace
        return namespace

    @property
    def model_tag(self) -> str:
        tag: str = self._dofn._model_tag
        return tag

    @property
    def shared_model_handle(self) -> Any:
        return self._dofn._shared_model_handle

    def set_shared_model_handle(self, handle: Any) -> None:
        """Where Beam's DoFn keeps its ``Shared`` handle (``acquire(load, tag)``)."""
        self._dofn._shared_model_handle = handle


def inference_dofn_parts(dofn: Any) -> InferenceDoFnParts:
    """Beam's inference DoFn's private parts, for ``dofn`` (a subclass instance)."""
    return InferenceDoFnParts(dofn)


def applies_to_example(fn: Any) -> bool:
    """Whether ``fn`` is Beam's ``_ApplyToExample`` (2.78 and later): a keyed handler's
    batching function that takes the ``(key, example)`` pair and applies to the example."""
    from apache_beam.ml.inference import base

    wrapper = getattr(base, "_ApplyToExample", None)
    return wrapper is not None and isinstance(fn, wrapper)


#: Beam's metric namespace and names for batching (``_BatchSizeEstimator``), kept identical
#: so that dashboards built on stock Beam keep working.
METRICS_NAMESPACE = "BatchElements"
BATCH_SIZE_METRIC = "batch_size"
MSEC_PER_BATCH_METRIC = "msec_per_batch"

#: Beam's default length buckets for ``length_fn`` (``BatchElements._DEFAULT_BUCKET_BOUNDARIES``).
DEFAULT_BUCKET_BOUNDARIES: list[int] = [16, 32, 64, 128, 256, 512]

#: At most this many windows are batched at once before the fullest is emitted
#: (``_WindowAwareBatchingDoFn._MAX_LIVE_WINDOWS``).
MAX_LIVE_WINDOWS = 10


def at_end_of_global_window(value: Any) -> Any:
    """``value`` in the global window, at its end (as Beam's batching emits batches)."""
    return GlobalWindows.windowed_value_at_end_of_window(value)


#: Beam's words for an error pickling what is sent to a model shared across processes.
SHARED_MODEL_PICKLING_ERROR = (
    "Pickling error encountered while running inference. This may be caused by trying to send "
    "unpickleable data to a model which is shared across processes. For more information, see "
    "https://beam.apache.org/documentation/ml/large-language-modeling/#pickling-errors"
)


def shared_model_pickling_error(error: BaseException) -> TypeError | None:
    """Beam's ``TypeError`` for ``error`` raised running a model shared across processes, where
    the installed Beam gives one (2.78's ``_is_pickling_error``: a pickling error; before 2.78
    Beam's check, ``e is pickle.PickleError``, never holds), else None."""
    from apache_beam.ml.inference import base

    is_pickling_error = getattr(base, "_is_pickling_error", None)
    if is_pickling_error is None or not is_pickling_error(error):
        return None
    return TypeError(SHARED_MODEL_PICKLING_ERROR)


def current_step() -> Any:
    """The step this thread runs now (its state in Beam's state sampler, which holds the step's
    metrics container), or None outside a worker: metrics updated on another thread count in
    it through :func:`counting_in`."""
    tracker = statesampler.get_current_tracker()
    return None if tracker is None else tracker.current_state()


class _StepTracker:
    """Stands for Beam's state sampler on a thread of beam-turbo's own: Beam's metrics
    (``Metrics.counter(...).inc()`` and the like) look the sampler up per thread, and without
    one on the thread they are dropped. This one sends them to one step's container (Beam's
    own timeout wrapper gives its thread the dispatching thread's whole sampler instead, which
    counts in whatever step that thread has moved on to)."""

    __slots__ = ("_step",)

    def __init__(self, step: Any) -> None:
        self._step = step

    def current_state(self) -> Any:
        return self._step

    def update_metric(self, typed_metric_name: Any, value: Any) -> None:
        container = self._step.metrics_container
        if container is not None:
            container.get_metric_cell(typed_metric_name).update(value)


def count_in(step: Any) -> None:
    """From now on, metrics updated on this thread count in ``step`` (from
    :func:`current_step`; None: nowhere, as on a thread Beam does not know)."""
    statesampler.set_current_tracker(None if step is None else _StepTracker(step))


def shared_key_dofn() -> Any:
    """Beam's DoFn keying elements by a per-process id, for its stateful batching."""
    return WithSharedKey()


def length_bucket_key_dofn(length_fn: Any, boundaries: Any) -> Any:
    """Beam's DoFn keying elements by (per-process id, length bucket)."""
    return WithLengthBucketKey(length_fn, boundaries)


__all__ = [
    "BATCHING_LOGGER",
    "BATCH_SIZE_METRIC",
    "DEFAULT_BUCKET_BOUNDARIES",
    "HUGGINGFACE_FRAMEWORKS_AT_LOAD",
    "LENGTH_FN_IGNORED_WARNING",
    "MAX_BATCH_WEIGHT_BOUNDS_APART",
    "MAX_LIVE_WINDOWS",
    "METRICS_NAMESPACE",
    "MSEC_PER_BATCH_METRIC",
    "SHARED_MODEL_PICKLING_ERROR",
    "SINCE_2_78",
    "STATEFUL_BATCHING_DOFN_LABEL",
    "SUPPORTED_BEAM",
    "TRANSFORMERS_REQUIRED",
    "BatchSizeEstimator",
    "GlobalWindowsBatchingDoFn",
    "InferenceDoFnParts",
    "UnsupportedBeamVersionError",
    "WindowedValue",
    "applies_to_example",
    "at_end_of_global_window",
    "check_beam_version",
    "count_in",
    "current_step",
    "inference_dofn_parts",
    "length_bucket_key_dofn",
    "shared_key_dofn",
    "shared_model_pickling_error",
]
