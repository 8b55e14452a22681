"""``beam-turbo demo``: one pipeline, run with stock Beam's RunInference and with beam-turbo's.

A small model is made on the spot (a scikit-learn decision tree by default, ``--framework
torch|tensorflow`` for a linear model),
data is generated inside the pipeline, and both runs write their predictions; the demo then
prints elements per second for each, the ratio, and whether the predictions agree (exactly
for scikit-learn, ``allclose`` for floating-point outputs whose batches differ). Beam pipeline
options after ``--`` pass through, so the same command runs multi-process::

    beam-turbo demo -- --direct_running_mode=multi_processing --direct_num_workers=2
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

from beam_turbo.bench import e2e
from beam_turbo.bench._timing import print_table


def _with_progress(label: str, work: Callable[[], float]) -> float:
    """Run ``work`` while a line shows that it is running and for how long."""
    done = threading.Event()
    start = time.perf_counter()

    def spin() -> None:
        for mark in itertools.cycle("|/-\\"):
            if done.wait(0.25):
                return
            if sys.stdout.isatty():
                print(
                    f"\r  {mark} {label}: {time.perf_counter() - start:5.1f} s", end="", flush=True
                )

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        seconds = work()
    finally:
        done.set()
        spinner.join()
    print(f"\r  {label}: done in {seconds:.1f} s{' ' * 10}", flush=True)
    return seconds


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--framework", choices=["sklearn", "torch", "tensorflow"], default="sklearn"
    )
    parser.add_argument("--elements", type=int, default=200_000, help="elements to run through")
    parser.add_argument(
        "beam_options",
        nargs=argparse.REMAINDER,
        help="Beam pipeline options after --, e.g. -- --runner=DirectRunner",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    options: Sequence[str] = [o for o in args.beam_options if o != "--"]
    elements = max(e2e.CHUNK, args.elements // e2e.CHUNK * e2e.CHUNK)
    print(
        f"beam-turbo demo: {elements:,} elements through a {args.framework} model, "
        f"stock Beam RunInference and beam-turbo's, on {_runner(options)}\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        framework = e2e.make_framework(args.framework, folder, tree=True)
        outputs = {which: os.path.join(folder, which) for which in ("stock", "turbo")}
        seconds = {
            which: _with_progress(
                f"{'stock Beam' if which == 'stock' else 'beam-turbo'}",
                lambda which=which: e2e.run_pipeline(  # type: ignore[misc]
                    framework, which, elements, options, output=outputs[which]
                ),
            )
            for which in ("stock", "turbo")
        }
        stock, turbo = (e2e.read_predictions(outputs[w]) for w in ("stock", "turbo"))
    agree = e2e.same_predictions(stock, turbo, framework.exact) and len(stock) == elements
    print()
    print_table(
        ["pipeline", "elements/s", "seconds"],
        [
            [
                "stock Beam RunInference",
                f"{elements / seconds['stock']:,.0f}",
                f"{seconds['stock']:.2f}",
            ],
            [
                "beam-turbo RunInference",
                f"{elements / seconds['turbo']:,.0f}",
                f"{seconds['turbo']:.2f}",
            ],
        ],
    )
    how = "exactly" if framework.exact else "within allclose"
    print(f"\nspeed-up: {seconds['stock'] / seconds['turbo']:.2f}x (whole runs, start-up included)")
    print(
        f"predictions: {'the same' if agree else 'DIFFERENT'} for all {len(stock):,} elements"
        f" ({how})"
    )
    return 0 if agree else 1


def _runner(options: Sequence[str]) -> str:
    for option in options:
        if option.startswith("--runner"):
            return option.split("=", 1)[-1]
    mode = next((o for o in options if "direct_running_mode" in o), "")
    return "the DirectRunner" + (f" ({mode.split('=', 1)[-1]})" if mode else "")
