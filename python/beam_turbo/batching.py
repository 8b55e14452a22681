"""``beam_turbo.BatchElements``: Beam's ``BatchElements``, sized by :class:`~beam_turbo.BatchSizer`.

Same arguments, defaults and meaning as ``apache_beam.BatchElements``, the same outputs (lists,
emitted at the end of their window), the same metrics, and the same stateful mode for
streaming (``max_batch_duration_secs``), plus ``max_batch_weight``. Batch sizes come from
:class:`~beam_turbo.BatchSizer`: they settle on the target and stay there, and back off after
memory failures that the downstream work reports. Both transforms gather through the one
gatherer (``_gathering``) in the gathering DoFn (``_dofns``). The deliberate differences from
Beam are listed in one place, the README's "Differences from Beam" table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.coders import typecoders
from apache_beam.pvalue import PCollection

from beam_turbo._beam import internals
from beam_turbo._dofns.gathering import (
    DownstreamTiming,
    EmitBatches,
    GatheringDoFn,
    WindowedGatheringDoFn,
)
from beam_turbo._dofns.keyed_state import stateful_batching_dofn
from beam_turbo._gathering.gatherer import by_size
from beam_turbo._gathering.sizing import MemoryFailureReporter, Sizing, unit_weight
from beam_turbo.errors import InvalidInputError

__all__ = ["BatchElements", "SortAndBatchElements"]


def _pardo(fn: beam.DoFn) -> Any:
    """``beam.ParDo(fn)``, which Beam does not annotate."""
    return beam.ParDo(fn)


class BatchElements(beam.PTransform[PCollection[Any], PCollection[list[Any]]]):
    """Batch elements for amortized processing, sized adaptively by :class:`BatchSizer`.

    A drop-in for ``apache_beam.BatchElements``: it consumes a ``PCollection[T]`` and produces
    a ``PCollection[list[T]]``, batched per window (each batch at the end of its window), with
    batch sizes chosen from the time the downstream (fused) work takes on each batch, so that
    the fixed cost per batch stays under ``target_batch_overhead`` and a batch under
    ``target_batch_duration_secs``.

    Args:
        min_batch_size: the smallest size of a batch.
        max_batch_size: the largest size of a batch.
        target_batch_overhead: a target for fixed cost / total time of a batch.
        target_batch_duration_secs: a target for a batch's time, excluding its fixed cost.
        target_batch_duration_secs_including_fixed_cost: a target for a batch's total time.
        max_batch_duration_secs: the longest a batch may be buffered before it is emitted.
            Setting it uses the stateful implementation, which batches across bundles
            (streaming): elements are keyed per worker (or per length bucket), held in state,
            and flushed when the batch is full, its window ends, or this much processing time
            has passed since its first element.
        element_size_fn: an element's weight (default 1). With it, the batch-size bounds and
            targets are in total weight, and batches hold a varying number of elements. From
            Beam 2.78, with ``max_batch_weight`` too, as Beam: the bounds and targets count
            elements, and ``max_batch_weight`` bounds the weight apart.
        variance: accepted for compatibility; Beam jitters sizes by this much, beam-turbo
            does not.
        clock: an alternative to ``time.time`` to time downstream work (for tests).
        record_metrics: record Beam's ``BatchElements`` distributions ``batch_size`` and
            ``msec_per_batch``.
        length_fn: in the stateful mode with ``bucket_boundaries``, an element's length:
            elements of similar length are batched together (less padding).
        bucket_boundaries: sorted positive length boundaries, lower-inclusive; default
            ``[16, 32, 64, 128, 256, 512]`` when ``length_fn`` is set.
        max_batch_weight: a cap on a batch's total weight (``element_size_fn``). An element
            heavier than the cap goes out alone. From Beam 2.78 it requires
            ``element_size_fn`` and must be >= 1 (Beam's checks).

    Raises:
        InvalidInputError (a ValueError): invalid targets, bounds or bucket boundaries, with
            Beam's messages.

    Example:
        >>> import apache_beam as beam
        >>> from beam_turbo import BatchElements
        >>> with beam.Pipeline() as p:
        ...     _ = (
        ...         p
        ...         | beam.Create(range(10))
        ...         | BatchElements(min_batch_size=4, max_batch_size=4)
        ...         | beam.Map(len)
        ...         | beam.Map(print)
        ...     )
        4
        4
        2
    """

    def __init__(
        self,
        min_batch_size: int = 1,
        max_batch_size: int = 10000,
        target_batch_overhead: float | None = 0.05,
        target_batch_duration_secs: float | None = 10,
        target_batch_duration_secs_including_fixed_cost: float | None = None,
        max_batch_duration_secs: float | None = None,
        *,
        element_size_fn: Callable[[Any], float] = unit_weight,
        variance: float = 0.25,
        clock: Callable[[], Any] = time.time,
        record_metrics: bool = True,
        length_fn: Callable[[Any], int] | None = None,
        bucket_boundaries: Sequence[float] | None = None,
        max_batch_weight: float | None = None,
    ) -> None:
        super().__init__()
        if bucket_boundaries is not None and length_fn is None:
            raise InvalidInputError("bucket_boundaries requires length_fn to be set.")
        if bucket_boundaries is not None and (
            not bucket_boundaries
            or any(b <= 0 for b in bucket_boundaries)
            or list(bucket_boundaries) != sorted(bucket_boundaries)
        ):
            raise InvalidInputError(
                "bucket_boundaries must be a non-empty sorted list of positive values."
            )
        if max_batch_weight is not None and internals.MAX_BATCH_WEIGHT_BOUNDS_APART:
            # Beam's checks, Beam's words.
            if element_size_fn is None or element_size_fn is unit_weight:
                raise InvalidInputError("max_batch_weight requires element_size_fn to be set.")
            if max_batch_weight < 1:
                raise InvalidInputError(f"max_batch_weight must be >= 1, got {max_batch_weight}")
        if max_batch_weight is not None and not max_batch_weight > 0:
            raise InvalidInputError(f"max_batch_weight ({max_batch_weight}) must be positive")
        if (
            length_fn is not None
            and max_batch_duration_secs is None
            and internals.LENGTH_FN_IGNORED_WARNING is not None
        ):
            logging.getLogger(internals.BATCHING_LOGGER).warning(
                internals.LENGTH_FN_IGNORED_WARNING
            )
        self._sizing = Sizing.from_batching_args(
            {
                "min_batch_size": min_batch_size,
                "max_batch_size": max_batch_size,
                "target_batch_overhead": target_batch_overhead,
                "target_batch_duration_secs": target_batch_duration_secs,
                "target_batch_duration_secs_including_fixed_cost": (
                    target_batch_duration_secs_including_fixed_cost
                ),
                "variance": variance,
                "element_size_fn": element_size_fn,
                "max_batch_weight": max_batch_weight,
            }
        )
        self._max_batch_dur = max_batch_duration_secs
        self._clock = clock
        self._record_metrics = record_metrics
        self._length_fn = length_fn
        if length_fn is not None and bucket_boundaries is None:
            self._bucket_boundaries: list[float] | None = list(internals.DEFAULT_BUCKET_BOUNDARIES)
        else:
            self._bucket_boundaries = None if bucket_boundaries is None else list(bucket_boundaries)

    @property
    def sizing(self) -> Sizing:
        """The transform's sizing (its sizer, weights and cap), shared by its DoFns."""
        return self._sizing

    def memory_failure_reporter(self) -> MemoryFailureReporter:
        """A picklable callable through which the work downstream reports a batch that ran out
        of memory, so that the sizer backs off and does not propose that size again.

        Example:
            >>> from beam_turbo import BatchElements
            >>> batching = BatchElements()
            >>> report = batching.memory_failure_reporter()
            >>> report(512)  # where a batch of 512 raised CUDA's out-of-memory error
        """
        return self._sizing.reporter()

    def expand(self, pcoll: PCollection[Any]) -> PCollection[list[Any]]:
        timing = DownstreamTiming(self._clock, self._record_metrics)
        batches: PCollection[list[Any]]
        if self._max_batch_dur is not None:
            coder = typecoders.registry.get_coder(pcoll)
            if self._length_fn is not None:
                keying = internals.length_bucket_key_dofn(self._length_fn, self._bucket_boundaries)
            else:
                keying = internals.shared_key_dofn()
            stateful = stateful_batching_dofn(
                input_coder=coder,
                sizing=self._sizing,
                max_buffering_secs=self._max_batch_dur,
                timing=timing,
            )
            if internals.STATEFUL_BATCHING_DOFN_LABEL is not None:  # Beam's labels
                batches = pcoll | _pardo(keying) | _pardo(stateful)
            else:
                batches = pcoll | "Key" >> _pardo(keying) | "Batch" >> _pardo(stateful)
            return batches
        dofn_class = GatheringDoFn if pcoll.windowing.is_default() else WindowedGatheringDoFn
        batches = pcoll | _pardo(dofn_class(sizing=self._sizing, action=EmitBatches(timing)))
        return batches


class SortAndBatchElements(beam.PTransform[PCollection[Any], PCollection[list[Any]]]):
    """Batch the elements of each bundle sorted by size, so that each batch holds elements of
    similar size (less padding for ragged inputs): a drop-in for Beam 2.77's
    ``apache_beam.transforms.util.SortAndBatchElements``, with the same arguments, batches,
    windows and timestamps.

    Each bundle's elements are held per window, sorted by ``element_size_fn`` (default
    ``len(element)``, or 1 for elements without a length) and cut into batches of at most
    ``max_batch_size`` elements whose sizes sum below ``max_batch_weight`` (an element heavier
    than that goes alone). Each batch is emitted at the end of its window.

    Not Beam's: given any of :class:`BatchSizer`'s targets (``target_batch_overhead``,
    ``target_batch_duration_secs``, ``target_batch_duration_secs_including_fixed_cost``),
    the number of elements per batch is chosen by a :class:`BatchSizer` between
    ``min_batch_size`` and ``max_batch_size`` from the time the work downstream (fused)
    takes on each batch, as :class:`BatchElements` does; without them, batches fill to
    ``max_batch_size`` as in Beam.

    Raises:
        ValueError: ``min_batch_size`` < 1, ``max_batch_size`` < ``min_batch_size``,
            ``max_batch_weight`` < 1 (Beam's messages).
        TypeError: an ``element_size_fn`` that is not callable.

    Example:
        >>> import apache_beam as beam
        >>> from beam_turbo import SortAndBatchElements
        >>> with beam.Pipeline() as p:
        ...     _ = (
        ...         p
        ...         | beam.Create(["ccc", "a", "dddd", "bb"], reshuffle=False)
        ...         | SortAndBatchElements(min_batch_size=1, max_batch_size=2, max_batch_weight=100)
        ...         | beam.Map(print)
        ...     )
        ['a', 'bb']
        ['ccc', 'dddd']
    """

    def __init__(
        self,
        min_batch_size: int,
        max_batch_size: int,
        max_batch_weight: int,
        element_size_fn: Callable[[Any], int] | None = None,
        *,
        target_batch_overhead: float | None = None,
        target_batch_duration_secs: float | None = None,
        target_batch_duration_secs_including_fixed_cost: float | None = None,
    ) -> None:
        super().__init__()
        # Beam's checks, Beam's words.
        if min_batch_size < 1:
            raise ValueError(f"min_batch_size must be >= 1, got {min_batch_size}")
        if max_batch_size < min_batch_size:
            raise ValueError(
                f"max_batch_size ({max_batch_size}) must be >= min_batch_size ({min_batch_size})"
            )
        if max_batch_weight < 1:
            raise ValueError(f"max_batch_weight must be >= 1, got {max_batch_weight}")
        if element_size_fn is not None and not callable(element_size_fn):
            raise TypeError("element_size_fn must be callable")
        self._cut = by_size(max_batch_size, max_batch_weight, element_size_fn)
        targets = {
            "target_batch_overhead": target_batch_overhead,
            "target_batch_duration_secs": target_batch_duration_secs,
            "target_batch_duration_secs_including_fixed_cost": (
                target_batch_duration_secs_including_fixed_cost
            ),
        }
        if any(value is not None for value in targets.values()):
            args = {"min_batch_size": min_batch_size, "max_batch_size": max_batch_size}
            self._sizing = Sizing.from_batching_args({**args, **targets})
        else:  # Beam's: batches fill to max_batch_size
            fixed = {"min_batch_size": max_batch_size, "max_batch_size": max_batch_size}
            self._sizing = Sizing.from_batching_args(fixed)

    def expand(self, pcoll: PCollection[Any]) -> PCollection[list[Any]]:
        # The whole bundle's elements per window are pooled, then cut sorted by size.
        timing = DownstreamTiming(time.perf_counter, record_metrics=False)
        dofn_class = GatheringDoFn if pcoll.windowing.is_default() else WindowedGatheringDoFn
        dofn = dofn_class(
            sizing=self._sizing, action=EmitBatches(timing), pool=float("inf"), cut=self._cut
        )
        batches: PCollection[list[Any]] = pcoll | _pardo(dofn)
        return batches
