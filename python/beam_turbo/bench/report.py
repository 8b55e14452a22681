"""report: rerun what the README's benchmark table needs and print it as Markdown.

Each row compares stock Beam's ``RunInference`` with beam-turbo's end to end on the
DirectRunner, measured by the functions ``bench e2e`` uses (:mod:`beam_turbo.bench.e2e` for
the small models, :mod:`beam_turbo.bench.real_models` for MiniLM and MobileNetV2): throughput
is the slope between a small and a large run, per round. Stock and beam-turbo run in turn
within each round, so load on a shared machine falls on both alike; each row gives the median
over rounds and the spread (the smallest and the largest round). Peak memory is one run per
pipeline (a fresh process for the small models, each variant's worker process for the real
ones). The table says what it ran on: the commit (``dirty`` when tracked files differ from
it), the date, the machine, and the command that reproduces it.

Progress goes to stderr, the Markdown to stdout: ``beam-turbo bench report > table.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

#: ``--only`` names, in the README's order: the small models of ``bench e2e``, then the real.
SMALL_MODELS = {
    "sklearn": "scikit-learn linear, float32[16]",
    "torch": "torch linear, float32[16]",
    "torch-mlp": "torch MLP 256-1024-1024-10",
    "tensorflow": "TensorFlow linear, float32[16]",
}
#: Per real model: (stock variant, the row's label) for each row, against its ``turbo``.
REAL_ROWS = {
    "minilm": (
        ("stock-1", "all-MiniLM-L6-v2, sentences of 5-250 tokens, vs Beam's `max_batch_size=1`"),
        ("stock-pad", "the same, vs Beam with sentences padded to 256"),
    ),
    "mobilenet": (("stock", "MobileNetV2, 224x224 JPEGs decoded in the pipeline"),),
}
NAMES = (*SMALL_MODELS, *REAL_ROWS)
#: Elements in the small and the large run of a small model (bench e2e's defaults).
SIZES = {"full": (20_000, 200_000), "quick": (4_000, 20_000)}
#: Seconds a small model's large run must take beyond its small run, or it is run again,
#: larger (``bench e2e --min-work-secs``): on a loaded machine a fast pipeline's 180,000
#: extra elements can take less time than the load's swings.
MIN_WORK_SECS = {"full": 2.0, "quick": 0.5}
ROUNDS = {"full": 5, "quick": 2}
HEADERS = ("model", "stock Beam", "beam-turbo", "speed-up", "peak memory vs stock")


@dataclass(frozen=True)
class Row:
    """One line of the table: per-round seconds per element of each side, and peak memory."""

    label: str
    unit: str  # "el/s", "/s"
    stock: Sequence[float]  # seconds per element, one per round that gave a slope
    turbo: Sequence[float]
    memory_ratio: float  # beam-turbo's peak resident memory over stock's
    rounds: int  # rounds run (a round whose large run was not the slower gives no slope)

    def speedups(self) -> list[float]:
        """Stock's time over beam-turbo's, per round where both gave a slope; where a round
        gave none on one side, the rounds cannot be paired, and the bounds are the widest
        the two sides allow (the slowest stock round over the fastest beam-turbo round, and
        the other way round) with their ratio of medians between.

        Example:
            >>> Row("m", "/s", [2.0, 4.0], [1.0, 1.0], 1.0, 2).speedups()
            [2.0, 4.0]
            >>> Row("m", "/s", [2.0, 4.0], [1.0], 1.0, 2).speedups()
            [2.0, 3.0, 4.0]
        """
        if len(self.stock) == len(self.turbo) == self.rounds:
            return [s / t for s, t in zip(self.stock, self.turbo, strict=True)]
        if not self.stock or not self.turbo:
            return []
        middle = statistics.median(self.stock) / statistics.median(self.turbo)
        return sorted(
            [min(self.stock) / max(self.turbo), middle, max(self.stock) / min(self.turbo)]
        )

    def cells(self) -> list[str]:
        return [
            self.label,
            _rate_cell(self.stock, self.unit),
            _rate_cell(self.turbo, self.unit),
            _spread_cell(self.speedups(), "x"),
            "n/a" if self.memory_ratio != self.memory_ratio else f"{self.memory_ratio:.2f}x",
        ]


def format_rate(per_second: float) -> str:
    """Elements per second with three significant digits and k or M.

    Example:
        >>> format_rate(179_400.0), format_rate(5_812.0), format_rate(93.34), format_rate(1.2e6)
        ('179k', '5.81k', '93.3', '1.20M')
    """
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if per_second >= scale:
            return _three_digits(per_second / scale) + suffix
    return _three_digits(per_second)


def _three_digits(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _spread_cell(values: Sequence[float], suffix: str) -> str:
    """``median (min-max)`` of ``values``.

    Example:
        >>> _spread_cell([2.1, 1.9, 2.4], "x")
        '2.10x (1.90-2.40x)'
    """
    if not values:
        return "n/a (too noisy)"
    mid = statistics.median(values)
    return f"{mid:.2f}{suffix} ({min(values):.2f}-{max(values):.2f}{suffix})"


def _rate_cell(per_element_secs: Sequence[float], unit: str) -> str:
    """The median rate of the rounds, and their range.

    Example:
        >>> _rate_cell([1 / 180_000, 1 / 170_000, 1 / 190_000], "el/s")
        '180k el/s (170k-190k)'
    """
    if not per_element_secs:
        return "n/a (too noisy)"
    rates = [1 / s for s in per_element_secs]
    low, high = format_rate(min(rates)), format_rate(max(rates))
    return f"{format_rate(statistics.median(rates))} {unit} ({low}-{high})"


def commit(folder: str | None = None) -> str:
    """The commit of the checkout beam-turbo runs from (or of ``folder``), ``dirty`` if
    tracked files differ from it; for an installed package outside a checkout, says so."""
    import beam_turbo

    if folder is None:
        folder = os.path.dirname(os.path.abspath(beam_turbo.__file__))

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", folder, *args], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        version = getattr(beam_turbo, "__version__", "?")
        return f"unknown (beam-turbo {version} installed, not run from a git checkout)"
    return f"`{head}`" + (" (dirty: tracked files differ from it)" if dirty else "")


def machine() -> str:
    """Cores, CPU model, memory and load: what the figures depend on.

    Example:
        >>> "cores" in machine()
        True
    """
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    text = f"{cores} cores" + (f" ({usable} usable)" if usable != cores else "") + f", {model}"
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        text += f", {pages * page_size / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    return text + f", {platform.system()} {platform.release()}"


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces the report.

    Example:
        >>> command_line(argparse.Namespace(rounds=5, quick=False, only=None))
        'beam-turbo bench report --rounds 5'
    """
    line = f"beam-turbo bench report --rounds {args.rounds}"
    if args.quick:
        line += " --quick"
    if args.only:
        line += " --only " + " ".join(args.only)
    return line


def torch_before_tensorflow() -> None:
    """Import torch, and triton where installed, if they are: the rows run in one process,
    and torch's LLVM loaded after TensorFlow's aborts it ("LLVM ERROR: inconsistency in
    registered CommandLine options": MobileNetV2's row after TensorFlow's did). The real
    models' workers do the same (:mod:`beam_turbo.bench.real_models`)."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    with contextlib.suppress(ImportError):
        import triton  # noqa: F401


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure_small_model(name: str, rounds: int, quick: bool) -> Row:
    """A small model of ``bench e2e``: per round, stock's and beam-turbo's slope (one
    ``e2e.per_element_secs`` round each, in turn); peak memory of one pipeline of the large
    size in a fresh process each (``e2e.peak_resident_mib``)."""
    from beam_turbo.bench import e2e

    mode = "quick" if quick else "full"
    small, large = SIZES[mode]
    slopes: dict[str, list[float]] = {"stock": [], "turbo": []}
    grown = dict.fromkeys(slopes, large)  # a large run grown once stays grown
    with tempfile.TemporaryDirectory() as folder:
        framework = e2e.make_framework(name, folder)
        for n in range(rounds):
            said = []
            for which, found in slopes.items():
                slope, grown[which] = e2e.per_element_secs(
                    framework, which, small, grown[which], 1, min_work_secs=MIN_WORK_SECS[mode]
                )
                # e2e clamps a large run that the load made no slower than the small one to
                # 1e-9 s of work: no slope, as real_models counts it.
                if slope * (large - small) > 1e-9:
                    found.append(slope)
                    said.append(f"{which} {1 / slope:,.0f} el/s (large run {grown[which]:,})")
                else:
                    said.append(f"{which}: the large run was the faster, no slope")
            _say(f"  {name}, round {n + 1}/{rounds}: " + ", ".join(said))
    peak = {which: e2e.peak_resident_mib(name, which, large) for which in slopes}
    memory = peak["turbo"] / peak["stock"]
    return Row(SMALL_MODELS[name], "el/s", slopes["stock"], slopes["turbo"], memory, rounds)


def measure_real_model(name: str, rounds: int, quick: bool) -> tuple[list[Row], list[str]]:
    """A real model: ``real_models.measure`` over all its variants (each in a worker process
    of its own, in turn within each round); a row per stock variant against beam-turbo's.
    Also the outputs' agreement, as notes; a disagreement is a failure of the report."""
    from beam_turbo.bench import real_models

    model = real_models.load(name)
    small, large = model.sizes["quick" if quick else "full"]
    found = real_models.measure(
        model, name, model.variants, small, large, rounds, say=_say, bare=False
    )
    turbo = next(v.name for v in model.variants if v.turbo)
    rows = [
        Row(
            label,
            "/s",
            found[stock].slopes,
            found[turbo].slopes,
            found[turbo].peak_mib / found[stock].peak_mib,
            rounds,
        )
        for stock, label in REAL_ROWS[name]
    ]
    problems = []
    for variant in model.variants[1:]:
        agreement = found[variant.name].agreement
        if agreement is None or not agreement.same:
            problems.append(
                f"{name}: {variant.name}'s outputs DIFFER from {model.variants[0].name}'s "
                f"(largest difference {agreement.max_abs_diff if agreement else 'n/a'})"
            )
    return rows, problems


def preamble(args: argparse.Namespace, ran_on: str, started: datetime.datetime) -> str:
    """What the report runs on (``ran_on``: :func:`commit` at the start), then the table's
    head; the rows follow as they are measured, so a run cut short still leaves its rows."""
    import apache_beam

    mode = "quick" if args.quick else "full"
    sizes = SIZES[mode]
    lines = [
        f"- commit: {ran_on}",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}; load average (1, 5, 15 min) {load_average()} at the start",
        f"- software: Python {platform.python_version()}, apache-beam {apache_beam.__version__}, "
        "the DirectRunner",
        f"- command: `{command_line(args)}`",
        f"- method: throughput is the slope between a small and a large run ({sizes[0]:,} and "
        f"{sizes[1]:,} elements for the linear models and the MLP, elements generated in the "
        f"pipeline, a large run grown until it takes {MIN_WORK_SECS[mode]:g} s longer than the "
        "small one; bench e2e's sizes for the real models); stock and beam-turbo run in turn "
        f"in each of {args.rounds} rounds; each cell is the median over the rounds, with the "
        "smallest and largest round in brackets (the speed-up's per round); peak memory is "
        "one run of each",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "| --- | " + " | ".join("---:" for _ in HEADERS[1:]) + " |",
    ]
    return "\n".join(lines)


def _row_line(row: Row) -> str:
    return "| " + " | ".join(row.cells()) + " |"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"rounds per row (default {ROUNDS['full']}; {ROUNDS['quick']} with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small runs (small models {SIZES['quick'][0]:,} and {SIZES['quick'][1]:,} "
        "elements, real models bench e2e's --quick sizes): a smoke test, not figures",
    )
    parser.add_argument(
        "--only", nargs="+", choices=NAMES, metavar="NAME", help=f"only these rows: {NAMES}"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if args.rounds is None:
        args.rounds = ROUNDS["quick" if args.quick else "full"]
    if args.rounds < 1:
        raise SystemExit("--rounds: at least 1")
    chosen = [name for name in NAMES if not args.only or name in args.only]
    torch_before_tensorflow()
    start = time.perf_counter()
    print(preamble(args, commit(), datetime.datetime.now(datetime.UTC)), flush=True)
    problems: list[str] = []
    for name in chosen:
        _say(f"{name}: {args.rounds} round(s)")
        if name in SMALL_MODELS:
            rows = [measure_small_model(name, args.rounds, args.quick)]
        else:
            rows, disagreements = measure_real_model(name, args.rounds, args.quick)
            problems += disagreements
            # Said now, so that a run cut short keeps the verdict.
            _say(f"  {name}: outputs " + ("DIFFER" if disagreements else "agree"))
        for row in rows:
            print(_row_line(row), flush=True)
    print(
        f"\n- took {(time.perf_counter() - start) / 60:.0f} min; load average at the end "
        f"{load_average()}"
    )
    for problem in problems:
        print(f"\n**{problem}**")
    return 1 if problems else 0
