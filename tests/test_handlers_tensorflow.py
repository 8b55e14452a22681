"""beam_turbo.tensorflow: same results as Beam's handlers, model formats, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.testing.util import assert_that, equal_to

tf = pytest.importorskip("tensorflow")
beam_tf = pytest.importorskip("apache_beam.ml.inference.tensorflow_inference")

from beam_turbo.errors import ModelLoadError, ModelNotFoundError  # noqa: E402
from beam_turbo.tensorflow import ModelType, TFModelHandlerNumpy, TFModelHandlerTensor  # noqa: E402


def make_model() -> Any:
    tf.keras.utils.set_random_seed(3)
    return tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tf") / "model.keras"
    make_model().save(path)
    return str(path)


def same_results(ours: Any, beams: Any) -> None:
    ours, beams = list(ours), list(beams)
    assert len(ours) == len(beams)
    for mine, theirs in zip(ours, beams, strict=True):
        assert type(mine) is PredictionResult
        assert mine.example is theirs.example
        assert type(mine.inference) is type(theirs.inference)
        assert mine.inference.dtype == theirs.inference.dtype
        assert np.array_equal(mine.inference.numpy(), theirs.inference.numpy())
        assert mine.model_id == theirs.model_id


def test_numpy_results_equal_beams(saved: str) -> None:
    ours, beams = TFModelHandlerNumpy(saved), beam_tf.TFModelHandlerNumpy(saved)
    batch = [np.random.default_rng(i).random(4, dtype=np.float32) for i in range(21)]
    same_results(
        ours.run_inference(batch, ours.load_model()), beams.run_inference(batch, beams.load_model())
    )
    assert ours.get_num_bytes(batch) == beams.get_num_bytes(batch)


def test_tensor_results_equal_beams(saved: str) -> None:
    ours, beams = TFModelHandlerTensor(saved), beam_tf.TFModelHandlerTensor(saved)
    batch = [tf.constant(np.full(4, i, np.float32)) for i in range(9)]
    same_results(
        ours.run_inference(batch, ours.load_model()), beams.run_inference(batch, beams.load_model())
    )


def test_saved_weights_with_create_model_fn(tmp_path: Path) -> None:
    weights = tmp_path / "model.weights.h5"
    make_model().save_weights(weights)
    spec: dict[str, Any] = {"model_type": ModelType.SAVED_WEIGHTS, "create_model_fn": make_model}
    ours = TFModelHandlerNumpy(str(weights), **spec)
    beams = beam_tf.TFModelHandlerNumpy(str(weights), **spec)
    batch = [np.ones(4, np.float32) * i for i in range(5)]
    same_results(
        ours.run_inference(batch, ours.load_model()), beams.run_inference(batch, beams.load_model())
    )


def test_missing_and_corrupt_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"nothing\.keras does not exist"):
        TFModelHandlerNumpy(str(tmp_path / "nothing.keras")).load_model()
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match=r"corrupt\.keras could not be loaded"):
        TFModelHandlerNumpy(str(corrupt)).load_model()


def test_wrong_shape_names_the_element(saved: str) -> None:
    handler = TFModelHandlerNumpy(saved)
    with pytest.raises(ValueError, match=r"element 1 has shape \(5,\)"):
        handler.run_inference(
            [np.zeros(4, np.float32), np.zeros(5, np.float32)], handler.load_model()
        )


def test_inside_stock_beam_run_inference(saved: str) -> None:
    inputs = [np.full(4, i / 10, np.float32) for i in range(30)]
    model = tf.keras.models.load_model(saved)
    expected = [round(float(v), 4) for v in model(np.stack(inputs)).numpy()[:, 0]]
    with beam.Pipeline() as pipeline:
        outputs = (
            pipeline
            | beam.Create(inputs)
            | RunInference(TFModelHandlerNumpy(saved))
            | beam.Map(lambda r: round(float(r.inference.numpy()[0]), 4))
        )
        assert_that(outputs, equal_to(expected))


def test_out_of_memory_splits_the_batch(saved: str) -> None:
    sizes: list[int] = []

    def model(batch: np.ndarray[Any, Any]) -> Any:
        sizes.append(len(batch))
        if len(batch) > 4:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return tf.constant(batch.sum(axis=1, keepdims=True))

    handler = TFModelHandlerNumpy(saved)
    batch = [np.full(4, i, np.float32) for i in range(10)]
    results = list(handler.run_inference(batch, model))
    assert [float(r.inference.numpy()[0]) for r in results] == [4.0 * i for i in range(10)]
    assert sizes == [10, 5, 2, 2, 2, 2, 2]
