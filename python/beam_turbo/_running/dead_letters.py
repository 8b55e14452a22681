"""Exception handling in ``RunInference``: the dead-letter output's entries, isolating the
failing elements of a batch, and ``threshold`` for the fused DoFn."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import apache_beam as beam

from beam_turbo._running.oom import is_out_of_memory

__all__ = ["DEAD_LETTER_TAG", "MAIN_TAG", "check_threshold", "dead_letter", "isolating"]

#: The dead-letter and main tags of Beam's ``ParDo.with_exception_handling`` (its defaults).
DEAD_LETTER_TAG = "bad"
MAIN_TAG = "good"


def dead_letter(batch: Sequence[Any], error: BaseException) -> beam.pvalue.TaggedOutput:
    """The dead-letter output's entry for a failing batch, in Beam's form
    ``(batch, (exception type, repr, formatted traceback))``."""
    info = (type(error), repr(error), traceback.format_exception(error))
    return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, (list(batch), info))


def isolating(
    run: Callable[[Sequence[Any]], Iterable[Any]],
    batch: Sequence[Any],
    exc_class: type[BaseException] | tuple[type[BaseException], ...],
) -> list[Any]:
    """``run(batch)``, halving a failing batch until each failing element is alone; those go
    to the dead-letter output as ``([element], exception_info)``, the rest give results. (A
    batch of table rows whose table is at fault goes by table: :func:`_split`.)
    A batch of several that runs out of memory raises, for the splitting around this (which
    teaches the batch sizer); a single element that does is dead-lettered like any other.
    """
    try:
        return list(run(batch))
    except exc_class as error:
        if len(batch) > 1:
            if is_out_of_memory(error):
                raise
            parts = _split(batch, error)
            if len(parts) > 1:
                return [output for part in parts for output in isolating(run, part, exc_class)]
        return [dead_letter(batch, error)]


def _split(batch: Sequence[Any], error: BaseException) -> Sequence[Sequence[Any]]:
    """The parts a failing batch is isolated in: its halves, or what the batch says
    (``split_failing``: rows of tables split by table on a table's own error, such as a
    missing column, and one table's rows not at all; one part: dead-lettered whole)."""
    split = getattr(batch, "split_failing", None)
    if split is not None:
        parts: Sequence[Sequence[Any]] = split(error)
        return parts
    middle = len(batch) // 2
    return [batch[:middle], batch[middle:]]


def check_threshold(
    examples: beam.PCollection,
    dead: beam.PCollection,
    threshold: float,
    count: Callable[[Any], int] | None = None,
) -> None:
    """Beam's ``threshold`` of ``with_exception_handling``, for the fused DoFn: the pipeline
    fails when the elements of failing batches exceed ``threshold`` of the elements in, per
    window. (Beam's two steps count batches; the fused DoFn has no batches to count, and the
    two agree when batches are of one size.) ``count``: how many of what dead letters hold an
    example is (tables: their rows; default one)."""

    def check(bad: int, total: int, threshold: float, window: Any = beam.DoFn.WindowParam) -> None:
        if bad > total * threshold:
            raise ValueError(
                f"The number of failing elements within the window {window!r} exceeded "
                f"threshold: {bad} / {total} = {bad / total} > {threshold}"
            )

    total = examples | "CountTotal" >> (
        beam.Map(count or _one) | beam.CombineGlobally(sum).as_singleton_view()
    )
    bad = dead | "CountBad" >> (
        beam.Map(lambda entry: len(entry[0])) | beam.CombineGlobally(sum).without_defaults()
    )
    _ = bad | "CheckThreshold" >> beam.Map(check, total, threshold)


def _one(example: Any) -> int:
    return 1
