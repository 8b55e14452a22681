"""Building a handler's batch: ``beam_turbo.stack`` for the common case, Beam's own conversion
for the rest, the time spent stacking (the ``beam_turbo_stack_micro_secs`` metric), and the
stacked batch's byte size."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from beam_turbo._arrays.stacking import stack
from beam_turbo.errors import InvalidInputError, InvalidTypeError

__all__ = [
    "SHAPE_HINT",
    "ByteSizeMemo",
    "beams_conversion",
    "numpy_batch",
    "report_stack_time",
    "take_stack_time_ns",
    "timed_stack",
]

R = TypeVar("R")

_stack_time = threading.local()


def timed_stack(stack: Callable[..., R], batch: Sequence[Any], **kwargs: Any) -> R:
    """``stack(batch, **kwargs)``, its time added to this thread's stacking time (which
    ``RunInference`` reports as the ``beam_turbo_stack_micro_secs`` metric)."""
    start = time.perf_counter_ns()
    try:
        return stack(batch, **kwargs)
    finally:
        _stack_time.ns = getattr(_stack_time, "ns", 0) + time.perf_counter_ns() - start


#: What a RunInference user can do about elements of different shapes in one batch.
SHAPE_HINT = (
    "RunInference stacks a batch's elements into one array, so they need one shape: reshape "
    "or pad them before RunInference (in a beam.Map), or give the model handler "
    "max_batch_size=1 to run them one at a time"
)

_STACK_PAD_ADVICE = "; pass pad= to stack arrays of different shapes"


def beams_conversion(convert: Callable[..., R], batch: Sequence[Any], fast_error: Exception) -> R:
    """``convert(batch)`` where ``convert`` is the conversion Beam's handler makes
    (``numpy.stack``, ``torch.stack``), for a batch the fast path refused with ``fast_error``:
    Beam's results, and Beam's errors. A shape mismatch keeps Beam's error type and words,
    followed by the fast path's detail (the element, its shape and dtype) and what the user
    can do.
    """
    try:
        return timed_stack(convert, batch)
    except (ValueError, RuntimeError) as error:
        message = str(error)
        if type(error) not in (ValueError, RuntimeError) or not (
            "shape" in message or "size" in message
        ):
            raise
        # stack()'s own advice (pad=) is for its callers; a RunInference user gets SHAPE_HINT.
        detail = str(fast_error).removesuffix(_STACK_PAD_ADVICE)
        # Both errors' words are in the message: one traceback, not three chained.
        raise type(error)(f"{message} ({detail}). {SHAPE_HINT}") from None


def numpy_batch(batch: Sequence[Any]) -> Any:
    """A numpy handler's batch: one copy by :func:`beam_turbo.stack` for arrays of one dtype
    and shape; anything else (lists, tuples, mixed dtypes, which numpy promotes) as Beam's
    handler builds it, by ``numpy.stack``.

    Example:
        >>> numpy_batch([[1, 2], np.array([0.5, 1.5])]).tolist()
        [[1.0, 2.0], [0.5, 1.5]]
    """
    try:
        return timed_stack(stack, batch)
    except (InvalidInputError, InvalidTypeError) as error:
        refused = error  # outside this block, Beam's error does not chain onto it
    return beams_conversion(np.stack, batch, refused)


def report_stack_time(distribution: Any) -> None:
    """The time this thread's handler spent stacking the batch, as a metric."""
    spent_ns = take_stack_time_ns()
    if spent_ns:
        distribution.update(spent_ns // 1000)


def take_stack_time_ns() -> int:
    """This thread's stacking time since the last call, in nanoseconds."""
    spent: int = getattr(_stack_time, "ns", 0)
    _stack_time.ns = 0
    return spent


class ByteSizeMemo:
    """The byte size of the batch a thread just stacked, for ``get_num_bytes`` to return.

    Beam's inference DoFn calls ``run_inference(batch)`` and then ``get_num_bytes(batch)`` on
    the same list; remembering the stacked batch's size makes the second call constant-time.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def remember(self, batch: Sequence[Any], nbytes: int) -> None:
        self._local.entry = (id(batch), len(batch), nbytes)

    def recall(self, batch: Sequence[Any]) -> int | None:
        entry = getattr(self._local, "entry", None)
        if entry is None or entry[0] != id(batch) or entry[1] != len(batch):
            return None
        self._local.entry = None
        nbytes: int = entry[2]
        return nbytes

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._local = threading.local()
