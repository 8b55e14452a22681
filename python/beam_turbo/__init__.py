"""beam-turbo: a Rust-accelerated batching core for Apache Beam's RunInference.

``import beam_turbo`` imports neither Beam nor any ML framework: ``RunInference``,
``BatchElements`` and ``SortAndBatchElements`` (which import Beam) load on first use.

Example:
    >>> import numpy as np, beam_turbo
    >>> beam_turbo.stack([np.zeros(4, np.float32)] * 8).shape
    (8, 4)
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from beam_turbo import errors
from beam_turbo._arrays.stacking import set_pool_limit, stack
from beam_turbo._beam import lazy_torch
from beam_turbo._beam.patch import patch, unpatch
from beam_turbo._native import BatchSizer, ModelCache

if TYPE_CHECKING:
    from beam_turbo.batching import BatchElements, SortAndBatchElements
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
    "SortAndBatchElements",
    "__version__",
    "errors",
    "patch",
    "set_pool_limit",
    "stack",
    "unpatch",
]

# Beam's inference module imports torch where installed; beam-turbo's imports of it do not.
lazy_torch.install()

# The names that import Beam, loaded on first use (PEP 562).
_LAZY = {
    "BatchElements": "beam_turbo.batching",
    "RunInference": "beam_turbo.inference",
    "SortAndBatchElements": "beam_turbo.batching",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'beam_turbo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
