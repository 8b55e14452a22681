"""Soak and fault injection: the figures of docs/reliability.md.

Three parts, each optional:

* ``pipeline``: pushes ``--elements`` (default ten million) through the demo pipeline
  (scikit-learn, beam-turbo's RunInference, DirectRunner in-process) in chunks of
  ``--chunk``, counting elements out, and records resident memory after each chunk.
* ``hammer``: ``--threads`` (default 16) threads call ``stack`` (random dtypes, shapes,
  strides, pads, ``out=``, batches large enough for the parallel copy) and ``ModelCache``
  (six keys, two tags, a bound of three models, invalidations) for ``--seconds`` (default 60),
  checking every result against numpy or the key and tag asked for; resident memory is
  sampled every second.
* ``faults``: pipelines with injected faults (elements that raise, batches out of memory, a
  loader that fails then recovers, a loader that never recovers), in-process and
  multi-process, counting faults, elements in, results and dead letters.

It writes ``soak.csv`` (the memory curves), ``faults.csv`` and ``soak.png`` into ``--out``
and exits non-zero on any wrong result, lost or duplicated element, or resident memory that
grows by more than ``--max-growth-mib`` after the warm-up (see :func:`growth`;
``--max-hammer-growth-mib`` sets the hammer's bound apart). Memory is judged only for a part
with at least five samples (chunks, or seconds of hammering); the script says when it is not.

    python scripts/soak.py --out soak-out                       # everything, full size
    python scripts/soak.py --elements 200000 --seconds 5 --out /tmp/soak
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference import base
from apache_beam.options.pipeline_options import PipelineOptions

import beam_turbo
from beam_turbo import ModelCache
from beam_turbo.bench.e2e import CHUNK, generate, make_framework
from beam_turbo.inference import RunInference


def rss_mib() -> float:
    """Resident memory of this process, MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


# --- pipeline ---------------------------------------------------------------------------------


class CountOut(beam.DoFn):  # type: ignore[misc]
    """Counts elements out in a Beam metric (per bundle, cheap)."""

    def __init__(self) -> None:
        self.out = beam.metrics.Metrics.counter("soak", "out")

    def process(self, element: Any) -> Iterable[None]:
        self.out.inc()
        return ()


def counted(result: Any, name: str) -> int:
    query = result.metrics().query(beam.metrics.MetricsFilter().with_name(name))
    return int(sum(c.committed or 0 for c in query["counters"]))


def soak_pipeline(elements: int, chunk: int, rows: list[list[Any]]) -> bool:
    with tempfile.TemporaryDirectory() as folder:
        framework = make_framework("sklearn", folder)
        done, start = 0, time.perf_counter()
        while done < elements:
            n = min(chunk, elements - done)
            seeds = list(range(done // CHUNK, (done + n) // CHUNK))
            pipeline = beam.Pipeline(options=PipelineOptions([]))
            _ = (
                pipeline
                | beam.Create(seeds)
                | beam.FlatMap(generate, framework.make_element)
                | RunInference(framework.turbo)
                | beam.ParDo(CountOut())
            )
            result = pipeline.run()
            result.wait_until_finish()
            out = counted(result, "out")
            expected = len(seeds) * CHUNK
            done += expected
            rows.append(["pipeline", done, round(time.perf_counter() - start, 2), rss_mib()])
            print(f"pipeline: {done:>10,} elements, {rss_mib():7.1f} MiB", flush=True)
            if out != expected:
                print(f"pipeline: {out} results for {expected} elements", file=sys.stderr)
                return False
    return True


# --- hammer -----------------------------------------------------------------------------------


class Model:
    def __init__(self, key: str, tag: int) -> None:
        self.key, self.tag = key, tag
        self.weights = np.full(1024, tag, np.float64)  # something to leak if models leaked


DTYPES = [np.uint8, np.int16, np.int32, np.float32, np.float64, np.complex64]


def one_stack(rng: random.Random) -> None:
    dtype = rng.choice(DTYPES)
    ndim = rng.randint(0, 3)
    pad = rng.random() < 0.3
    if rng.random() < 0.03:  # large enough for the parallel copy
        arrays = [np.full((1 << 17,), i, dtype) for i in range(rng.randint(8, 16))]
    else:
        base_shape = tuple(rng.randint(0, 6) for _ in range(ndim))
        arrays = []
        for _ in range(rng.randint(1, 12)):
            shape = tuple(rng.randint(0, 6) for _ in range(ndim)) if pad else base_shape
            full = np.arange(np.prod([2 * s + 1 for s in shape], dtype=int)).astype(dtype)
            view = full.reshape(tuple(2 * s + 1 for s in shape))
            steps = tuple(rng.choice([1, 2, -1, -2]) for _ in shape)
            view = view[tuple(slice(None, None, st) for st in steps)]
            arrays.append(view[tuple(slice(0, s) for s in shape)])
    if pad:
        batch, shapes = beam_turbo.stack(arrays, pad=1)
        dims = tuple(max(a.shape[d] for a in arrays) for d in range(arrays[0].ndim))
        expected = np.ones((len(arrays), *dims), dtype)
        for i, a in enumerate(arrays):
            region: tuple[int | slice, ...] = (i, *(slice(0, n) for n in a.shape))
            expected[region] = a
        ok = shapes.tolist() == [list(a.shape) for a in arrays]
    else:
        expected = np.stack(arrays)
        if rng.random() < 0.3:
            out = np.empty_like(expected)
            batch = beam_turbo.stack(arrays, out=out)
            ok = batch is out
        else:
            batch, ok = beam_turbo.stack(arrays), True
    if not ok or batch.dtype != expected.dtype or not np.array_equal(batch, expected):
        raise AssertionError(f"stack gave a wrong batch for {len(arrays)} arrays of {dtype}")


def one_acquire(rng: random.Random, cache: ModelCache) -> None:
    key, tag = f"k{rng.randint(0, 5)}", rng.randint(0, 1)
    if rng.random() < 0.02:
        cache.invalidate(key)
        return
    model = cache.acquire(key, lambda: Model(key, tag), tag=tag)
    if model.key != key or model.tag != tag:
        raise AssertionError(f"acquire({key}, tag={tag}) gave {model.key}, tag {model.tag}")


def soak_hammer(threads: int, seconds: float, rows: list[list[Any]]) -> bool:
    cache = ModelCache(max_models=3)
    stop = threading.Event()
    counts = [0] * threads
    errors: list[str] = []

    def work(index: int) -> None:
        rng = random.Random(index)
        try:
            while not stop.is_set():
                if rng.random() < 0.5:
                    one_stack(rng)
                else:
                    one_acquire(rng, cache)
                counts[index] += 1
        except BaseException as err:  # any error is a failure of the soak
            errors.append(f"thread {index}: {type(err).__name__}: {err}")
            stop.set()

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    while not stop.is_set() and time.perf_counter() - start < seconds:
        time.sleep(1.0)
        rows.append(["hammer", sum(counts), round(time.perf_counter() - start, 2), rss_mib()])
        print(f"hammer: {sum(counts):>10,} operations, {rss_mib():7.1f} MiB", flush=True)
    stop.set()
    for w in workers:
        w.join()
    stats = cache.stats()
    print(f"hammer: {sum(counts):,} operations on {threads} threads; cache {stats}", flush=True)
    for line in errors:
        print(line, file=sys.stderr)
    return not errors


# --- faults -----------------------------------------------------------------------------------


class Faulty(base.ModelHandler[float, base.PredictionResult, Any]):  # type: ignore[misc]
    """A model that doubles numbers, with scripted faults, each noted in ``record``."""

    def __init__(
        self,
        record: str,
        *,
        fail_loads: int = 0,
        oom_above: int | None = None,
        bad_every: int | None = None,
    ) -> None:
        super().__init__()
        self.record, self.fail_loads = record, fail_loads
        self.oom_above, self.bad_every = oom_above, bad_every

    def _note(self, what: str) -> None:
        with open(self.record, "a") as f:
            f.write(what + "\n")

    def load_model(self) -> float:
        if self.fail_loads > 0:
            self.fail_loads -= 1
            self._note("load failed")
            raise ConnectionError("model store unavailable")
        return 2.0

    def run_inference(
        self, batch: Sequence[float], model: float, inference_args: Any = None
    ) -> Iterable[base.PredictionResult]:
        if self.oom_above is not None and len(batch) > self.oom_above:
            self._note("oom")
            raise MemoryError(f"batch of {len(batch)} does not fit")
        if self.bad_every and any(int(x) % self.bad_every == 0 for x in batch):
            self._note("raised")
            raise ValueError("cannot score this element")
        return [base.PredictionResult(x, x * model) for x in batch]

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": 256}


SCENARIOS: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    # name, handler faults, RunInference arguments, with_exception_handling(isolate_failures)
    ("elements that raise (1 in 100)", {"bad_every": 100}, {}, True),
    ("batches out of memory (above 32)", {"oom_above": 32}, {}, False),
    (
        "loader fails 3 times, then recovers",
        {"fail_loads": 3},
        {"model_load_retries": 3, "model_load_backoff_secs": 0.0},
        False,
    ),
    ("loader never recovers", {"fail_loads": 10**9}, {"model_load_retries": 1}, True),
    ("all of: raise, OOM above 32", {"bad_every": 100, "oom_above": 32}, {}, True),
]


def run_faulty(
    elements: int, faults: dict[str, Any], kwargs: dict[str, Any], dlq: bool, options: list[str]
) -> tuple[int, int, int, dict[str, int], int]:
    """Results, dead letters, distinct elements seen in both, faults by kind, duplicates."""
    with tempfile.TemporaryDirectory() as folder:
        record = os.path.join(folder, "faults")
        Path(record).touch()
        prefix = os.path.join(folder, "out")
        handler = Faulty(record, **faults)
        with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
            data = pipeline | beam.Create([float(i) for i in range(elements)])
            transform = RunInference(handler, **kwargs)
            if dlq:
                results, dead = data | transform.with_exception_handling(isolate_failures=True)
                failed = dead.failed_inferences | "Dead" >> beam.FlatMap(lambda f: f[0])
            else:
                results = data | transform
                failed = pipeline | "NoDead" >> beam.Create([])
            good = results | beam.Map(lambda r: r.example)
            _ = (
                good
                | "WriteGood" >> beam.Map(lambda x: f"ok {int(x)}")
                | "G" >> beam.io.WriteToText(prefix + "-good")
            )
            _ = (
                failed
                | "WriteDead" >> beam.Map(lambda x: f"dead {int(x)}")
                | "D" >> beam.io.WriteToText(prefix + "-dead")
            )
        lines = []
        for name in os.listdir(folder):
            if name.startswith("out-"):
                lines += Path(folder, name).read_text().split()
        oks = [int(v) for k, v in zip(lines[::2], lines[1::2], strict=True) if k == "ok"]
        dead_ = [int(v) for k, v in zip(lines[::2], lines[1::2], strict=True) if k == "dead"]
        seen = oks + dead_
        kinds: dict[str, int] = {}
        for line in Path(record).read_text().splitlines():
            kinds[line] = kinds.get(line, 0) + 1
        return len(oks), len(dead_), len(set(seen)), kinds, len(seen) - len(set(seen))


def soak_faults(elements: int, repeats: int, out: Path) -> bool:
    modes = [
        ("in-process", []),
        ("multi-process", ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]),
    ]
    ok = True
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "fault",
                "mode",
                "runs",
                "faults injected",
                "elements in",
                "results",
                "dead letters",
                "lost",
                "duplicated",
            ]
        )
        for name, faults, kwargs, dlq in SCENARIOS:
            for mode, options in modes:
                totals = {"in": 0, "ok": 0, "dead": 0, "lost": 0, "dup": 0}
                kinds: dict[str, int] = {}
                for _ in range(repeats):
                    n_ok, n_dead, distinct, found, dup = run_faulty(
                        elements, faults, kwargs, dlq, options
                    )
                    totals["in"] += elements
                    totals["ok"] += n_ok
                    totals["dead"] += n_dead
                    totals["lost"] += elements - distinct
                    totals["dup"] += dup
                    for k, v in found.items():
                        kinds[k] = kinds.get(k, 0) + v
                injected = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "0"
                row = [
                    name,
                    mode,
                    repeats,
                    injected,
                    totals["in"],
                    totals["ok"],
                    totals["dead"],
                    totals["lost"],
                    totals["dup"],
                ]
                writer.writerow(row)
                print("faults:", " | ".join(str(v) for v in row), flush=True)
                ok = ok and totals["lost"] == 0 and totals["dup"] == 0
    return ok


# --- main -------------------------------------------------------------------------------------


def growth(rows: list[list[Any]], phase: str) -> float | None:
    """Resident memory growth after the warm-up, MiB: the median of the last fifth of the
    samples less the median of the second fifth (medians, since threads that allocate and
    free batches of megabytes move single samples by a hundred MiB either way); None for
    fewer than five samples, which cannot tell a drift from the warm-up."""
    values = [r[3] for r in rows if r[0] == phase]
    fifth = len(values) // 5
    if fifth < 1:
        return None
    return float(statistics.median(values[-fifth:]) - statistics.median(values[fifth : 2 * fifth]))


def plot(rows: list[list[Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in ("pipeline", "hammer") if any(r[0] == p for r in rows)]
    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=True):
        mine = [r for r in rows if r[0] == phase]
        if phase == "pipeline":
            ax.plot([r[1] / 1e6 for r in mine], [r[3] for r in mine], marker=".")
            ax.set_xlabel("elements through the pipeline (millions)")
            ax.set_title("demo pipeline (sklearn, DirectRunner)")
        else:
            ax.plot([r[2] for r in mine], [r[3] for r in mine], marker=".")
            ax.set_xlabel("seconds")
            ax.set_title("threads hammering stack and ModelCache")
        ax.set_ylabel("resident memory (MiB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("soak-out"))
    parser.add_argument("--parts", default="pipeline,hammer,faults")
    parser.add_argument("--elements", type=int, default=10_000_000)
    parser.add_argument("--chunk", type=int, default=500_000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--fault-elements", type=int, default=2_000)
    parser.add_argument("--fault-repeats", type=int, default=3)
    parser.add_argument("--max-growth-mib", type=float, default=64.0)
    parser.add_argument(
        "--max-hammer-growth-mib",
        type=float,
        default=None,
        help="the hammer's bound, if not --max-growth-mib: in a short run its buffer pool "
        "(up to 256 MiB idle) is still filling",
    )
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    rows: list[list[Any]] = []
    ok = True
    if "pipeline" in parts:
        ok = soak_pipeline(args.elements, max(args.chunk, CHUNK), rows) and ok
    if "hammer" in parts:
        ok = soak_hammer(args.threads, args.seconds, rows) and ok
    if rows:
        with open(args.out / "soak.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["phase", "elements or operations", "seconds", "rss_mib"])
            writer.writerows(rows)
        plot(rows, args.out / "soak.png")
        for phase in ("pipeline", "hammer"):
            if not any(r[0] == phase for r in rows):
                continue
            grew = growth(rows, phase)
            bound = args.max_growth_mib
            if phase == "hammer" and args.max_hammer_growth_mib is not None:
                bound = args.max_hammer_growth_mib
            if grew is None:
                print(f"{phase}: memory not judged: fewer than five samples")
                continue
            print(f"{phase}: resident memory grew {grew:.1f} MiB after warm-up")
            if grew > bound:
                print(f"{phase}: more than {bound} MiB", file=sys.stderr)
                ok = False
    if "faults" in parts:
        ok = soak_faults(args.fault_elements, args.fault_repeats, args.out / "faults.csv") and ok
    print("soak:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
