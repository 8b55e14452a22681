"""beam_turbo.sklearn: same results as Beam's handlers, model formats, OOM, bad input."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import apache_beam as beam
import joblib
import numpy as np
import pandas
import pytest
from apache_beam.ml.inference import sklearn_inference as beam_sklearn
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.testing.util import assert_that, equal_to
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from beam_turbo.errors import ModelLoadError, ModelNotFoundError
from beam_turbo.sklearn import ModelFileType, SklearnModelHandlerNumpy, SklearnModelHandlerPandas

RNG = np.random.default_rng(0)


def fitted(features: int = 3) -> Any:
    x = RNG.random((40, features))
    return LinearRegression().fit(x, x @ RNG.random(features) + 1.0)


@pytest.fixture
def pickled(tmp_path: Path) -> str:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(fitted()))
    return str(path)


def same_results(ours: Any, beams: Any) -> None:
    ours, beams = list(ours), list(beams)
    assert len(ours) == len(beams)
    for mine, theirs in zip(ours, beams, strict=True):
        assert type(mine) is PredictionResult
        assert mine.example is theirs.example
        assert type(mine.inference) is type(theirs.inference)
        assert mine.inference == theirs.inference
        assert mine.model_id == theirs.model_id


@pytest.mark.parametrize("file_type", [ModelFileType.PICKLE, ModelFileType.JOBLIB])
def test_numpy_results_equal_beams(tmp_path: Path, file_type: ModelFileType) -> None:
    path = str(tmp_path / "model.bin")
    model = fitted()
    if file_type is ModelFileType.PICKLE:
        Path(path).write_bytes(pickle.dumps(model))
    else:
        joblib.dump(model, path)
    ours = SklearnModelHandlerNumpy(path, file_type)
    beams = beam_sklearn.SklearnModelHandlerNumpy(path, file_type)
    batch = [RNG.random(3) for _ in range(25)]
    same_results(
        ours.run_inference(batch, ours.load_model()), beams.run_inference(batch, beams.load_model())
    )
    assert ours.get_num_bytes(batch) == beams.get_num_bytes(batch)


def test_pandas_results_equal_beams(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.pkl"
    frame = pandas.DataFrame(RNG.random((30, 2)), columns=["a", "b"])
    model = make_pipeline(StandardScaler(), LinearRegression()).fit(frame, RNG.random(30))
    path.write_bytes(pickle.dumps(model))
    ours = SklearnModelHandlerPandas(str(path))
    beams = beam_sklearn.SklearnModelHandlerPandas(str(path))
    batch = [frame.iloc[[i]] for i in range(12)]
    mine = list(ours.run_inference(batch, ours.load_model()))
    theirs = list(beams.run_inference(batch, beams.load_model()))
    for a, b in zip(mine, theirs, strict=True):
        assert a.example.equals(b.example)
        assert a.inference == b.inference
        assert a.model_id == b.model_id
    assert ours.get_num_bytes(batch) == beams.get_num_bytes(batch)
    with pytest.raises(ValueError, match="Only dataframes with single rows are supported"):
        ours.run_inference([frame.iloc[:2]], ours.load_model())


def test_user_inference_fn_gets_what_beam_gives(pickled: str) -> None:
    seen = []

    def inference_fn(model: Any, batch: Any, args: Any) -> Any:
        seen.append(type(batch))
        return model.predict(np.stack(batch))

    handler = SklearnModelHandlerNumpy(pickled, inference_fn=inference_fn)
    assert len(list(handler.run_inference([RNG.random(3)] * 4, handler.load_model()))) == 4
    assert seen == [list]


def test_wrong_shape_keeps_beams_error_and_names_the_element(pickled: str) -> None:
    handler = SklearnModelHandlerNumpy(pickled)
    model = handler.load_model()
    with pytest.raises(
        ValueError,
        match=r"(?s)^all input arrays must have the same shape.*element 1 has shape \(4,\) "
        r"and dtype float64.*max_batch_size=1",
    ):
        handler.run_inference([RNG.random(3), RNG.random(4)], model)
    with pytest.raises(ValueError) as raised:
        handler.run_inference([RNG.random(3), RNG.random(4)], model)
    assert "pad=" not in str(raised.value)  # stack()'s advice; a RunInference user cannot pad=


def test_missing_and_corrupt_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"absent\.pkl does not exist"):
        SklearnModelHandlerNumpy(str(tmp_path / "absent.pkl")).load_model()
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(b"\x80\x05garbage")
    with pytest.raises(ModelLoadError, match=r"corrupt\.pkl could not be loaded"):
        SklearnModelHandlerNumpy(str(corrupt)).load_model()
    with pytest.raises(ModelLoadError, match=r"corrupt\.pkl could not be loaded"):
        SklearnModelHandlerPandas(str(corrupt), ModelFileType.JOBLIB).load_model()


class FailsAboveSize:
    """A model whose predict runs out of memory above a batch size."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def predict(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise MemoryError(f"cannot allocate a batch of {len(x)}")
        return np.asarray(x.sum(axis=1))


def test_memory_error_splits_the_batch(pickled: str) -> None:
    handler = SklearnModelHandlerNumpy(pickled)
    model = FailsAboveSize(limit=4)
    batch = [np.full(2, float(i)) for i in range(10)]
    results = list(handler.run_inference(batch, model))
    assert [float(r.inference) for r in results] == [2.0 * i for i in range(10)]
    assert model.sizes == [10, 5, 2, 2, 2, 2, 2]


def test_inside_stock_beam_run_inference(pickled: str) -> None:
    inputs = [RNG.random(3) for _ in range(40)]
    model = pickle.loads(Path(pickled).read_bytes())
    expected = [round(float(v), 9) for v in model.predict(np.stack(inputs))]
    with beam.Pipeline() as pipeline:
        outputs = (
            pipeline
            | beam.Create(inputs)
            | RunInference(SklearnModelHandlerNumpy(pickled))
            | beam.Map(lambda r: round(float(r.inference), 9))
        )
        assert_that(outputs, equal_to(expected))
