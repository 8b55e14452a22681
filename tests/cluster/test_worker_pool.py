"""The clusters' SDK worker pool (``scripts/cluster/worker_pool.py``): two runner processes that
ask for the same worker id each stop their own worker. Beam's pool, which keeps its workers by
id alone, fails this test; it needs no cluster (a real gRPC server, real worker processes)."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest
from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc, endpoints_pb2

from tests.cluster.conftest import ROOT


def _pool_module() -> Any:
    path = ROOT / "scripts" / "cluster" / "worker_pool.py"
    spec = importlib.util.spec_from_file_location("beam_turbo_cluster_worker_pool", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, int]]:
    # The pool starts workers as `python -c ...`: this interpreter's.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    servicer = _pool_module().PerPeerWorkerPool(use_process=True)
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(servicer, server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        yield servicer, port
    finally:
        for process in servicer._worker_processes.values():
            process.kill()
            process.wait()
        server.stop(0)


def test_each_runner_stops_its_own_worker_of_a_shared_id(pool: tuple[Any, int]) -> None:
    servicer, port = pool
    # Two runner processes: two connections (a channel each, not sharing one connection).
    channels = [
        grpc.insecure_channel(f"localhost:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(2)
    ]
    runners = [beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolStub(channel) for channel in channels]
    # Each runner's own control server; nothing listens there, so the workers wait.
    for runner, control_port in zip(runners, (1, 2), strict=True):
        start = beam_fn_api_pb2.StartWorkerRequest(
            worker_id="3-1",
            control_endpoint=endpoints_pb2.ApiServiceDescriptor(url=f"localhost:{control_port}"),
        )
        assert not runner.StartWorker(start).error
    workers = list(servicer._worker_processes.values())
    assert len(workers) == 2, "both runners' worker 3-1 are kept"

    runners[0].StopWorker(beam_fn_api_pb2.StopWorkerRequest(worker_id="3-1"))
    (other,) = servicer._worker_processes.values()
    assert other.poll() is None, "the other runner's worker 3-1 was stopped"
    (stopped,) = (worker for worker in workers if worker is not other)
    assert stopped.poll() is not None, "the first runner's worker 3-1 still runs"

    runners[1].StopWorker(beam_fn_api_pb2.StopWorkerRequest(worker_id="3-1"))
    assert not servicer._worker_processes
    assert other.poll() is not None
    for channel in channels:
        channel.close()
