"""Beam's SDK worker pool (``apache_beam.runners.worker.worker_pool_main``) for a cluster whose
workers share one pool: each worker process is stopped only by the runner process that started it.

Beam's pool keeps its worker processes by worker id alone, but the ids are counters of each runner
process (Spark executor, Flink TaskManager): two executors both ask for worker "3-1", and when
one stops its "3-1" the pool kills whichever "3-1" it started last, the other executor's too, in
the middle of a task (``CANCELLED: client cancelled``). Spark's runner stops workers at the end
of each stage, so on Spark that happened in most jobs; the retried task has waited for ever
(docs/clusters.md, "A Spark job that never ends"). Here a process is kept by the gRPC peer that
started it and its id: a runner starts and stops a worker over the same channel
(``ExternalEnvironmentFactory``), so the peer is the same connection.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from apache_beam.portability.api import beam_fn_api_pb2
from apache_beam.runners.worker import worker_pool_main as beam_pool

_LOGGER = logging.getLogger("beam_turbo.worker_pool")


class PerPeerWorkerPool(beam_pool.BeamFnExternalWorkerPoolServicer):  # type: ignore[misc]
    """Beam's servicer (process workers), its processes kept by (peer, worker id)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()

    def StartWorker(  # noqa: N802 (gRPC's method name)
        self, request: beam_fn_api_pb2.StartWorkerRequest, context: Any
    ) -> beam_fn_api_pb2.StartWorkerResponse:
        with self._lock:  # Beam's servicer files the process under the bare id: move it
            response = super().StartWorker(request, context)
            process = self._worker_processes.pop(request.worker_id, None)
            if process is not None:
                self._worker_processes[(context.peer(), request.worker_id)] = process
        return response

    def StopWorker(  # noqa: N802
        self, request: beam_fn_api_pb2.StopWorkerRequest, context: Any
    ) -> beam_fn_api_pb2.StopWorkerResponse:
        key = (context.peer(), request.worker_id)
        with self._lock:
            process = self._worker_processes.pop(key, None)
        if process is None:
            _LOGGER.warning("no worker %s started by %s to stop", request.worker_id, key[0])
        else:
            _LOGGER.info("stopping worker %s of %s", request.worker_id, key[0])
            beam_pool.kill_process_gracefully(process)
        return beam_fn_api_pb2.StopWorkerResponse()


if __name__ == "__main__":
    # Beam's main, with its servicer class (main looks the name up when it runs).
    beam_pool.BeamFnExternalWorkerPoolServicer = PerPeerWorkerPool
    beam_pool.main(sys.argv)
