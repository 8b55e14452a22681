"""A TaskManager dies in the middle of a batch job: Flink's restart strategy (fixed delay, in
scripts/cluster/flink-config.yaml) runs the job again on the TaskManager left, and the output
holds every element exactly once."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

import beam_turbo
from tests.cluster import workloads
from tests.cluster.conftest import Cluster, script

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

N = 4000
#: Each element costs this much inference time, so that the job runs long enough to be hit.
SECONDS_PER_ELEMENT = 0.006


def flink_rest(cluster: Cluster, path: str) -> Any:
    url = cluster.settings["BEAM_TURBO_FLINK_REST"] + path
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def taskmanager_running(cluster: Cluster) -> str:
    """The resource id of a TaskManager running a task of the running job, inference first."""
    (jid,) = [
        j["jid"] for j in flink_rest(cluster, "/jobs/overview")["jobs"] if j["state"] == "RUNNING"
    ]
    vertices = flink_rest(cluster, f"/jobs/{jid}")["vertices"]
    vertices.sort(key=lambda vertex: "RunInference" not in vertex["name"])
    for vertex in vertices:
        path = f"/jobs/{jid}/vertices/{vertex['id']}/taskmanagers"
        for tm in flink_rest(cluster, path)["taskmanagers"]:
            if tm["status"] == "RUNNING":
                return str(tm["taskmanager-id"])
    raise AssertionError("no task of the job is running")


def processed(record: Path) -> int:
    return sum(size for _, size in workloads.read_pairs(record))


def test_taskmanager_killed_mid_job_loses_and_duplicates_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    if cluster.runner != "flink":
        pytest.skip("kills a Flink TaskManager")
    records = tmp_path / "records"
    records.mkdir()
    model = workloads.make_sklearn_model(tmp_path)
    handler = workloads.recorded(workloads.SlowTurboSklearn(model), str(records), "slow")
    handler.seconds_per_element = SECONDS_PER_ELEMENT
    prefix = str(tmp_path / "out" / "indices")
    pipeline = beam.Pipeline(options=PipelineOptions(cluster.options()))
    _ = (
        pipeline
        | beam.Create(workloads.sklearn_inputs(N))
        | beam.Reshuffle()
        | beam_turbo.RunInference(handler)
        | beam.Map(workloads.result_index)
        | beam.io.WriteToText(prefix)
    )
    result = pipeline.run()
    try:
        deadline = time.monotonic() + 240
        while processed(records / "slow.batches") < N // 4:
            assert time.monotonic() < deadline, "the job did not get a quarter through"
            assert not PipelineState.is_terminal(result.state), result.state
            time.sleep(0.2)
        done_before_kill = processed(records / "slow.batches")
        assert done_before_kill < N, "the job finished before the kill"
        killed = script("kill-taskmanager", taskmanager_running(cluster)).stdout.strip()
        state = result.wait_until_finish(duration=300_000)
    finally:
        if not PipelineState.is_terminal(result.state):
            result.cancel()
        script("heal")
    assert state == PipelineState.DONE, f"the job ended {state} after TaskManager {killed} died"

    jobs = flink_rest(cluster, "/jobs/overview")["jobs"]
    job = max(jobs, key=lambda job: job["start-time"])
    history = flink_rest(cluster, f"/jobs/{job['jid']}/exceptions")["exceptionHistory"]["entries"]
    assert history, "Flink recorded no failure: the kill did not hit the job"
    assert processed(records / "slow.batches") > N, "nothing was run again after the kill"

    written = Counter(
        int(text)
        for path in Path(prefix).parent.glob(Path(prefix).name + "*")
        for text in path.read_text().split()
    )
    lost = sorted(set(range(N)) - set(written))
    duplicated = sorted(index for index, count in written.items() if count > 1)
    assert not lost, f"lost {len(lost)} elements, e.g. {lost[:10]}"
    assert not duplicated, f"duplicated {len(duplicated)} elements, e.g. {duplicated[:10]}"
    assert sum(written.values()) == N
    print(
        json.dumps(
            {
                "killed_taskmanager": killed,
                "processed_before_kill": done_before_kill,
                "processed_in_all": processed(records / "slow.batches"),
                "restarts_recorded": len(history),
                "first_failure": history[0]["exceptionName"],
                "written": sum(written.values()),
            }
        )
    )
