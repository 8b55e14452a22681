# Beam's DoFn API declares state and timers as call defaults (DoFn.StateParam(...)).
# ruff: noqa: B008
"""``RunInference``'s fused path for streaming, taken when the handler sets
``max_batch_duration_secs``: batches gathered across bundles in keyed state and run through the
handler in the same DoFn. Beam runs its stateful ``BatchElements`` and its inference DoFn as two
steps, with five states read and written for every element; here an element costs one append
to a bag, and a batch two timers.

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
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam import coders, typehints
from apache_beam.transforms import window as beam_window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from beam_turbo import _beam_internals as internals
from beam_turbo._fused import FusedInferenceDoFn, unkeyed_length
from beam_turbo._gc import cyclic_gc_paused
from beam_turbo._sizing import SizedBatch

__all__ = ["STREAMING_ARGS", "keying_dofn", "stateful_fused_dofn"]

#: The batching argument that makes ``RunInference`` batch across bundles, in keyed state.
STREAMING_ARGS = frozenset({"max_batch_duration_secs"})


@dataclasses.dataclass
class _Gathering:
    """What one key's bag holds in one window: how many elements, their weight, the weight at
    which the batch runs, and when (processing time, in seconds) it must run at the latest."""

    count: int = 0
    weight: float = 0.0
    target: float = 0.0
    deadline: float | None = None


def keying_dofn(handler: Any) -> tuple[beam.DoFn, Any]:
    """The DoFn that keys elements for :func:`stateful_fused_dofn`, and its key's type: per
    worker process (Beam's ``WithSharedKey``), and with the handler's ``batch_length_fn`` per
    length bucket too (Beam's ``WithLengthBucketKey``, with ``batch_bucket_boundaries`` or
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


#: Where a batch gathers: the transform (its sizing's key), the element key and the window.
_Where = tuple[str, Any, Any]
#: What each bag in this process holds, as of the last bundle that finished with its key. A
#: key is in one bundle at a time (the runner's keyed-state contract), so no lock is needed.
_GATHERING: dict[_Where, _Gathering] = {}


def stateful_fused_dofn(
    *, input_coder: coders.Coder, max_buffering_secs: float, **fused: Any
) -> FusedInferenceDoFn:
    """A :class:`~beam_turbo._fused.FusedInferenceDoFn` (made with ``fused``) that batches
    ``(key, element)`` pairs across bundles in keyed state: see the module docs. Its state
    specs need the elements' coder, hence a class per transform."""
    elements_spec = BagStateSpec("elements", input_coder)
    window_end_spec = TimerSpec("window_end", TimeDomain.WATERMARK)
    deadline_spec = TimerSpec("buffering_end", TimeDomain.REAL_TIME)

    class StatefulFusedInferenceDoFn(FusedInferenceDoFn):
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
            weight = self._sizing.element_weight(value)
            if gathering.count and (
                gathering.weight + weight > gathering.target  # it would not fit
                or self._overdue(gathering)
            ):
                yield from self._flush(where, elements, deadline)
                gathering = self._gathering(where, elements)
            if gathering.count == 0:  # a new batch
                gathering.target = self._sizing.target()
                window_end.set(win.end)
                if max_buffering_secs > 0:
                    gathering.deadline = self._clock.time() + max_buffering_secs
                    deadline.set(Timestamp.of(gathering.deadline))
            elements.add(value)
            gathering.count += 1
            gathering.weight += weight
            if gathering.weight >= gathering.target:
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
                gathering = _Gathering(len(held), self._sizing.weight(held))
                gathering.target = self._sizing.target()
                if held and max_buffering_secs > 0:
                    # Its timer was set before; should it be lost, _overdue runs the batch.
                    gathering.deadline = self._clock.time() + max_buffering_secs
            self._touched[where] = gathering
            return gathering

        def _overdue(self, gathering: _Gathering) -> bool:
            """Past its deadline by another ``max_buffering_secs``: its timer was lost."""
            late = gathering.deadline
            return late is not None and self._clock.time() > late + max_buffering_secs

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
            batch = list(elements.read())
            elements.clear()
            deadline.clear()
            self._touched[where] = _Gathering()
            if batch:
                yield from self._run_gathered(batch, gathering.target if gathering else 0.0)

        def _run_gathered(self, batch: list[Any], target: float) -> Iterable[Any]:
            # One bag, one batch: with a batch_length_fn the bags are length buckets already
            # (keying_dofn), and a bucket runs whole, padded to its longest, as in Beam.
            gathered = SizedBatch(target)
            gathered.elements = batch
            gathered.weight = self._sizing.weight(batch)
            with cyclic_gc_paused():
                return self._outputs(gathered)

        def finish_bundle(self) -> Iterator[Any]:
            # Nothing to run: what is gathered stays in state, for the next bundles.
            for where, gathering in self._touched.items():
                if gathering is None:
                    _GATHERING.pop(where, None)
                else:
                    _GATHERING[where] = gathering
            self._touched = {}
            self._models.report_hits()
            if self._metrics is not None:
                self._metrics.update_metrics_with_cache()
            return iter(())

    return StatefulFusedInferenceDoFn(**fused)
