"""Timing and table helpers shared by the benchmarks."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the best and the median of several rounds."""

    best: float
    median: float


def measure(fn: Callable[[], object], *, rounds: int = 7, min_round_secs: float = 0.05) -> Timing:
    """Time ``fn``: calibrate a loop to ``min_round_secs``, then take ``rounds`` rounds.

    The best round is the least disturbed by other work on the machine; the median is shown
    beside it so a noisy run is visible.

    Example:
        >>> measure(lambda: sum(range(100)), rounds=3, min_round_secs=0.001).best > 0
        True
    """
    fn()
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_round_secs or loops >= 1 << 24:
            break
        loops *= 2 if elapsed <= 0 else max(2, min(10, int(min_round_secs / elapsed) + 1))
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(loops):
                fn()
            samples.append((time.perf_counter() - start) / loops)
    finally:
        if gc_was_enabled:
            gc.enable()
    samples.sort()
    return Timing(best=samples[0], median=samples[len(samples) // 2])


def format_seconds(seconds: float) -> str:
    """A duration with a unit that keeps 3-4 significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain text table with aligned columns."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def print_markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table: the first column left-aligned, the others right-aligned.

    Example:
        >>> print_markdown_table(["name", "n"], [["a|b", 1]])
        | name | n |
        | --- | ---: |
        | a\\|b | 1 |
    """

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    print("| " + " | ".join(cell(h) for h in headers) + " |")
    print("| " + " | ".join("---" if i == 0 else "---:" for i in range(len(headers))) + " |")
    for row in rows:
        print("| " + " | ".join(cell(c) for c in row) + " |")
