"""``beam-turbo demo``: one pipeline, run with stock Beam's RunInference and with beam-turbo's.

A small model is made on the spot (a scikit-learn decision tree by default, ``--framework
torch|tensorflow`` for a linear model),
data is generated inside the pipeline. Both pipelines are timed as they would run (the
elements counted at the end), each on a small run and the full one, so that the elements per
second come from the difference and start-up cancels out; then they run again over the
first ``--check`` elements keyed by id,
writing their predictions; the demo prints elements per second for each, the ratio, and
whether the predictions agree (exactly for scikit-learn, ``allclose`` for floating-point
outputs whose batches differ). Beam pipeline
options after ``--`` pass through, so the same command runs multi-process::

    beam-turbo demo -- --direct_running_mode=multi_processing --direct_num_workers=2

``--framework minilm`` (sentence embeddings with all-MiniLM-L6-v2: Beam as its example runs
it, one sentence at a time, against beam-turbo padding per batch) and ``--framework
mobilenet`` (MobileNetV2 on JPEG images decoded in the pipeline) run real models the same
way, each pipeline in a process of its own, on 160 elements by default (see
:mod:`beam_turbo.bench.real_models`); they compare the embeddings or class scores.
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
from beam_turbo.bench._outputs import read_predictions
from beam_turbo.bench._timing import print_table
from beam_turbo.bench.real_models import REAL_MODELS


def _with_progress(label: str, work: Callable[[], float]) -> float:
    """``work()``, while a line shows that it is running and for how long."""
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
        result = work()
    finally:
        done.set()
        spinner.join()
    print(f"\r  {label}: done in {time.perf_counter() - start:.1f} s{' ' * 10}", flush=True)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--framework",
        choices=["sklearn", "torch", "torch-mlp", "tensorflow", *REAL_MODELS],
        default="sklearn",
        help="the model to run (minilm, mobilenet: a real model, each pipeline in a process "
        "of its own)",
    )
    # No default shown for these two: it depends on the framework (``%(default).0s`` prints
    # nothing, and keeps ArgumentDefaultsHelpFormatter from adding "(default: None)").
    parser.add_argument(
        "--elements",
        type=int,
        default=None,
        help=f"elements to time (default: {_DEFAULT_ELEMENTS:,}, at least {_MIN_TIMED:,}; "
        "minilm and mobilenet: 160)%(default).0s",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (the median)")
    parser.add_argument(
        "--check",
        type=int,
        default=None,
        help=f"elements whose predictions are compared (default: {_DEFAULT_CHECK:,}; minilm "
        "and mobilenet: those of the small timed run, a fifth of --elements)%(default).0s",
    )
    parser.add_argument(
        "beam_options",
        nargs=argparse.REMAINDER,
        help="Beam pipeline options after --, e.g. -- --runner=DirectRunner",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    options: Sequence[str] = [o for o in args.beam_options if o != "--"]
    if args.framework in REAL_MODELS:
        from beam_turbo.bench import real_models

        return real_models.demo(args, options, _runner(options))
    # Fewer elements than this time the runner's noise, not the pipelines.
    elements = max(_MIN_TIMED, (args.elements or _DEFAULT_ELEMENTS) // e2e.CHUNK * e2e.CHUNK)
    # Elements are generated in chunks: check whole chunks, at least the --check asked for.
    check = _DEFAULT_CHECK if args.check is None else args.check
    checked = min(elements, -(-max(1, check) // e2e.CHUNK) * e2e.CHUNK)
    print(
        f"beam-turbo demo: {elements:,} elements through a {args.framework} model, "
        f"stock Beam RunInference and beam-turbo's, on {_runner(options)}\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        framework = e2e.make_framework(args.framework, folder, tree=True)
        # Elements per second from the slope between a small run and the full one (start-up
        # cancels out), the median of --rounds rounds, as bench e2e measures them.
        small = 2 * e2e.CHUNK
        print(f"timing ({args.rounds} rounds of {small:,} and {elements:,} elements each):")
        seconds = {
            which: _with_progress(
                _LABELS[which],
                lambda which=which: e2e.per_element_secs(  # type: ignore[misc]
                    framework, which, small, elements, args.rounds, options
                )[0],
            )
            for which in ("stock", "turbo")
        }
        rate = {w: 1 / seconds[w] for w in ("stock", "turbo")}
        print(f"checking predictions (the first {checked:,} elements, keyed by id, written out):")
        outputs = {which: os.path.join(folder, which) for which in ("stock", "turbo")}
        for which in ("stock", "turbo"):
            _with_progress(
                _LABELS[which],
                lambda which=which: e2e.run_pipeline(  # type: ignore[misc]
                    framework, which, checked, options, output=outputs[which]
                ),
            )
        stock, turbo = (read_predictions(outputs[w]) for w in ("stock", "turbo"))
    agree = e2e.same_predictions(stock, turbo, framework.exact) and len(stock) == checked
    print()
    print_table(
        ["pipeline", "elements/s"],
        [[f"{_LABELS[w]} RunInference", f"{rate[w]:,.0f}"] for w in ("stock", "turbo")],
    )
    how = "exactly" if framework.exact else "within allclose"
    print(
        f"\nspeed-up: {rate['turbo'] / rate['stock']:.2f}x "
        f"(median over {args.rounds} rounds of the slope between {small:,} and {elements:,} "
        "elements; start-up cancels out)"
    )
    print(
        f"predictions: {'the same' if agree else 'DIFFERENT'} for all {len(stock):,} elements "
        f"checked ({how})"
    )
    return 0 if agree else 1


_LABELS = {"stock": "stock Beam", "turbo": "beam-turbo"}
_MIN_TIMED = 100_000
_DEFAULT_ELEMENTS = 200_000
_DEFAULT_CHECK = 20_000


def _runner(options: Sequence[str]) -> str:
    for option in options:
        if option.startswith("--runner"):
            return option.split("=", 1)[-1]
    mode = next((o for o in options if "direct_running_mode" in o), "")
    return "the DirectRunner" + (f" ({mode.split('=', 1)[-1]})" if mode else "")
