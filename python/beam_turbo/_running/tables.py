"""Running a batch of table rows: the :data:`~beam_turbo._running.runner.Infer` of
``RunInference(...).with_tables()``. The rows' feature columns become one matrix in one copy,
the handler's ``predict_matrix`` scores it, and the rows come out as one table with their
prediction. The batch runner around it splits and isolates by rows, so failing rows reach the
dead letters as rows, and every other row is scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from beam_turbo._arrays.tables import TableRows, TableSpec, check_columns
from beam_turbo._running.runner import HandlerInference
from beam_turbo.errors import InvalidInputError, InvalidTypeError

__all__ = ["TableInference", "check_scores_tables", "check_unbatched_by_length"]


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


def check_unbatched_by_length(handler: Any) -> None:
    """A clear error for a handler with a ``batch_length_fn``: length-aware batching sorts
    ragged elements so that little of a padded batch is padding, but a table's rows become one
    rectangular matrix (each row has one value per feature column), so there is nothing to
    pad, and the function, written for one element, has no element to take."""
    if "length_fn" in handler.batch_elements_kwargs():
        raise InvalidInputError(
            f"{type(handler).__name__} has a batch_length_fn, which with_tables() does not "
            "take: every row of a table has one value per feature column, so its batches are "
            "rectangular and there is no padding to save by length; build the handler "
            "without batch_length_fn and batch_bucket_boundaries (ragged features, such as "
            "token lists, are scored row by row, without with_tables())"
        )


class TableInference(HandlerInference):
    """The handler's ``predict_matrix`` on a part of a batch of rows (elements are rows), run
    as :class:`~beam_turbo._running.runner.HandlerInference` runs ``run_inference``."""

    def __init__(self, *, spec: TableSpec, **inference: Any) -> None:
        super().__init__(**inference)
        self._spec = spec
        self._matrix_bytes = 0
        self._checked = False

    def run(self, part: Sequence[Any], model: Any) -> list[Any]:
        assert isinstance(part, TableRows)
        spec = self._spec
        if not self._checked:  # the columns' rule, at the first batch (the next are alike)
            check_columns(part.pieces[0], spec)
            self._checked = True
        features = spec.features_of(part.pieces[0])
        matrix = part.feature_matrix(features, spec.feature_dtype)
        self._matrix_bytes = int(matrix.nbytes)
        predictions = self._handler.predict_matrix(
            matrix, model, self._inference_args or {}, features
        )
        return [part.with_predictions(predictions, spec)]

    def num_bytes(self, part: Sequence[Any]) -> int:
        return self._matrix_bytes
