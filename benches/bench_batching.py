"""pytest-benchmark suite for beam_turbo.BatchElements against beam.BatchElements; each group
holds ours and Beam's, so pytest-benchmark's table shows the ratio of one run.

Run: .venv/bin/python -m pytest benches/bench_batching.py --benchmark-enable
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import apache_beam as beam
import pytest

import beam_turbo
from beam_turbo.bench.batching import batching_dofn_per_element

ELEMENTS = 50_000


def weight_one(element: Any) -> int:
    return 1


def pipeline(transform: Callable[..., Any], **kwargs: Any) -> Callable[[], None]:
    def run() -> None:
        with beam.Pipeline() as p:
            _ = (
                p
                | beam.Create(range(ELEMENTS), reshuffle=False)
                | transform(**kwargs)
                | beam.Map(len)
            )

    return run


@pytest.mark.benchmark(group=f"DirectRunner pipeline, {ELEMENTS:,} elements")
def test_pipeline_beam_turbo(benchmark: Any) -> None:
    benchmark.pedantic(pipeline(beam_turbo.BatchElements), rounds=5, iterations=1)


@pytest.mark.benchmark(group=f"DirectRunner pipeline, {ELEMENTS:,} elements")
def test_pipeline_beam(benchmark: Any) -> None:
    benchmark.pedantic(pipeline(beam.BatchElements), rounds=5, iterations=1)


@pytest.mark.benchmark(group=f"DirectRunner pipeline, {ELEMENTS:,} weighted elements")
def test_weighted_pipeline_beam_turbo(benchmark: Any) -> None:
    run = pipeline(beam_turbo.BatchElements, element_size_fn=weight_one)
    benchmark.pedantic(run, rounds=5, iterations=1)


@pytest.mark.benchmark(group=f"DirectRunner pipeline, {ELEMENTS:,} weighted elements")
def test_weighted_pipeline_beam(benchmark: Any) -> None:
    benchmark.pedantic(
        pipeline(beam.BatchElements, element_size_fn=weight_one), rounds=3, iterations=1
    )


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("which", ["beam-turbo", "beam"])
@pytest.mark.benchmark(group="batching DoFn, per element")
def test_dofn_per_element(benchmark: Any, which: str, weighted: bool) -> None:
    benchmark(batching_dofn_per_element, which, weighted, ELEMENTS)
