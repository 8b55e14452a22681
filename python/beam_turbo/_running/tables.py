"""Running a batch of table rows: the :data:`~beam_turbo._running.runner.Infer` of
``RunInference(...).with_tables()``. The rows' feature columns become one matrix in one copy,
the handler's ``predict_matrix`` scores it, and the rows come out as one table with their
prediction. The batch runner around it splits and isolates by rows, so failing rows reach the
dead letters as rows, and every other row is scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from apache_beam.metrics.metric import Metrics

from beam_turbo._arrays.tables import TableRows, TableSpec
from beam_turbo._gathering.sizing import Sizing
from beam_turbo._running.runner import BATCH_SIZE_METRIC, ModelSource
from beam_turbo.errors import InvalidTypeError

if TYPE_CHECKING:  # it imports torch where installed, which BatchElements must not do
    from apache_beam.ml.inference import base

__all__ = ["TableInference", "check_scores_tables"]


def check_scores_tables(handler: Any) -> None:
    """A clear error for a handler that cannot score a matrix of features."""
    if not callable(getattr(handler, "predict_matrix", None)):
        raise InvalidTypeError(
            f"{type(handler).__name__} cannot score tables column-wise: with_tables() needs a "
            "model handler with predict_matrix(matrix, model, inference_args, feature_names), as "
            "beam-turbo's SklearnModelHandlerNumpy, SklearnModelHandlerPandas, "
            "PytorchModelHandlerTensor and TFModelHandlerNumpy have (keyed handlers do not: a "
            "table keeps its key columns with keep_columns instead)"
        )


class TableInference:
    """The handler's ``predict_matrix`` on a part of a batch of rows, with the model from the
    cache, the time to the sizer, and Beam's metrics (elements are rows)."""

    def __init__(
        self,
        *,
        handler: base.ModelHandler,
        models: ModelSource,
        namespace: str,
        clock: Any,
        sizing: Sizing,
        inference_args: dict[str, Any] | None,
        spec: TableSpec,
    ) -> None:
        self._handler = handler
        self._models = models
        self._clock = clock
        self._sizing = sizing
        self._inference_args = inference_args or {}
        self._spec = spec
        self._batch_size = Metrics.distribution(namespace, BATCH_SIZE_METRIC)

    def __call__(self, part: Sequence[Any]) -> list[Any]:
        assert isinstance(part, TableRows)
        model = self._models.acquire_model()
        metrics = self._models.metrics
        start = self._clock.time_ns()
        try:
            spec = self._spec
            features = spec.features_of(part.pieces[0])
            matrix = part.feature_matrix(features, spec.feature_dtype)
            predictions = self._handler.predict_matrix(
                matrix, model, self._inference_args, features
            )
            output = part.with_predictions(predictions, spec)
        except Exception:
            if metrics is not None:
                metrics.failed_batches_counter.inc()
            raise
        elapsed_ns = self._clock.time_ns() - start
        self._sizing.record(len(part), elapsed_ns / 1e9)
        self._batch_size.update(len(part))
        if metrics is not None:
            metrics.update(len(part), int(matrix.nbytes), elapsed_ns // 1000)
        return [output]
