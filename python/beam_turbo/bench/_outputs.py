"""What the benchmarks' pipelines write, and reading it back: ``(id, output)`` lines, one per
element, so that variants' outputs can be compared id by id."""

from __future__ import annotations

import os
from typing import Any


def write_or_count(keyed_outputs: Any, output: str | None) -> None:
    """The pipeline's end: ``(id, output)`` lines written to ``output`` (to compare variants),
    or only counted (a timed run)."""
    import apache_beam as beam

    if output is None:
        _ = keyed_outputs | "Count" >> beam.combiners.Count.Globally()
    else:
        _ = keyed_outputs | "Format" >> beam.Map(as_line) | "Write" >> beam.io.WriteToText(output)


def as_line(keyed: tuple[int, Any]) -> str:
    """``key<TAB>values``, as :func:`read_predictions` reads them."""
    import numpy as np

    key, values = keyed
    return f"{key}\t" + " ".join(repr(float(v)) for v in np.asarray(values).reshape(-1))


def read_predictions(prefix: str) -> dict[int, list[float]]:
    """The ``(id, values)`` a benchmark pipeline wrote to ``prefix``."""
    found: dict[int, list[float]] = {}
    folder, name = os.path.split(prefix)
    for shard in os.listdir(folder):
        if shard.startswith(name):
            with open(os.path.join(folder, shard)) as f:
                for line in f:
                    key, values = line.rstrip("\n").split("\t")
                    found[int(key)] = [float(v) for v in values.split()]
    return found
