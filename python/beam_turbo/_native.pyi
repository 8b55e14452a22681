"""Type stubs of beam_turbo._native (checked against the built module by stubtest)."""

from collections.abc import Callable, Iterable
from typing import Any, final

import numpy as np

__all__ = [
    "BatchMemory",
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
