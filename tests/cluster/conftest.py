"""The cluster the tests in this folder run on: a Flink or a Spark cluster on loopback, started
by ``scripts/cluster.sh`` (see docs/clusters.md).

A test asks for ``cluster``, a session fixture parametrized by runner. It uses the cluster of
that runner when one is started; with ``BEAM_TURBO_CLUSTER_START=1`` it starts it (and stops
it after the last test that needs it, so Flink and Spark never run together); otherwise the
test is skipped, saying how to start one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster.sh"
RUNNERS = ("flink", "spark")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: needs a Flink or Spark cluster (scripts/cluster.sh); skipped without"
    )


@dataclass(frozen=True)
class Cluster:
    """A started cluster, and the pipeline options that submit to it."""

    runner: str
    settings: dict[str, str]

    @property
    def run_dir(self) -> Path:
        return Path(self.settings["BEAM_TURBO_CLUSTER_RUN_DIR"])

    @property
    def job_server_log(self) -> Path:
        """The log of ``scripts/cluster.sh``'s job server (on Spark, the driver's)."""
        return self.run_dir.parent / "log" / "job-server.out"

    def options(self, *extra: str) -> list[str]:
        """Beam's PortableRunner, Beam's job server for this engine, SDK workers from the
        worker pool (its processes run the beam-turbo wheel)."""
        options = [
            "--runner=PortableRunner",
            f"--job_endpoint={self.settings['BEAM_TURBO_JOB_ENDPOINT']}",
            "--environment_type=EXTERNAL",
            f"--environment_config={self.settings['BEAM_TURBO_WORKER_POOL']}",
        ]
        if self.runner == "flink":
            options.append("--parallelism=2")
        return [*options, *extra]


#: A job not finished in this long is cancelled and run once more; every job here runs through
#: ``run_job``. Spark jobs have waited for ever after a task failed and was retried (Beam's
#: worker pool killed an SDK harness another executor was using: docs/clusters.md, "A Spark job
#: that never ends"); the jobs take 1-3 min.
JOB_DEADLINE_SECS = 480


def run_job(
    options: Sequence[str],
    build: Callable[[beam.Pipeline], None],
    outputs: Sequence[Path],
    cluster: Cluster | None = None,
) -> None:
    """Build a pipeline with ``build`` and run it to the end; a job past
    ``JOB_DEADLINE_SECS`` is cancelled, its ``outputs`` (folders) removed, and run once more.
    A job that fails, or misses the deadline twice, fails the test. On ``cluster``'s job
    server on Spark, so does a task that failed on the way: Spark retries it and the job ends
    done, but a retried task has waited for ever (docs/clusters.md), and only the driver's log
    tells."""
    log = cluster.job_server_log if cluster is not None and cluster.runner == "spark" else None
    for attempt in (1, 2):
        logged = log.stat().st_size if log is not None else 0
        pipeline = beam.Pipeline(options=PipelineOptions(list(options)))
        build(pipeline)
        result = pipeline.run()
        state = result.wait_until_finish(duration=JOB_DEADLINE_SECS * 1000)
        if state == PipelineState.DONE:
            if log is not None:
                assert_no_task_failed(log, logged)
            return
        try:
            result.cancel()
        except Exception as error:  # the job server may have given up on it already
            warnings.warn(f"cancelling a job that missed its deadline: {error}", stacklevel=2)
        if attempt == 2:
            pytest.fail(f"the job was {state} after {JOB_DEADLINE_SECS} s, twice")
        warnings.warn(
            f"the job was {state} after {JOB_DEADLINE_SECS} s: cancelled, run once more",
            stacklevel=2,
        )
        for folder in outputs:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)


def assert_no_task_failed(log: Path, offset: int) -> None:
    """No "Lost task" in the Spark driver's ``log`` past ``offset``."""
    with log.open("rb") as file:
        file.seek(offset)
        text = file.read().decode(errors="replace")
    lost = [line for line in text.splitlines() if "Lost task" in line]
    if lost:
        pytest.fail(f"{len(lost)} failed tasks in {log}, the first: {lost[0]}")


def script(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, check=check, timeout=600
    )


def running_runner() -> str | None:
    status = script("status", check=False)
    if status.returncode != 0:
        return None
    first = status.stdout.splitlines()[0]
    if "DEAD" in status.stdout:
        pytest.fail(f"a process of the started cluster died:\n{status.stdout}")
    return first.removeprefix("runner:").strip()


def settings() -> dict[str, str]:
    lines = script("env").stdout.splitlines()
    return dict(text.split("=", 1) for text in lines if "=" in text)


def check_same_beam_turbo() -> None:
    """Pipelines are built here and run on the workers: both must have this checkout's
    beam-turbo (the editable install of this checkout, or the worker venv's wheel), or the
    handlers' pickled state may not match the code that unpickles it."""
    import beam_turbo

    here = Path(beam_turbo.__file__).resolve()
    ours = (ROOT / "python", ROOT / ".cluster" / "worker-venv")
    if not any(here.is_relative_to(folder.resolve()) for folder in ours):
        pytest.fail(
            f"beam_turbo is imported from {here}, not from this checkout ({ROOT}): run the "
            "tests with .cluster/worker-venv/bin/python -m pytest"
        )


@pytest.fixture(scope="session", params=RUNNERS)
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    runner: str = request.param
    running = running_runner()
    start = os.environ.get("BEAM_TURBO_CLUSTER_START") == "1"
    if running != runner and not start:
        how = f"scripts/cluster.sh install && scripts/cluster.sh start {runner}"
        pytest.skip(
            f"no {runner} cluster is started (running: {running or 'none'}); "
            f"run `{how}`, or set BEAM_TURBO_CLUSTER_START=1"
        )
    check_same_beam_turbo()
    if running == runner:
        yield Cluster(runner, settings())
        return
    if running is not None:
        script("stop")
    started = script("start", runner, check=False)
    if started.returncode != 0:
        pytest.fail(f"scripts/cluster.sh start {runner} failed:\n{started.stderr[-4000:]}")
    try:
        yield Cluster(runner, settings())
    finally:
        script("stop")
