"""Out-of-memory recovery: a batch that does not fit is split in halves until it does.

The recovery is one routine. A handler runs its batch through :func:`run_splitting_on_oom`;
beam-turbo's ``RunInference`` runs the handler through :func:`run_owning_oom`, which marks the
recovery as the transform's, so that the handler lets the error through and the splitting
happens once, in the transform (which also tells its batch sizer).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import TypeVar

from beam_turbo._frameworks import imported

__all__ = ["is_out_of_memory", "run_owning_oom", "run_splitting_on_oom"]

T = TypeVar("T")
R = TypeVar("R")

_LOG = logging.getLogger(__name__)

_OOM_OWNED: ContextVar[bool] = ContextVar("beam_turbo_oom_owned", default=False)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` means the batch did not fit: CUDA's, TensorFlow's, or MemoryError."""
    if isinstance(error, MemoryError):
        return True
    torch = imported("torch")
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    tf = imported("tensorflow")
    if tf is not None and isinstance(error, tf.errors.ResourceExhaustedError):
        return True
    message = str(error)
    # Beam's own test for CUDA's error (OOMProtectedFn), for errors re-raised as other types.
    return "out of memory" in message and "CUDA" in message


def free_accelerator_memory() -> None:
    """Release what a failed batch left behind, so that a smaller one can fit."""
    gc.collect()
    torch = imported("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_splitting_on_oom(run: Callable[[Sequence[T]], list[R]], batch: Sequence[T]) -> list[R]:
    """``run(batch)``, splitting the batch in halves while it fails for memory (for handlers).

    A part that fails is halved until it fits (or is a single element, whose error is
    raised); the size that fit is kept for the rest of the batch, so a 1,024-element batch
    that fits only 100 at a time fails four times, not once per part. Results come back in
    the order of ``batch``. Inside
    :func:`run_owning_oom` (beam-turbo's ``RunInference``), the error goes straight through
    to the transform instead, which splits and tells its batch sizer.

    Example:
        >>> def run(part):
        ...     if len(part) > 2:
        ...         raise MemoryError
        ...     return [x * 10 for x in part]
        >>> run_splitting_on_oom(run, [1, 2, 3, 4, 5])
        [10, 20, 30, 40, 50]
    """
    if _OOM_OWNED.get() or not batch:
        return run(batch)
    return _split_on_oom(run, batch, None)


def run_owning_oom(
    run: Callable[[Sequence[T]], list[R]],
    batch: Sequence[T],
    on_oom: Callable[[Sequence[T]], None] | None = None,
    fits: int | None = None,
) -> list[R]:
    """:func:`run_splitting_on_oom` for the transform: handlers inside ``run`` let their
    out-of-memory errors through, and the splitting happens here. ``on_oom(part)`` is told
    each part that failed (to teach a batch sizer); ``fits``: the most elements known to fit
    (default: try the whole batch)."""
    token = _OOM_OWNED.set(True)
    try:
        return _split_on_oom(run, batch, on_oom, fits) if batch else run(batch)
    finally:
        _OOM_OWNED.reset(token)


def _split_on_oom(
    run: Callable[[Sequence[T]], list[R]],
    batch: Sequence[T],
    on_oom: Callable[[Sequence[T]], None] | None,
    fits: int | None = None,
) -> list[R]:
    results: list[R] = []
    start, limit = 0, len(batch) if fits is None else max(1, fits)
    while start < len(batch):
        # The whole batch is passed as itself (not a copy) while it fits in one go.
        part = batch if limit >= len(batch) else batch[start : start + limit]
        try:
            done = run(part)
        except Exception as error:
            if len(part) <= 1 or not is_out_of_memory(error):
                raise
            _LOG.warning("A batch of %d ran out of memory; retrying in halves.", len(part))
            free_accelerator_memory()
            if on_oom is not None:
                on_oom(part)
            limit = len(part) // 2
            continue
        results.extend(done)
        start += len(part)
    return results
