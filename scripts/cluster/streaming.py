"""Streaming on the started Flink cluster: ``PeriodicImpulse`` into ``RunInference`` with and
without ``max_batch_duration_secs``, stock Beam's against beam-turbo's. Reports the bundle
sizes, the batch sizes the handler saw, and the latency from each element's timestamp (when
the impulse fired it) to its result.

    .cluster/worker-venv/bin/python scripts/cluster/streaming.py --rate 1000 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import apache_beam as beam  # noqa: E402
from apache_beam.ml.inference import base  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.transforms.periodicsequence import PeriodicImpulse  # noqa: E402
from tests.cluster import workloads  # noqa: E402
from tests.cluster.conftest import Cluster, running_runner, settings  # noqa: E402

import beam_turbo  # noqa: E402


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {
        "count": len(values),
        "mean": round(statistics.fmean(values), 3),
        "p50": round(ordered[len(ordered) // 2], 3),
        "p90": round(ordered[int(len(ordered) * 0.9)], 3),
        "p99": round(ordered[int(len(ordered) * 0.99)], 3),
        "max": round(ordered[-1], 3),
    }


def run(options: list[str], which: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    records = folder / "records"
    records.mkdir()
    rec = str(records)
    model = workloads.make_sklearn_model(folder)
    kwargs = {}
    if args.max_batch_duration_secs:
        kwargs["max_batch_duration_secs"] = args.max_batch_duration_secs
    if which == "stock":
        transform: Any = base.RunInference(
            workloads.recorded(workloads.StockSklearn(model, **kwargs), rec, which)
        )
    else:
        transform = beam_turbo.RunInference(
            workloads.recorded(workloads.TurboSklearn(model, **kwargs), rec, which)
        )
    # The first impulse fires after the job has started (25-40 s here): a start inside the
    # start-up would release a backlog at once, and measure the start-up, not the stream.
    start = time.time() + args.start_delay
    pipeline = beam.Pipeline(options=PipelineOptions(options))
    _ = (
        pipeline
        | PeriodicImpulse(
            start_timestamp=start,
            stop_timestamp=start + args.seconds,
            fire_interval=1 / args.rate,
        )
        | beam.Map(workloads.row_at)
        | beam.ParDo(workloads.CountBundles(rec))
        | transform
        | beam.ParDo(workloads.RecordLatency(rec))
    )
    began = time.monotonic()
    pipeline.run().wait_until_finish()
    latencies = [float(text) for text in (records / "latency").read_text().split() if text.strip()]
    return {
        "which": which,
        "job_seconds": round(time.monotonic() - began, 1),
        "bundles": summary([s for _, s in workloads.read_pairs(records / "bundles")]),
        "batches": summary([s for _, s in workloads.read_pairs(records / f"{which}.batches")]),
        "latency_secs": summary(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000, help="elements per second")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-batch-duration-secs", type=float)
    parser.add_argument("--max-bundle-size", type=int)
    parser.add_argument(
        "--max-bundle-time-mills", type=int, help="Flink's bundle time limit, ms (default 1,000)"
    )
    parser.add_argument(
        "--which", nargs="+", default=["stock", "turbo"], choices=["stock", "turbo"]
    )
    parser.add_argument(
        "--start-delay", type=float, default=45, help="seconds from submission to the first impulse"
    )
    args = parser.parse_args()
    if running_runner() != "flink":
        sys.exit("no Flink cluster is started: scripts/cluster.sh start flink")
    extra = ["--streaming"]
    if args.max_bundle_size:
        extra.append(f"--max_bundle_size={args.max_bundle_size}")
    if args.max_bundle_time_mills:
        extra.append(f"--max_bundle_time_mills={args.max_bundle_time_mills}")
    options = Cluster("flink", settings()).options(*extra)
    for which in args.which:
        with tempfile.TemporaryDirectory(prefix="streaming-") as folder:
            report = run(options, which, args, Path(folder))
        report.update(
            rate=args.rate,
            seconds=args.seconds,
            max_batch_duration_secs=args.max_batch_duration_secs,
            max_bundle_size=args.max_bundle_size,
            max_bundle_time_mills=args.max_bundle_time_mills,
        )
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
