"""Microbenchmarks behind ``beam-turbo bench``: each compares beam-turbo with the alternatives
in the same run and prints ratios, so the figures hold on whatever machine runs them.

Each benchmark module has ``add_arguments(parser)`` and ``run(args) -> int``; ``BENCHMARKS``
maps the subcommand name to its module and one line of help (here, so that ``--help`` need
not import the modules, which import Beam and the frameworks).
"""

from __future__ import annotations

BENCHMARKS: dict[str, tuple[str, str]] = {
    "cache": (
        "beam_turbo.bench.cache",
        "ModelCache hits against Beam's Shared and a dict-and-lock cache, and two threads",
    ),
    "batching": (
        "beam_turbo.bench.batching",
        "BatchSizer against Beam's _BatchSizeEstimator on one simulated clock, 7 scenarios",
    ),
    "stack": ("beam_turbo.bench.stack", "beam_turbo.stack against numpy and torch, as ratios"),
    "handlers": (
        "beam_turbo.bench.handlers",
        "beam-turbo's model handlers against Beam's, per batch of 1,024",
    ),
    "e2e": (
        "beam_turbo.bench.e2e",
        "one RunInference pipeline with stock Beam and with beam-turbo, end to end (also "
        "real models: --framework minilm|mobilenet)",
    ),
    "tabular": (
        "beam_turbo.bench.tabular",
        "scoring a table, Parquet in and out: stock Beam, patched, beam-turbo's columnar "
        "RunInference, plain Beam, pyarrow alone and Spark, outputs checked by id",
    ),
    "large-model": (
        "beam_turbo.bench.large_model",
        "resident memory of a 200 MB model with two worker processes: stock Beam and "
        "beam-turbo, per process and large_model=True",
    ),
    "report": (
        "beam_turbo.bench.report",
        "rerun the README's benchmark table and print it as Markdown, with its commit, "
        "machine, medians and spread",
    ),
}
