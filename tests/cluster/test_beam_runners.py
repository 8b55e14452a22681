"""Beam's own ``FlinkRunner`` and ``SparkRunner``, as a user runs them: the runner starts the job
server itself from ``--flink_job_server_jar`` / ``--spark_job_server_jar`` (the launcher jar
``scripts/cluster.sh install`` assembles) and submits to the cluster's master."""

from __future__ import annotations

import pickle
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest

import beam_turbo
from beam_turbo import sklearn as turbo_sklearn
from tests.cluster import workloads
from tests.cluster.conftest import Cluster, run_job

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

N = 500


def runner_options(cluster: Cluster) -> list[str]:
    s = cluster.settings
    worker_pool = [
        "--environment_type=EXTERNAL",
        f"--environment_config={s['BEAM_TURBO_WORKER_POOL']}",
    ]
    if cluster.runner == "flink":
        return [
            "--runner=FlinkRunner",
            f"--flink_master={s['BEAM_TURBO_FLINK_REST'].removeprefix('http://')}",
            f"--flink_job_server_jar={s['BEAM_TURBO_FLINK_JOB_SERVER_JAR']}",
            "--parallelism=2",
            *worker_pool,
        ]
    assert s["BEAM_TURBO_SPARK_JOB_SERVER_PROPERTY"], "scripts/cluster.sh env: no Guava jar"
    return [
        "--runner=SparkRunner",
        f"--spark_master_url={s['BEAM_TURBO_SPARK_MASTER']}",
        f"--spark_job_server_jar={s['BEAM_TURBO_SPARK_JOB_SERVER_JAR']}",
        f"--job_server_jvm_property={s['BEAM_TURBO_SPARK_JOB_SERVER_PROPERTY']}",
        *worker_pool,
    ]


def test_beams_runner_starts_the_job_server_from_the_jar(cluster: Cluster, tmp_path: Path) -> None:
    model = workloads.make_sklearn_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    prefix = str(out / "lines")

    def build(pipeline: beam.Pipeline) -> None:
        _ = (
            pipeline
            | beam.Create(workloads.sklearn_inputs(N))
            | beam_turbo.RunInference(turbo_sklearn.SklearnModelHandlerNumpy(model))
            | workloads.to_line("turbo")
            | beam.io.WriteToText(prefix)
        )

    run_job(runner_options(cluster), build, [out])
    got = dict(workloads.read_output(prefix)["turbo"])
    assert sorted(got) == list(range(N))
    local = pickle.loads(Path(model).read_bytes()).predict(np.stack(workloads.sklearn_inputs(N)))
    np.testing.assert_allclose([got[i][0] for i in range(N)], local, rtol=1e-9)
