"""pytest-benchmark suite for beam_turbo.ModelCache: a warm hit against Beam's Shared and a
dict-and-lock cache written in Python, in one group so the table shows the ratios of one run.

Run: scripts/bench.sh benches/bench_cache.py
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from beam_turbo.bench.cache import hit_calls


@pytest.fixture(scope="module")
def calls() -> dict[str, Callable[[], object]]:
    return hit_calls()


@pytest.mark.benchmark(group="warm hit")
def test_hit_beam_turbo(benchmark: Any, calls: dict[str, Callable[[], object]]) -> None:
    benchmark(calls["beam_turbo.ModelCache"])


@pytest.mark.benchmark(group="warm hit")
def test_hit_beam_shared(benchmark: Any, calls: dict[str, Callable[[], object]]) -> None:
    benchmark(calls["beam Shared"])


@pytest.mark.benchmark(group="warm hit")
def test_hit_dict_and_lock(benchmark: Any, calls: dict[str, Callable[[], object]]) -> None:
    benchmark(calls["dict + lock (Python)"])
