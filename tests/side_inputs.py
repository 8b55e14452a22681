"""What the side-input refresh tests share: Beam's way (in base_test) of turning timestamped
model updates into a side input that changes every fixed window."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.transforms import trigger, window


def _emit_each(grouped: tuple[str, Sequence[Any]]) -> Iterator[Any]:
    yield from grouped[1]


def in_fixed_windows(
    pipeline: beam.Pipeline, updates: Sequence[tuple[int, Any]], interval: int, prefix: str
) -> beam.PCollection:
    """``updates`` (timestamp, value), each in its fixed window of ``interval`` seconds, one
    value per window (discarding), as Beam's side-input refresh tests build them."""
    return (
        pipeline
        | f"{prefix}Create" >> beam.Create(updates)
        | f"{prefix}Ts" >> beam.Map(lambda x: window.TimestampedValue(x[1], x[0]))
        | f"{prefix}Win"
        >> beam.WindowInto(
            window.FixedWindows(interval),
            accumulation_mode=trigger.AccumulationMode.DISCARDING,
        )
        | f"{prefix}Key" >> beam.Map(lambda x: ("key", x))
        | f"{prefix}Gbk" >> beam.GroupByKey()
        | f"{prefix}Emit" >> beam.FlatMap(_emit_each)
    )
