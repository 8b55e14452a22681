"""e2e: the same RunInference pipeline with stock Beam and with beam-turbo, end to end.

Elements are generated inside the pipeline (``beam.Create`` of a large list would measure its
encoding). Throughput is the slope between a small and a large run, so start-up cancels out;
each figure is the median of several rounds. The ideal time per element is the floor's (the
same pipeline with an identity ``Map`` for RunInference) plus the bare model's on pre-stacked
batches of 1,024 (the model call alone: no stacking, no splitting into rows, no results).

``--framework minilm|mobilenet`` runs real models instead, each variant in a process of its
own: :mod:`beam_turbo.bench.real_models`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.ml.inference import base
from apache_beam.options.pipeline_options import PipelineOptions

from beam_turbo._beam import internals
from beam_turbo._running.runner import BATCH_SIZE_METRIC, BATCH_TARGET_METRIC
from beam_turbo.bench._timing import print_table
from beam_turbo.bench.real_models import REAL_MODELS, has_batches_in_flight

CHUNK = 2_000  # elements generated per seed
MAX_LARGE = 50_000_000  # the most elements a large run grows to (see per_element_secs)


@dataclass(frozen=True)
class Framework:
    """A small model of one framework, and Beam's and beam-turbo's handlers for it."""

    name: str
    make_element: Callable[[np.ndarray[Any, Any]], Any]
    stock: base.ModelHandler
    turbo: base.ModelHandler
    bare: Callable[[Any], object]  # the model alone, on a batch stacked by ``stacked``
    stacked: Callable[[list[Any]], Any]
    exact: bool
    features: int = 16  # each element is float32[features]


def make_framework(name: str, folder: str, *, tree: bool = False, device: str = "cpu") -> Framework:
    """Build the model on the spot and save it where both handlers load it from: a linear
    model on float32[16] (``sklearn``, ``torch``, ``tensorflow``), or ``torch-mlp``, a
    256-1024-1024-10 ReLU network on float32[256]. ``device`` (``cpu`` or ``cuda``) is
    where the torch models run: both handlers' and the bare model's.

    scikit-learn's model is linear, or with ``tree`` a decision tree: a linear model's
    predictions for a row may differ in the last bit with the batch it is in (BLAS kernels
    sum in a different order at different batch sizes); a tree's cannot.
    """
    rng = np.random.default_rng(0)
    if device != "cpu" and name not in ("torch", "torch-mlp"):
        raise ValueError(f"--device {device}: only the torch models run off the CPU, not {name}")
    if name == "sklearn":
        from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy
        from sklearn.linear_model import LinearRegression
        from sklearn.tree import DecisionTreeRegressor

        from beam_turbo import sklearn as turbo_sklearn

        x = rng.random((256, 16), dtype=np.float32)
        estimator = (
            DecisionTreeRegressor(max_depth=8, random_state=0) if tree else LinearRegression()
        )
        model = estimator.fit(x, x @ rng.random(16))
        path = os.path.join(folder, "linear.pkl")
        with open(path, "wb") as f:
            pickle.dump(model, f)
        return Framework(
            name,
            lambda row: row,
            SklearnModelHandlerNumpy(path),
            turbo_sklearn.SklearnModelHandlerNumpy(path),
            model.predict,
            np.stack,
            exact=tree,
        )
    if name in ("torch", "torch-mlp"):
        import torch
        from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

        from beam_turbo import pytorch as turbo_pytorch

        torch.manual_seed(0)
        features = 256 if name == "torch-mlp" else 16
        model_class: Callable[..., torch.nn.Module] = (
            _mlp if name == "torch-mlp" else torch.nn.Linear
        )
        params = {"in_features": features, "out_features": 10 if name == "torch-mlp" else 1}
        net = model_class(**params).eval()
        path = os.path.join(folder, f"{name}.pt")
        torch.save(net.state_dict(), path)
        spec: dict[str, Any] = {
            "state_dict_path": path,
            "model_class": model_class,
            "model_params": params,
            "device": "GPU" if device == "cuda" else "CPU",  # Beam's names, which both take
        }
        net = net.to(device)
        if device != "cpu":  # CUDA's start-up and its libraries' first call, before timing
            with torch.no_grad():
                net(torch.zeros((1, features), device=device))
            torch.cuda.synchronize()

        def bare_torch(batch: torch.Tensor) -> object:
            with torch.no_grad():
                out = net(batch)
            if device != "cpu":
                torch.cuda.synchronize()  # the call returns before the device is done
            return out

        return Framework(
            name,
            lambda row: torch.from_numpy(row.copy()),  # its own storage, as a decoded element has
            PytorchModelHandlerTensor(**spec),
            turbo_pytorch.PytorchModelHandlerTensor(**spec),
            bare_torch,
            lambda batch: torch.stack(batch).to(device),
            exact=False,
            features=features,
        )
    if name == "tensorflow":
        import tensorflow as tf
        from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy

        from beam_turbo import tensorflow as turbo_tf

        tf.keras.utils.set_random_seed(0)
        keras_model = tf.keras.Sequential([tf.keras.Input((16,)), tf.keras.layers.Dense(1)])
        path = os.path.join(folder, "linear.keras")
        keras_model.save(path)
        return Framework(
            name,
            lambda row: row,
            TFModelHandlerNumpy(path),
            turbo_tf.TFModelHandlerNumpy(path),
            keras_model,
            lambda batch: tf.convert_to_tensor(np.stack(batch)),
            exact=False,
        )
    raise ValueError(
        f"unknown framework {name!r}; expected sklearn, torch, torch-mlp or tensorflow"
    )


def _mlp(in_features: int, out_features: int) -> Any:
    """The 256-1024-1024-10 ReLU network of the torch MLP benchmark."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(in_features, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, out_features),
    )


def generate(
    seed: int,
    make_element: Callable[[np.ndarray[Any, Any]], Any],
    keyed: bool = False,
    features: int = 16,
) -> Iterator[Any]:
    """``CHUNK`` elements of ``features`` values from ``seed``; with ``keyed``, each paired
    with a unique id."""
    rows = np.random.default_rng(seed).random((CHUNK, features), dtype=np.float32)
    if keyed:
        for i, row in enumerate(rows):
            yield (seed * CHUNK + i, make_element(row))
    else:
        for row in rows:
            yield make_element(row)


def as_line(keyed: tuple[int, Any]) -> str:
    key, result = keyed
    values = np.asarray(result.inference).reshape(-1)
    return f"{key}\t" + " ".join(repr(float(v)) for v in values)


#: The metric through which each SDK worker process reports its peak resident memory.
PEAK_METRIC = ("beam_turbo_bench", "worker_peak_rss_kib")
#: The batch-size distributions: Beam's BatchElements' and beam-turbo's fused DoFn's.
BATCH_SIZE_METRICS = (internals.BATCH_SIZE_METRIC, BATCH_SIZE_METRIC)


@dataclass
class Reported:
    """What a runner's SDK workers reported through metrics, over the runs given it."""

    peak_mib: float = float("nan")  # the largest peak resident memory of a worker process
    batches: int = 0
    batched: int = 0  # elements in those batches
    largest_batch: int = 0
    targets: int = 0  # beam-turbo's batches that report the size they were gathered for
    targeted: float = 0.0  # the sum of those sizes

    def add(self, result: beam.runners.runner.PipelineResult) -> None:
        for dist in result.metrics().query(MetricsFilter())["distributions"]:
            value = dist.committed or dist.attempted
            if value is None or not value.count:
                continue
            name = (dist.key.metric.namespace, dist.key.metric.name)
            if name == PEAK_METRIC:
                self.peak_mib = float(np.fmax(self.peak_mib, value.max / 1024))  # NaN: none yet
            elif name[1] == BATCH_TARGET_METRIC:
                self.targets += value.count
                self.targeted += value.sum
            elif name[1] in BATCH_SIZE_METRICS:
                self.batches += value.count
                self.batched += value.sum
                self.largest_batch = max(self.largest_batch, value.max)

    def batch_sizes(self) -> str:
        if not self.batches:
            return "-"
        sizes = f"{self.batches:,}, {self.batched / self.batches:,.0f} ({self.largest_batch:,})"
        if self.targets:  # what the sizer wanted, for beam-turbo: its batches close there
            sizes += f"; target {self.targeted / self.targets:,.0f}"
        return sizes


class _ReportPeakMemory(beam.DoFn):
    """Passes elements on; at the end of each bundle, reports the peak resident memory of the
    worker process it runs in (fused with RunInference, so the process that runs the model)."""

    def setup(self) -> None:
        self._peak = Metrics.distribution(*PEAK_METRIC)

    def process(self, element: Any) -> Iterator[Any]:
        yield element

    def finish_bundle(self) -> None:
        self._peak.update(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run_pipeline(
    framework: Framework,
    which: str,
    elements: int,
    options: Sequence[str] = (),
    output: str | None = None,
    reported: Reported | None = None,
) -> float:
    """Run one pipeline over ``elements`` generated elements; its wall time in seconds.

    ``which`` is ``stock``, ``turbo``, ``turbo-serial`` (beam-turbo with
    ``with_batches_in_flight(0)``) or ``floor`` (an identity ``Map`` for RunInference).
    With ``reported``, the SDK workers' peak resident memory and batch sizes are added to it
    (a runner's workers, not this process).
    """
    from beam_turbo.inference import RunInference

    seeds = list(range(max(1, elements // CHUNK)))
    make = framework.make_element
    keyed = output is not None  # ids, to compare predictions element by element
    start = time.perf_counter()
    pipeline = beam.Pipeline(options=PipelineOptions(list(options)))
    examples = (
        pipeline
        | "Seeds" >> beam.Create(seeds)
        | "Generate" >> beam.FlatMap(generate, make, keyed=keyed, features=framework.features)
    )
    if which == "floor":
        results = examples | "Identity" >> beam.Map(lambda x: x)
    else:
        handler = framework.stock if which == "stock" else framework.turbo
        transform = base.RunInference if which == "stock" else RunInference
        if keyed:
            handler = base.KeyedModelHandler(handler)
        inference = transform(handler)
        if which == "turbo-serial":
            inference = inference.with_batches_in_flight(0)
        results = examples | "RunInference" >> inference
    if reported is not None:
        results = results | "Peak memory" >> beam.ParDo(_ReportPeakMemory())
    if output is not None:
        _ = results | "Format" >> beam.Map(as_line) | "Write" >> beam.io.WriteToText(output)
    else:
        _ = results | "Count" >> beam.combiners.Count.Globally()
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - start
    if reported is not None:
        reported.add(result)
    return seconds


def same_predictions(a: dict[int, list[float]], b: dict[int, list[float]], exact: bool) -> bool:
    if a.keys() != b.keys():
        return False
    if exact:
        return all(a[k] == b[k] for k in a)
    return all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def per_element_secs(
    framework: Framework,
    which: str,
    small: int,
    large: int,
    rounds: int,
    options: Sequence[str] = (),
    reported: Reported | None = None,
    min_work_secs: float = 0.0,
) -> tuple[float, int]:
    """Median over rounds of the slope between a small and a large run (seconds/element), and
    the large run's size. With ``min_work_secs``, a large run whose time exceeds the small
    one's by less than that is run again, larger, until it does: on a runner a job's start-up
    varies by seconds, and a fast pipeline needs more elements than a slow one to outweigh it.
    With ``reported``, what the large runs' SDK workers reported (see :func:`run_pipeline`)."""
    slopes = []
    for _ in range(rounds):
        t_small = run_pipeline(framework, which, small, options)
        while True:
            t_large = run_pipeline(framework, which, large, options, reported=reported)
            work = t_large - t_small
            # Without a minimum, a large run no slower than the small one (noise) ends here too.
            if work >= min_work_secs or min_work_secs <= 0 or large >= MAX_LARGE:
                break
            # Aim past the minimum; at most ten times larger per step, as work may be ~0.
            factor = min(10.0, 1.5 * min_work_secs / max(work, min_work_secs / 10))
            large = min(MAX_LARGE, int(large * factor) // CHUNK * CHUNK)
        slopes.append(max(work, 1e-9) / (large - small))
    return statistics.median(slopes), large


def bare_per_element_secs(framework: Framework) -> float:
    """The bare model's time per element on a pre-stacked batch of 1,024 (the best of 5
    timings of 20 calls), without the cyclic collector, as the ideal asks."""
    import gc

    rng = np.random.default_rng(5)
    batch = framework.stacked(
        [
            framework.make_element(rng.random(framework.features, dtype=np.float32))
            for _ in range(1024)
        ]
    )
    framework.bare(batch)
    timings = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(20):
                framework.bare(batch)
            timings.append((time.perf_counter() - start) / (20 * 1024))
    finally:
        if was_enabled:
            gc.enable()
    return min(timings)


GOALS = {
    "sklearn": (1.5, 0.85),
    "torch": (5.0, 0.75),
    "torch-mlp": (5.0, 0.85),
    "tensorflow": (10.0, 0.7),
}


_PEAK_SCRIPT = """
import resource, sys, tempfile
from beam_turbo.bench import e2e
framework_name, which, elements, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with tempfile.TemporaryDirectory() as folder:
    framework = e2e.make_framework(framework_name, folder, device=device)
    e2e.run_pipeline(framework, which, elements)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_resident_mib(framework: str, which: str, elements: int, device: str = "cpu") -> float:
    """Peak resident memory (MiB) of a fresh process that runs one pipeline."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, framework, which, str(elements), device],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout.split()[-1]) / 1024


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--framework",
        choices=sorted([*GOALS, *REAL_MODELS, "simulated"]),
        default="sklearn",
        help="a small model of each framework, a real model (minilm, mobilenet: "
        "see docs/benchmarks.md; each variant runs in a process of its own), or a simulated "
        "accelerator (simulated: a model that sleeps outside the GIL)",
    )
    parser.add_argument(
        "--per-element-us",
        type=float,
        default=2.0,
        help="simulated: the accelerator's time per element, in microseconds (default 2)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the torch models run (torch, torch-mlp, minilm, mobilenet; default cpu)",
    )
    parser.add_argument(
        "--serial",
        action="store_true",
        help="also run beam-turbo serial (with_batches_in_flight(0)) beside its default, "
        "batches in flight, where this build has it",
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs, one round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the median is shown)")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs=2,
        metavar=("SMALL", "LARGE"),
        help="elements in the small and the large run (default 20,000 and 200,000; on a "
        "cluster, where a job's start-up varies by seconds, take millions)",
    )
    parser.add_argument(
        "--min-work-secs",
        type=float,
        help="on a runner, grow a pipeline's large run until it takes this much longer than "
        "its small run (default 30 on a runner, 0 on the DirectRunner)",
    )
    parser.add_argument(
        "beam_options",
        nargs=argparse.REMAINDER,
        help="Beam pipeline options after --, e.g. -- --runner=PortableRunner "
        "--job_endpoint=localhost:8099 --environment_type=EXTERNAL "
        "--environment_config=localhost:50000 (docs/clusters.md)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if args.framework == "simulated":
        from beam_turbo.bench import simulated

        return simulated.run(args)
    if args.framework in REAL_MODELS:
        from beam_turbo.bench import real_models

        return real_models.bench(args)
    small, large = (4_000, 20_000) if args.quick else (20_000, 200_000)
    if args.sizes:
        small, large = args.sizes
    rounds = 1 if args.quick else args.rounds
    options = [o for o in args.beam_options if o != "--"]
    runner = next((o.split("=", 1)[-1] for o in options if o.startswith("--runner")), None)
    # On a runner, the pipelines run in its SDK workers, which report their peak memory (the
    # floor's too, so that all three pay for the step that reports it) and batch sizes.
    pipelines: tuple[str, ...] = ("floor", "stock", "turbo")
    if args.serial and has_batches_in_flight():
        pipelines += ("turbo-serial",)
    elif args.serial:
        print("(this build has no with_batches_in_flight: beam-turbo is serial, run once)")
    reported = {which: Reported() if runner is not None else None for which in pipelines}
    min_work = args.min_work_secs if args.min_work_secs is not None else 30.0 if runner else 0.0
    with tempfile.TemporaryDirectory() as folder:
        framework = make_framework(args.framework, folder, device=args.device)
        # Rounds take the pipelines in turn, so that the machine's load falls on all alike.
        slopes: dict[str, list[float]] = {which: [] for which in pipelines}
        larges = dict.fromkeys(pipelines, large)
        for _ in range(rounds):
            for which in pipelines:
                slope, larges[which] = per_element_secs(
                    framework, which, small, larges[which], 1, options, reported[which], min_work
                )
                slopes[which].append(slope)
        measured = {which: (statistics.median(slopes[which]), larges[which]) for which in pipelines}
        ideal = measured["floor"][0] + bare_per_element_secs(framework)
    floor, stock, turbo = (measured[which][0] for which in ("floor", "stock", "turbo"))
    goal_ratio, goal_ideal = GOALS[args.framework]
    grown = any(measured[which][1] != large for which in pipelines)
    sizes = f"{small:,} and {large:,} elements"
    if grown:
        sizes = f"{small:,} elements and a large run at least {min_work:g} s longer"
    where = runner or "the DirectRunner"
    on = f" on {args.device}" if args.device != "cpu" else ""
    print(f"end to end on {where}, {args.framework}{on}, slope between {sizes}\n")
    rows = [
        ["floor (identity Map)", f"{1 / floor:,.0f}", "", ""],
        ["ideal (floor + bare model)", f"{1 / ideal:,.0f}", "1.00", ""],
        ["stock Beam RunInference", f"{1 / stock:,.0f}", f"{ideal / stock:.2f}", ""],
        [
            "beam-turbo RunInference",
            f"{1 / turbo:,.0f}",
            f"{ideal / turbo:.2f} (goal >= {goal_ideal})",
            f"{stock / turbo:.2f}x (goal >= {goal_ratio}x)",
        ],
    ]
    if "turbo-serial" in measured:
        serial = measured["turbo-serial"][0]
        rows[-1][0] += ", batches in flight"
        rows.append(
            [
                "beam-turbo RunInference, serial",
                f"{1 / serial:,.0f}",
                f"{ideal / serial:.2f}",
                f"{stock / serial:.2f}x; in flight {serial / turbo:.2f}x serial",
            ]
        )
    headers = ["pipeline", "elements/s", "fraction of ideal", "vs stock"]
    if runner is None:
        print_table(headers, rows)
    else:
        # The ideal's row has no run of its own: its bare model ran in this process.
        on_runner = [(w, reported[w]) for w in pipelines]
        for row, (which, found) in zip([rows[0], *rows[2:]], on_runner, strict=True):
            row += [f"{measured[which][1]:,}", found.batch_sizes() if found else "-"]
        rows[1] += ["", ""]
        print_table([*headers, "large run", "batches: count, mean (max); target"], rows)
        peak = {which: found.peak_mib for which, found in on_runner if found}
        # (The floor's workers, without a model: what Beam's SDK harness itself takes.)
        print(
            f"\npeak resident memory of the SDK worker processes that ran the model (the "
            f"largest, over the large runs): stock {peak['stock']:.0f} MiB, "
            f"beam-turbo {peak['turbo']:.0f} MiB, {peak['turbo'] / peak['stock']:.2f}x "
            f"(no model: {peak['floor']:.0f} MiB); batches as the workers reported them, over "
            "the large runs"
        )
        return 0
    peak = {
        which: peak_resident_mib(args.framework, which, large, args.device)
        for which in ("stock", "turbo")
    }
    print(
        f"\npeak resident memory, one pipeline of {large:,} elements in a fresh process: "
        f"stock {peak['stock']:.0f} MiB, beam-turbo {peak['turbo']:.0f} MiB, "
        f"{peak['turbo'] / peak['stock']:.2f}x (goal <= 1.1x)"
    )
    return 0
