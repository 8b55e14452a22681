"""Microbenchmarks behind ``beam-turbo bench``: each compares beam-turbo with the alternatives
in the same run and prints ratios, so the figures hold on whatever machine runs them.

Each benchmark module has ``add_arguments(parser)`` and ``run(args) -> int``; ``BENCHMARKS``
maps the subcommand name to its module.
"""

from __future__ import annotations

BENCHMARKS: dict[str, str] = {
    "cache": "beam_turbo.bench.cache",
    "batching": "beam_turbo.bench.batching",
    "stack": "beam_turbo.bench.stack",
    "handlers": "beam_turbo.bench.handlers",
    "e2e": "beam_turbo.bench.e2e",
}
