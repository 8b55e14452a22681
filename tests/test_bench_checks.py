"""The benchmark smoke runs fail on a wrong result, never on speed: ``bench stack`` and
``bench handlers`` exit 1 when a batch or a result differs from the reference."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy as BeamSklearn
from sklearn.linear_model import LinearRegression

from beam_turbo.bench import handlers as handlers_bench
from beam_turbo.bench import stack as stack_bench
from beam_turbo.sklearn import SklearnModelHandlerNumpy


def test_bench_stack_exits_1_on_a_batch_unlike_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arrays = [np.arange(4.0), np.arange(4.0) + 1]
    right = stack_bench.Case(
        "2 x float64[4]", lambda: np.stack(arrays), "numpy.stack", lambda: np.stack(arrays), 99.0
    )
    wrong = stack_bench.Case(
        "2 x float64[4]",
        lambda: np.stack(arrays[::-1]),
        "numpy.stack",
        lambda: np.stack(arrays),
        0.0,
    )
    args = argparse.Namespace(quick=True)
    monkeypatch.setattr(stack_bench, "resident_growth", lambda calls: (0.0, 0.0))
    monkeypatch.setattr(stack_bench, "cases", lambda quick: [right])
    assert stack_bench.run(args) == 0  # its goal of 99x is missed: speed does not fail it
    monkeypatch.setattr(stack_bench, "cases", lambda quick: [right, wrong])
    assert stack_bench.run(args) == 1


def test_stack_reference_checks_dtype_shape_values_and_pads() -> None:
    same = stack_bench._difference
    assert same(np.zeros(3, np.float32), np.zeros(3, np.float32)) is None
    assert "float64" in str(same(np.zeros(3), np.zeros(3, np.float32)))
    assert "[3]" in str(same(np.zeros(3), np.zeros((3, 1))))
    assert "differ at 2" in str(same(np.array([0, 1, 2]), np.array([0, 1, 3])))
    batch, shapes = np.zeros((2, 3)), np.array([[3], [2]])
    assert same((batch, shapes), (batch, shapes)) is None
    assert same((batch, shapes), (batch, np.array([[3], [3]]))) is not None


def test_bench_handlers_names_a_result_unlike_beams(tmp_path: Path) -> None:
    path = os.path.join(tmp_path, "linear.pkl")
    with open(path, "wb") as f:
        pickle.dump(LinearRegression().fit([[0.0], [1.0]], [0.0, 2.0]), f)
    batch = [np.array([float(i)]) for i in range(4)]

    def off_by_one(model: Any, rows: Any, inference_args: Any = None) -> Any:
        return model.predict(np.stack(rows)) + 1

    def case(ours: Any) -> handlers_bench.Case:
        return handlers_bench.Case("sklearn", BeamSklearn(path), ours, batch, lambda: None, 1.0)

    right, wrong = (
        case(SklearnModelHandlerNumpy(path)),
        case(SklearnModelHandlerNumpy(path, inference_fn=off_by_one)),
    )
    model = right.beam.load_model()
    assert handlers_bench.difference(right, model, model) is None
    assert "result 0 is" in str(handlers_bench.difference(wrong, model, model))


def test_bench_e2e_simulated_exits_1_on_a_result_paired_with_another_element(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from beam_turbo.bench import simulated

    free = simulated.Variant("free", "free", "turbo", 0.0)
    assert simulated.check([free], simulated.CHUNK)  # the model gives each element back

    def shifted(self: simulated.SimulatedModel, batch: Any) -> Any:
        return [*batch[1:], *batch[:1]]  # each result paired with the next element

    monkeypatch.setattr(simulated.SimulatedModel, "__call__", shifted)
    monkeypatch.setattr(
        simulated, "variants", lambda secs: [simulated.Variant("floor", "", "floor"), free]
    )
    args = argparse.Namespace(quick=True, sizes=[2_000, 4_000], rounds=1, per_element_us=0.0)
    assert simulated.run(args) == 1
    found = capsys.readouterr()
    assert "WRONG RESULT: free: element" in found.err
    assert "is not its input" in found.err


def test_the_simulated_check_names_lost_and_extra_results() -> None:
    from beam_turbo.bench import simulated

    found = {key: [float(v) for v in row] for key, row in simulated.generate(0, keyed=True)}
    assert simulated.wrong_results(dict(found), simulated.CHUNK) == []
    del found[7]
    found[simulated.CHUNK] = [0.0]
    assert simulated.wrong_results(found, simulated.CHUNK) == [
        "element 7: no result",
        f"element {simulated.CHUNK}: a result for no input",
    ]
