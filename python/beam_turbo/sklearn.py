"""scikit-learn model handlers: Beam's ``SklearnModelHandlerNumpy`` and
``SklearnModelHandlerPandas``, with the same names, arguments and results, made faster.

Switch by changing the import::

    # from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy
    from beam_turbo.sklearn import SklearnModelHandlerNumpy

With Beam's default inference functions, numpy batches are built by :func:`beam_turbo.stack`
(one copy, and an element of the wrong shape or dtype is named in the error), pandas batches
are concatenated once and split without a per-row ``iloc``, and results are built in one
pass. Byte sizes are Beam's figures. A missing or corrupt model file fails with its path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas
from apache_beam.ml.inference import sklearn_inference as beam_sklearn
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.sklearn_inference import ModelFileType

from beam_turbo._arrays.inputs import numpy_batch
from beam_turbo._arrays.results import prediction_results
from beam_turbo._beam import internals
from beam_turbo._running.loading import loading_model
from beam_turbo._running.oom import run_splitting_on_oom

__all__ = ["ModelFileType", "SklearnModelHandlerNumpy", "SklearnModelHandlerPandas"]

_BEAM_NUMPY_FN = internals.sklearn_numpy_inference_fn
_BEAM_PANDAS_FN = internals.sklearn_pandas_inference_fn


class SklearnModelHandlerNumpy(beam_sklearn.SklearnModelHandlerNumpy):
    """Beam's ``SklearnModelHandlerNumpy``, faster; see the module docs.

    Example:
        >>> import pickle, tempfile, os, numpy as np
        >>> from sklearn.linear_model import LinearRegression
        >>> from beam_turbo.sklearn import SklearnModelHandlerNumpy
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pkl")
        >>> with open(path, "wb") as f:
        ...     pickle.dump(LinearRegression().fit([[0.0], [1.0]], [0.0, 2.0]), f)
        >>> handler = SklearnModelHandlerNumpy(model_uri=path)
        >>> [round(float(r.inference), 6) for r in handler.run_inference(
        ...     [np.array([0.5]), np.array([2.0])], handler.load_model())]
        [1.0, 4.0]
    """

    def load_model(self) -> Any:
        """Load the pickled or joblib model; a missing or corrupt file names its path."""
        with loading_model(self._model_uri, "scikit-learn model"):
            return super().load_model()

    def run_inference(
        self,
        batch: Sequence[np.ndarray[Any, Any]],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Predict a batch of numpy arrays; one ``PredictionResult`` per array."""
        args = inference_args or {}

        def run(part: Sequence[np.ndarray[Any, Any]]) -> list[PredictionResult]:
            if self._model_inference_fn is _BEAM_NUMPY_FN:
                predictions = model.predict(numpy_batch(part), **args)
            else:
                predictions = self._model_inference_fn(model, part, args)
            return prediction_results(part, predictions, self._model_uri)

        return run_splitting_on_oom(run, batch)

    def predict_matrix(
        self,
        matrix: np.ndarray[Any, Any],
        model: Any,
        inference_args: dict[str, Any] | None = None,
        feature_names: Sequence[str] = (),
    ) -> Any:
        """Predict a table's rows, given as one matrix of its feature columns (for
        ``RunInference(...).with_tables()``): one prediction per row."""
        args = inference_args or {}
        if self._model_inference_fn is _BEAM_NUMPY_FN:
            return model.predict(matrix, **args)
        return self._model_inference_fn(model, matrix, args)


class SklearnModelHandlerPandas(beam_sklearn.SklearnModelHandlerPandas):
    """Beam's ``SklearnModelHandlerPandas``, faster: the batch is concatenated once and each
    result's example is the single-row frame it came from, with no per-row ``iloc``.
    """

    def load_model(self) -> Any:
        """Load the pickled or joblib model; a missing or corrupt file names its path."""
        with loading_model(self._model_uri, "scikit-learn model"):
            return super().load_model()

    def run_inference(
        self,
        batch: Sequence[pandas.DataFrame],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Predict a batch of single-row frames; one ``PredictionResult`` per frame."""
        for index, frame in enumerate(batch):
            if len(frame) != 1:
                raise ValueError(
                    "Only dataframes with single rows are supported. "
                    f"(element {index} has {len(frame)} rows)"
                )

        def run(part: Sequence[pandas.DataFrame]) -> list[PredictionResult]:
            if self._model_inference_fn is _BEAM_PANDAS_FN:
                # One concat; the frames themselves are the per-row splits Beam makes by iloc.
                predictions = model.predict(pandas.concat(part, axis=0))
                examples: Sequence[pandas.DataFrame] = part
            else:
                predictions, examples = self._model_inference_fn(model, part, inference_args)
            return prediction_results(examples, predictions, self._model_uri)

        return run_splitting_on_oom(run, batch)

    def predict_matrix(
        self,
        matrix: np.ndarray[Any, Any],
        model: Any,
        inference_args: dict[str, Any] | None = None,
        feature_names: Sequence[str] = (),
    ) -> Any:
        """Predict a table's rows, given as one matrix of its feature columns (for
        ``RunInference(...).with_tables()``): the model sees a frame with the columns' names."""
        frame = pandas.DataFrame(matrix, columns=list(feature_names) or None, copy=False)
        if self._model_inference_fn is _BEAM_PANDAS_FN:
            return model.predict(frame, **(inference_args or {}))
        predictions, _ = self._model_inference_fn(model, [frame], inference_args)
        return predictions
