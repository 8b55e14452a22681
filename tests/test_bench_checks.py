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
