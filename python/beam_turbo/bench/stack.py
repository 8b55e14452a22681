"""stacking: beam_turbo.stack against numpy and torch, as ratios measured in one run.

Every case's batch is also checked against the reference (numpy's or torch's, byte for byte):
the run exits 1 when one differs. Speed never fails it.
"""

from __future__ import annotations

import argparse
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from beam_turbo import stack
from beam_turbo.bench._timing import format_seconds, measure, print_table


@dataclass(frozen=True)
class Case:
    """One comparison: ours against an alternative on the same inputs."""

    name: str
    ours: Callable[[], object]
    theirs_name: str
    theirs: Callable[[], object]
    goal: float
    #: The batch ``ours`` must give; ``theirs``' result when None.
    expected: Callable[[], object] | None = None

    def difference(self) -> str | None:
        """How ``ours`` differs from the expected batch, or None."""
        return _difference(self.ours(), (self.expected or self.theirs)())


def _difference(got: Any, want: Any) -> str | None:
    if isinstance(want, tuple):
        if not isinstance(got, tuple) or len(got) != len(want):
            return f"got {type(got).__name__}, expected a tuple of {len(want)}"
        found = [_difference(g, w) for g, w in zip(got, want, strict=True)]
        return next((f for f in found if f is not None), None)
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"got {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
    if got.tobytes() != want.tobytes():
        return f"the values differ at {int(np.argmax(got.ravel() != want.ravel()))} (flat index)"
    return None


def small_arrays(n: int = 1000, size: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random(size, dtype=np.float32) for _ in range(n)]


def images(n: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.random((224, 224, 3), dtype=np.float32) for _ in range(n)]


def tokens(n: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    return [
        rng.integers(0, 30000, size=int(rng.integers(1, 513)), dtype=np.int64) for _ in range(n)
    ]


def numpy_pad_and_stack(arrays: list[np.ndarray]) -> np.ndarray:
    longest = max(len(a) for a in arrays)
    return np.stack([np.pad(a, (0, longest - len(a))) for a in arrays])


def cases(quick: bool) -> list[Case]:
    small = small_arrays()
    img = images(16 if quick else 64)
    img_bytes = np.stack(img)  # the same bytes, contiguous, for the plain-copy reference
    touched = np.empty_like(img_bytes)
    tok = tokens()
    found = [
        Case(
            "1000 x float32[16]", lambda: stack(small), "numpy.stack", lambda: np.stack(small), 8.0
        ),
        Case(
            "1000 x float32[16]",
            lambda: stack(small),
            "numpy.concatenate+reshape",
            lambda: np.concatenate(small).reshape(len(small), -1),
            2.5,
        ),
        Case(
            f"{len(img)} x float32[224,224,3]",
            lambda: stack(img),
            "numpy.copyto (1 thread, touched)",
            lambda: np.copyto(touched, img_bytes),
            0.85,
            lambda: img_bytes,
        ),
        Case(
            f"{len(img)} x float32[224,224,3]",
            lambda: stack(img),
            "numpy.stack",
            lambda: np.stack(img),
            1.5,
        ),
        Case(
            "256 x int64[1..512], padded",
            lambda: stack(tok, pad=0),
            "numpy.pad loop + stack",
            lambda: numpy_pad_and_stack(tok),
            5.0,
            lambda: (numpy_pad_and_stack(tok), np.array([[len(t)] for t in tok], np.int64)),
        ),
    ]
    try:
        import torch
    except ImportError:
        return found
    tensors = [torch.from_numpy(a.copy()) for a in small]
    reused = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype)
    found += [
        Case(
            "1000 x torch float32[16]",
            lambda: stack(tensors),
            "torch.stack",
            lambda: torch.stack(tensors),
            1.0,
        ),
        Case(
            "1000 x torch float32[16], out=reused",
            lambda: stack(tensors, out=reused),
            "torch.stack",
            lambda: torch.stack(tensors),
            1.0,
        ),
    ]
    return found


def resident_growth(calls: int = 10_000) -> tuple[float, float]:
    """Peak resident memory (MiB) after a warm-up and after ``calls`` more stacking calls."""
    arrays = small_arrays(256, 1024)

    def peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    for _ in range(100):
        stack(arrays)
    before = peak_mib()
    for _ in range(calls):
        stack(arrays)
    return before, peak_mib()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="fewer, smaller rounds (a smoke run)")
    return parser


def run(args: argparse.Namespace) -> int:
    rounds, secs = (3, 0.02) if args.quick else (7, 0.1)
    rows = []
    wrong = []
    for case in cases(args.quick):
        difference = case.difference()
        if difference is not None:
            wrong.append(f"{case.name} against {case.theirs_name}: {difference}")
        ours = measure(case.ours, rounds=rounds, min_round_secs=secs)
        theirs = measure(case.theirs, rounds=rounds, min_round_secs=secs)
        ratio = theirs.best / ours.best
        rows.append(
            [
                case.name,
                case.theirs_name,
                format_seconds(ours.best),
                format_seconds(theirs.best),
                f"{ratio:.2f}x",
                f">= {case.goal}x",
                "yes" if ratio >= case.goal else "NO",
            ]
        )
    print("beam_turbo.stack against the alternatives (best of rounds; ratio = theirs / ours)\n")
    print_table(["inputs", "against", "beam-turbo", "theirs", "speed-up", "goal", "met"], rows)
    before, after = resident_growth(1000 if args.quick else 10_000)
    print(
        f"\npeak resident memory: {before:.1f} MiB after warm-up, {after:.1f} MiB after the calls"
    )
    for line in wrong:
        print(f"WRONG RESULT: {line}", file=sys.stderr)
    return 1 if wrong else 0
