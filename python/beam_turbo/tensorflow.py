"""TensorFlow model handlers: Beam's ``TFModelHandlerNumpy`` and ``TFModelHandlerTensor``, with
the same names, arguments and results, made faster.

Switch by changing the import::

    # from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy
    from beam_turbo.tensorflow import TFModelHandlerNumpy

With Beam's default inference functions, a batch of numpy arrays is built by
:func:`beam_turbo.stack` (one copy, into 64-byte-aligned memory that TensorFlow can read in
place; eager tensors are stacked by ``tf.stack``, as in Beam), the model runs on a GPU
when one is usable, and the output is split into rows with one ``tf.unstack`` (Beam iterates
the output tensor row by row, about 250 us a row). Results have Beam's types, dtypes and
values: eager tensors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from apache_beam.ml.inference import tensorflow_inference as beam_tf
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.tensorflow_inference import ModelType

from beam_turbo._arrays.inputs import numpy_batch, timed_stack
from beam_turbo._arrays.results import prediction_results
from beam_turbo._running.loading import loading_model
from beam_turbo._running.oom import run_splitting_on_oom
from beam_turbo.errors import InvalidInputError

__all__ = ["ModelType", "TFModelHandlerNumpy", "TFModelHandlerTensor"]


@functools.cache
def _device() -> str | None:
    """The device to place models and batches on: the first GPU, when TensorFlow has one."""
    return "/GPU:0" if tf.config.list_physical_devices("GPU") else None


class _TFRunner:
    _model_uri: str
    _inference_fn: Any
    _beam_default: Any
    _stack: Callable[[Sequence[Any]], Any]

    def load_model(self) -> tf.Module:
        """Load the model (on the GPU when one is usable); a missing file names its path."""
        checkpoint = (f"{self._model_uri}.index",)
        with loading_model(self._model_uri, "TensorFlow model", checkpoint), _on_device():
            return super().load_model()  # type: ignore[misc]

    def run_inference(
        self,
        batch: Sequence[Any],
        model: tf.Module,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Run the model on a batch; one ``PredictionResult`` (an eager tensor) per element."""
        args = inference_args or {}

        def run(part: Sequence[Any]) -> list[PredictionResult]:
            with _on_device():
                if self._inference_fn is not self._beam_default:
                    return list(self._inference_fn(model, part, args, self._model_uri))
                predictions = model(self._stack(part), **args)
            return prediction_results(part, predictions, self._model_uri)

        return run_splitting_on_oom(run, batch)


def _on_device() -> Any:
    device = _device()
    return tf.device(device) if device else contextlib.nullcontext()


class TFModelHandlerNumpy(_TFRunner, beam_tf.TFModelHandlerNumpy):
    """Beam's ``TFModelHandlerNumpy``, faster; see the module docs."""

    _beam_default = staticmethod(beam_tf.default_numpy_inference_fn)
    _stack = staticmethod(numpy_batch)

    def run_inference(
        self,
        batch: Sequence[np.ndarray[Any, Any]],
        model: tf.Module,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Run the model on a batch of numpy arrays; one eager-tensor result per array."""
        return _TFRunner.run_inference(self, batch, model, inference_args)

    def predict_matrix(
        self,
        matrix: np.ndarray[Any, Any],
        model: tf.Module,
        inference_args: dict[str, Any] | None = None,
        feature_names: Sequence[str] = (),
    ) -> Any:
        """Predict a table's rows, given as one matrix of its feature columns (for
        ``RunInference(...).with_tables()``): one prediction per row, as numpy."""
        if self._inference_fn is not self._beam_default:
            raise InvalidInputError(
                "with_tables() calls the model on the feature matrix itself: it does not take "
                f"a custom inference_fn ({self._inference_fn!r})"
            )
        with _on_device():
            return np.asarray(model(matrix, **(inference_args or {})))


class TFModelHandlerTensor(_TFRunner, beam_tf.TFModelHandlerTensor):
    """Beam's ``TFModelHandlerTensor``, faster; see the module docs."""

    _beam_default = staticmethod(beam_tf.default_tensor_inference_fn)
    # tf.stack reads eager tensors in one op, checks shapes and dtypes naming the offending
    # input, and is faster here than viewing each tensor from Python.
    _stack = staticmethod(functools.partial(timed_stack, tf.stack))

    def run_inference(
        self,
        batch: Sequence[tf.Tensor],
        model: tf.Module,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Run the model on a batch of eager tensors; one eager-tensor result per tensor."""
        return _TFRunner.run_inference(self, batch, model, inference_args)
