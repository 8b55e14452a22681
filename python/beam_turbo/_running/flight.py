"""Batches in flight: gathered batches run on an inference thread of their own while the DoFn
gathers the next, so the model does not wait for Beam's per-element work, nor Beam for the
model (where the model releases the GIL: PyTorch, TensorFlow, a device, a native library).

:class:`Flight` is the queue: :meth:`Flight.launch` starts a batch, :meth:`Flight.landed`
gives back the batches that finished, in the order they were launched, waiting for the oldest
while more than ``ahead`` run. What a batch run gives (results, dead letters, an error) is
the batch runner's, unchanged; the error of a batch that failed is raised where it lands, on
the DoFn's thread. Metrics updated on the inference thread count in the step that launched
the batch.

Whether handing batches over pays depends on the model and the machine: it gains what of the
model's time is spent outside the GIL (a device's, a native library's) and costs a thread
switch each way and the two threads' turns at the GIL (some 60 us a batch alone, 0.3 ms in a
pipeline here). With a model that holds the GIL for most of its time (a small torch model's
rows split into tensors, pure Python) it loses: 0.8x here for a torch linear layer. So the
:class:`Flight` measures, as the pipeline runs, which way gives the caller's thread (Beam's:
the pipeline) less time per element, from one launch to the next (:class:`Chooser`): after
``WARM_UP_BATCHES`` run where they were gathered, a trial of ``TRIAL_BATCHES`` handed over
and as many run where they were gathered (after the batches before them land, so that they
keep their order), then the faster way for ``KEEP_BATCHES``, then another trial; each time
the same way wins, it is kept twice as long, up to ``MAX_KEEP_BATCHES``. ``adaptive=False``
hands every batch over.
"""

from __future__ import annotations

import collections
import concurrent.futures
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from beam_turbo._beam import internals

__all__ = [
    "DEFAULT_BATCHES_IN_FLIGHT",
    "KEEP_BATCHES",
    "MAX_KEEP_BATCHES",
    "TRIAL_BATCHES",
    "WARM_UP_BATCHES",
    "Chooser",
    "Flight",
]

#: Batches that run while the next is gathered, by default: one ahead. More hold more
#: batches' elements and results in memory, and gain only when a batch's time varies.
DEFAULT_BATCHES_IN_FLIGHT = 1
#: Batches run each way when the Chooser measures which is faster; the first ``SETTLING``
#: of each way's are not counted (they wait for the batches of the other way to land).
TRIAL_BATCHES = 6
SETTLING = 2
#: Batches run where they were gathered before the first trial: the sizer's first batches
#: grow from its minimum, and batches of different sizes cost different times per element
#: (the smallest, handed over, cost the most).
WARM_UP_BATCHES = 16
#: Batches run the faster way before it is measured again: twice as many each time the
#: same way wins, up to ``MAX_KEEP_BATCHES``.
KEEP_BATCHES = 64
MAX_KEEP_BATCHES = 1024


class Chooser:
    """Which way each batch runs, handed over (True) or where it was gathered (False), chosen
    by measuring both: each way's time per element from one launch to the next (the caller's
    thread's wall time, gathering and emitting included), its median over a trial.

    Example:
        >>> chooser = Chooser()
        >>> ways = [chooser.next(now=float(n), weight=1.0) for n in range(28)]
        >>> ways == [False] * 16 + [True] * 6 + [False] * 6  # warming up, then a trial
        True
        >>> chooser.next(now=28.0, weight=1.0), chooser.chosen  # a tie: handed over
        (True, True)
    """

    def __init__(self) -> None:
        #: The ways of the next batches, each with whether its time counts.
        self._plan: collections.deque[tuple[bool, bool]] = collections.deque()
        self._times: dict[bool, list[float]] = {True: [], False: []}
        self._last: tuple[float, bool, bool] | None = None  # launched: when, which way, counts
        self.chosen: bool | None = None  # the last trial's choice (None: none yet)
        self._keep = KEEP_BATCHES  # doubled each time the same way wins again
        self._plan.extend([(False, False)] * WARM_UP_BATCHES)

    def next(self, now: float, weight: float) -> bool:
        """The way of the batch launched ``now``, of ``weight`` (what was gathered since the
        last launch: the time since then is per element of it; a weight not above 0, or NaN,
        unknown, is not counted)."""
        if self._last is not None:
            since, way, counts = self._last
            if counts and weight > 0:
                self._times[way].append((now - since) / weight)
        if not self._plan:
            self._plan_next()
        way, counts = self._plan.popleft()
        self._last = (now, way, counts)
        return way

    def pause(self) -> None:
        """The caller stopped (a bundle's end): the time until its next launch is not a
        batch's."""
        self._last = None

    def _plan_next(self) -> None:
        handed, here = self._times[True], self._times[False]
        if handed and here:  # a trial ended: the faster way, for a while
            chosen = statistics.median(handed) <= statistics.median(here)
            same = chosen == self.chosen
            self._keep = min(2 * self._keep, MAX_KEEP_BATCHES) if same else KEEP_BATCHES
            self.chosen = chosen
            handed.clear()
            here.clear()
            self._plan.extend([(chosen, False)] * self._keep)
            return
        for way in (True, False):
            self._plan.extend((way, n >= SETTLING) for n in range(TRIAL_BATCHES))


class Flight:
    """Up to ``ahead`` batches running on one inference thread (started on first use) while
    the caller gathers the next, or (``adaptive``, where the :class:`Chooser` measured that
    it is faster) each run on the caller's thread. Built in a DoFn's ``setup``;
    :meth:`close` at teardown."""

    def __init__(self, ahead: int, adaptive: bool = True) -> None:
        self._ahead = ahead
        self.chooser = Chooser() if adaptive else None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: (what the caller tags the batch with, its future), oldest first.
        self._running: collections.deque[tuple[Any, concurrent.futures.Future[Any] | _Ran]] = (
            collections.deque()
        )

    def launch(self, tag: Any, run: Callable[[Any], Any], batch: Any, weight: float) -> None:
        """Start ``run(batch)`` on the inference thread, or run it here (see the module docs);
        ``tag`` comes back with its result, or its error, when it lands. ``weight``: the
        batch's elements (rows), for the time per element."""
        chooser = self.chooser
        if chooser is not None and not chooser.next(time.perf_counter(), weight):
            self._run_here(tag, run, batch)
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="beam-turbo-inference"
            )
            weakref.finalize(self, self._pool.shutdown, wait=False)
        step = internals.current_step()
        self._running.append((tag, self._pool.submit(_in_step, step, run, batch)))

    def _run_here(self, tag: Any, run: Callable[[Any], Any], batch: Any) -> None:
        if self._running:  # the batches in flight land first
            concurrent.futures.wait(
                [f for _, f in self._running if isinstance(f, concurrent.futures.Future)]
            )
        try:
            ran = _Ran(run(batch))
        except Exception as error:  # raised where it lands, as a batch's in flight is
            ran = _Ran(None, error)
        self._running.append((tag, ran))

    def landed(self) -> Iterator[tuple[Any, Any]]:
        """The batches that finished, as ``(tag, result)`` in launch order: the oldest waited
        for while more than ``ahead`` run, then those done already. A failed batch's error is
        raised here (the batches after it stay running: :meth:`abandon` them)."""
        return self._land(self._ahead)

    def drain(self) -> Iterator[tuple[Any, Any]]:
        """Every batch running, as :meth:`landed` gives them, each waited for (the caller
        stops launching: a bundle ends)."""
        if self.chooser is not None:
            self.chooser.pause()
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
        if self.chooser is not None:
            self.chooser.pause()
        running = self._running
        while running:
            _, future = running.popleft()
            if isinstance(future, concurrent.futures.Future):
                concurrent.futures.wait([future])

    def close(self) -> None:
        self.abandon()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __len__(self) -> int:
        return len(self._running)


class _Ran:
    """A batch that ran on the caller's thread, as a done future of its outcome."""

    __slots__ = ("_error", "_outcome")

    def __init__(self, outcome: Any, error: Exception | None = None) -> None:
        self._outcome = outcome
        self._error = error

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._outcome


def _in_step(step: Any, run: Callable[[Any], Any], batch: Any) -> Any:
    internals.count_in(step)
    try:
        return run(batch)
    finally:
        internals.count_in(None)
