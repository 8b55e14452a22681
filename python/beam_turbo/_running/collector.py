"""Pausing the cyclic garbage collector while a batch is gathered, run and emitted."""

from __future__ import annotations

import gc
import threading
import time

__all__ = ["MAX_GC_PAUSE_SECS", "GcHold", "cyclic_gc_paused", "pause_cyclic_gc", "resume_cyclic_gc"]

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


class _Paused:
    """The context of :func:`cyclic_gc_paused`: a class, not a generator's context manager,
    which costs a generator and its frame per batch and, held across a batch's yields in a
    DoFn's generator, showed as 4% of a free model's pipeline in a profile."""

    __slots__ = ()

    def __enter__(self) -> None:
        pause_cyclic_gc()

    def __exit__(self, *error: object) -> None:
        resume_cyclic_gc()


_PAUSED = _Paused()


def cyclic_gc_paused() -> _Paused:
    """Hold off the cyclic garbage collector while one batch runs and its results are emitted.

    A batch's results (framework tensors and ``PredictionResult`` tuples, which the collector
    tracks) are all alive until the last is emitted, so collections during that time move them
    to older generations and, every so often, set off a full collection, which with TensorFlow
    or PyTorch loaded walks every object they made (its cost: docs/benchmarks.md). Paused,
    they die young without being traversed. Reference counting frees memory as usual; only
    cycles wait, for one batch.
    """
    return _PAUSED


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
