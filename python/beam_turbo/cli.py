"""The ``beam-turbo`` command: ``beam-turbo bench NAME`` and ``beam-turbo demo``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from beam_turbo.bench import BENCHMARKS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beam-turbo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a microbenchmark against the alternatives")
    suites = bench.add_subparsers(dest="suite", required=True)
    for name, module in BENCHMARKS.items():
        suite = importlib.import_module(module)
        sub = suites.add_parser(name, help=(suite.__doc__ or "").strip().splitlines()[0])
        suite.add_arguments(sub)
        sub.set_defaults(run=suite.run)
    demo = commands.add_parser(
        "demo", help="one pipeline with stock Beam and with beam-turbo, side by side"
    )
    from beam_turbo import demo as demo_module

    demo_module.add_arguments(demo)
    demo.set_defaults(run=demo_module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``beam-turbo`` console script."""
    args = _parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
