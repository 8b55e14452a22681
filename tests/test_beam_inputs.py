"""Every input Beam's handlers accept, beam-turbo's accept, with Beam's results.

Batches are drawn from what Beam's handlers take: numpy arrays of mixed dtypes (numpy promotes),
lists and tuples of numbers, torch tensors of mixed dtypes (torch promotes), and now and then
an element of another length, which Beam refuses: then ours must refuse it with the same
exception type. The fast path takes the common case; everything else falls back to Beam's
own conversion, and these tests hold the two to the same results.
"""

from __future__ import annotations

import pickle
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.ml.inference import base
from apache_beam.ml.inference import pytorch_inference as beam_pytorch
from apache_beam.ml.inference import sklearn_inference as beam_sklearn
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LinearRegression

from beam_turbo import RunInference
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


# --- bad inputs ---------------------------------------------------------------------------
#
# Elements no model can score (None, strings, bytes, other Python objects) and NaN among
# numbers, mixed into batches of good ones: ours answer as Beam's do (NaN gives Beam's result;
# the rest Beam's error type, an element of the wrong kind named where Beam only says "shape"),
# and in a pipeline every such element reaches the dead letters while the others give results.

NAN = float("nan")


def bad_python_objects() -> st.SearchStrategy[Any]:
    # b"abc" has FEATURES bytes: viewed as a uint8 buffer it would pass for a row of three.
    return st.sampled_from([None, "abc", "1.5", b"abc", object(), {"x": 1.0}])


@st.composite
def numpy_batches_with_bad_elements(draw: st.DrawFn) -> list[Any]:
    good = st.one_of(
        st.builds(lambda v: np.array(v, np.float64), st.just([1.0, 2.0, 3.0])),
        st.just([0.5, 1.0, 1.5]),
        st.just(np.array([NAN, 1.0, 2.0])),
        st.just([1.0, NAN, 2.0]),
    )
    element = st.one_of(good, good, bad_python_objects())
    return draw(st.lists(element, min_size=1, max_size=6))


def outcome_of(run: Any) -> tuple[str, Any]:
    """("ok", results) or ("error", the exception)."""
    try:
        return "ok", list(run())
    except Exception as error:
        return "error", error


def assert_beams_answer(
    ours: Any, beams: Any, batch: list[Any], model: Any, same_results: Any
) -> None:
    """Beam's results; or Beam's error type, naming the element where Beam says only that
    shapes differ (numpy.stack's words for an element that is no array)."""
    mine = outcome_of(lambda: ours.run_inference(batch, model))
    theirs = outcome_of(lambda: beams.run_inference(batch, model))
    assert mine[0] == theirs[0], (mine, theirs)
    if mine[0] == "ok":
        assert len(mine[1]) == len(theirs[1]) == len(batch)
        for a, b in zip(mine[1], theirs[1], strict=True):
            assert a.example is b.example
            same_results(a.inference, b.inference)
        return
    assert isinstance(mine[1], type(theirs[1])), (mine, theirs)
    if "must have the same shape" in str(theirs[1]):
        assert "element " in str(mine[1]), mine[1]


def same_arrays_or_nan(mine: Any, theirs: Any) -> None:
    mine, theirs = np.asarray(mine), np.asarray(theirs)
    assert mine.dtype == theirs.dtype
    assert np.array_equal(mine, theirs, equal_nan=mine.dtype.kind in "fc")


@settings(max_examples=150, deadline=None)
@given(batch=numpy_batches_with_bad_elements())
def test_sklearn_numpy_handler_answers_bad_elements_as_beam(batch: list[Any]) -> None:
    ours = SklearnModelHandlerNumpy("unused.pkl")
    beams = beam_sklearn.SklearnModelHandlerNumpy("unused.pkl")
    assert_beams_answer(ours, beams, batch, _SKLEARN_MODEL, same_arrays_or_nan)


def test_bytes_are_strings_to_the_numpy_handler_as_to_beams() -> None:
    """``bytes`` expose a buffer, but numpy (so Beam) reads them as one string each: a batch of
    them must not be scored as rows of uint8."""
    ours = SklearnModelHandlerNumpy("unused.pkl")
    beams = beam_sklearn.SklearnModelHandlerNumpy("unused.pkl")
    with pytest.raises(ValueError, match="Expected 2D array") as beam_error:
        list(beams.run_inference([b"abc", b"def"], _SKLEARN_MODEL))
    with pytest.raises(ValueError) as our_error:
        list(ours.run_inference([b"abc", b"def"], _SKLEARN_MODEL))  # type: ignore[list-item]
    assert str(our_error.value) == str(beam_error.value)


@st.composite
def tensor_batches_with_bad_elements(draw: st.DrawFn) -> list[Any]:
    good = st.one_of(
        st.just(torch.tensor([1.0, 2.0, 3.0])),
        st.just(torch.tensor([NAN, 1.0, 2.0])),
    )
    wrong_kind = st.one_of(
        bad_python_objects(), st.just(np.array([1.0, 2.0, 3.0])), st.just([1.0, 2.0, 3.0])
    )
    return draw(st.lists(st.one_of(good, good, wrong_kind), min_size=1, max_size=6))


def same_tensors_or_nan(mine: torch.Tensor, theirs: torch.Tensor) -> None:
    assert mine.dtype == theirs.dtype
    assert torch.equal(mine.isnan(), theirs.isnan())
    assert torch.equal(mine.nan_to_num(0.0), theirs.nan_to_num(0.0))


@settings(max_examples=100, deadline=None)
@given(batch=tensor_batches_with_bad_elements())
def test_pytorch_handler_answers_bad_elements_as_beam(affine_path: str, batch: list[Any]) -> None:
    args: dict[str, Any] = {
        "state_dict_path": affine_path,
        "model_class": Affine,
        "model_params": {},
    }
    ours, beams = PytorchModelHandlerTensor(**args), beam_pytorch.PytorchModelHandlerTensor(**args)
    assert_beams_answer(ours, beams, batch, beams.load_model(), same_tensors_or_nan)


@st.composite
def keyed_batches_with_bad_elements(draw: st.DrawFn) -> list[Any]:
    values = draw(tensor_batches_with_bad_elements())
    good_tensor = torch.tensor([1.0, 1.0, 1.0])
    batch: list[Any] = []
    for value in values:
        kind = draw(st.sampled_from(["x", "x", "x", "x and y", "not a dict"]))
        if kind == "x":
            batch.append({"x": value})
        elif kind == "x and y":
            batch.append({"x": value, "y": good_tensor})
        else:
            batch.append(value)
    return batch


@settings(max_examples=100, deadline=None)
@given(batch=keyed_batches_with_bad_elements())
def test_pytorch_keyed_handler_answers_bad_elements_as_beam(
    affine_path: str, batch: list[Any]
) -> None:
    """As Beam, except a batch whose dicts have different keys: Beam stacks each key's tensors
    as they come (rows of one element's key then belong to another's), ours names the element
    (the README's differences)."""
    args: dict[str, Any] = {
        "state_dict_path": affine_path,
        "model_class": Affine,
        "model_params": {},
    }
    ours = PytorchModelHandlerKeyedTensor(**args)
    beams = beam_pytorch.PytorchModelHandlerKeyedTensor(**args)
    model = beams.load_model()
    dicts = all(isinstance(element, dict) for element in batch)
    if dicts and len({frozenset(element) for element in batch}) > 1:
        with pytest.raises(ValueError, match=r"element \d+ has keys"):
            list(ours.run_inference(batch, model))
        return
    assert_beams_answer(ours, beams, batch, model, same_tensors_or_nan)


@settings(max_examples=60, deadline=None)
@given(batch=numpy_batches_with_bad_elements())
def test_tensorflow_numpy_handler_answers_bad_elements_as_beam(batch: list[Any]) -> None:
    tf = pytest.importorskip("tensorflow")
    from apache_beam.ml.inference import tensorflow_inference as beam_tf

    from beam_turbo.tensorflow import TFModelHandlerNumpy

    def model(x: Any) -> Any:
        return tf.convert_to_tensor(x) * 2

    def same_eager_tensors(mine: Any, theirs: Any) -> None:
        same_arrays_or_nan(mine.numpy(), theirs.numpy())

    ours, beams = TFModelHandlerNumpy("unused"), beam_tf.TFModelHandlerNumpy("unused")
    assert_beams_answer(ours, beams, batch, model, same_eager_tensors)


@settings(max_examples=60, deadline=None)
@given(batch=tensor_batches_with_bad_elements())
def test_tensorflow_tensor_handler_answers_bad_elements_as_beam(batch: list[Any]) -> None:
    tf = pytest.importorskip("tensorflow")
    from apache_beam.ml.inference import tensorflow_inference as beam_tf

    from beam_turbo.tensorflow import TFModelHandlerTensor

    def model(x: Any) -> Any:
        return x * 2

    def same_eager_tensors(mine: Any, theirs: Any) -> None:
        same_arrays_or_nan(mine.numpy(), theirs.numpy())

    # The torch tensors drawn stand for eager tensors here; the bad elements stay as drawn.
    batch = [tf.constant(x.numpy()) if isinstance(x, torch.Tensor) else x for x in batch]
    ours, beams = TFModelHandlerTensor("unused"), beam_tf.TFModelHandlerTensor("unused")
    assert_beams_answer(ours, beams, batch, model, same_eager_tensors)


# --- bad elements in pipelines: the dead letters ------------------------------------------


def describe(element: Any) -> str:
    """A name for an element that survives pickling (object() has no value to compare)."""
    if isinstance(element, np.ndarray | torch.Tensor):
        return f"{type(element).__name__} {element.tolist()}"
    if isinstance(element, dict):
        return "dict " + ", ".join(f"{k}: {describe(v)}" for k, v in sorted(element.items()))
    if isinstance(element, tuple):
        return "(" + ", ".join(describe(v) for v in element) + ")"
    if type(element) is object:
        return "object"
    return f"{type(element).__name__} {element!r}"


def what_came_in(result: Any) -> str:
    """The element a result is for: a ``PredictionResult``'s example, or a keyed result's
    key and example."""
    if isinstance(result, tuple) and not isinstance(result, base.PredictionResult):
        return describe((result[0], result[1].example))
    return describe(result.example)


def _sklearn(path: str) -> tuple[Any, Any]:
    return SklearnModelHandlerNumpy(path), beam_sklearn.SklearnModelHandlerNumpy(path)


def _torch(path: str) -> tuple[Any, Any]:
    args: dict[str, Any] = {"state_dict_path": path, "model_class": Affine, "model_params": {}}
    return PytorchModelHandlerTensor(**args), beam_pytorch.PytorchModelHandlerTensor(**args)


def _keyed_torch(path: str) -> tuple[Any, Any]:
    args: dict[str, Any] = {"state_dict_path": path, "model_class": Affine, "model_params": {}}
    return (
        PytorchModelHandlerKeyedTensor(**args),
        beam_pytorch.PytorchModelHandlerKeyedTensor(**args),
    )


def _keyed_sklearn(path: str) -> tuple[Any, Any]:
    ours, beams = _sklearn(path)
    return base.KeyedModelHandler(ours), base.KeyedModelHandler(beams)


ARRAYS_WITH_BAD = [
    np.array([1.0, 2.0, 3.0]),
    None,
    np.array([4.0, 5.0, 6.0]),
    "abc",
    b"abc",
    np.array([NAN, 1.0, 2.0]),
    object(),
    [0.5, 1.0, 1.5],
    np.array([7.0, 8.0, 9.0]),
]
TENSORS_WITH_BAD = [
    torch.tensor([1.0, 2.0, 3.0]),
    None,
    torch.tensor([4.0, 5.0, 6.0]),
    "abc",
    b"abc",
    torch.tensor([NAN, 1.0, 2.0]),
    object(),
    np.array([1.0, 2.0, 3.0]),
    torch.tensor([7.0, 8.0, 9.0]),
]
PIPELINE_CASES: dict[str, tuple[Any, list[Any]]] = {
    "sklearn": (_sklearn, ARRAYS_WITH_BAD),
    "torch": (_torch, TENSORS_WITH_BAD),
    "keyed torch": (
        _keyed_torch,
        [{"x": x} for x in TENSORS_WITH_BAD]
        + [None, "abc", {"x": torch.ones(3), "y": torch.ones(3)}],
    ),
    "KeyedModelHandler": (_keyed_sklearn, [(f"k{i}", x) for i, x in enumerate(ARRAYS_WITH_BAD)]),
}


@pytest.mark.parametrize("isolate", [True, False])
@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_bad_elements_reach_the_dead_letters_and_the_rest_give_results(
    tmp_path: Any, affine_path: str, case: str, isolate: bool
) -> None:
    """Every element comes out once, as a result or a dead letter; with isolate_failures, the
    dead letters are exactly the elements Beam's own handler cannot score alone."""
    make, data = PIPELINE_CASES[case]
    path = affine_path
    if case in ("sklearn", "KeyedModelHandler"):
        path = str(tmp_path / "linear.pkl")
        with open(path, "wb") as f:
            pickle.dump(_SKLEARN_MODEL, f)
    ours, beams = make(path)
    model = beams.load_model()
    unscorable = [describe(x) for x in data if not scores_alone(beams, model, x)]
    assert 0 < len(unscorable) < len(data)
    check_dead_letters(ours, data, unscorable, isolate)


def scores_alone(handler: Any, model: Any, element: Any) -> bool:
    return outcome_of(lambda: handler.run_inference([element], model))[0] == "ok"


def test_bad_elements_reach_the_dead_letters_with_tensorflow() -> None:
    tf = pytest.importorskip("tensorflow")
    from apache_beam.ml.inference import tensorflow_inference as beam_tf

    from beam_turbo.tensorflow import TFModelHandlerNumpy

    class FunctionModel(TFModelHandlerNumpy):
        """A function for a model: nothing to load."""

        def load_model(self) -> Any:
            return lambda x: tf.convert_to_tensor(x) * 2

    beams = beam_tf.TFModelHandlerNumpy("unused")
    model = FunctionModel("unused").load_model()
    unscorable = [describe(x) for x in ARRAYS_WITH_BAD if not scores_alone(beams, model, x)]
    assert 0 < len(unscorable) < len(ARRAYS_WITH_BAD)
    for isolate in (True, False):
        check_dead_letters(FunctionModel("unused"), ARRAYS_WITH_BAD, unscorable, isolate)


def check_dead_letters(handler: Any, data: list[Any], unscorable: list[str], isolate: bool) -> None:
    with beam.Pipeline() as pipeline:
        results, dlq = (
            pipeline
            | beam.Create(data, reshuffle=False)
            | RunInference(handler).with_exception_handling(isolate_failures=isolate)
        )
        scored = results | beam.Map(what_came_in)
        dead = dlq.failed_inferences | beam.FlatMap(lambda failure: map(describe, failure[0]))
        everything = (scored, dead) | beam.Flatten()
        assert_that(everything, equal_to([describe(x) for x in data]), label="each once")
        if isolate:
            assert_that(dead, equal_to(unscorable), label="only the unscorable")


# --- a model that returns more or fewer rows than the batch -------------------------------


def first_rows(count_change: int) -> Any:
    """A scikit-learn ``inference_fn`` whose model returns ``count_change`` rows more (or,
    negative, fewer) than the batch has elements."""

    def inference_fn(model: Any, batch: Any, inference_args: Any = None) -> Any:
        predictions = model.predict(np.stack(batch))
        if count_change < 0:
            return predictions[:count_change]
        return np.concatenate([predictions, predictions[:1].repeat(count_change)])

    return inference_fn


@pytest.mark.parametrize("count_change", [-1, 1])
def test_a_model_with_too_many_or_too_few_rows_is_an_error_naming_the_counts(
    count_change: int,
) -> None:
    handler = SklearnModelHandlerNumpy("unused.pkl", inference_fn=first_rows(count_change))
    batch = [np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0]), np.array([7.0, 8.0, 9.0])]
    rows = 3 + count_change
    with pytest.raises(ValueError, match=f"returned {rows} predictions for a batch of 3 elements"):
        handler.run_inference(batch, _SKLEARN_MODEL)


def test_predictions_as_a_generator_of_the_right_length_are_results() -> None:
    def inference_fn(model: Any, batch: Any, inference_args: Any = None) -> Any:
        return (float(row.sum()) for row in batch)

    handler = SklearnModelHandlerNumpy("unused.pkl", inference_fn=inference_fn)
    results = handler.run_inference([np.ones(3), np.zeros(3)], _SKLEARN_MODEL)
    assert [r.inference for r in results] == [3.0, 0.0]


@pytest.mark.parametrize("count_change", [-1, 1])
def test_a_model_with_the_wrong_row_count_loses_no_element(
    tmp_path: Any, count_change: int
) -> None:
    """Beam pairs predictions with elements up to the shorter side: a model one row short
    loses an element a batch, silently. Here each element comes out, as a dead letter."""
    path = str(tmp_path / "linear.pkl")
    with open(path, "wb") as f:
        pickle.dump(_SKLEARN_MODEL, f)
    handler = SklearnModelHandlerNumpy(path, inference_fn=first_rows(count_change))
    data = [np.array([float(i), 1.0, 2.0]) for i in range(20)]
    with beam.Pipeline() as pipeline:
        results, dlq = (
            pipeline | beam.Create(data) | RunInference(handler).with_exception_handling()
        )
        dead = dlq.failed_inferences | beam.FlatMap(lambda failure: map(describe, failure[0]))
        errors = dlq.failed_inferences | beam.Map(
            lambda failure: "predictions for" in str(failure[1])
        )
        assert_that(results | beam.Map(what_came_in), equal_to([]), label="no results")
        assert_that(dead, equal_to([describe(x) for x in data]), label="all dead letters")
        assert_that(errors | beam.Distinct(), equal_to([True]), label="the counts named")


# --- the results themselves: built natively, the objects Beam's _convert_to_result makes ---


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 40),
    kind=st.sampled_from(["list", "numpy", "torch", "dict", "generator"]),
    model_id=st.sampled_from([None, "gs://models/v2"]),
)
def test_results_are_beams_own_for_every_kind_of_predictions(
    rows: int, kind: str, model_id: str | None
) -> None:
    import gc
    import sys

    from apache_beam.ml.inference import utils

    from beam_turbo._arrays.results import prediction_results

    examples = [np.full(3, float(i)) for i in range(rows)]
    batched = np.arange(rows * 2, dtype=np.float64).reshape(rows, 2)
    predictions: Any = {
        "list": lambda: [float(i) for i in range(rows)],
        "numpy": lambda: batched,
        "torch": lambda: torch.from_numpy(batched),
        "dict": lambda: {"a": batched, "b": list(range(rows))},
        "generator": lambda: (str(i) for i in range(rows)),
    }[kind]
    held = [sys.getrefcount(e) for e in examples]
    ours = prediction_results(examples, predictions(), model_id)
    beams = list(utils._convert_to_result(examples, predictions(), model_id))
    assert len(ours) == len(beams) == rows
    for mine, theirs in zip(ours, beams, strict=True):
        assert type(mine) is base.PredictionResult
        assert gc.is_tracked(mine)
        assert mine.example is theirs.example
        assert mine.model_id == theirs.model_id
        if kind in ("numpy", "torch"):
            assert np.array_equal(np.asarray(mine.inference), np.asarray(theirs.inference))
        elif kind == "dict":
            assert mine.inference.keys() == theirs.inference.keys()
            assert np.array_equal(mine.inference["a"], theirs.inference["a"])
            assert mine.inference["b"] == theirs.inference["b"]
        else:
            assert mine.inference == theirs.inference
    ours = beams = mine = theirs = None  # type: ignore[assignment]
    assert [sys.getrefcount(e) for e in examples] == held  # each example held once, let go


def test_the_native_records_refuse_a_class_that_is_not_a_plain_three_field_tuple() -> None:
    from typing import NamedTuple

    from beam_turbo._native import records

    class Two(NamedTuple):
        a: int
        b: int

    for cls, name in [(tuple, "tuple"), (Two, "Two"), (list, "list")]:
        with pytest.raises(TypeError, match=f"records: {name} is not a NamedTuple of 3 fields"):
            records(cls, [1], [2], None)
    with pytest.raises(ValueError, match="first has 2 items and second 1; they must pair up"):
        records(base.PredictionResult, [1, 2], [3], None)
