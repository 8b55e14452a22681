# Beam's DoFn API declares state and timers as call defaults (DoFn.StateParam(...)).
# ruff: noqa: B008
"""Batches kept in keyed state across bundles, when ``max_batch_duration_secs`` is set (by a
model handler, or given to ``BatchElements``): the two stateful compositions of the gather
rule (:func:`~beam_turbo._gathering.gatherer.closes_first` and ``is_full``).

:func:`stateful_batching_dofn` is ``BatchElements``': Beam's stateful batching (batches
flushed by size, window end or a processing-time limit), with the sizer kept in state as Beam
keeps its estimator, and element weights honoured; batches go out as lists, timed downstream.

:func:`stateful_inference_dofn` is ``RunInference``'s fused path for it: batches gathered
across bundles in keyed state and run through the batch runner in the same DoFn. Beam runs
its stateful ``BatchElements`` and its inference DoFn as two steps, with five states read and
written for every element; here an element costs one append to a bag, and a batch two timers.

Elements are keyed per worker process (Beam's ``WithSharedKey``, as Beam's stateful batching
does), kept in a ``BagState`` per key and window, and a batch runs when its weight reaches the
sizer's target, when ``max_batch_duration_secs`` of processing time have passed since its first
element (a ``REAL_TIME`` timer), or when its window ends (a watermark timer). Results carry
the timestamp and window Beam's two steps give them: the element's that completed the batch,
or the timer's (the first element's timestamp, for the duration limit; the end of the
window).

How full each key's bag is, and when its batch must run, is kept in this process's memory
(:data:`_GATHERING`), so that an element needs no state read. A bundle works on its own copy of
the keys it touches and publishes it when it finishes, so that a bundle that fails (its state
and timers rolled back by the runner) leaves nothing behind here either. A key first seen in
this process (a worker restarted, a key moved) counts its bag once. Should the runner still
fail a bundle after it finished, the count is too high (the next batch only runs early) and a
timer may be lost: a batch overdue by a second ``max_batch_duration_secs`` runs with the next
element of its key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam import coders, typehints
from apache_beam.transforms import window as beam_window
from apache_beam.transforms.combiners import CountCombineFn
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    CombiningValueStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.utils.timestamp import Timestamp

from beam_turbo._arrays.tables import (
    TableRows,
    check_table,
    row_count,
    slice_rows,
    table_from_bytes,
    table_to_bytes,
)
from beam_turbo._beam import internals
from beam_turbo._dofns.gathering import DownstreamTiming, RunBatches, emit_timed
from beam_turbo._gathering.gatherer import (
    SizedBatch,
    closes_first,
    is_full,
    rows_that_fit,
    unkeyed_length,
)
from beam_turbo._gathering.sizing import Sizing
from beam_turbo._running.collector import cyclic_gc_paused

__all__ = [
    "TablePieceCoder",
    "keying_dofn",
    "stateful_batching_dofn",
    "stateful_inference_dofn",
]


def keying_dofn(handler: Any) -> tuple[beam.DoFn, Any]:
    """The DoFn that keys elements for :func:`stateful_inference_dofn`, and its key's type:
    per worker process (Beam's ``WithSharedKey``), and with the handler's ``batch_length_fn``
    per length bucket too (Beam's ``WithLengthBucketKey``, with ``batch_bucket_boundaries`` or
    Beam's default ones), so that elements of similar lengths gather in one bag, as in Beam's
    stateful length-aware batching."""
    kwargs = handler.batch_elements_kwargs()
    length_fn = kwargs.get("length_fn")
    if length_fn is None:
        return internals.shared_key_dofn(), str
    length = unkeyed_length(length_fn, handler)

    def readable_length(element: Any) -> float:
        try:
            return length(element)
        except Exception:  # the first bucket; the batch it joins fails, and says why
            return 0

    boundaries = kwargs.get("bucket_boundaries") or internals.DEFAULT_BUCKET_BOUNDARIES
    return internals.length_bucket_key_dofn(readable_length, boundaries), typehints.Tuple[str, int]


@dataclasses.dataclass
class _Gathering:
    """What one key's bag holds in one window: how many elements, their weight, the weight at
    which the batch runs, and when (processing time, in seconds) it must run at the latest."""

    count: int = 0
    weight: float = 0.0
    target: float = 0.0
    deadline: float | None = None
    load: float = 0.0  # Sizing.load_fn's total (Beam 2.78's max_batch_weight)


#: Where a batch gathers: the transform (its sizing's key), the element key and the window.
_Where = tuple[str, Any, Any]
#: What each bag in this process holds, as of the last bundle that finished with its key. A
#: key is in one bundle at a time (the runner's keyed-state contract), so no lock is needed.
_GATHERING: dict[_Where, _Gathering] = {}


def stateful_inference_dofn(
    *,
    input_coder: coders.Coder,
    max_buffering_secs: float,
    sizing: Sizing,
    clock: Any,
    action: RunBatches,
    rows: bool = False,
) -> beam.DoFn:
    """A DoFn that batches ``(key, element)`` pairs across bundles in keyed state and runs
    each batch through ``action``: see the module docs. Its state specs need the elements'
    coder, hence a class per transform. With ``rows``, elements are tables: the bag holds
    pieces of them (:class:`TablePieceCoder`), a batch is of rows, and a table that does not
    fit fills the batch and its rest starts the next (the gatherer's rows,
    :func:`~beam_turbo._gathering.gatherer.rows_that_fit`)."""
    elements_spec = BagStateSpec("elements", TablePieceCoder() if rows else input_coder)
    window_end_spec = TimerSpec("window_end", TimeDomain.WATERMARK)
    deadline_spec = TimerSpec("buffering_end", TimeDomain.REAL_TIME)

    class StatefulInferenceDoFn(beam.DoFn):
        def __init__(self) -> None:
            self._sizing = sizing
            self._action = action

        def setup(self) -> None:
            self._sizing = self._sizing.shared()
            self._action.setup(self._sizing)

        def start_bundle(self) -> None:
            # This bundle's view of the keys it touches (None: a window done), published
            # when it finishes.
            self._touched: dict[_Where, _Gathering | None] = {}

        def process(
            self,
            element: Any,
            win: Any = beam.DoFn.WindowParam,
            elements: Any = beam.DoFn.StateParam(elements_spec),
            window_end: Any = beam.DoFn.TimerParam(window_end_spec),
            deadline: Any = beam.DoFn.TimerParam(deadline_spec),
        ) -> Iterator[Any]:
            key, value = element
            where = (self._sizing.key, key, win)
            gathering = self._gathering(where, elements)
            if rows:
                yield from self._add_rows(value, where, win, elements, window_end, deadline)
                return
            sizing = self._sizing
            weight = sizing.element_weight(value)
            load = sizing.element_load(value)
            if closes_first(
                gathering.count,
                gathering.weight,
                weight,
                gathering.target,
                gathering.load,
                load,
                sizing.max_load,
            ) or (gathering.count and self._overdue(gathering)):
                yield from self._flush(where, elements, deadline)
                gathering = self._gathering(where, elements)
            if gathering.count == 0:
                self._start(gathering, win, window_end, deadline)
            elements.add(value)
            gathering.count += 1
            gathering.weight += weight
            gathering.load += load
            if is_full(gathering.weight, gathering.target, gathering.load, sizing.max_load):
                yield from self._flush(where, elements, deadline)

        def _start(self, gathering: _Gathering, win: Any, window_end: Any, deadline: Any) -> None:
            """A new batch: its target, and its timers."""
            gathering.target = self._sizing.target()
            window_end.set(win.end)
            if max_buffering_secs > 0:
                gathering.deadline = clock.time() + max_buffering_secs
                deadline.set(Timestamp.of(gathering.deadline))

        def _add_rows(
            self, table: Any, where: _Where, win: Any, elements: Any, window_end: Any, deadline: Any
        ) -> Iterator[Any]:
            """A table's rows, cut where a batch fills: each piece joins the key's bag."""
            check_table(table)
            gathering = self._gathering(where, elements)
            if gathering.count and self._overdue(gathering):
                yield from self._flush(where, elements, deadline)
            total, start = row_count(table), 0
            while start < total:
                gathering = self._gathering(where, elements)
                if gathering.count == 0:
                    self._start(gathering, win, window_end, deadline)
                stop = min(total, start + rows_that_fit(gathering.weight, gathering.target))
                whole = (start, stop) == (0, total)
                elements.add(table if whole else slice_rows(table, start, stop))
                gathering.count += 1
                gathering.weight += stop - start
                start = stop
                if is_full(gathering.weight, gathering.target):
                    yield from self._flush(where, elements, deadline)

        def _gathering(self, where: _Where, elements: Any) -> _Gathering:
            gathering = self._touched.get(where)
            if gathering is not None:
                return gathering
            published = _GATHERING.get(where)
            if published is not None:
                gathering = dataclasses.replace(published)
            else:
                # First seen in this process: count what the bag holds (a worker restarted).
                held = list(elements.read())
                if rows:
                    gathering = _Gathering(len(held), float(sum(map(row_count, held))))
                else:
                    gathering = _Gathering(len(held), self._sizing.batch_weight(held))
                    gathering.load = self._sizing.batch_load(held)
                gathering.target = self._sizing.target()
                if held and max_buffering_secs > 0:
                    # Its timer was set before; should it be lost, _overdue runs the batch.
                    gathering.deadline = clock.time() + max_buffering_secs
            self._touched[where] = gathering
            return gathering

        def _overdue(self, gathering: _Gathering) -> bool:
            """Past its deadline by another ``max_buffering_secs``: its timer was lost."""
            late = gathering.deadline
            return late is not None and clock.time() > late + max_buffering_secs

        @on_timer(deadline_spec)
        def on_deadline(
            self,
            key: Any = beam.DoFn.KeyParam,
            win: Any = beam.DoFn.WindowParam,
            elements: Any = beam.DoFn.StateParam(elements_spec),
            deadline: Any = beam.DoFn.TimerParam(deadline_spec),
        ) -> Iterator[Any]:
            yield from self._flush((self._sizing.key, key, win), elements, deadline)

        @on_timer(window_end_spec)
        def on_window_end(
            self,
            key: Any = beam.DoFn.KeyParam,
            win: Any = beam.DoFn.WindowParam,
            elements: Any = beam.DoFn.StateParam(elements_spec),
            deadline: Any = beam.DoFn.TimerParam(deadline_spec),
        ) -> Iterator[Any]:
            where = (self._sizing.key, key, win)
            yield from self._flush(where, elements, deadline)
            if not isinstance(win, beam_window.GlobalWindow):
                self._touched[where] = None  # the window is done

        def _flush(self, where: _Where, elements: Any, deadline: Any) -> Iterator[Any]:
            """Run what the bag holds, and start the key's next batch empty."""
            gathering = self._touched.get(where) or _GATHERING.get(where)
            held = list(elements.read())
            elements.clear()
            deadline.clear()
            self._touched[where] = _Gathering()
            if held:
                # One bag, one batch: with a batch_length_fn the bags are length buckets
                # already (keying_dofn), and a bucket runs whole, padded to its longest, as
                # in Beam.
                target = gathering.target if gathering else 0.0
                if rows:
                    pieces = TableRows(held)
                    batch = SizedBatch(target, pieces, float(len(pieces)))  # type: ignore[arg-type]
                else:
                    batch = SizedBatch(target, held, self._sizing.batch_weight(held))
                with cyclic_gc_paused():
                    outputs = self._action.outputs(batch)
                yield from outputs

        def finish_bundle(self) -> Iterator[Any]:
            # Nothing to run: what is gathered stays in state, for the next bundles.
            for where, gathering in self._touched.items():
                if gathering is None:
                    _GATHERING.pop(where, None)
                else:
                    _GATHERING[where] = gathering
            self._touched = {}
            self._action.bundle_done()
            return iter(())

        def teardown(self) -> None:
            self._action.release()

    return StatefulInferenceDoFn()


class TablePieceCoder(coders.Coder):
    """The bag's coder for pieces of tables: Arrow's IPC format for pyarrow tables and record
    batches (a slice is written alone; a pickled slice carries its whole table's buffers),
    pickle for pandas frames."""

    def encode(self, value: Any) -> bytes:
        return table_to_bytes(value)

    def decode(self, encoded: bytes) -> Any:
        return table_from_bytes(encoded)

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self) -> Any:
        return Any


class _SumWeights(beam.CombineFn):
    """Sums element weights in a float accumulator (the state's coder is FloatCoder)."""

    def create_accumulator(self) -> float:
        return 0.0

    def add_input(self, total: float, weight: float) -> float:
        return total + weight

    def merge_accumulators(self, totals: Any) -> float:
        return float(sum(totals))

    def extract_output(self, total: float) -> float:
        return total


def stateful_batching_dofn(
    *,
    input_coder: coders.Coder,
    sizing: Sizing,
    max_buffering_secs: float,
    timing: DownstreamTiming,
) -> beam.DoFn:
    """``BatchElements``' stateful DoFn: see the module docs.

    Its ``weight`` state sums ``element_size_fn`` (the weights, or the loads: ``Sizing``);
    where Beam pins its stateful batching's label and state names (2.78), the DoFn takes
    Beam's label and has no ``weight`` state without ``element_size_fn``."""
    elements_state = BagStateSpec("values", input_coder)
    count_state = CombiningValueStateSpec("count", coders.VarIntCoder(), CountCombineFn())
    weight_state = CombiningValueStateSpec("weight", coders.FloatCoder(), _SumWeights())
    target_state = ReadModifyWriteStateSpec("batch_size", coders.FloatCoder())
    sizer_state = ReadModifyWriteStateSpec("batch_estimator", coders.PickleCoder())
    window_timer = TimerSpec("window_end", TimeDomain.WATERMARK)
    buffering_timer = TimerSpec("buffering_end", TimeDomain.REAL_TIME)
    label = internals.STATEFUL_BATCHING_DOFN_LABEL
    loaded = sizing.load_fn is not None  # the weight state sums loads, the size is a count
    weighed = label is None or not sizing.unit  # a weight state (else weight is None)

    def held_weight(count: Any, weight: Any) -> float:
        return float(count.read()) if weight is None or loaded else float(weight.read())

    class StatefulBatchingDoFn(beam.DoFn):
        def setup(self) -> None:
            timing.setup()

        def default_label(self) -> str:
            return label or super().default_label()

        if weighed:

            def process(
                self,
                element: Any,
                win: Any = beam.DoFn.WindowParam,
                elements: Any = beam.DoFn.StateParam(elements_state),
                count: Any = beam.DoFn.StateParam(count_state),
                weight: Any = beam.DoFn.StateParam(weight_state),
                target: Any = beam.DoFn.StateParam(target_state),
                sizer_in_state: Any = beam.DoFn.StateParam(sizer_state),
                window_end: Any = beam.DoFn.TimerParam(window_timer),
                buffering_end: Any = beam.DoFn.TimerParam(buffering_timer),
            ) -> Iterator[Any]:
                state = (elements, count, weight, target, sizer_in_state, buffering_end)
                return self._add(element, win, window_end, *state)

            @on_timer(window_timer)
            def on_window_end(
                self,
                elements: Any = beam.DoFn.StateParam(elements_state),
                count: Any = beam.DoFn.StateParam(count_state),
                weight: Any = beam.DoFn.StateParam(weight_state),
                target: Any = beam.DoFn.StateParam(target_state),
                sizer_in_state: Any = beam.DoFn.StateParam(sizer_state),
                buffering_end: Any = beam.DoFn.TimerParam(buffering_timer),
            ) -> Iterator[Any]:
                yield from self._flush(
                    elements, count, weight, target, sizer_in_state, buffering_end
                )

            @on_timer(buffering_timer)
            def on_buffering_end(
                self,
                elements: Any = beam.DoFn.StateParam(elements_state),
                count: Any = beam.DoFn.StateParam(count_state),
                weight: Any = beam.DoFn.StateParam(weight_state),
                target: Any = beam.DoFn.StateParam(target_state),
                sizer_in_state: Any = beam.DoFn.StateParam(sizer_state),
                buffering_end: Any = beam.DoFn.TimerParam(buffering_timer),
            ) -> Iterator[Any]:
                yield from self._flush(
                    elements, count, weight, target, sizer_in_state, buffering_end
                )

        else:  # Beam 2.78's state names without element_size_fn: no weight state

            def process(  # type: ignore[misc]
                self,
                element: Any,
                win: Any = beam.DoFn.WindowParam,
                elements: Any = beam.DoFn.StateParam(elements_state),
                count: Any = beam.DoFn.StateParam(count_state),
                target: Any = beam.DoFn.StateParam(target_state),
                sizer_in_state: Any = beam.DoFn.StateParam(sizer_state),
                window_end: Any = beam.DoFn.TimerParam(window_timer),
                buffering_end: Any = beam.DoFn.TimerParam(buffering_timer),
            ) -> Iterator[Any]:
                state = (elements, count, None, target, sizer_in_state, buffering_end)
                return self._add(element, win, window_end, *state)

            @on_timer(window_timer)
            def on_window_end(
                self,
                elements: Any = beam.DoFn.StateParam(elements_state),
                count: Any = beam.DoFn.StateParam(count_state),
                target: Any = beam.DoFn.StateParam(target_state),
                sizer_in_state: Any = beam.DoFn.StateParam(sizer_state),
                buffering_end: Any = beam.DoFn.TimerParam(buffering_timer),
            ) -> Iterator[Any]:
                yield from self._flush(elements, count, None, target, sizer_in_state, buffering_end)

            @on_timer(buffering_timer)
            def on_buffering_end(
                self,
                elements: Any = beam.DoFn.StateParam(elements_state),
                count: Any = beam.DoFn.StateParam(count_state),
                target: Any = beam.DoFn.StateParam(target_state),
                sizer_in_state: Any = beam.DoFn.StateParam(sizer_state),
                buffering_end: Any = beam.DoFn.TimerParam(buffering_timer),
            ) -> Iterator[Any]:
                yield from self._flush(elements, count, None, target, sizer_in_state, buffering_end)

        def _add(
            self,
            element: Any,
            win: Any,
            window_end: Any,
            elements: Any,
            count: Any,
            weight: Any,
            target: Any,
            sizer_in_state: Any,
            buffering_end: Any,
        ) -> Iterator[Any]:
            window_end.set(win.end)
            value = element[1]  # the key only spreads the work; batches hold the values
            element_weight = sizing.element_weight(value)
            element_load = sizing.element_load(value)
            goal = target.read()
            if goal is None:
                sizer_in_state.write(sizing.sizer)
                goal = sizing.target()
                target.write(goal)
            state = (elements, count, weight, target, sizer_in_state, buffering_end)
            load = float(weight.read()) if loaded else 0.0
            if closes_first(
                count.read(),
                held_weight(count, weight),
                element_weight,
                goal,
                load,
                element_load,
                sizing.max_load,
            ):
                yield from self._flush(*state)
                goal = target.read()
            elements.add(value)
            count.add(1)
            if weight is not None:
                weight.add(element_load if loaded else element_weight)
            if count.read() == 1 and max_buffering_secs > 0:
                buffering_end.set(timing.now() + max_buffering_secs)
            load = float(weight.read()) if loaded else 0.0
            if is_full(held_weight(count, weight), goal, load, sizing.max_load):
                yield from self._flush(*state)

        def _flush(
            self,
            elements: Any,
            count: Any,
            weight: Any,
            target: Any,
            sizer_in_state: Any,
            buffering_end: Any,
        ) -> Iterator[Any]:
            batch = list(elements.read())
            if not batch:
                return
            batch_weight = held_weight(count, weight)
            elements.clear()
            count.clear()
            if weight is not None:
                weight.clear()
            in_state = sizing.using(sizer_in_state.read() or sizing.sizer)
            yield from emit_timed(batch, batch_weight, in_state, timing, untimed=False)
            target.write(in_state.target())
            sizer_in_state.write(in_state.sizer)
            buffering_end.clear()

    return StatefulBatchingDoFn()
