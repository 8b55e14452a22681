"""How batches are sized: the one home of what every batching DoFn shares.

:class:`Sizing` owns a transform's :class:`~beam_turbo.BatchSizer`, the cap on a batch's weight
(``max_batch_weight``), an element's weight (``element_size_fn``) and the memory failures that
the work downstream reports. ``BatchElements``' DoFns, the stateful streaming DoFn and
``RunInference``'s fused DoFn all size through it; :class:`WindowBatches` is the policy by
which they gather elements into batches.

A new ``BatchSizer`` option needs no change here: the sizer's arguments are read from its
signature (:data:`SIZER_ARGS`).
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from beam_turbo import _beam_internals as internals
from beam_turbo._native import BatchSizer

__all__ = [
    "BATCHING_ARGS",
    "LENGTH_ARGS",
    "MAX_PADDING",
    "NO_OUTPUT",
    "POOL_BATCHES",
    "SIZER_ARGS",
    "MemoryFailureReporter",
    "SizedBatch",
    "Sizing",
    "WindowBatches",
    "by_length",
    "unit_weight",
]

#: ``BatchSizer``'s arguments (Beam's batch-size estimator's), read from its signature.
SIZER_ARGS = frozenset(inspect.signature(BatchSizer).parameters)
#: The batching arguments a :class:`Sizing` takes: the sizer's, the weights and their cap.
BATCHING_ARGS = SIZER_ARGS | {"element_size_fn", "max_batch_weight"}
#: A handler's length-aware batching arguments (Beam's ``batch_length_fn`` and buckets):
#: ``RunInference``'s fused DoFn sorts what it gathers by length instead of bucketing.
LENGTH_ARGS = frozenset({"length_fn", "bucket_boundaries"})
#: How many batches' worth of elements the fused DoFn gathers before sorting them by length.
POOL_BATCHES = 8
#: A batch sorted by length closes before more than this share of its tokens would be padding.
MAX_PADDING = 0.1


#: What a batching DoFn's ``process`` returns for an element that completes no batch. (Not a
#: literal None: Beam warns about DoFns whose source returns None.)
NO_OUTPUT: tuple[()] = ()


def unit_weight(element: Any) -> int:
    """Every element weighs 1 (Beam's default ``element_size_fn``)."""
    return 1


_REGISTRY_LOCK = threading.Lock()
#: This process's sizing of each transform (by key): its DoFn instances (threads, bundles,
#: a DoFn rebuilt after a failed bundle) share what its sizer learned.
_SHARED: dict[str, Sizing] = {}
#: Memory failures reported downstream, by transform key, not yet told to its sizer.
_MEMORY_FAILURES: dict[str, list[float]] = {}


@dataclasses.dataclass(frozen=True)
class MemoryFailureReporter:
    """Tells a transform's sizing that a batch of ``size`` ran out of memory downstream.

    Made by :meth:`Sizing.reporter` (``BatchElements.memory_failure_reporter()``); picklable,
    so the work downstream (an inference DoFn that splits a batch after a CUDA out-of-memory
    error) can take it to the workers. ``size`` is in the batch-size units: elements, or total
    weight with ``element_size_fn``. The batching DoFn fused upstream, in the same process,
    hears of it when the batch returns: that batch's time is not recorded, and the sizer will
    not propose that size again. Elsewhere, calling it does nothing.

    Example:
        >>> from beam_turbo import BatchElements
        >>> report = BatchElements().memory_failure_reporter()
        >>> report(4096)  # in the DoFn that ran out of memory on a batch of 4096
    """

    key: str

    def __call__(self, size: float) -> None:
        with _REGISTRY_LOCK:
            _MEMORY_FAILURES.setdefault(self.key, []).append(size)


@dataclasses.dataclass
class Sizing:
    """One transform's batch sizing: its sizer, the weight cap, element weights, and the memory
    failures reported for it (by ``key``).

    Example:
        >>> sizing = Sizing.from_batching_args({"max_batch_size": 64, "max_batch_weight": 10})
        >>> sizing.target()  # the sizer starts small, and never past the weight cap
        1.0
        >>> sizing.weight([1, 2, 3])
        3.0
    """

    sizer: BatchSizer
    #: An element's weight; None: every element weighs 1 (and batches need not be weighed).
    weigh: Callable[[Any], float] | None = None
    max_weight: float = float("inf")
    key: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def from_batching_args(cls, args: Mapping[str, Any]) -> Sizing:
        """From ``BatchElements``' arguments or a handler's ``batch_elements_kwargs()``;
        arguments outside :data:`BATCHING_ARGS` are ignored."""
        weigh = args.get("element_size_fn")
        cap = args.get("max_batch_weight")
        return cls(
            BatchSizer(**{k: v for k, v in args.items() if k in SIZER_ARGS}),
            weigh=None if weigh is unit_weight else weigh,
            max_weight=float("inf") if cap is None else float(cap),
        )

    def shared(self) -> Sizing:
        """This process's one sizing for the transform (the first to ask sets it)."""
        with _REGISTRY_LOCK:
            return _SHARED.setdefault(self.key, self)

    def using(self, sizer: BatchSizer) -> Sizing:
        """The same sizing with another sizer (one kept in a DoFn's state)."""
        return dataclasses.replace(self, sizer=sizer)

    def target(self) -> float:
        """The weight at which the next batch is full."""
        return min(float(self.sizer.next_size()), self.max_weight)

    def element_weight(self, element: Any) -> float:
        return 1.0 if self.weigh is None else float(self.weigh(element))

    def weight(self, batch: Sequence[Any]) -> float:
        """A batch's size in the sizer's units: elements, or their total weight."""
        if self.weigh is None:
            return float(len(batch))
        return float(sum(self.weigh(element) for element in batch))

    def record(self, weight: float, seconds: float) -> None:
        """A batch of ``weight`` took ``seconds``."""
        self.sizer.record(weight, seconds)

    def record_memory_failure(self, weight: float) -> None:
        """A batch of ``weight`` did not fit in memory: the sizer stays below it."""
        self.sizer.record_failure(weight, memory=True)

    def reporter(self) -> MemoryFailureReporter:
        """A picklable callable through which the work downstream reports memory failures."""
        return MemoryFailureReporter(self.key)

    def take_reported_failures(self) -> bool:
        """Pass the memory failures reported for this transform to the sizer; true if any."""
        if not _MEMORY_FAILURES:  # the common case, without the lock
            return False
        with _REGISTRY_LOCK:
            failures = _MEMORY_FAILURES.pop(self.key, [])
        for size in failures:
            self.record_memory_failure(size)
        return bool(failures)


class SizedBatch:
    """The elements of one batch being gathered, their total weight, and the weight at which
    the batch is full (chosen when it starts)."""

    __slots__ = ("elements", "target", "weight")

    def __init__(self, target: float) -> None:
        self.elements: list[Any] = []
        self.weight: float = 0.0
        self.target = target


class WindowBatches:
    """The batches being gathered, one per window, by the policy that ``BatchElements`` and
    ``RunInference``'s fused DoFn share: a batch is full at its target weight; an element that
    does not fit sends the batch so far out first (so one heavier than the target goes out
    alone, never after an empty batch); at most ``MAX_LIVE_WINDOWS`` batches are held, then
    the fullest goes out.

    Each new batch's target is ``sizing.target()``, asked only after the batches given out
    before have been emitted, so that it can learn from them.
    """

    __slots__ = ("_pool", "_sizing", "batches")

    def __init__(self, sizing: Sizing, pool: int = 1) -> None:
        self._sizing = sizing
        self._pool = pool  # gather this many batches' worth (to sort them by length)
        self.batches: dict[Any, SizedBatch] = {}

    def start(self, window: Any) -> SizedBatch:
        """A new, empty batch for ``window``."""
        batch = self.batches[window] = SizedBatch(self._sizing.target() * self._pool)
        return batch

    def add(self, element: Any, window: Any) -> Iterator[tuple[Any, SizedBatch]]:
        """Add ``element`` to its window's batch, giving out each batch that is full (or the
        fullest, past the window limit) as ``(window, batch)``: emit it before going on."""
        weight = self._sizing.element_weight(element)
        batch = self.batches.get(window)
        if batch is not None and batch.elements and batch.weight + weight > batch.target:
            del self.batches[window]
            yield window, batch
            batch = None
        if batch is None:
            batch = self.start(window)
        batch.elements.append(element)
        batch.weight += weight
        if batch.weight >= batch.target:
            del self.batches[window]
            yield window, batch
        elif len(self.batches) > internals.MAX_LIVE_WINDOWS:
            fullest = max(self.batches, key=lambda w: self.batches[w].weight)
            yield fullest, self.batches.pop(fullest)

    def drain(self) -> Iterator[tuple[Any, SizedBatch]]:
        """Every batch still gathering (at the end of a bundle)."""
        batches, self.batches = self.batches, {}
        yield from batches.items()


def by_length(
    elements: Sequence[Any], sizing: Sizing, length: Callable[[Any], float]
) -> Iterator[SizedBatch]:
    """``elements`` sorted by ``length`` and cut into batches of similar lengths, so that
    little of each padded batch is padding: a batch closes at the sizer's target (asked anew
    for each batch, after the one before has run, when the caller runs each as it comes), or
    before padding would exceed :data:`MAX_PADDING` of its tokens, or before its padded weight
    (its count times its heaviest element's weight: its tokens computed, when weights are
    token counts) would exceed ``max_batch_weight``.

    An element whose length cannot be read sorts first; the batch it is in fails, and says
    why.

    Example:
        >>> sizing = Sizing.from_batching_args({"min_batch_size": 3, "max_batch_size": 3})
        >>> words = ["xxxxx", "a", "yyyyy", "b", "zzzzz", "cc"]
        >>> [b.elements for b in by_length(words, sizing, len)]
        [['a', 'b'], ['cc'], ['xxxxx', 'yyyyy', 'zzzzz']]
    """

    def sort_key(element: Any) -> float:
        try:
            return max(0.0, float(length(element)))
        except Exception:  # the handler reports it, for the batch that holds it
            return 0.0

    ordered = sorted(((sort_key(element), element) for element in elements), key=_first)
    next_one = 0
    while next_one < len(ordered):
        batch = SizedBatch(sizing.target())
        heaviest = tokens = 0.0
        while next_one < len(ordered):
            longest, element = ordered[next_one]
            weight = sizing.element_weight(element)
            count = len(batch.elements) + 1
            padded_tokens = count * longest
            if batch.elements and (
                batch.weight + weight > batch.target
                or count * max(heaviest, weight) > sizing.max_weight
                or padded_tokens - (tokens + longest) > MAX_PADDING * padded_tokens
            ):
                break
            batch.elements.append(element)
            batch.weight += weight
            heaviest = max(heaviest, weight)
            tokens += longest
            next_one += 1
        yield batch


def _first(pair: tuple[float, Any]) -> float:
    return pair[0]
