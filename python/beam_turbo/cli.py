"""The ``beam-turbo`` command: ``beam-turbo bench NAME`` and ``beam-turbo demo``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from beam_turbo.bench import BENCHMARKS

_DESCRIPTION = (
    "beam-turbo: Rust-accelerated batching for Apache Beam's RunInference. "
    "'beam-turbo demo' runs one pipeline with stock Beam and with beam-turbo side by side; "
    "'beam-turbo bench NAME' runs a benchmark against the alternatives."
)
_DEMO_HELP = "one pipeline with stock Beam and with beam-turbo, side by side"
_Formatter = argparse.ArgumentDefaultsHelpFormatter


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The command's parser; only the subcommand ``argv`` names imports its module (the others
    import Beam and the frameworks, seconds that ``--help`` should not wait for)."""
    chosen = [a for a in argv if not a.startswith("-")][:2]
    parser = argparse.ArgumentParser(prog="beam-turbo", description=_DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a benchmark against the alternatives")
    suites = bench.add_subparsers(dest="suite", required=True)
    for name, (module, help_line) in BENCHMARKS.items():
        sub = suites.add_parser(
            name, help=help_line, description=help_line, formatter_class=_Formatter
        )
        if chosen == ["bench", name]:
            suite = importlib.import_module(module)
            suite.add_arguments(sub)
            sub.set_defaults(run=suite.run)
    demo = commands.add_parser(
        "demo", help=_DEMO_HELP, description=_DEMO_HELP, formatter_class=_Formatter
    )
    if chosen[:1] == ["demo"]:
        demo_module = importlib.import_module("beam_turbo.bench.demo")
        demo_module.add_arguments(demo)
        demo.set_defaults(run=demo_module.run)
    return parser


class _QuietBeamImport(logging.Filter):
    """Drops Beam's import-time warning about optional Google Cloud clients, noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``beam-turbo`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.getLogger().addFilter(_QuietBeamImport())
    args = _parser(argv).parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
