"""model cache: ModelCache hits against Beam's Shared and a dict-and-lock cache, and two threads."""

from __future__ import annotations

import argparse
import functools
import gc
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from apache_beam.utils import shared as beam_shared

from beam_turbo import ModelCache
from beam_turbo.bench._timing import Timing, format_seconds, measure, print_table

KEY = "bench-model"
TAG = "gs://models/bench/v1"


class Model:
    """A stand-in model (Shared needs one that takes weak references)."""


class DictLockCache:
    """The cache one would write in Python: a dict under a lock, loading outside it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[Hashable, tuple[Any, Any]] = {}

    def acquire(self, key: Hashable, loader: Callable[[], Any], tag: Any = None) -> Any:
        with self._lock:
            found = self._models.get(key)
        if found is not None and found[0] == tag:
            return found[1]
        model = loader()
        with self._lock:
            self._models[key] = (tag, model)
        return model


def hit_calls() -> dict[str, Callable[[], object]]:
    """One warm hit per contender, as a call with no Python frame of its own."""
    model = Model()

    def loader() -> Model:
        return model

    shared_handle: Any = beam_shared.Shared  # untyped in Beam
    shared = shared_handle()
    ours, plain = ModelCache(), DictLockCache()
    calls: dict[str, Callable[[], object]] = {
        "beam_turbo.ModelCache": functools.partial(ours.acquire, KEY, loader, TAG),
        "beam Shared": functools.partial(shared.acquire, loader, TAG),
        "dict + lock (Python)": functools.partial(plain.acquire, KEY, loader, TAG),
    }
    for call in calls.values():
        call()
    return calls


def measure_together(
    calls: dict[str, Callable[[], object]], *, rounds: int, min_round_secs: float
) -> dict[str, Timing]:
    """Time each call like ``measure``, but round by round in turn, so that all of them see
    the same machine: a busy spell slows every contender's round, not one contender."""
    loops = {}
    for name, call in calls.items():
        timing = measure(call, rounds=1, min_round_secs=min_round_secs)
        loops[name] = max(1, int(min_round_secs / max(timing.best, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, call in calls.items():
                n = loops[name]
                start = time.perf_counter()
                for _ in range(n):
                    call()
                samples[name].append((time.perf_counter() - start) / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: Timing(best=min(times), median=sorted(times)[len(times) // 2])
        for name, times in samples.items()
    }


def one_round(call: Callable[[], object], threads: int, n: int) -> float:
    """Seconds per acquire with ``threads`` threads doing ``n`` acquires each."""

    def worker(start_line: threading.Barrier) -> None:
        start_line.wait()
        for _ in range(n):
            call()

    start_line = threading.Barrier(threads + 1)
    workers = [threading.Thread(target=worker, args=(start_line,)) for _ in range(threads)]
    for w in workers:
        w.start()
    start_line.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    return (time.perf_counter() - start) / (threads * n)


def thread_scaling(call: Callable[[], object], n: int, rounds: int) -> tuple[float, float]:
    """Best seconds per acquire with one thread and with two, their rounds interleaved."""
    one, two = float("inf"), float("inf")
    for _ in range(rounds):
        one = min(one, one_round(call, 1, n))
        two = min(two, one_round(call, 2, n))
    return one, two


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (a smoke run)")
    return parser


def run(args: argparse.Namespace) -> int:
    rounds, secs, n = (3, 0.02, 20_000) if args.quick else (7, 0.1, 200_000)
    calls = hit_calls()
    ours_name = "beam_turbo.ModelCache"
    hit = measure_together(calls, rounds=rounds, min_round_secs=secs)
    ours = hit[ours_name].best
    goals = {"beam Shared": 10.0}
    rows = []
    for name, timing in hit.items():
        ratio = timing.best / ours
        median_ratio = timing.median / hit[ours_name].median
        goal = goals.get(name)
        rows.append(
            [
                name,
                format_seconds(timing.best),
                format_seconds(timing.median),
                f"{ratio:.1f}x",
                f"{median_ratio:.1f}x",
                f">= {goal:g}x" if goal else "",
                ("yes" if ratio >= goal else "NO") if goal else "",
            ]
        )
    print(
        "A warm hit from Python, rounds interleaved (ratio = theirs / ours, of the best rounds"
        " and of the medians; the goal is on the best)\n"
    )
    print_table(["cache", "best", "median", "ratio", "median ratio", "goal", "met"], rows)

    rows = []
    for name, call in calls.items():
        one, two = thread_scaling(call, n, rounds)
        goal = 1.5 if name == ours_name else None
        rows.append(
            [
                name,
                format_seconds(one),
                format_seconds(two),
                f"{two / one:.2f}x",
                f"<= {goal}x" if goal else "",
                ("yes" if two / one <= goal else "NO") if goal else "",
            ]
        )
    print(
        f"\nTime per acquire, one key, {n} acquires per thread"
        f" (best of {rounds} rounds, one- and two-thread rounds interleaved)\n"
    )
    print_table(["cache", "1 thread", "2 threads", "2 / 1", "goal", "met"], rows)
    return 0
