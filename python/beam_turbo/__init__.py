"""beam-turbo: a Rust-accelerated batching core for Apache Beam's RunInference.

Example:
    >>> import numpy as np, beam_turbo
    >>> beam_turbo.stack([np.zeros(4, np.float32)] * 8).shape
    (8, 4)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from beam_turbo import errors
from beam_turbo._native import BatchSizer, ModelCache
from beam_turbo._patch import patch, unpatch
from beam_turbo._stacking import set_pool_limit, stack
from beam_turbo.batching import BatchElements
from beam_turbo.inference import RunInference

try:
    __version__ = version("beam-turbo")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "BatchElements",
    "BatchSizer",
    "ModelCache",
    "RunInference",
    "__version__",
    "errors",
    "patch",
    "set_pool_limit",
    "stack",
    "unpatch",
]
