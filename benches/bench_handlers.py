"""pytest-benchmark suite: beam-turbo's handlers against Beam's, per batch of 1,024; each group
holds Beam's handler, ours and the bare model, so the table shows the ratios of one run.

Run: scripts/bench.sh benches/bench_handlers.py
"""

from __future__ import annotations

from typing import Any

import pytest

from beam_turbo.bench import handlers


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("models"))


def cases(folder: str) -> dict[str, handlers.Case]:
    found = [handlers.sklearn_case(folder), *handlers.torch_cases(folder)]
    found.append(handlers.tensorflow_case(folder))
    return {case.name: case for case in found}


NAMES = [
    "sklearn linear, float32[16]",
    "torch linear, float32[16]",
    "torch MLP 256-1024-1024-10",
    "TensorFlow linear, float32[16]",
]


@pytest.fixture(scope="module")
def all_cases(folder: str) -> dict[str, handlers.Case]:
    return cases(folder)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("who", ["beam", "ours", "bare"])
def test_handler(benchmark: Any, all_cases: dict[str, handlers.Case], name: str, who: str) -> None:
    case = all_cases[name]
    benchmark.group = name
    if who == "bare":
        benchmark(case.bare)
        return
    handler = case.beam if who == "beam" else case.ours
    benchmark(handlers.drive(handler, handler.load_model(), case.batch))
