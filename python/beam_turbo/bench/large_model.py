"""large-model: resident memory of a model that dominates it, with two SDK worker processes.

One pipeline (Beam's DirectRunner, ``multi_processing`` with two workers) scores a few hundred
rows with a scikit-learn MLP of ``--model-mb`` MB (its weights made at random, saved with
joblib, which reads them straight into their arrays: no second copy while loading), with stock
Beam's ``RunInference`` and with beam-turbo's, each without and with ``large_model=True``.
While each runs, the memory of every process under this one (the workers; a model shared
across processes is served from inside the worker that loaded it) is sampled from
``/proc/<pid>/smaps_rollup``: the peak of the sum of their PSS (shared pages divided among
the processes that map them) and of their RSS, beside a baseline run's (the same pipeline,
its model 1 MB); and, from ``/proc/<pid>/smaps``, which workers hold the weights (a resident
anonymous mapping of the first layer's size: numpy gives an array that large a mapping of its
own). Each run's predictions are summed and checked against the others'.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from beam_turbo.bench._timing import print_table

#: The run that gives the workers' memory without the model: a model of 1 MB.
BASELINE = "baseline (1 MB model)"
MB = 2**20


def build_model(folder: Path, megabytes: float, features: int) -> Path:
    """A fitted ``MLPRegressor`` with one hidden layer whose weights take ``megabytes``,
    saved with joblib in ``folder``."""
    import joblib
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    hidden = max(1, int(megabytes * MB / 8 / (features + 1)))
    rng = np.random.default_rng(0)
    x, y = rng.random((4, features)), rng.random(4)
    model = MLPRegressor(hidden_layer_sizes=(hidden,), max_iter=1, solver="sgd", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    # What only training uses (the optimizer's velocities, the best weights so far): each as
    # large as the weights, and not what a served model holds.
    for training_state in ("_optimizer", "_best_coefs", "_best_intercepts"):
        vars(model).pop(training_state, None)
    path = folder / "mlp.joblib"
    joblib.dump(model, path)
    return path


def first_layer_bytes(model_mb: float, features: int) -> int:
    """The first layer's weights in :func:`build_model`'s MLP, less a margin: a resident
    mapping that large is a copy of them."""
    return int(0.9 * model_mb * MB * features / (features + 1))


def descendants(root: int) -> list[int]:
    """The processes under ``root`` (children, theirs, ...), from ``/proc``."""
    parents: dict[int, int] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:  # gone meanwhile
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        pid = int(text.split(" ", 1)[0])
        parents[pid] = int(text.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def memory(pid: int) -> tuple[int, int] | None:
    """``(PSS, RSS)`` of ``pid`` in bytes, or None for a process gone meanwhile."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("Pss", "Rss"):
            fields[name] = int(rest.split()[0]) * 1024
    return fields["Pss"], fields["Rss"]


#: Below this, an anonymous mapping may be a malloc arena (glibc's take up to 64 MB), not the
#: weights: the workers holding them are not counted for a model so small.
MIN_DETECTABLE_WEIGHTS = 80 * 2**20


def holds(pid: int, resident_bytes: int) -> bool:
    """Whether ``pid`` has an anonymous mapping with at least ``resident_bytes`` resident: a
    weight matrix that large (numpy allocates it as a mapping of its own), when it is at
    least :data:`MIN_DETECTABLE_WEIGHTS`."""
    if resident_bytes < MIN_DETECTABLE_WEIGHTS:
        return False
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return False
    anonymous = False
    for line in text.splitlines():
        first = line.split(maxsplit=6)
        if "-" in first[0] and len(first) >= 5:  # a mapping's header: no path, inode 0
            anonymous = len(first) == 5 and first[4] == "0"
        elif anonymous and first[0] == "Rss:" and int(first[1]) * 1024 >= resident_bytes:
            return True
    return False


@dataclasses.dataclass
class Peaks:
    """What the sampler saw: the peak sums, each process's own PSS peak, the processes seen
    holding the weights, the samples."""

    pss: int = 0
    rss: int = 0
    per_process: dict[int, int] = dataclasses.field(default_factory=dict)
    holders: set[int] = dataclasses.field(default_factory=set)
    samples: int = 0


def sampling(
    root: int, interval_secs: float, weights_bytes: int
) -> tuple[Peaks, Callable[[], None]]:
    """Start sampling the memory of ``root``'s descendants every ``interval_secs`` (and which
    hold a mapping of ``weights_bytes``, every fifth): the peaks, filled in as it goes, and
    the function that stops it."""
    peaks = Peaks()
    stop = threading.Event()

    def sample() -> None:
        pss = rss = 0
        for pid in descendants(root):
            found = memory(pid)
            if found is None:
                continue
            pss += found[0]
            rss += found[1]
            peaks.per_process[pid] = max(peaks.per_process.get(pid, 0), found[0])
            if peaks.samples % 5 == 0 and pid not in peaks.holders and holds(pid, weights_bytes):
                peaks.holders.add(pid)
        peaks.pss, peaks.rss = max(peaks.pss, pss), max(peaks.rss, rss)
        peaks.samples += 1

    def loop() -> None:
        while not stop.wait(interval_secs):
            sample()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def stopped() -> None:
        stop.set()
        thread.join()

    return peaks, stopped


def _append_sum(total: float, path: str) -> None:
    with open(path, "a") as f:
        f.write(f"{total!r}\n")


@dataclasses.dataclass
class Run:
    name: str
    peaks: Peaks
    seconds: float
    total: float


def one_run(
    name: str,
    transform: Callable[..., Any],
    handler: Any,
    rows: list[Any],
    folder: Path,
    weights_bytes: int,
) -> Run:
    """Run the pipeline with ``transform(handler)`` on two worker processes, sampling."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    out = folder / f"sum-{uuid.uuid4().hex}"
    tag = f"beam-turbo-bench-{uuid.uuid4().hex}"
    peaks, stop = sampling(os.getpid(), 0.1, weights_bytes)
    start = time.perf_counter()
    try:
        with beam.Pipeline(options=options) as pipeline:
            _ = (
                pipeline
                | beam.Create(rows)
                | transform(handler, model_identifier=tag)
                | beam.Map(lambda result: float(result.inference))
                | beam.CombineGlobally(sum)
                | beam.Map(_append_sum, str(out))
            )
    finally:
        seconds = time.perf_counter() - start
        stop()
        for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{tag}*")):
            os.remove(path)  # Beam's address and lock files for the shared copies
    totals = [float(line) for line in out.read_text().split()]
    if len(totals) != 1:
        raise AssertionError(f"{name}: expected one sum of the predictions, got {totals}")
    return Run(name, peaks, seconds, totals[0])


def runs(model_mb: float, features: int, elements: int) -> Iterator[tuple[str, Run]]:
    """For stock Beam and for beam-turbo: a baseline (the same pipeline with a model of 1 MB,
    per process), the model per process, and the model with ``large_model=True``."""
    import numpy as np
    from apache_beam.ml.inference import base
    from apache_beam.ml.inference import sklearn_inference as beam_sklearn
    from apache_beam.ml.inference.sklearn_inference import ModelFileType

    from beam_turbo import RunInference
    from beam_turbo import sklearn as turbo_sklearn

    rows = list(np.random.default_rng(1).random((elements, features)))
    batching = {"min_batch_size": 32, "max_batch_size": 32}
    with tempfile.TemporaryDirectory(prefix="beam-turbo-large-model-") as name:
        folder = Path(name)
        (folder / "small").mkdir()
        small = str(build_model(folder / "small", 1.0, features))
        path = str(build_model(folder, model_mb, features))
        weights_bytes = first_layer_bytes(model_mb, features)
        for label, transform, module in (
            ("stock Beam", base.RunInference, beam_sklearn),
            ("beam-turbo", RunInference, turbo_sklearn),
        ):
            for sharing, model, large_model in (
                (BASELINE, small, False),
                ("per process", path, False),
                ("large_model=True", path, True),
            ):
                handler = module.SklearnModelHandlerNumpy(
                    model, model_file_type=ModelFileType.JOBLIB, large_model=large_model, **batching
                )
                name = f"{label}, {sharing}"
                yield label, one_run(name, transform, handler, rows, folder, weights_bytes)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model-mb", type=float, default=200.0, help="the model's weights, MB")
    parser.add_argument("--features", type=int, default=1000, help="the model's inputs")
    parser.add_argument("--elements", type=int, default=256, help="rows scored per pipeline")
    parser.add_argument("--quick", action="store_true", help="a 100 MB model (a smoke run)")
    return parser


def run(args: argparse.Namespace) -> int:
    model_mb = 100.0 if args.quick else args.model_mb
    print(
        f"An MLP of {model_mb:g} MB, {args.elements} rows, DirectRunner with two worker "
        "processes; the memory of every process under this one, sampled every 0.1 s (peaks), "
        "and the workers seen holding the weights (a resident anonymous mapping of the weight "
        "matrix's size). Timings here are noisy; the peaks vary by about 100 MB a worker."
    )
    results = list(runs(model_mb, args.features, args.elements))
    weights_bytes = first_layer_bytes(model_mb, args.features)
    baselines = {label: r.peaks.pss for label, r in results if r.name.endswith(BASELINE)}
    table = []
    for label, result in results:
        largest = sorted(result.peaks.per_process.values(), reverse=True)[:2]
        table.append(
            [
                result.name,
                f"{result.peaks.pss / MB:.0f}",
                f"{(result.peaks.pss - baselines[label]) / MB:+.0f}",
                f"{result.peaks.rss / MB:.0f}",
                " ".join(f"{p / MB:.0f}" for p in largest),
                len(result.peaks.holders) if weights_bytes >= MIN_DETECTABLE_WEIGHTS else "n/a",
                f"{result.seconds:.1f}",
            ]
        )
    print_table(
        [
            "run",
            "peak PSS sum MB",
            "over baseline",
            "peak RSS sum MB",
            "workers' PSS peaks MB",
            "holding the weights",
            "wall s",
        ],
        table,
    )
    totals = [r.total for label, r in results if not r.name.endswith(BASELINE)]
    if not all(math.isclose(t, totals[0], rel_tol=1e-9) for t in totals):
        print(f"The predictions differ between runs: sums {totals}")
        return 1
    print(f"The model's predictions sum to {totals[0]!r} in every run.")
    return 0
