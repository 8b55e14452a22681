"""What every beam-turbo model handler shares: building Beam's per-element results in one pass,
recovering from out-of-memory errors by splitting the batch, and the batch byte-size memo.

The out-of-memory recovery is one routine. A handler runs its batch through
:func:`run_splitting_on_oom`; beam-turbo's ``RunInference`` runs the handler through
:func:`run_owning_oom`, which marks the recovery as the transform's, so that the handler lets
the error through and the splitting happens once, in the transform.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from itertools import repeat
from typing import Any, TypeVar

import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import PredictionResult

from beam_turbo._stacking import stack
from beam_turbo.errors import (
    InvalidInputError,
    InvalidTypeError,
    ModelLoadError,
    ModelNotFoundError,
)

__all__ = [
    "SHAPE_HINT",
    "ByteSizeMemo",
    "GcHold",
    "beams_conversion",
    "cyclic_gc_paused",
    "is_out_of_memory",
    "loading_model",
    "numpy_batch",
    "prediction_results",
    "run_owning_oom",
    "run_splitting_on_oom",
    "take_stack_time_ns",
    "timed_stack",
]

T = TypeVar("T")
R = TypeVar("R")

_LOG = logging.getLogger(__name__)
_new_tuple = tuple.__new__


def prediction_results(
    examples: Sequence[Any], predictions: Any, model_id: str | None = None
) -> list[PredictionResult]:
    """Beam's ``utils._convert_to_result``, with the batch split into rows in one call.

    A torch tensor is split with ``unbind`` and an eager TensorFlow tensor with ``tf.unstack``
    (Beam iterates TensorFlow tensors row by row, at about 250 us a row); numpy arrays and
    other iterables are iterated as Beam does. The results are the same objects Beam makes:
    one ``PredictionResult(example, inference, model_id)`` per pair, the shorter side deciding
    how many, and a dict of batched outputs becomes one dict per example.

    Example:
        >>> import numpy as np
        >>> [r.inference for r in prediction_results(["a", "b"], np.array([1, 2]))]
        [np.int64(1), np.int64(2)]
    """
    if isinstance(predictions, dict):
        keys = list(predictions)
        columns = [rows(predictions[key]) for key in keys]
        per_example = [
            dict(zip(keys, values, strict=False)) for values in zip(*columns, strict=False)
        ]
        return _results(examples, per_example, model_id)
    return _results(examples, rows(predictions), model_id)


def rows(batched: Any) -> Any:
    """The rows of a batched output, as Beam's iteration over it would give them."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(batched, torch.Tensor):
        return batched.unbind(0)
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(batched, tf.Tensor) and hasattr(batched, "numpy"):
        return tf.unstack(batched)
    return batched


def _results(examples: Sequence[Any], rows: Any, model_id: str | None) -> list[PredictionResult]:
    # PredictionResult is a NamedTuple: building it through tuple.__new__ skips the Python-level
    # __new__ and costs about a fifth as much per element.
    return list(map(_new_tuple, repeat(PredictionResult), zip(examples, rows, repeat(model_id))))


# --- time spent stacking ----------------------------------------------------------------

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
        raise type(error)(f"{message} ({detail}). {SHAPE_HINT}") from error


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
        return beams_conversion(np.stack, batch, error)


def take_stack_time_ns() -> int:
    """This thread's stacking time since the last call, in nanoseconds."""
    spent: int = getattr(_stack_time, "ns", 0)
    _stack_time.ns = 0
    return spent


# --- the cyclic garbage collector ----------------------------------------------------------

_gc_pause_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False
_gc_paused_since = 0.0

#: The longest the collector waits while pauses overlap (threads gathering batches in turn
#: can keep one going); past it, the next pause runs a full collection first.
MAX_GC_PAUSE_SECS = 5.0


def pause_cyclic_gc() -> None:
    """Hold off the cyclic garbage collector until the matching :func:`resume_cyclic_gc`.

    Pauses nest and may overlap across threads: the collector is enabled again when the last
    one ends, and only if it was enabled when the first began. Overlapping pauses that keep
    it off for more than ``MAX_GC_PAUSE_SECS`` get a full collection at the next pause, so
    cycles never wait longer than that.
    """
    global _gc_pauses, _gc_was_enabled, _gc_paused_since
    collect = False
    with _gc_pause_lock:
        now = time.monotonic()
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            _gc_paused_since = now
            gc.disable()
        elif _gc_was_enabled and now - _gc_paused_since > MAX_GC_PAUSE_SECS:
            _gc_paused_since = now
            collect = True
        _gc_pauses += 1
    if collect:
        gc.collect()


def resume_cyclic_gc() -> None:
    """End one :func:`pause_cyclic_gc`."""
    global _gc_pauses
    with _gc_pause_lock:
        if _gc_pauses == 0:
            raise RuntimeError("resume_cyclic_gc() without a pause_cyclic_gc()")
        _gc_pauses -= 1
        if _gc_pauses == 0 and _gc_was_enabled:
            gc.enable()


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector while one batch runs and its results are emitted.

    A batch's results (framework tensors and ``PredictionResult`` tuples, which the collector
    tracks) are all alive until the last is emitted, so collections during that time move them
    to older generations and, every so often, set off a full collection: with TensorFlow or
    PyTorch loaded, a full pass over about 600,000 objects, 0.3 s. Paused, they die young
    without being traversed. Reference counting frees memory as usual; only cycles wait, for
    one batch.
    """
    pause_cyclic_gc()
    try:
        yield
    finally:
        resume_cyclic_gc()


class GcHold:
    """One owner's pause of the cyclic collector, taken and given back at most once each
    time: a batch being gathered holds one, so that its elements (torch tensors are tracked)
    are not moved to the old generation while they wait."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = False

    def take(self) -> None:
        if not self.held:
            self.held = True
            pause_cyclic_gc()

    def give_back(self) -> None:
        if self.held:
            self.held = False
            resume_cyclic_gc()


# --- out-of-memory recovery ----------------------------------------------------------------

_OOM_OWNED: ContextVar[bool] = ContextVar("beam_turbo_oom_owned", default=False)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` means the batch did not fit: CUDA's, TensorFlow's, or MemoryError."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(error, tf.errors.ResourceExhaustedError):
        return True
    message = str(error)
    # Beam's own test for CUDA's error (OOMProtectedFn), for errors re-raised as other types.
    return "out of memory" in message and "CUDA" in message


def free_accelerator_memory() -> None:
    """Release what a failed batch left behind, so that a smaller one can fit."""
    gc.collect()
    torch = sys.modules.get("torch")
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
) -> list[R]:
    """:func:`run_splitting_on_oom` for the transform: handlers inside ``run`` let their
    out-of-memory errors through, and the splitting happens here. ``on_oom(part)`` is told
    each part that failed (to teach a batch sizer)."""
    token = _OOM_OWNED.set(True)
    try:
        return _split_on_oom(run, batch, on_oom) if batch else run(batch)
    finally:
        _OOM_OWNED.reset(token)


def _split_on_oom(
    run: Callable[[Sequence[T]], list[R]],
    batch: Sequence[T],
    on_oom: Callable[[Sequence[T]], None] | None,
) -> list[R]:
    results: list[R] = []
    start, limit = 0, len(batch)
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


# --- byte sizes --------------------------------------------------------------------------


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


# --- model loading -----------------------------------------------------------------------

# What deserializers raise for a file that is not a model of the expected kind. Other
# OSErrors (a flaky network file system, a timeout) are left alone: retrying may help those.
_DESERIALIZE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    RuntimeError,
    KeyError,
    AttributeError,
)


@contextlib.contextmanager
def loading_model(
    path: str | None, what: str = "model", also: Sequence[str] = ()
) -> Iterator[None]:
    """Turn what a model loader raises into an error that names the model file.

    The loader always runs: a user's loader, or one replaced in a test, may not read ``path``
    at all. Only after it fails is the path looked up: a path that does not exist (nor any of
    ``also``, such as a checkpoint's ``.index``) gives :class:`ModelNotFoundError`, a file that
    does not deserialize gives :class:`ModelLoadError`; other errors (a flaky network file
    system, a timeout) go through as they are, since retrying may help those.

    Example:
        >>> with loading_model("/nowhere/model.pkl"):
        ...     open("/nowhere/model.pkl", "rb")
        Traceback (most recent call last):
        ...
        beam_turbo.errors.ModelNotFoundError: model file /nowhere/model.pkl does not exist ...
    """
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as error:
        if isinstance(error, FileNotFoundError) or (path and not _exists(path, *also)):
            raise ModelNotFoundError(f"{what} file {path} does not exist ({error})") from error
        if isinstance(error, _DESERIALIZE_ERRORS):
            raise ModelLoadError(f"{what} file {path} could not be loaded: {error}") from error
        raise


def _exists(*paths: str) -> bool:
    """Whether any of ``paths`` exists; True for a scheme no Beam file system knows (a hub
    handle), which only its loader can judge."""
    try:
        return any(FileSystems.exists(p) for p in paths)
    except Exception:
        return True
