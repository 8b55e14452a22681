"""beam-turbo on real Flink and Spark clusters: results equal stock Beam's RunInference on the
same cluster, element by element; dead letters; keyed models; one model load per SDK worker
process; the workers run the installed wheel; batch sizes against bundle sizes.

One pipeline per cluster holds every branch (a job costs tens of seconds on these engines);
each test checks one part of its output.
"""

from __future__ import annotations

import json
import pickle
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cluster import workloads
from tests.cluster.conftest import ROOT, Cluster, run_job

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

N = 3000


@dataclass
class Run:
    cluster: Cluster
    paths: workloads.Paths
    output: dict[str, list[tuple[int, Any]]]
    seconds: float

    def records(self, name: str) -> Path:
        return Path(self.paths.record_dir) / name


@pytest.fixture(scope="session")
def conformance(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Run:
    folder = tmp_path_factory.mktemp(f"conformance-{cluster.runner}")
    records = folder / "records"
    records.mkdir()
    paths = workloads.Paths(
        sklearn_model=workloads.make_sklearn_model(folder),
        torch_model=workloads.make_torch_model(folder),
        record_dir=str(records),
        output_prefix=str(folder / "out" / "lines"),
    )
    start = time.monotonic()
    run_job(
        cluster.options(),
        lambda pipeline: workloads.build_conformance(pipeline, paths, N),
        [records, Path(paths.output_prefix).parent],
        cluster,
    )
    seconds = time.monotonic() - start
    return Run(cluster, paths, workloads.read_output(paths.output_prefix), seconds)


def by_index(pairs: list[tuple[int, Any]]) -> dict[int, Any]:
    """The payloads by element index; every index once."""
    counts = Counter(index for index, _ in pairs)
    duplicated = [index for index, count in counts.items() if count > 1]
    assert not duplicated, f"elements output more than once: {duplicated[:10]}"
    return dict(pairs)


def assert_same_results(run: Run, stock: str, turbo: str, rtol: float) -> None:
    expected, actual = by_index(run.output[stock]), by_index(run.output[turbo])
    assert sorted(expected) == list(range(N)), f"{stock}: not every element has a result"
    assert sorted(actual) == list(range(N)), f"{turbo}: not every element has a result"
    for index in range(N):
        np.testing.assert_allclose(
            actual[index], expected[index], rtol=rtol, err_msg=f"element {index}"
        )


def test_sklearn_results_equal_stock_beams(conformance: Run) -> None:
    assert_same_results(conformance, "sk_stock", "sk_turbo", rtol=1e-9)
    model = pickle.loads(Path(conformance.paths.sklearn_model).read_bytes())
    local = model.predict(np.stack(workloads.sklearn_inputs(N)))
    turbo = by_index(conformance.output["sk_turbo"])
    np.testing.assert_allclose([turbo[i][0] for i in range(N)], local, rtol=1e-9)


def test_stateful_batching_results_equal_stock_beams(conformance: Run) -> None:
    """``max_batch_duration_secs``: batches kept in keyed state across bundles (Beam's
    stateful ``BatchElements``; beam-turbo's stateful fused DoFn), each element in one batch."""
    assert_same_results(conformance, "sk_stateful_stock", "sk_stateful_turbo", rtol=1e-9)
    ran = workloads.read_pairs(conformance.records("sk_stateful_turbo.batches"))
    assert sum(size for _, size in ran) == N


def test_torch_results_equal_stock_beams(conformance: Run) -> None:
    assert_same_results(conformance, "torch_stock", "torch_turbo", rtol=1e-5)


def test_keyed_results_equal_stock_beams(conformance: Run) -> None:
    stock, turbo = (
        by_index(conformance.output["keyed_stock"]),
        by_index(conformance.output["keyed_turbo"]),
    )
    assert sorted(turbo) == sorted(stock) == list(range(N))
    for index in range(N):
        assert turbo[index][0] == stock[index][0] == f"k{index % 7}"
        np.testing.assert_allclose(turbo[index][1:], stock[index][1:], rtol=1e-9)


@pytest.mark.parametrize("branch", ["dlq_stock", "dlq_turbo", "dlq_isolated"])
def test_dead_letters_hold_what_failed_and_nothing_is_lost(conformance: Run, branch: str) -> None:
    good = by_index(conformance.output.get(branch + "_good", []))
    dead = by_index(conformance.output.get(branch + "_dead", []))
    marked = {i for i in range(N) if workloads.is_marked(i)}
    assert not set(good) & set(dead), "an element both gave a result and was dead-lettered"
    assert sorted([*good, *dead]) == list(range(N)), "elements lost"
    assert marked <= set(dead), "a failing element gave a result"
    if branch == "dlq_isolated":
        assert set(dead) == marked, "isolation dead-lettered elements that do not fail"
    assert all("is marked bad" in str(dead[i]) for i in marked)
    reference = by_index(conformance.output["sk_stock"])
    for index, payload in good.items():
        np.testing.assert_allclose(payload, reference[index], rtol=1e-9)


def test_each_worker_process_loads_each_model_once(conformance: Run) -> None:
    batches = workloads.read_pairs(conformance.records("sk_turbo.batches"))
    workers = {pid for pid, _ in batches}
    assert workers, "no batch was recorded"
    for name in ("sk_turbo", "torch_turbo"):
        loads = workloads.loads_per_pid(conformance.records(name + ".loads"))
        ran = {pid for pid, _ in workloads.read_pairs(conformance.records(name + ".batches"))}
        assert ran <= set(loads), f"{name}: a process ran batches without loading"
        assert all(count == 1 for count in loads.values()), f"{name}: loads per process {loads}"


def test_workers_run_the_installed_wheel(conformance: Run) -> None:
    where = [payload for _, payload in conformance.output["where"]]
    assert len(where) == 8
    for module_file, executable in where:
        assert "site-packages" in module_file, f"beam-turbo on the worker is {module_file}"
        assert not module_file.startswith(str(ROOT / "python")), module_file
        assert executable.startswith(str(ROOT / ".cluster" / "worker-venv")), executable


def test_batches_never_cross_a_bundle(conformance: Run) -> None:
    """Measures what beam-turbo's batching gets on the runner, and records it beside the run
    (``batch-sizes.json``, the figures docs/clusters.md reports)."""
    bundles = [size for _, size in workloads.read_pairs(conformance.records("bundles"))]
    turbo = [size for _, size in workloads.read_pairs(conformance.records("sk_turbo.batches"))]
    stock = [size for _, size in workloads.read_pairs(conformance.records("sk_stock.batches"))]
    assert sum(bundles) == N
    assert sum(turbo) == N, "every element is in exactly one of beam-turbo's batches"
    assert sum(stock) == N
    assert max(turbo) <= max(bundles), "a batch larger than any bundle"

    def summary(sizes: list[int]) -> dict[str, float]:
        return {
            "count": len(sizes),
            "mean": round(statistics.fmean(sizes), 1),
            "median": statistics.median(sizes),
            "max": max(sizes),
        }

    figures = {
        "runner": conformance.cluster.runner,
        "elements": N,
        "job_seconds": round(conformance.seconds, 1),
        "bundles": summary(bundles),
        "turbo_batches": summary(turbo),
        "stock_batches": summary(stock),
    }
    (conformance.cluster.run_dir / f"batch-sizes-{conformance.cluster.runner}.json").write_text(
        json.dumps(figures, indent=1)
    )
    print(json.dumps(figures))
