"""Type stubs of beam_turbo._native (checked against the built module by stubtest)."""

from collections.abc import Callable, Iterable
from typing import Any, final

import numpy as np

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
