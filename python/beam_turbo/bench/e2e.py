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

from beam_turbo.bench._timing import print_table
from beam_turbo.bench.real_models import REAL_MODELS

CHUNK = 2_000  # elements generated per seed


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


def make_framework(name: str, folder: str, *, tree: bool = False) -> Framework:
    """Build the model on the spot and save it where both handlers load it from: a linear
    model on float32[16] (``sklearn``, ``torch``, ``tensorflow``), or ``torch-mlp``, a
    256-1024-1024-10 ReLU network on float32[256].

    scikit-learn's model is linear, or with ``tree`` a decision tree: a linear model's
    predictions for a row may differ in the last bit with the batch it is in (BLAS kernels
    sum in a different order at different batch sizes); a tree's cannot.
    """
    rng = np.random.default_rng(0)
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
        }

        def bare_torch(batch: torch.Tensor) -> object:
            with torch.no_grad():
                return net(batch)

        return Framework(
            name,
            lambda row: torch.from_numpy(row.copy()),  # its own storage, as a decoded element has
            PytorchModelHandlerTensor(**spec),
            turbo_pytorch.PytorchModelHandlerTensor(**spec),
            bare_torch,
            torch.stack,
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
    worker_peaks: list[float] | None = None,
) -> float:
    """Run one pipeline over ``elements`` generated elements; its wall time in seconds.

    ``which`` is ``stock``, ``turbo`` or ``floor`` (an identity ``Map`` for RunInference).
    With ``worker_peaks``, the largest peak resident memory (MiB) of the SDK worker processes
    that ran the model is appended to it (a runner's workers, not this process).
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
        results = examples | "RunInference" >> transform(handler)
    if worker_peaks is not None:
        results = results | "Peak memory" >> beam.ParDo(_ReportPeakMemory())
    if output is not None:
        _ = results | "Format" >> beam.Map(as_line) | "Write" >> beam.io.WriteToText(output)
    else:
        _ = results | "Count" >> beam.combiners.Count.Globally()
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - start
    if worker_peaks is not None:
        query = MetricsFilter().with_namespace(PEAK_METRIC[0]).with_name(PEAK_METRIC[1])
        peaks = [d.committed.max for d in result.metrics().query(query)["distributions"]]
        worker_peaks.append(max(peaks, default=float("nan")) / 1024)
    return seconds


def read_predictions(prefix: str) -> dict[int, list[float]]:
    """The predictions a pipeline wrote with :func:`run_pipeline`'s ``output``."""
    found: dict[int, list[float]] = {}
    folder, name = os.path.split(prefix)
    for shard in os.listdir(folder):
        if shard.startswith(name):
            with open(os.path.join(folder, shard)) as f:
                for line in f:
                    key, values = line.rstrip("\n").split("\t")
                    found[int(key)] = [float(v) for v in values.split()]
    return found


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
    worker_peaks: list[float] | None = None,
) -> float:
    """Median over rounds of the slope between a small and a large run (seconds/element);
    with ``worker_peaks``, the large runs' SDK worker peak memory (see :func:`run_pipeline`)."""
    slopes = []
    for _ in range(rounds):
        t_small = run_pipeline(framework, which, small, options)
        t_large = run_pipeline(framework, which, large, options, worker_peaks=worker_peaks)
        slopes.append(max(t_large - t_small, 1e-9) / (large - small))
    return statistics.median(slopes)


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
framework_name, which, elements = sys.argv[1], sys.argv[2], int(sys.argv[3])
with tempfile.TemporaryDirectory() as folder:
    e2e.run_pipeline(e2e.make_framework(framework_name, folder), which, elements)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_resident_mib(framework: str, which: str, elements: int) -> float:
    """Peak resident memory (MiB) of a fresh process that runs one pipeline."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, framework, which, str(elements)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout.split()[-1]) / 1024


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--framework",
        choices=sorted([*GOALS, *REAL_MODELS]),
        default="sklearn",
        help="a small model of each framework, or a real model (minilm, mobilenet: "
        "see docs/benchmarks.md; each variant runs in a process of its own)",
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
        "beam_options",
        nargs=argparse.REMAINDER,
        help="Beam pipeline options after --, e.g. -- --runner=PortableRunner "
        "--job_endpoint=localhost:8099 --environment_type=EXTERNAL "
        "--environment_config=localhost:50000 (docs/clusters.md)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if args.framework in REAL_MODELS:
        from beam_turbo.bench import real_models

        return real_models.bench(args)
    small, large = (4_000, 20_000) if args.quick else (20_000, 200_000)
    if args.sizes:
        small, large = args.sizes
    rounds = 1 if args.quick else args.rounds
    options = [o for o in args.beam_options if o != "--"]
    runner = next((o.split("=", 1)[-1] for o in options if o.startswith("--runner")), None)
    # On a runner, the pipelines run in its SDK workers: they report their peak memory (the
    # floor's too, so that all three pay for the step that reports it).
    peaks: dict[str, list[float] | None] = {
        which: [] if runner is not None else None for which in ("floor", "stock", "turbo")
    }
    with tempfile.TemporaryDirectory() as folder:
        framework = make_framework(args.framework, folder)
        floor = per_element_secs(framework, "floor", small, large, rounds, options, peaks["floor"])
        stock = per_element_secs(framework, "stock", small, large, rounds, options, peaks["stock"])
        turbo = per_element_secs(framework, "turbo", small, large, rounds, options, peaks["turbo"])
        ideal = floor + bare_per_element_secs(framework)
    goal_ratio, goal_ideal = GOALS[args.framework]
    print(
        f"end to end on {runner or 'the DirectRunner'}, {args.framework}, "
        f"slope between {small:,} and {large:,} elements\n"
    )
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
    print_table(["pipeline", "elements/s", "fraction of ideal", "vs stock"], rows)
    if runner is not None:
        worker = {which: max(found or [float("nan")]) for which, found in peaks.items()}
        # (The floor's workers, without a model: what Beam's SDK harness itself takes.)
        print(
            f"\npeak resident memory of the SDK worker processes that ran the model (the "
            f"largest, over the {large:,}-element runs): stock {worker['stock']:.0f} MiB, "
            f"beam-turbo {worker['turbo']:.0f} MiB, {worker['turbo'] / worker['stock']:.2f}x "
            f"(no model: {worker['floor']:.0f} MiB)\n"
            "(the ideal's bare model ran in this process)"
        )
        return 0
    peak = {which: peak_resident_mib(args.framework, which, large) for which in ("stock", "turbo")}
    print(
        f"\npeak resident memory, one pipeline of {large:,} elements in a fresh process: "
        f"stock {peak['stock']:.0f} MiB, beam-turbo {peak['turbo']:.0f} MiB, "
        f"{peak['turbo'] / peak['stock']:.2f}x (goal <= 1.1x)"
    )
    return 0
