"""Tables as batches of rows: pyarrow ``Table`` and ``RecordBatch``, pandas ``DataFrame``.

:class:`TableRows` is a batch gathered from pieces of tables (large tables cut, small ones
joined), seen as a sequence of rows: its length is its row count and a slice is a slice of
rows (no copy), so the batch runner splits and isolates it by rows as it does a list of
elements, and a dead letter holds rows (dicts). Its feature matrix is built in one copy, piece
by piece into one output (:func:`~beam_turbo._arrays.columns.feature_matrix`), and its
predictions come out as one table of the pieces' kind: the kept columns and the prediction.

pyarrow and pandas are never imported here: a table of theirs means they are imported.
"""

from __future__ import annotations

import dataclasses
import pickle
import sys
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np

from beam_turbo.errors import InvalidInputError, InvalidTypeError, MissingColumnError

__all__ = [
    "TableRows",
    "TableSpec",
    "check_columns",
    "check_table",
    "is_table",
    "row_count",
    "slice_rows",
    "table_from_bytes",
    "table_to_bytes",
]


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """How ``RunInference`` scores tables: which columns are the model's features (None: every
    column not in ``keep_columns``, or every column), the model input's dtype (None: the
    feature columns' common type), the prediction column's name, and the input columns kept
    beside it (None: all)."""

    def features_of(self, table: Any) -> list[str]:
        """The feature columns, for a table of the batch."""
        if self.feature_columns is not None:
            return list(self.feature_columns)
        keep = set(self.keep_columns or ())
        return [name for name in columns_of(table) if name not in keep]

    feature_columns: tuple[str, ...] | None = None
    prediction_column: str = "prediction"
    keep_columns: tuple[str, ...] | None = None
    feature_dtype: str | None = None
    prediction_dtype: str | None = None


def _kind(table: Any) -> str:
    pa = sys.modules.get("pyarrow")
    if pa is not None:
        if isinstance(table, pa.Table):
            return "arrow"
        if isinstance(table, pa.RecordBatch):
            return "batch"
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(table, pd.DataFrame):
        return "pandas"
    return ""


def is_table(element: Any) -> bool:
    """Whether ``element`` is a table beam-turbo scores column-wise."""
    return bool(_kind(element))


def check_table(element: Any) -> str:
    """The kind of table ``element`` is; a clear error for anything else."""
    kind = _kind(element)
    if not kind:
        raise InvalidTypeError(
            f"RunInference(...).with_tables() scores tables, but got a "
            f"{type(element).__module__}.{type(element).__qualname__}: expected a "
            "pyarrow.Table, pyarrow.RecordBatch or pandas.DataFrame (ReadFromParquetBatched "
            "gives pyarrow Tables)"
        )
    return kind


def check_columns(table: Any, spec: TableSpec) -> list[str]:
    """The one rule for a table's columns under ``spec``, checked on no rows of ``table``: the
    kept columns are there, the feature columns are there and numeric (and fit
    ``feature_dtype``: :func:`~beam_turbo._arrays.columns.feature_matrix`'s own checks), and the
    prediction column is not a kept one. Returns the feature columns. It runs at the first
    batch of tables, and at pipeline construction for schema'd rows (on a table of none).

    Raises:
        MissingColumnError, InvalidTypeError, InvalidInputError: naming the column.
    """
    from beam_turbo._arrays.columns import _missing, feature_matrix

    names = columns_of(table)
    for name in spec.keep_columns or ():
        if name not in names:
            raise _missing(name, names)
    features = spec.features_of(table)
    feature_matrix(slice_rows(table, 0, 0), features, spec.feature_dtype)
    kept = names if spec.keep_columns is None else spec.keep_columns
    if spec.prediction_column in kept:
        raise InvalidInputError(
            f"the prediction column {spec.prediction_column!r} is also a kept column: name it "
            "apart (prediction_column=) or leave that column out of keep_columns"
        )
    return features


def row_count(table: Any) -> int:
    """How many rows ``table`` has."""
    return len(table) if _kind(table) == "pandas" else int(table.num_rows)


def slice_rows(table: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of ``table``, without copying them."""
    if _kind(table) == "pandas":
        return table.iloc[start:stop]
    return table.slice(start, stop - start)


def table_to_bytes(table: Any) -> bytes:
    """``table`` as bytes: Arrow's IPC stream for pyarrow (a slice is written alone, where a
    pickled slice carries its whole table's buffers), pickle for pandas."""
    kind = check_table(table)
    if kind == "pandas":
        return b"P" + pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL)
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    encoded: bytes = sink.getvalue().to_pybytes()
    return (b"T" if kind == "arrow" else b"B") + encoded


def table_from_bytes(encoded: bytes) -> Any:
    """The table :func:`table_to_bytes` wrote."""
    kind, body = encoded[:1], memoryview(encoded)[1:]
    if kind == b"P":
        return pickle.loads(body)
    import pyarrow as pa

    reader = pa.ipc.open_stream(pa.py_buffer(body))
    if kind == b"T":
        return reader.read_all()
    batches = list(reader)
    return batches[0] if len(batches) == 1 else pa.concat_batches(batches)


def columns_of(table: Any) -> list[str]:
    if _kind(table) == "pandas":
        return [str(c) for c in table.columns]
    return list(table.schema.names)


class TableRows(Sequence[Any]):
    """A batch of rows from pieces of tables: see the module docs.

    Example:
        >>> import pyarrow as pa
        >>> rows = TableRows([pa.table({"x": [1.0, 2.0]}), pa.table({"x": [3.0]})])
        >>> len(rows), rows[1:].to_pylist()
        (3, [{'x': 2.0}, {'x': 3.0}])
    """

    __slots__ = ("_length", "pieces")

    def __init__(self, pieces: list[Any]) -> None:
        self.pieces = pieces
        self._length = sum(row_count(piece) for piece in pieces)

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> TableRows: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, int):
            position = index + self._length if index < 0 else index
            if not 0 <= position < self._length:
                raise IndexError(f"row {index} of {self._length}")
            return self[position : position + 1].to_pylist()[0]
        start, stop, step = index.indices(self._length)
        if step != 1:
            raise InvalidInputError("rows of a table are sliced with step 1")
        pieces, offset = [], 0
        for piece in self.pieces:
            count = row_count(piece)
            low, high = max(start - offset, 0), min(stop - offset, count)
            if low < high:
                pieces.append(piece if (low, high) == (0, count) else slice_rows(piece, low, high))
            offset += count
        return TableRows(pieces)

    def split_failing(self, error: BaseException) -> list[TableRows]:
        """The parts in which these rows are isolated after ``error``: their halves; but a
        table's own error (a feature column missing or not numeric: no row of that table can
        be scored) splits them by table, and leaves one table whole, so that its rows reach
        the dead letters together rather than one by one."""
        if isinstance(error, (MissingColumnError, InvalidTypeError)):
            if len(self.pieces) == 1:
                return [self]
            return [TableRows([piece]) for piece in self.pieces]
        middle = self._length // 2
        return [self[:middle], self[middle:]]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.to_pylist())

    def to_pylist(self) -> list[dict[str, Any]]:
        """The rows, as dicts (a dead letter's elements)."""
        rows: list[dict[str, Any]] = []
        for piece in self.pieces:
            if _kind(piece) == "pandas":
                rows += piece.to_dict("records")
            else:
                rows += piece.to_pylist()
        return rows

    def feature_matrix(self, columns: Sequence[str] | None, dtype: Any) -> np.ndarray[Any, Any]:
        """The rows' feature columns as one row-major matrix, in one copy."""
        from beam_turbo._arrays.columns import feature_matrix

        if len(self.pieces) == 1:
            return feature_matrix(self.pieces[0], columns, dtype)
        # The matrix's width and dtype, from none of the rows: each piece is then copied once,
        # into its rows of the one output.
        shape = feature_matrix(slice_rows(self.pieces[0], 0, 0), columns, dtype)
        out = np.empty((self._length, shape.shape[1]), shape.dtype)
        offset = 0
        for piece in self.pieces:
            count = row_count(piece)
            feature_matrix(piece, columns, shape.dtype, out=out[offset : offset + count])
            offset += count
        return out

    def with_predictions(self, predictions: Any, spec: TableSpec) -> Any:
        """One table of the pieces' kind: the kept columns of every row, and the prediction."""
        predictions = np.asarray(predictions, dtype=spec.prediction_dtype)
        if predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]  # one output per row: a column of scalars
        if len(predictions) != self._length:
            raise InvalidInputError(
                f"the model returned {len(predictions)} predictions for {self._length} rows: "
                "a model scoring a table must return one prediction per row"
            )
        outputs, offset = [], 0
        for piece in self.pieces:
            count = row_count(piece)
            outputs.append(_with_column(piece, predictions[offset : offset + count], spec))
            offset += count
        return _joined(outputs)


def _with_column(piece: Any, predictions: np.ndarray[Any, Any], spec: TableSpec) -> Any:
    kind = _kind(piece)
    keep = spec.keep_columns
    name = spec.prediction_column
    if kind == "pandas":
        kept = piece if keep is None else piece[list(keep)]
        values = predictions if predictions.ndim == 1 else list(predictions)
        return kept.assign(**{name: values})
    import pyarrow as pa

    if predictions.ndim == 1:
        column = pa.array(predictions)
    else:
        flat = predictions.reshape(len(predictions), -1)
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    kept = piece if keep is None else piece.select(list(keep))
    if kind == "batch":
        return pa.RecordBatch.from_arrays([*kept.columns, column], names=[*kept.schema.names, name])
    return kept.append_column(name, column)


def _joined(outputs: list[Any]) -> Any:
    if len(outputs) == 1:
        return outputs[0]
    kind = _kind(outputs[0])
    if kind == "pandas":
        import pandas as pd

        return pd.concat(outputs, ignore_index=False)
    import pyarrow as pa

    if kind == "batch":
        return pa.concat_batches(outputs)
    return pa.concat_tables(outputs)
