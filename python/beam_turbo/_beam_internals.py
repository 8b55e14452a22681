"""The one home of everything beam-turbo takes from Beam's private internals.

Names here are not in Beam's public API (``__all__`` or documented classes) and may change
between releases, so they are imported only after checking that the installed Beam is a
release they were read from. Another version fails at import with an error that says so.
"""

from __future__ import annotations

from typing import Any

import apache_beam

#: The Beam releases (major.minor) whose internals this module was read from and checked
#: against: the names below are the same in each, and Beam's own tests pass with beam-turbo
#: in place on each (scripts/conformance.sh).
SUPPORTED_BEAM = ("2.75", "2.76", "2.77")


class UnsupportedBeamVersionError(ImportError):
    """The installed Beam is not a release whose internals beam-turbo knows."""


def check_beam_version(version: str = apache_beam.__version__) -> None:
    """Raise :class:`UnsupportedBeamVersionError` unless ``version`` is a supported release.

    Example:
        >>> check_beam_version("2.77.1")
        >>> check_beam_version("2.75.0")
        >>> check_beam_version("2.78.0")
        Traceback (most recent call last):
        ...
        beam_turbo._beam_internals.UnsupportedBeamVersionError: ...
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

# The checked imports. Keep this list short: each is a promise about Beam's internals.
from apache_beam.transforms.util import (  # noqa: E402
    WithLengthBucketKey,
    WithSharedKey,
    _BatchSizeEstimator,
    _GlobalWindowsBatchingDoFn,
)
from apache_beam.transforms.window import GlobalWindows  # noqa: E402
from apache_beam.utils.windowed_value import WindowedValue  # noqa: E402

#: The names taken from ``apache_beam.ml.inference.base``, imported on first use: that module
#: imports torch wherever it is installed (Beam 2.77's model manager), which ``BatchElements``
#: and ``patch()`` must not do before the pipeline imports it.
_INFERENCE_BASE_NAMES = {
    "MetricsCollector": "_MetricsCollector",
    "RunInferenceDoFn": "_RunInferenceDoFn",
}


def __getattr__(name: str) -> Any:
    private = _INFERENCE_BASE_NAMES.get(name)
    if private is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from apache_beam.ml.inference import base

    value = getattr(base, private)
    globals()[name] = value
    return value


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


def shared_key_dofn() -> Any:
    """Beam's DoFn keying elements by a per-process id, for its stateful batching."""
    return WithSharedKey()


def length_bucket_key_dofn(length_fn: Any, boundaries: Any) -> Any:
    """Beam's DoFn keying elements by (per-process id, length bucket)."""
    return WithLengthBucketKey(length_fn, boundaries)


def beam_batch_size_estimator(**kwargs: Any) -> Any:
    """Beam's own ``_BatchSizeEstimator`` (for comparisons), with ``kwargs`` as its arguments."""
    return _BatchSizeEstimator(**kwargs)


def beam_global_batching_dofn(element_size_fn: Any = None, **kwargs: Any) -> Any:
    """Beam's own batching DoFn for the global window (for comparisons)."""
    size_fn = element_size_fn if element_size_fn is not None else (lambda x: 1)
    return _GlobalWindowsBatchingDoFn(_BatchSizeEstimator(**kwargs), size_fn)


__all__ = [
    "BATCH_SIZE_METRIC",
    "DEFAULT_BUCKET_BOUNDARIES",
    "MAX_LIVE_WINDOWS",
    "METRICS_NAMESPACE",
    "MSEC_PER_BATCH_METRIC",
    "SUPPORTED_BEAM",
    "UnsupportedBeamVersionError",
    "WindowedValue",
    "at_end_of_global_window",
    "beam_batch_size_estimator",
    "beam_global_batching_dofn",
    "check_beam_version",
    "length_bucket_key_dofn",
    "shared_key_dofn",
]
