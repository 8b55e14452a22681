"""Batches in flight: gathered batches run on an inference thread of their own while the DoFn
gathers the next, so the model does not wait for Beam's per-element work, nor Beam for the
model (where the model releases the GIL: PyTorch, TensorFlow, a device, a native library).

:class:`Flight` is the queue: :meth:`Flight.launch` starts a batch, :meth:`Flight.landed`
gives back the batches that finished, in the order they were launched, waiting for the oldest
while more than ``ahead`` run. What a batch run gives (results, dead letters, an error) is
the batch runner's, unchanged; the error of a batch that failed is raised where it lands, on
the DoFn's thread. Metrics updated on the inference thread count in the step that launched
the batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from beam_turbo._beam import internals

__all__ = ["DEFAULT_BATCHES_IN_FLIGHT", "Flight"]

#: Batches that run while the next is gathered, by default: one ahead. More hold more
#: batches' elements and results in memory, and gain only when a batch's time varies.
DEFAULT_BATCHES_IN_FLIGHT = 1


class Flight:
    """Up to ``ahead`` batches running on one inference thread (started on first use) while
    the caller gathers the next. Built in a DoFn's ``setup``; :meth:`close` at teardown."""

    def __init__(self, ahead: int) -> None:
        self._ahead = ahead
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: (what the caller tags the batch with, its future), oldest first.
        self._running: collections.deque[tuple[Any, concurrent.futures.Future[Any]]] = (
            collections.deque()
        )

    def launch(self, tag: Any, run: Callable[[Any], Any], batch: Any) -> None:
        """Start ``run(batch)`` on the inference thread; ``tag`` comes back with its result."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="beam-turbo-inference"
            )
            weakref.finalize(self, self._pool.shutdown, wait=False)
        step = internals.current_step()
        self._running.append((tag, self._pool.submit(_in_step, step, run, batch)))

    def landed(self) -> Iterator[tuple[Any, Any]]:
        """The batches that finished, as ``(tag, result)`` in launch order: the oldest waited
        for while more than ``ahead`` run, then those done already. A failed batch's error is
        raised here (the batches after it stay running: :meth:`abandon` them)."""
        return self._land(self._ahead)

    def drain(self) -> Iterator[tuple[Any, Any]]:
        """Every batch running, as :meth:`landed` gives them, each waited for."""
        return self._land(-1)

    def _land(self, ahead: int) -> Iterator[tuple[Any, Any]]:
        running = self._running
        while running and (len(running) > ahead or running[0][1].done()):
            tag, future = running[0]
            result = future.result()
            running.popleft()
            yield tag, result

    def abandon(self) -> None:
        """Wait for the batches still running and drop what they give (the bundle that
        launched them failed, and the runner will run its elements again)."""
        running = self._running
        while running:
            _, future = running.popleft()
            concurrent.futures.wait([future])

    def close(self) -> None:
        self.abandon()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __len__(self) -> int:
        return len(self._running)


def _in_step(step: Any, run: Callable[[Any], Any], batch: Any) -> Any:
    internals.count_in(step)
    try:
        return run(batch)
    finally:
        internals.count_in(None)
