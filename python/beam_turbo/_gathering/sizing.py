"""How batches are sized: a transform's :class:`Sizing`, the one home of what every batching
and inference DoFn needs to know about batch sizes.

:class:`Sizing` owns a transform's :class:`~beam_turbo.BatchSizer`, the cap on a batch's weight
(``max_batch_weight``), an element's weight (``element_size_fn``) and the memory failures that
the work downstream reports. The gatherer (:mod:`beam_turbo._gathering.gatherer`) asks it for
each batch's target; the batch runner tells it each batch's time.

A new ``BatchSizer`` option needs no change here: the sizer's arguments are read from its
signature (:data:`SIZER_ARGS`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from beam_turbo._beam import internals
from beam_turbo._native import BatchSizer

__all__ = [
    "BATCHING_ARGS",
    "LENGTH_ARGS",
    "SIZER_ARGS",
    "STREAMING_ARGS",
    "MemoryFailureReporter",
    "Sizing",
    "unit_weight",
]

#: ``BatchSizer``'s arguments (Beam's batch-size estimator's), read from its signature.
SIZER_ARGS = frozenset(inspect.signature(BatchSizer).parameters)
#: The batching arguments a :class:`Sizing` takes: the sizer's, the weights and their cap.
BATCHING_ARGS = SIZER_ARGS | {"element_size_fn", "max_batch_weight"}
#: A handler's length-aware batching arguments (Beam's ``batch_length_fn`` and buckets):
#: ``RunInference``'s fused DoFn sorts what it gathers by length instead of bucketing.
LENGTH_ARGS = frozenset({"length_fn", "bucket_boundaries"})
#: The batching argument that makes batches gather across bundles, in keyed state.
STREAMING_ARGS = frozenset({"max_batch_duration_secs"})


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
        >>> sizing.batch_weight([1, 2, 3])
        3.0
    """

    sizer: BatchSizer
    #: An element's weight; None: every element weighs 1 (and batches need not be weighed).
    weight_fn: Callable[[Any], float] | None = None
    max_weight: float = float("inf")
    key: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    #: An element's load: a second measure of a batch, bounded apart from its weight by
    #: ``max_load`` (Beam 2.78's ``max_batch_weight``, where the weight counts elements and
    #: ``element_size_fn`` gives the load: tokens, say). None: no load.
    load_fn: Callable[[Any], float] | None = None
    max_load: float = float("inf")

    @classmethod
    def from_batching_args(cls, args: Mapping[str, Any]) -> Sizing:
        """From ``BatchElements``' arguments or a handler's ``batch_elements_kwargs()``;
        arguments outside :data:`BATCHING_ARGS` are ignored."""
        weigh = args.get("element_size_fn")
        weigh = None if weigh is unit_weight else weigh
        cap = args.get("max_batch_weight")
        sizer = BatchSizer(**{k: v for k, v in args.items() if k in SIZER_ARGS})
        if cap is not None and weigh is not None and internals.MAX_BATCH_WEIGHT_BOUNDS_APART:
            return cls(sizer, load_fn=weigh, max_load=float(cap))
        return cls(sizer, weight_fn=weigh, max_weight=float("inf") if cap is None else float(cap))

    @property
    def unit(self) -> bool:
        """Whether every element weighs 1 and there is no load: batches are counted only."""
        return self.weight_fn is None and self.load_fn is None

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
        """One element's weight: 1, or ``element_size_fn``'s answer."""
        return 1.0 if self.weight_fn is None else float(self.weight_fn(element))

    def element_load(self, element: Any) -> float:
        """One element's load: 0, or ``element_size_fn``'s answer (see :attr:`load_fn`)."""
        return 0.0 if self.load_fn is None else float(self.load_fn(element))

    def batch_load(self, batch: Sequence[Any]) -> float:
        """A batch's load: the sum of its elements'."""
        if self.load_fn is None:
            return 0.0
        return float(sum(self.load_fn(element) for element in batch))

    def batch_weight(self, batch: Sequence[Any]) -> float:
        """A batch's size in the sizer's units: elements, or their total weight."""
        if self.weight_fn is None:
            return float(len(batch))
        return float(sum(self.weight_fn(element) for element in batch))

    def record(self, weight: float, seconds: float) -> None:
        """A batch of ``weight`` took ``seconds``."""
        self.sizer.record(weight, seconds)

    @property
    def ceiling(self) -> float | None:
        """The smallest weight that ran out of memory, while the sizer keeps below it."""
        ceiling = self.sizer.ceiling
        return None if ceiling is None else float(ceiling)

    def fitting_length(self, length: int, weight: float) -> int:
        """How many of a batch's ``length`` elements (of ``weight`` in all) to run at once:
        all, or fewer when batches of its weight have run out of memory (the sizer's ceiling;
        a batch gathered before the failure was heard of, as with batches in flight)."""
        ceiling = self.ceiling
        if ceiling is None or weight < ceiling or length <= 1:
            return length
        return max(1, math.ceil(length * ceiling / weight) - 1)

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
