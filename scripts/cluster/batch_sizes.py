"""Batch sizes on the started cluster (scripts/cluster.sh start flink|spark): what stock Beam's
and beam-turbo's RunInference get, against the bundles the runner cuts and against what the
sizer chooses where nothing cuts (the in-process DirectRunner, one bundle).

    .cluster/worker-venv/bin/python scripts/cluster/batch_sizes.py --elements 20000
    .cluster/worker-venv/bin/python scripts/cluster/batch_sizes.py --streaming  # Flink only

Prints one JSON object per mode: bundle sizes, batch sizes the handlers saw (per worker
process, in order), and Beam's ``BatchElements/batch_size`` and beam-turbo's
``beam_turbo_batch_size`` distributions as the runner reports them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import apache_beam as beam  # noqa: E402
from apache_beam.metrics.metric import MetricsFilter  # noqa: E402
from apache_beam.ml.inference import base  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from tests.cluster import workloads  # noqa: E402
from tests.cluster.conftest import Cluster, running_runner, settings  # noqa: E402

import beam_turbo  # noqa: E402
from beam_turbo.bench.e2e import BATCH_SIZE_METRICS  # noqa: E402


def summary(sizes: list[int]) -> dict[str, Any]:
    if not sizes:
        return {"count": 0}
    return {
        "count": len(sizes),
        "mean": round(statistics.fmean(sizes), 1),
        "median": statistics.median(sizes),
        "max": max(sizes),
    }


def distributions(result: Any) -> dict[str, Any]:
    """Beam's and beam-turbo's batch-size distributions, as the runner reports them."""
    try:
        metrics = result.metrics().query(MetricsFilter())
    except Exception as error:  # a runner that reports no metrics: say so
        return {"error": repr(error)}
    out: dict[str, Any] = {}
    for dist in metrics["distributions"]:
        name = dist.key.metric.name
        if name in BATCH_SIZE_METRICS:
            value = dist.committed or dist.attempted
            label = f"{dist.key.step}:{dist.key.metric.namespace}/{name}"
            out[label] = {
                "count": value.count,
                "mean": round(value.mean, 1) if value.count else None,
                "min": value.min,
                "max": value.max,
            }
    return out


def run(options: list[str], n: int, folder: Path, duration: float | None) -> dict[str, Any]:
    records = folder / "records"
    records.mkdir(parents=True)
    model = workloads.make_sklearn_model(folder)
    rec = str(records)
    # Beam's stateful batching across bundles (keyed state, a timer), for both transforms.
    kwargs = {} if duration is None else {"max_batch_duration_secs": duration}
    start = time.monotonic()
    pipeline = beam.Pipeline(options=PipelineOptions(options))
    rows = (
        pipeline
        | beam.Create(workloads.sklearn_inputs(n))
        | beam.Reshuffle()
        | beam.ParDo(workloads.CountBundles(rec))
    )
    _ = rows | "stock" >> base.RunInference(
        workloads.recorded(workloads.StockSklearn(model, **kwargs), rec, "stock")
    )
    _ = rows | "turbo" >> beam_turbo.RunInference(
        workloads.recorded(workloads.TurboSklearn(model, **kwargs), rec, "turbo")
    )
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.monotonic() - start
    report: dict[str, Any] = {"elements": n, "job_seconds": round(seconds, 1)}
    report["bundles"] = summary([s for _, s in workloads.read_pairs(records / "bundles")])
    for name in ("stock", "turbo"):
        pairs = workloads.read_pairs(records / f"{name}.batches")
        report[f"{name}_batches"] = summary([s for _, s in pairs])
        in_order: dict[int, list[int]] = defaultdict(list)
        for pid, size in pairs:
            in_order[pid].append(size)
        report[f"{name}_batches_per_worker_in_order"] = {
            str(pid): sizes[:40] for pid, sizes in in_order.items()
        }
    report["metrics"] = distributions(result)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=20000)
    parser.add_argument("--streaming", action="store_true", help="Flink's streaming mode")
    parser.add_argument("--max-bundle-size", type=int, help="Flink's --max_bundle_size")
    parser.add_argument(
        "--max-batch-duration-secs", type=float, help="the handlers' max_batch_duration_secs"
    )
    parser.add_argument("--reference", action="store_true", help="also the DirectRunner")
    args = parser.parse_args()
    runner = running_runner()
    if runner is None:
        sys.exit("no cluster is started: scripts/cluster.sh start flink|spark")
    cluster = Cluster(runner, settings())
    extra = ["--streaming"] if args.streaming else []
    if args.max_bundle_size:
        extra.append(f"--max_bundle_size={args.max_bundle_size}")
    modes = {f"{runner}{' streaming' if args.streaming else ''}": cluster.options(*extra)}
    if args.reference:
        modes["DirectRunner, in-process"] = ["--runner=DirectRunner"]
    for mode, options in modes.items():
        with tempfile.TemporaryDirectory(prefix="batch-sizes-") as folder:
            report = {
                "mode": mode,
                "options": options,
                "max_batch_duration_secs": args.max_batch_duration_secs,
                **run(options, args.elements, Path(folder), args.max_batch_duration_secs),
            }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
