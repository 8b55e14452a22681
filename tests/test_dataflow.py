"""Dataflow, as far as it can be checked without Google Cloud: a beam-turbo pipeline translates
for Dataflow Runner v2, and the job that would be submitted stages the beam-turbo wheel.

Beam's ``DataflowRunner`` runs for real up to the service: with ``--dry_run`` it translates the
pipeline (Runner v2's overrides, the Docker environment with the staged artifacts, the
pre-optimization) and builds the ``Job``, and stops before it creates an API client. The test
then runs what the runner runs next, ``DataflowApplicationClient.create_job_description``, which
uploads the artifacts and the pipeline proto to the ``gs://`` staging location and writes the
job's environment (worker pool, packages, SDK container, experiments); only its one GCS upload
method, ``stage_file``, is replaced, by one that keeps the bytes. ``submit_job_description``
(the Dataflow API call) is never called. Nothing may reach the network: no credentials are set
(``--no_auth``), and any Python socket connection or name lookup fails the test.
``scripts/dataflow.sh`` builds the wheel and an overlay venv with ``apache-beam[gcp]`` and runs
this file there (in a namespace without network, where the kernel allows one). See
docs/clusters.md#dataflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2

import beam_turbo
from beam_turbo._dofns.gathering import GatheringDoFn, RunBatches

pytestmark = [pytest.mark.slow, pytest.mark.dataflow]

ROOT = Path(__file__).resolve().parents[1]
STAGING = "gs://beam-turbo-offline/staging"
CUSTOM_IMAGE = "us-docker.pkg.dev/my-project/beam/beam-turbo:0.1.0"
RUNNER_V2_EXPERIMENTS = {
    "use_runner_v2",
    "beam_fn_api",
    "use_unified_worker",
    "use_portable_job_submission",
}


@dataclass
class Translation:
    """What the Dataflow service would receive: the uploads by name, the job's JSON, and the
    pipeline proto as uploaded (``pipeline.pb``)."""

    uploads: dict[str, bytes]
    job: dict[str, Any]
    pipeline: beam_runner_api_pb2.Pipeline

    @property
    def worker_pool(self) -> dict[str, Any]:
        (pool,) = self.job["environment"]["workerPools"]
        return dict(pool)

    def environment(self) -> beam_runner_api_pb2.Environment:
        """The one environment the pipeline's transforms run in."""
        ids = {t.environment_id for t in self.pipeline.components.transforms.values()} - {""}
        (env_id,) = ids
        return self.pipeline.components.environments[env_id]


@pytest.fixture(scope="module")
def apiclient() -> Any:
    """Beam's Dataflow API client module; the tests skip where Google Cloud's libraries are
    missing (imported here, not at collection, so that deselected tests say nothing)."""
    return pytest.importorskip(
        "apache_beam.runners.dataflow.internal.apiclient",
        reason="Google Cloud libraries not installed (apache-beam[gcp]): run scripts/dataflow.sh",
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The beam-turbo wheel: ``BEAM_TURBO_WHEEL`` (scripts/dataflow.sh builds it), or built
    here with maturin as a user builds it."""
    given = os.environ.get("BEAM_TURBO_WHEEL")
    if given:
        return Path(given)
    maturin = shutil.which("maturin") or str(ROOT / ".venv" / "bin" / "maturin")
    if not Path(maturin).exists():
        pytest.skip("no maturin to build the wheel: set BEAM_TURBO_WHEEL")
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [maturin, "build", "--release", "--out", str(out)], cwd=ROOT, check=True, timeout=1800
    )
    (built,) = out.glob("beam_turbo-*.whl")
    return built


@pytest.fixture
def model_uri(tmp_path: Path) -> str:
    from sklearn.linear_model import LinearRegression

    model = LinearRegression().fit(np.arange(8.0).reshape(4, 2), np.arange(4.0))
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    return str(path)


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No credentials, Beam's temporary files under tmp_path, and every Python socket
    connection or name lookup refused and recorded (the test asserts there were none)."""
    attempts: list[str] = []

    def refuse(what: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{what}{args[1:] if what == 'connect' else args}")
            raise OSError(f"network refused by the test: {what}")

        return refused

    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family == socket.AF_UNIX:
            real_connect(sock, address)
        else:
            refuse("connect")(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "gethostbyname", refuse("gethostbyname"))
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    # Beam's stager writes extra_packages.txt and the like into tempfile.mkdtemp() and leaves it.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return attempts


def translate(
    build: Callable[[beam.Pipeline], None],
    *options: str,
    apiclient: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> Translation:
    """Translate for Dataflow and describe the job, as ``DataflowRunner`` does, without
    submitting it; the GCS uploads are kept instead of sent."""
    pipeline = beam.Pipeline(
        options=PipelineOptions(
            [
                "--runner=DataflowRunner",
                "--project=beam-turbo-offline",
                "--region=us-central1",
                "--job_name=beam-turbo-dataflow-check",
                f"--temp_location={STAGING}",
                "--experiments=use_runner_v2",
                "--sdk_location=container",
                "--no_auth",
                "--dry_run=True",
                *options,
            ]
        )
    )
    build(pipeline)
    job = pipeline.run().job  # --dry_run: the Job the runner would submit, nothing staged

    uploads: dict[str, bytes] = {}

    def stage_file(
        self: Any, gcs_or_local_path: str, file_name: str, stream: Any, *args: Any, **kw: Any
    ) -> None:
        assert gcs_or_local_path.startswith(f"{STAGING}/beam-turbo-dataflow-check.")
        uploads[file_name] = stream.read()

    monkeypatch.setattr(apiclient.DataflowApplicationClient, "stage_file", stage_file)
    client = apiclient.DataflowApplicationClient(job.options, job.root_staging_location)
    client.create_job_description(job)
    staged = beam_runner_api_pb2.Pipeline.FromString(uploads["pipeline.pb"])
    return Translation(uploads=uploads, job=json.loads(job.json()), pipeline=staged)


def fused_dofn(pipeline: beam_runner_api_pb2.Pipeline) -> Any:
    """The DoFn of the pipeline's one ``BeamML_RunInference`` step, unpickled as a worker
    unpickles it; and the step is one DoFn (no ``BatchElements`` before it)."""
    transforms = pipeline.components.transforms.values()
    (step,) = [t for t in transforms if t.unique_name.endswith("/BeamML_RunInference")]
    assert step.spec.urn == common_urns.primitives.PAR_DO.urn
    assert not [t.unique_name for t in transforms if "BatchElements" in t.unique_name]
    do_fn = beam_runner_api_pb2.ParDoPayload.FromString(step.spec.payload).do_fn
    assert do_fn.urn == python_urns.PICKLED_DOFN_INFO
    return pickler.loads(do_fn.payload)[0]


def default_image() -> str:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"gcr.io/cloud-dataflow/v1beta3/beam_python{python}_sdk:{beam.__version__}"


def check_runner_v2_job(translation: Translation, image: str) -> None:
    """A batch job for Runner v2, its transforms in the one Docker environment ``image``."""
    environment = translation.job["environment"]
    assert set(environment["experiments"]) >= RUNNER_V2_EXPERIMENTS
    assert environment["version"]["job_type"] == "FNAPI_BATCH"
    assert translation.job["type"] == "JOB_TYPE_BATCH"
    (container,) = translation.worker_pool["sdkHarnessContainerImages"]
    assert container["containerImage"] == image
    assert translation.worker_pool["workerHarnessContainerImage"] == image
    env = translation.environment()
    assert env.urn == common_urns.environments.DOCKER.urn
    assert beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image == image
    assert container["environmentId"] in translation.pipeline.components.environments


def staged_artifacts(translation: Translation) -> dict[str, tuple[str, str]]:
    """The environment's artifacts: staged name -> (URL the workers fetch, its sha256)."""
    artifacts = {}
    for dep in translation.environment().dependencies:
        assert dep.type_urn == common_urns.artifact_types.URL.urn
        assert dep.role_urn == common_urns.artifact_roles.STAGING_TO.urn
        url = beam_runner_api_pb2.ArtifactUrlPayload.FromString(dep.type_payload)
        role = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload)
        artifacts[role.staged_name] = (url.url, url.sha256)
    return artifacts


@pytest.mark.parametrize("how", ["import", "patch"])
def test_pipeline_translates_for_runner_v2_with_the_wheel_staged(
    how: str,
    apiclient: Any,
    wheel: Path,
    model_uri: str,
    offline: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from apache_beam.ml.inference import base, sklearn_inference

    from beam_turbo.sklearn import SklearnModelHandlerNumpy

    def build(p: beam.Pipeline) -> None:
        if how == "import":
            inference = beam_turbo.RunInference(SklearnModelHandlerNumpy(model_uri=model_uri))
        else:  # the pipeline's code names only Beam's classes
            beam_turbo.patch()
            try:
                handler = sklearn_inference.SklearnModelHandlerNumpy(model_uri=model_uri)
                inference = base.RunInference(handler)
            finally:
                beam_turbo.unpatch()
        examples = [np.array([1.0, 2.0]), np.array([3.0, 4.0])]
        _ = p | beam.Create(examples) | inference | beam.Map(print)

    translation = translate(
        build, f"--extra_packages={wheel}", apiclient=apiclient, monkeypatch=monkeypatch
    )

    # (a) beam-turbo's fused DoFn, with its scikit-learn handler, is the inference step.
    dofn = fused_dofn(translation.pipeline)
    assert type(dofn) is GatheringDoFn
    assert type(dofn._action) is RunBatches
    handler = dofn._action._handler
    assert type(handler) is SklearnModelHandlerNumpy
    assert handler._model_uri == model_uri

    # (b) The wheel is uploaded byte for byte, listed for the workers' boot program to install
    # (extra_packages.txt), and is an artifact of the environment, fetched from staging.
    assert wheel.name.startswith(f"beam_turbo-{beam_turbo.__version__}-")
    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert hashlib.sha256(translation.uploads[wheel.name]).hexdigest() == sha256
    assert translation.uploads["extra_packages.txt"].decode().split() == [wheel.name]
    artifacts = staged_artifacts(translation)
    url, staged_sha256 = artifacts[wheel.name]
    assert url.startswith(f"{STAGING}/")
    assert url.endswith(f"/{wheel.name}")
    assert staged_sha256 == sha256
    assert "extra_packages.txt" in artifacts
    packages = {package["name"] for package in translation.worker_pool["packages"]}
    assert packages == set(artifacts)

    # (c) Runner v2, Beam's default SDK container for this Python and Beam.
    check_runner_v2_job(translation, default_image())
    assert offline == []


def test_custom_sdk_container_stages_no_wheel(
    apiclient: Any, model_uri: str, offline: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container with beam-turbo installed: the job names it, and stages no package."""
    from beam_turbo.sklearn import SklearnModelHandlerNumpy

    def build(p: beam.Pipeline) -> None:
        handler = SklearnModelHandlerNumpy(model_uri=model_uri)
        _ = p | beam.Create([np.array([1.0, 2.0])]) | beam_turbo.RunInference(handler)

    translation = translate(
        build, f"--sdk_container_image={CUSTOM_IMAGE}", apiclient=apiclient, monkeypatch=monkeypatch
    )
    assert type(fused_dofn(translation.pipeline)) is GatheringDoFn
    check_runner_v2_job(translation, CUSTOM_IMAGE)
    assert not [name for name in translation.uploads if name.endswith(".whl")]
    assert "extra_packages.txt" not in translation.uploads
    assert offline == []
