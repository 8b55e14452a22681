"""Type stubs of beam_turbo._native (checked against the built module by stubtest)."""

from collections.abc import Callable, Hashable, Iterable
from typing import Any, final

import numpy as np

__all__ = [
    "BatchMemory",
    "ModelCache",
    "check_bounds",
    "empty",
    "first_unlike",
    "pool_usage",
    "set_pool_limit",
    "stack",
]

@final
class BatchMemory:
    """The memory of a batch made by ``stack``."""

    @property
    def nbytes(self) -> int: ...

@final
class ModelCache:
    """A process-wide cache of loaded models, shared by every thread: one model per key."""

    def __new__(cls, *, max_models: int | None = None) -> ModelCache: ...
    @classmethod
    def default(cls) -> ModelCache: ...
    def acquire(self, key: Hashable, loader: Callable[[], Any], tag: Any = None) -> Any: ...
    def invalidate(self, key: Hashable) -> bool: ...
    def clear(self) -> None: ...
    def stats(self) -> dict[str, int | float]: ...
    @property
    def max_models(self) -> int | None: ...
    def __reduce__(self) -> tuple[Callable[..., ModelCache], tuple[Any, ...]]: ...
    @staticmethod
    def _resolve(id: int, max_models: int | None) -> ModelCache: ...

def stack(
    arrays: Iterable[Any],
    *,
    out: Any | None = None,
    pad: Any | None = None,
    coerce: Callable[[Any, int], np.ndarray[Any, Any]] | None = None,
) -> Any: ...
def set_pool_limit(bytes: int) -> int: ...
def pool_usage() -> tuple[int, int]: ...
def empty(shape: list[int] | tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]: ...
def first_unlike(items: Iterable[Any], attr: str) -> int | None: ...
def check_bounds(array: np.ndarray[Any, Any], buffer: np.ndarray[Any, Any], index: int) -> None: ...
