"""Streaming on the Flink cluster (``--streaming``): ``PeriodicImpulse`` into beam-turbo's
``RunInference`` with ``max_batch_duration_secs``, which gathers batches across bundles in keyed
state (``beam_turbo._streaming``). Every impulse gives one result, the model's; batches hold
many bundles. The latencies and batch sizes it records are figures, not checks (this machine
is shared): ``scripts/cluster/streaming.py`` measures them against stock Beam's."""

from __future__ import annotations

import json
import pickle
import statistics
import time
from collections import Counter
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.transforms.periodicsequence import PeriodicImpulse

import beam_turbo
from tests.cluster import workloads
from tests.cluster.conftest import Cluster, run_job

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

RATE = 200  # impulses a second
SECONDS = 15
#: The first impulse fires this long after submission, past most of the job's start-up.
START_DELAY = 30


def test_streaming_batches_span_bundles_and_every_impulse_gives_one_result(
    cluster: Cluster, tmp_path: Path
) -> None:
    if cluster.runner != "flink":
        pytest.skip(
            "streaming is checked on Flink: Beam's portable Spark runner keeps user state in "
            "memory for one run of a stage (InMemoryBagUserStateFactory), not across bundles"
        )
    records = tmp_path / "records"
    records.mkdir()
    rec = str(records)
    model_path = workloads.make_sklearn_model(tmp_path)
    handler = workloads.recorded(
        workloads.TurboSklearn(model_path, max_batch_duration_secs=1), rec, "turbo"
    )
    start = time.time() + START_DELAY
    options = cluster.options("--streaming", "--max_bundle_time_mills=100")

    def build(pipeline: beam.Pipeline) -> None:
        _ = (
            pipeline
            | PeriodicImpulse(
                start_timestamp=start, stop_timestamp=start + SECONDS, fire_interval=1 / RATE
            )
            | beam.Map(workloads.ImpulseRow(start, RATE))
            | beam.ParDo(workloads.CountBundles(rec))
            | beam_turbo.RunInference(handler)
            | beam.ParDo(workloads.RecordResults(rec, "turbo"))
        )

    run_job(options, build, [records])
    lines = [line.split() for line in (records / "turbo.results").read_text().splitlines()]
    counts = Counter(int(index) for index, _, _ in lines)
    assert sorted(counts) == list(range(RATE * SECONDS)), "an impulse without a result"
    assert max(counts.values()) == 1, "an impulse with two results"

    model = pickle.loads(Path(model_path).read_bytes())
    rows = {int(index): (float(value), float(latency)) for index, value, latency in lines}
    row_at = workloads.ImpulseRow(start, RATE)
    expected = model.predict(np.stack([row_at(start + i / RATE) for i in range(RATE * SECONDS)]))
    np.testing.assert_allclose([rows[i][0] for i in range(RATE * SECONDS)], expected, rtol=1e-9)

    bundles = [size for _, size in workloads.read_pairs(records / "bundles")]
    batches = [size for _, size in workloads.read_pairs(records / "turbo.batches")]
    assert sum(batches) == RATE * SECONDS, "every impulse in exactly one batch"
    assert max(batches) > max(bundles), "no batch spans bundles"

    latencies = sorted(latency for _, latency in rows.values())
    figures = {
        "rate": RATE,
        "seconds": SECONDS,
        "bundles": {"count": len(bundles), "median": statistics.median(bundles)},
        "batches": {"count": len(batches), "median": statistics.median(batches)},
        "latency_p50": latencies[len(latencies) // 2],
        "latency_p99": latencies[int(len(latencies) * 0.99)],
    }
    (cluster.run_dir / "streaming-flink.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))
