"""The gatherer: the one rule by which elements become batches, and its variants as data.

The rule: **a batch is full at its target** (the sizer's answer, capped by
``max_batch_weight``); **an element that would take a non-empty batch past its target closes
the batch first** (so an element heavier than the target goes out alone, never after an empty
batch). :func:`closes_first` and :func:`is_full` state it; everything that batches uses them:

- :class:`Gatherer`, for batches held in memory within a bundle: one batch per window (at most
  ``MAX_LIVE_WINDOWS``, then the fullest goes), a fast path for the global window with unit
  weights (:meth:`Gatherer.add_unit`), pooling: ``pool`` batches' worth gathered, then cut
  by a :data:`Cut` (sorted by length, :func:`by_length`; or by size, :func:`by_size`), and
  rows of tables (``rows=True``): a table is an element that can be cut, so one that does not
  fit fills the batch and its rest starts the next (large tables cut, small ones joined);
- the DoFns that keep their batch in keyed state across bundles
  (:mod:`beam_turbo._dofns.keyed_state`), which hold counts, not lists, and ask the same two
  questions (and, for tables, cut them by :func:`rows_that_fit`, as the gatherer does).

``BatchElements``, ``SortAndBatchElements`` and every inference DoFn gather through this
module; none writes the rule again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from beam_turbo._arrays.tables import TableRows, check_table, row_count, slice_rows
from beam_turbo._beam import internals
from beam_turbo._gathering.sizing import Sizing
from beam_turbo._native import UnitFiller

__all__ = [
    "MAX_PADDING",
    "NO_OUTPUT",
    "POOL_BATCHES",
    "Cut",
    "Gatherer",
    "SizedBatch",
    "by_length",
    "by_size",
    "closes_first",
    "is_full",
    "rows_that_fit",
    "unkeyed_length",
]

_LOG = logging.getLogger(__name__)

#: How many batches' worth of elements the fused DoFn gathers before sorting them by length.
POOL_BATCHES = 8
#: A batch sorted by length closes before more than this share of its tokens would be padding.
MAX_PADDING = 0.1

#: What a gathering DoFn's ``process`` returns for an element that completes no batch. (Not a
#: literal None: Beam warns about DoFns whose source returns None.)
NO_OUTPUT: tuple[()] = ()


def closes_first(
    count: int,
    held: float,
    weight: float,
    target: float,
    load: float = 0.0,
    element_load: float = 0.0,
    max_load: float = math.inf,
) -> bool:
    """Whether an element of ``weight`` closes a batch of ``count`` elements weighing ``held``
    before it joins: it would take a non-empty batch past its ``target``, or its ``load``
    past ``max_load`` (``Sizing.load_fn``: Beam 2.78's ``max_batch_weight``).

    Example:
        >>> closes_first(0, 0.0, 9.0, 4.0), closes_first(3, 3.0, 2.0, 4.0)
        (False, True)
        >>> closes_first(2, 2.0, 1.0, 3.0, load=8.0, element_load=4.0, max_load=10.0)
        True
    """
    return count > 0 and (held + weight > target or load + element_load > max_load)


def is_full(held: float, target: float, load: float = 0.0, max_load: float = math.inf) -> bool:
    """Whether a batch weighing ``held`` is full: it has reached its ``target``, or its
    ``load`` has reached ``max_load``."""
    return held >= target or load >= max_load


def rows_that_fit(held: float, target: float) -> int:
    """How many rows of a table join a batch of ``held`` rows (a table is an element that can
    be cut): as many as take it to its ``target``, and at least one, so that a table always
    moves on. The rest of the table starts the next batch.

    Example:
        >>> rows_that_fit(0.0, 4.0), rows_that_fit(3.0, 4.0), rows_that_fit(5.0, 4.0)
        (4, 1, 1)
    """
    return max(1, math.ceil(target - held))


class SizedBatch:
    """The elements of one batch being gathered, their total weight, and the weight at which
    the batch is full (chosen when it starts)."""

    __slots__ = ("elements", "load", "target", "weight")

    def __init__(self, target: float, elements: list[Any] | None = None, weight: float = 0.0):
        self.elements: list[Any] = [] if elements is None else elements
        self.weight = weight
        self.target = target
        self.load = 0.0  # Sizing.load_fn's total, bounded apart (Beam 2.78's max_batch_weight)


#: How a pool of gathered elements is cut into batches, each batch's target asked of the
#: sizing as it is cut (lazily: after the batch before has run).
Cut = Callable[[Sequence[Any], Sizing], Iterator[SizedBatch]]


class Gatherer:
    """The batches of one bundle being gathered, one per window.

    Each new batch's target is ``sizing.target()`` (times ``pool``), asked only when the
    batch starts, so after the batches given out before have run, and can teach the sizer.
    With a ``cut``, a full pool is given out as the batches ``cut`` makes of it.

    Example:
        >>> from beam_turbo._gathering.sizing import Sizing
        >>> sizing = Sizing.from_batching_args({"min_batch_size": 2, "max_batch_size": 2})
        >>> gatherer = Gatherer(sizing)
        >>> [batch.elements for _, batch in gatherer.add("a", "w")]
        []
        >>> [batch.elements for _, batch in gatherer.add("b", "w")]
        [['a', 'b']]
    """

    __slots__ = ("_cut", "_filler", "_on_start", "_pool", "_rows", "_sizing", "add_unit", "batches")

    def __init__(
        self,
        sizing: Sizing,
        pool: float = 1,
        cut: Cut | None = None,
        on_start: Callable[[], None] | None = None,
        rows: bool = False,
    ) -> None:
        self._sizing = sizing
        self._rows = rows  # elements are tables, batches rows (TableRows)
        self._pool = pool  # gather this many batches' worth, then cut
        self._cut = cut
        self._on_start = on_start  # told when the global window's batch starts (add_unit)
        self.batches: dict[Any, SizedBatch] = {}
        self._filler = UnitFiller(self._start_unit)
        #: ``add_unit(element, window)``: the fast path of :meth:`add`, for the one window of
        #: elements that all weigh 1 (no cut): the batch ``element`` fills (its weight its
        #: length), or None. No generator, no weighing; native (``_native.UnitFiller``: it
        #: runs once per element), with each batch started by :meth:`_start_unit`.
        self.add_unit: Callable[[Any, Any], SizedBatch | None] = self._filler.add

    def _new_batch(self) -> SizedBatch:
        """A new, empty batch, its target asked of the sizing now (times ``pool``)."""
        return SizedBatch(self._sizing.target() * self._pool)

    def start(self, window: Any) -> SizedBatch:
        """A new, empty batch for ``window``."""
        batch = self.batches[window] = self._new_batch()
        return batch

    def _start_unit(self, window: Any) -> SizedBatch:
        """A new batch for :attr:`add_unit` (kept by the filler, not in :attr:`batches`)."""
        batch = self._new_batch()
        if self._on_start is not None:
            self._on_start()
        return batch

    def add(self, element: Any, window: Any) -> Iterator[tuple[Any, SizedBatch]]:
        """Add ``element`` to its window's batch, giving out each batch that is full (or the
        fullest, past the window limit) as ``(window, batch)``: run or emit each before
        going on."""
        if self._rows:
            yield from self._add_rows(element, window)
            return
        sizing = self._sizing
        weight = sizing.element_weight(element)
        load = sizing.element_load(element)
        batch = self.batches.get(window)
        if batch is not None and closes_first(
            len(batch.elements),
            batch.weight,
            weight,
            batch.target,
            batch.load,
            load,
            sizing.max_load * self._pool,
        ):
            del self.batches[window]
            yield from self._give_out(window, batch)
            batch = None
        if batch is None:
            batch = self.start(window)
        batch.elements.append(element)
        batch.weight += weight
        batch.load += load
        if is_full(batch.weight, batch.target, batch.load, sizing.max_load * self._pool):
            del self.batches[window]
            yield from self._give_out(window, batch)
        else:
            yield from self._past_the_window_limit()

    def _add_rows(self, table: Any, window: Any) -> Iterator[tuple[Any, SizedBatch]]:
        """A table's rows, cut where a batch fills: each part joins its window's batch."""
        check_table(table)
        rows = row_count(table)
        start = 0
        while start < rows:
            batch = self.batches.get(window)
            if batch is None:
                batch = self.start(window)
            stop = min(rows, start + rows_that_fit(batch.weight, batch.target))
            part = table if (start, stop) == (0, rows) else slice_rows(table, start, stop)
            batch.elements.append(part)
            batch.weight += stop - start
            start = stop
            if is_full(batch.weight, batch.target):
                del self.batches[window]
                yield from self._give_out(window, batch)
        yield from self._past_the_window_limit()

    def _past_the_window_limit(self) -> Iterator[tuple[Any, SizedBatch]]:
        """The fullest batch, while more than ``MAX_LIVE_WINDOWS`` windows are gathering."""
        if len(self.batches) > internals.MAX_LIVE_WINDOWS:
            fullest = max(self.batches, key=lambda w: self.batches[w].weight)
            yield from self._give_out(fullest, self.batches.pop(fullest))

    def drain(self) -> Iterator[tuple[Any, SizedBatch]]:
        """Every batch still gathering (at the end of a bundle)."""
        batches, self.batches = self.batches, {}
        filling = self._filler.take()
        if filling is not None:  # add_unit's
            window, batch = filling
            batch.weight = len(batch.elements)  # add_unit sets it when a batch is full
            batches[window] = batch
        for window, batch in batches.items():
            yield from self._give_out(window, batch)

    def _give_out(self, window: Any, batch: SizedBatch) -> Iterator[tuple[Any, SizedBatch]]:
        if self._rows:
            batch.elements = TableRows(batch.elements)  # type: ignore[assignment]
            yield window, batch
        elif self._cut is None:
            yield window, batch
        else:
            for part in self._cut(batch.elements, self._sizing):
                yield window, part


def by_length(length: Callable[[Any], float]) -> Cut:
    """A :data:`Cut` for ragged elements: sorted by ``length`` and cut into batches of similar
    lengths, so that little of each padded batch is padding. A batch closes at the sizer's
    target (asked anew for each batch), or before padding would exceed :data:`MAX_PADDING`
    of its tokens, or before its padded weight (its count times its heaviest element's
    weight: its tokens computed, when weights are token counts) would exceed
    ``max_batch_weight``.

    An element whose length cannot be read sorts first; the batch it is in fails, and says
    why.

    Example:
        >>> sizing = Sizing.from_batching_args({"min_batch_size": 3, "max_batch_size": 3})
        >>> words = ["xxxxx", "a", "yyyyy", "b", "zzzzz", "cc"]
        >>> [b.elements for b in by_length(len)(words, sizing)]
        [['a', 'b'], ['cc'], ['xxxxx', 'yyyyy', 'zzzzz']]
    """

    def sort_key(element: Any) -> float:
        try:
            return max(0.0, float(length(element)))
        except Exception:  # the handler reports it, for the batch that holds it
            return 0.0

    def cut(elements: Sequence[Any], sizing: Sizing) -> Iterator[SizedBatch]:
        ordered = sorted(((sort_key(element), element) for element in elements), key=_first)
        next_one = 0
        while next_one < len(ordered):
            batch = SizedBatch(sizing.target())
            heaviest = tokens = 0.0
            while next_one < len(ordered):
                longest, element = ordered[next_one]
                weight = sizing.element_weight(element)
                load = sizing.element_load(element)
                count = len(batch.elements) + 1
                padded_tokens = count * longest
                if batch.elements and (
                    closes_first(
                        count - 1,
                        batch.weight,
                        weight,
                        batch.target,
                        batch.load,
                        load,
                        sizing.max_load,
                    )
                    or count * max(heaviest, weight) > sizing.max_weight
                    or padded_tokens - (tokens + longest) > MAX_PADDING * padded_tokens
                ):
                    break
                batch.elements.append(element)
                batch.weight += weight
                batch.load += load
                heaviest = max(heaviest, weight)
                tokens += longest
                next_one += 1
            yield batch

    return cut


def unkeyed_length(length_fn: Callable[[Any], float], handler: Any) -> Callable[[Any], float]:
    """The inner handler's ``batch_length_fn`` for the elements ``RunInference`` gathers: a
    ``KeyedModelHandler`` passes its inner handler's batching arguments on, but gets
    ``(key, example)`` pairs; a ``MaybeKeyedModelHandler`` gets either. From Beam 2.78 they
    pass it on already applying to the example: then it is used as it is."""
    from apache_beam.ml.inference import base  # imports torch where installed: on first use

    if internals.applies_to_example(length_fn):
        return length_fn
    if isinstance(handler, base.KeyedModelHandler):
        return lambda element: length_fn(element[1])
    if isinstance(handler, base.MaybeKeyedModelHandler):

        def length(element: Any) -> float:
            try:
                return length_fn(element)
            except Exception:
                if isinstance(element, tuple) and len(element) == 2:
                    return length_fn(element[1])
                raise

        return length
    return length_fn


def by_size(
    max_batch_size: int, max_batch_weight: float, size_fn: Callable[[Any], float] | None
) -> Cut:
    """A :data:`Cut` with Beam's ``SortAndBatchElements`` rule: sorted by size (``size_fn``,
    default ``len(element)``, or 1 for elements without a length), stable for equal sizes,
    and cut into batches of at most the sizer's target (never past ``max_batch_size``) whose
    sizes sum below ``max_batch_weight``, unless one element alone exceeds it. A batch's
    ``weight`` is its count: what its sizing measures.

    Example:
        >>> sizing = Sizing.from_batching_args({"min_batch_size": 2, "max_batch_size": 2})
        >>> [b.elements for b in by_size(2, 100, None)(["ccc", "a", "dddd", "bb"], sizing)]
        [['a', 'bb'], ['ccc', 'dddd']]
    """
    warned = False

    def size(element: Any) -> float:
        nonlocal warned
        if size_fn is not None:
            return size_fn(element)
        try:
            return len(element)
        except TypeError:
            if not warned:
                # Beam's words.
                _LOG.warning(
                    "Element of type %s does not support len(). Falling back to size 1. "
                    "Consider providing a custom element_size_fn to SortAndBatchElements for "
                    "meaningful size-based batching.",
                    type(element).__name__,
                )
                warned = True
            return 1

    def limit(sizing: Sizing) -> int:
        return min(max_batch_size, max(1, int(sizing.target())))

    def cut(elements: Sequence[Any], sizing: Sizing) -> Iterator[SizedBatch]:
        sized = sorted(((size(element), element) for element in elements), key=_first)
        batch = SizedBatch(limit(sizing))
        total = 0.0
        for element_size, element in sized:
            # Beam's rule: a batch stays below max_batch_weight unless one element exceeds it.
            if batch.elements and (
                is_full(len(batch.elements), batch.target)
                or total + element_size >= max_batch_weight
            ):
                yield batch
                batch, total = SizedBatch(limit(sizing)), 0.0
            batch.elements.append(element)
            batch.weight += 1
            total += element_size
        if batch.elements:
            yield batch

    return cut


def _first(pair: tuple[float, Any]) -> float:
    return pair[0]
