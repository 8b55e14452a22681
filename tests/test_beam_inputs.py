"""Every input Beam's handlers accept, beam-turbo's accept, with Beam's results.

Batches are drawn from what Beam's handlers take: numpy arrays of mixed dtypes (numpy promotes),
lists and tuples of numbers, torch tensors of mixed dtypes (torch promotes), and now and then
an element of another length, which Beam refuses: then ours must refuse it with the same
exception type. The fast path takes the common case; everything else falls back to Beam's
own conversion, and these tests hold the two to the same results.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from apache_beam.ml.inference import pytorch_inference as beam_pytorch
from apache_beam.ml.inference import sklearn_inference as beam_sklearn
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LinearRegression

from beam_turbo.pytorch import PytorchModelHandlerKeyedTensor, PytorchModelHandlerTensor
from beam_turbo.sklearn import SklearnModelHandlerNumpy

FEATURES = 3
NUMPY_DTYPES = [np.int32, np.int64, np.float32, np.float64]
TORCH_DTYPES = [torch.int32, torch.int64, torch.float32, torch.float64]


@st.composite
def numpy_like(draw: st.DrawFn, length: int) -> Any:
    """One element as a user hands it to a numpy handler."""
    values = draw(st.lists(st.integers(-100, 100), min_size=length, max_size=length))
    kind = draw(st.sampled_from(["array", "array", "floats", "ints", "tuple"]))
    if kind == "array":
        return np.array(values, dtype=draw(st.sampled_from(NUMPY_DTYPES)))
    if kind == "floats":
        return [v / 4 for v in values]
    return values if kind == "ints" else tuple(values)


@st.composite
def numpy_batches(draw: st.DrawFn) -> list[Any]:
    size = draw(st.integers(1, 12))
    lengths = draw(
        st.lists(st.sampled_from([FEATURES] * 15 + [FEATURES + 1]), min_size=size, max_size=size)
    )
    return [draw(numpy_like(length)) for length in lengths]


@st.composite
def tensor(draw: st.DrawFn, length: int) -> torch.Tensor:
    values = draw(st.lists(st.integers(-100, 100), min_size=length, max_size=length))
    return torch.tensor(values, dtype=draw(st.sampled_from(TORCH_DTYPES)))


@st.composite
def tensor_batches(draw: st.DrawFn) -> list[torch.Tensor]:
    size = draw(st.integers(1, 12))
    lengths = draw(
        st.lists(st.sampled_from([FEATURES] * 15 + [FEATURES + 1]), min_size=size, max_size=size)
    )
    return [draw(tensor(length)) for length in lengths]


def outcome(run: Any) -> tuple[str, Any]:
    """("ok", results) or ("error", the exception's type)."""
    try:
        return "ok", list(run())
    except Exception as error:
        return "error", type(error)


def assert_same_outcome(
    ours: Any, beams: Any, batch: list[Any], model: Any, same_results: Any
) -> None:
    """Both handlers on ``batch``: the same results (by ``same_results``), or errors of which
    ours is Beam's type."""
    mine = outcome(lambda: ours.run_inference(batch, model))
    theirs = outcome(lambda: beams.run_inference(batch, model))
    assert mine[0] == theirs[0], (mine, theirs)
    if mine[0] == "ok":
        assert len(mine[1]) == len(theirs[1])
        for a, b in zip(mine[1], theirs[1], strict=True):
            assert a.example is b.example
            same_results(a.inference, b.inference)
    else:
        assert issubclass(mine[1], theirs[1])


def same_arrays(mine: Any, theirs: Any) -> None:
    assert np.asarray(mine).dtype == np.asarray(theirs).dtype
    assert np.array_equal(mine, theirs)


_SKLEARN_MODEL = LinearRegression().fit(
    np.arange(12, dtype=np.float64).reshape(4, FEATURES), [1.0, 2.0, 3.0, 5.0]
)


@settings(max_examples=150, deadline=None)
@given(batch=numpy_batches())
def test_sklearn_numpy_handler_takes_what_beams_takes(batch: list[Any]) -> None:
    ours = SklearnModelHandlerNumpy("unused.pkl")
    beams = beam_sklearn.SklearnModelHandlerNumpy("unused.pkl")
    assert_same_outcome(ours, beams, batch, _SKLEARN_MODEL, same_arrays)


class Affine(torch.nn.Module):
    """A model for any dtype: its output has the dtype of the batch Beam built."""

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return x * 2 + 1 if y is None else x * 2 + y


@pytest.fixture(scope="module")
def affine_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("affine") / "affine.pt"
    torch.save(Affine().state_dict(), path)
    return str(path)


def same_tensors(mine: torch.Tensor, theirs: torch.Tensor) -> None:
    assert mine.dtype == theirs.dtype
    assert torch.equal(mine, theirs)


@settings(max_examples=150, deadline=None)
@given(batch=tensor_batches())
def test_pytorch_handler_takes_what_beams_takes(affine_path: str, batch: list[Any]) -> None:
    args: dict[str, Any] = {
        "state_dict_path": affine_path,
        "model_class": Affine,
        "model_params": {},
    }
    ours, beams = PytorchModelHandlerTensor(**args), beam_pytorch.PytorchModelHandlerTensor(**args)
    assert_same_outcome(ours, beams, batch, beams.load_model(), same_tensors)


@settings(max_examples=60, deadline=None)
@given(xs=tensor_batches(), ys=tensor_batches())
def test_pytorch_keyed_handler_takes_what_beams_takes(
    affine_path: str, xs: list[Any], ys: list[Any]
) -> None:
    batch = [{"x": x, "y": y} for x, y in zip(xs, ys, strict=False)]
    args: dict[str, Any] = {
        "state_dict_path": affine_path,
        "model_class": Affine,
        "model_params": {},
    }
    ours = PytorchModelHandlerKeyedTensor(**args)
    beams = beam_pytorch.PytorchModelHandlerKeyedTensor(**args)
    assert_same_outcome(ours, beams, batch, beams.load_model(), same_tensors)


@settings(max_examples=60, deadline=None)
@given(batch=numpy_batches())
def test_tensorflow_numpy_handler_takes_what_beams_takes(batch: list[Any]) -> None:
    tf = pytest.importorskip("tensorflow")
    from apache_beam.ml.inference import tensorflow_inference as beam_tf

    from beam_turbo.tensorflow import TFModelHandlerNumpy

    def model(x: Any) -> Any:
        return tf.convert_to_tensor(x) * 2

    def same_eager_tensors(mine: Any, theirs: Any) -> None:
        assert mine.dtype == theirs.dtype
        assert np.array_equal(mine.numpy(), theirs.numpy())

    ours, beams = TFModelHandlerNumpy("unused"), beam_tf.TFModelHandlerNumpy("unused")
    assert_same_outcome(ours, beams, batch, model, same_eager_tensors)
