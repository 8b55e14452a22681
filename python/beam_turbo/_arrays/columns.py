"""A table's feature columns become the model's input matrix, in one copy.

``feature_matrix`` takes a pyarrow ``Table`` or ``RecordBatch``, a pandas ``DataFrame`` or a 2-D
numpy array and returns a C-contiguous ``(rows, columns)`` numpy matrix of the model's dtype.
The columns are read where they lie (Arrow buffers, pandas' blocks) and written into the
matrix by the native kernel (``_native.interleave``), converting as numpy's ``astype`` does,
on several threads for large tables; where the memory already has the matrix's layout,
nothing is copied at all.

pyarrow and pandas are imported only by whoever made the table: this module finds them in
``sys.modules``, never imports them.
"""

from __future__ import annotations

import bisect
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from beam_turbo import _native
from beam_turbo.errors import InvalidInputError, InvalidTypeError, MissingColumnError

__all__ = ["feature_matrix"]

Array = np.ndarray[Any, Any]

#: The dtypes the kernel reads (numpy's kinds: bool, signed, unsigned, float).
_NUMERIC_KINDS = frozenset("biuf")
#: Float targets: every numeric column converts to them, and nulls become NaN.
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
#: Column names listed in an error, at most.
_NAMES_SHOWN = 20


@dataclass
class _Column:
    """One feature column: its name, its numpy dtype, and its pieces as numpy 1-D arrays."""

    name: str
    dtype: np.dtype[Any]
    #: The pieces (Arrow chunks; one for pandas), in row order.
    pieces: list[Array] = field(default_factory=list)
    #: The first row of each piece.
    starts: list[int] = field(default_factory=list)
    #: Rows (of the whole table) that are null.
    nulls: list[Array] = field(default_factory=list)

    def add(self, start: int, values: Array, nulls: Array | None = None) -> None:
        self.starts.append(start)
        self.pieces.append(values)
        if nulls is not None and nulls.size:
            self.nulls.append(nulls + start)

    def rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` as a view of the one piece that holds them."""
        i = bisect.bisect_right(self.starts, start) - 1
        first = self.starts[i]
        return self.pieces[i][start - first : stop - first]

    def first_null(self) -> int | None:
        return min(int(rows[0]) for rows in self.nulls) if self.nulls else None


def feature_matrix(
    table: Any,
    columns: Sequence[str] | None = None,
    dtype: npt.DTypeLike | None = None,
    *,
    out: Array | None = None,
) -> Array:
    """The feature columns of ``table`` as one C-contiguous ``(rows, columns)`` matrix.

    Args:
        table: a pyarrow ``Table`` or ``RecordBatch``, a pandas ``DataFrame``, or a 2-D numpy
            array (whose columns are its second axis).
        columns: the feature columns' names, in the matrix's order; ``None`` for every column.
            A numpy array has no names: pass ``None``.
        dtype: the matrix's dtype: ``float32`` or ``float64`` (any numeric column converts,
            as ``astype`` would), or the dtype every column already has. ``None``: that
            shared dtype, else ``float64``.
        out: write into this C-contiguous ``(rows, columns)`` array of ``dtype`` and return
            it (a buffer reused across batches); nothing is shared with the table then.

    The values are copied once, with the GIL released. Nothing is copied where the layout
    already fits: a C-contiguous numpy matrix of the dtype is returned as it is; a single
    column of the dtype (one Arrow chunk, no nulls) as an ``(n, 1)`` view; pandas columns of
    the dtype that are the columns of one row-major block (a frame made from a numpy matrix)
    as a read-only view of that block. A view may be read-only (Arrow memory is immutable).
    Arrow columns of several chunks are read chunk by chunk into the one matrix, never
    concatenated first. Arrow booleans are bit-packed, so they are unpacked on the way (one
    more copy, of those columns only), as are pandas' nullable columns with missing values.

    Nulls (Arrow nulls, pandas' ``NA``): with a float dtype they become NaN, as they do in
    pyarrow's and pandas' own ``to_numpy``, and the model meets them as it meets NaN (many
    treat it as missing; others raise, naming it). An integer or bool matrix cannot hold a
    null, and any number put in its place would be a value the row never had, so a null
    there raises ``InvalidInputError`` naming the column and the first null row. NaN already
    in a float column is a value, and passes through.

    Raises:
        MissingColumnError (a KeyError): a named column is not in the table; the message
            lists the columns there are.
        InvalidTypeError (a TypeError): a column that is not numeric (string, list, struct,
            timestamp, ...), naming it and its type; a ``dtype`` that is neither a float nor
            the columns' own; a table of an unsupported type.
        InvalidInputError (a ValueError): a null in a column for an integer or bool
            ``dtype``; names for a numpy array; an ``out`` of the wrong shape or layout.

    Example:
        >>> import numpy as np, pyarrow as pa
        >>> from beam_turbo._arrays.columns import feature_matrix
        >>> table = pa.table({"id": [7, 8], "x": [0.5, None], "n": pa.array([1, 2], pa.int8())})
        >>> feature_matrix(table, ["x", "n"], np.float32)
        array([[0.5, 1. ],
               [nan, 2. ]], dtype=float32)
    """
    if isinstance(columns, str):
        raise InvalidTypeError(
            f"columns= takes a sequence of names, not one name: pass [{columns!r}]"
        )
    target = None if dtype is None else np.dtype(dtype)
    if isinstance(table, np.ndarray):
        return _from_numpy(table, columns, target, out)
    pa = sys.modules.get("pyarrow")
    if pa is not None and isinstance(table, pa.Table | pa.RecordBatch):
        rows, picked = _arrow_columns(pa, table, columns)
    else:
        pd = sys.modules.get("pandas")
        if pd is not None and isinstance(table, pd.DataFrame):
            rows, picked = _pandas_columns(pd, table, columns)
        else:
            raise InvalidTypeError(
                f"feature_matrix takes a pyarrow Table or RecordBatch, a pandas DataFrame or a"
                f" 2-D numpy array, got {type(table).__module__}.{type(table).__qualname__}"
            )
    target = _target(picked, target)
    for column in picked:
        first_null = column.first_null()
        if first_null is not None and target not in _FLOATS:
            raise InvalidInputError(
                f"column {column.name!r} has a null at row {first_null}, which a matrix of"
                f" dtype {target} cannot hold: pass dtype=float32 or float64 (nulls become NaN),"
                f" or fill or drop the nulls first"
            )
    if out is None:
        view = _shared(picked, rows, target)
        if view is not None:
            return view
    return _interleave(picked, rows, target, out)


def _from_numpy(
    matrix: Array, columns: Sequence[str] | None, target: np.dtype[Any] | None, out: Array | None
) -> Array:
    if columns is not None:
        raise InvalidInputError(
            "a numpy array has no column names: pass columns=None, or select its columns first"
            " (matrix[:, [0, 2]])"
        )
    if matrix.ndim != 2:
        raise InvalidInputError(
            f"a numpy table must be 2-D (rows, columns), got shape {matrix.shape}"
        )
    if matrix.dtype.kind not in _NUMERIC_KINDS:
        raise InvalidTypeError(
            f"the matrix has dtype {matrix.dtype}; features must be numeric (bool, integer or"
            f" floating point)"
        )
    target = matrix.dtype if target is None else target
    if out is None and matrix.dtype == target and matrix.flags.c_contiguous:
        return matrix
    picked = [_Column(str(j), matrix.dtype, [matrix[:, j]], [0]) for j in range(matrix.shape[1])]
    return _interleave(picked, matrix.shape[0], _target(picked, target), out)


def _missing(name: str, names: Sequence[str]) -> MissingColumnError:
    shown = ", ".join(repr(n) for n in names[:_NAMES_SHOWN])
    if len(names) > _NAMES_SHOWN:
        shown += f", ... ({len(names) - _NAMES_SHOWN} more)"
    return MissingColumnError(f"column {name!r} is not in the table; its columns are: {shown}")


def _not_numeric(name: str, kind: str) -> InvalidTypeError:
    return InvalidTypeError(
        f"column {name!r} has type {kind}; a feature column must be numeric (bool, integer or"
        f" floating point): cast it, or leave it out of columns="
    )


def _arrow_columns(pa: Any, table: Any, columns: Sequence[str] | None) -> tuple[int, list[_Column]]:
    schema = table.schema
    names: list[str] = schema.names
    if columns is None:
        where = list(enumerate(names))
    else:
        # One pass over the schema, not a search per name: this runs for every batch.
        position: dict[str, int] = {}
        for i, name in enumerate(names):
            position[name] = -1 if name in position else i
        where = []
        for name in columns:
            at = position.get(name)
            if at is None:
                raise _missing(name, names)
            if at < 0:
                times = names.count(name)
                raise InvalidInputError(f"column {name!r} appears {times} times in the table")
            where.append((at, name))
    types = schema.types
    picked = []
    for i, name in where:
        column = _Column(name, _arrow_dtype(pa, types[i], name))
        data = table.column(i)
        start = 0
        for chunk in data.chunks if isinstance(data, pa.ChunkedArray) else (data,):
            if len(chunk):
                column.add(start, *_arrow_values(chunk, column.dtype))
            start += len(chunk)
        picked.append(column)
    return table.num_rows, picked


#: numpy's dtype of each numeric Arrow type met so far.
_ARROW_DTYPES: dict[Any, np.dtype[Any]] = {}


def _arrow_dtype(pa: Any, kind: Any, name: str) -> np.dtype[Any]:
    """numpy's dtype for Arrow's ``kind``, or an error naming the column."""
    dtype = _ARROW_DTYPES.get(kind)
    if dtype is None:
        numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind)
        dtype = np.dtype(kind.to_pandas_dtype()) if numeric or pa.types.is_boolean(kind) else None
        if dtype is not None:  # The numeric types are few; others are not kept.
            _ARROW_DTYPES[kind] = dtype
    if dtype is None:
        raise _not_numeric(name, str(kind))
    return dtype


def _arrow_values(chunk: Any, dtype: np.dtype[Any]) -> tuple[Array, Array | None]:
    """One Arrow chunk as a numpy array (a view where Arrow's layout allows) and its null rows."""
    if not chunk.null_count:
        # Booleans are bit-packed: they alone cannot be viewed.
        return chunk.to_numpy(zero_copy_only=dtype.kind != "b"), None
    nulls = np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))
    if dtype.kind == "b":
        return chunk.fill_null(False).to_numpy(zero_copy_only=False), nulls
    # The values buffer as it is (what lies under a null is unspecified: the rows are
    # overwritten with NaN later); to_numpy would copy the whole chunk to float64 first.
    data = chunk.buffers()[1]
    if data is None:  # Arrow may leave out the values of an array that is all nulls.
        return np.zeros(len(chunk), dtype), nulls
    values = np.frombuffer(
        data, dtype=dtype, count=len(chunk), offset=chunk.offset * dtype.itemsize
    )
    return values, nulls


def _pandas_columns(
    pd: Any, frame: Any, columns: Sequence[str] | None
) -> tuple[int, list[_Column]]:
    labels = list(frame.columns)
    if columns is None:
        where = list(enumerate(labels))
    else:
        position: dict[Any, int] = {}
        for i, label in enumerate(labels):
            position[label] = -1 if label in position else i
        where = []
        for name in columns:
            at = position.get(name)
            if at is None:
                raise _missing(name, [str(label) for label in labels])
            if at < 0:
                raise InvalidInputError(
                    f"column {name!r} appears {labels.count(name)} times in the frame"
                )
            where.append((at, name))
    arrays = _frame_arrays(frame, [i for i, _ in where])
    picked = []
    for (_, name), values in zip(where, arrays, strict=True):
        kind = values.dtype
        if isinstance(kind, np.dtype):
            if kind.kind not in _NUMERIC_KINDS:
                raise _not_numeric(name, str(kind))
            # NaN in a float column is a value: it passes through, as astype passes it.
            picked.append(_Column(str(name), kind, [np.asarray(values)], [0]))
            continue
        # Extension dtypes (Int64, Float32, boolean, numeric Arrow types) carry nulls apart.
        numpy_dtype = getattr(kind, "numpy_dtype", None)
        if not (pd.api.types.is_numeric_dtype(kind) or pd.api.types.is_bool_dtype(kind)) or (
            numpy_dtype is None or np.dtype(numpy_dtype).kind not in _NUMERIC_KINDS
        ):
            raise _not_numeric(name, str(kind))
        numpy_dtype = np.dtype(numpy_dtype)
        column = _Column(str(name), numpy_dtype)
        nulls = np.flatnonzero(np.asarray(values.isna()))
        # Unmasked (a copy of this column where it has nulls; they become NaN later). Zero in
        # the nulls' place keeps the dtype, so values convert once, as numpy would convert them.
        column.add(0, values.to_numpy(dtype=numpy_dtype, na_value=numpy_dtype.type(0)), nulls)
        picked.append(column)
    return len(frame), picked


#: Read columns from pandas' block manager (tests turn it off to check the public road).
_PANDAS_BLOCKS = True


def _frame_arrays(frame: Any, positions: list[int]) -> list[Any]:
    """The columns at ``positions``: numpy or pandas extension arrays (or Series), not copied.

    pandas' public column access builds a Series per column (about 25 us each, more than
    interleaving a batch of 16 columns of 10k rows); its block manager hands out the arrays
    themselves (about 1 us). That is private pandas API, so any failure takes the public road.
    """
    iget = getattr(getattr(frame, "_mgr", None), "iget_values", None)
    if _PANDAS_BLOCKS and iget is not None:
        try:
            arrays = [iget(i) for i in positions]
        except Exception:  # any change in pandas internals: the public road
            pass
        else:
            if all(len(a) == len(frame) for a in arrays):
                return arrays
    return [frame.iloc[:, i] for i in positions]


def _target(picked: list[_Column], target: np.dtype[Any] | None) -> np.dtype[Any]:
    """The matrix's dtype: checked against the columns', or chosen from them."""
    shared = {c.dtype for c in picked}
    if target is None:
        return shared.pop() if len(shared) == 1 else np.dtype(np.float64)
    if target in _FLOATS or shared <= {target}:
        return target
    other = next(c for c in picked if c.dtype != target)
    raise InvalidTypeError(
        f"dtype={target} cannot be the matrix's dtype: column {other.name!r} has dtype"
        f" {other.dtype}; use float32 or float64 (or the columns' own dtype when they all share it)"
    )


def _shared(picked: list[_Column], rows: int, target: np.dtype[Any]) -> Array | None:
    """The matrix as a view of the columns' own memory, where it already has that layout."""
    if not picked or rows == 0:
        return None
    if any(len(c.pieces) != 1 or c.nulls or c.pieces[0].dtype != target for c in picked):
        return None
    first = picked[0].pieces[0]
    size, k = target.itemsize, len(picked)
    if k == 1:
        if not first.flags.c_contiguous:
            return None
        view = first.reshape(rows, 1)
        # Read-only, as pandas' and Arrow's own views are: writing would change the table.
        view.flags.writeable = False
        return view
    # Columns of one row-major block: column j starts j items after column 0, each one row
    # (k items) apart, as in a DataFrame made from a C-contiguous numpy matrix.
    start = first.__array_interface__["data"][0]
    if rows > 1 and first.strides[0] != k * size:
        return None
    for j, column in enumerate(picked):
        piece = column.pieces[0]
        if piece.__array_interface__["data"][0] != start + j * size or (
            rows > 1 and piece.strides[0] != first.strides[0]
        ):
            return None
    return np.lib.stride_tricks.as_strided(first, (rows, k), (k * size, size), writeable=False)


def _interleave(
    picked: list[_Column], rows: int, target: np.dtype[Any], out: Array | None
) -> Array:
    shape = (rows, len(picked))
    if out is not None and (out.shape != shape or out.dtype != target):
        # The kernel checks out= too, but would name a band's shape, not the matrix's.
        raise InvalidInputError(
            f"out= has shape {out.shape} and dtype {out.dtype}, expected {shape} and {target}"
        )
    if not picked or rows == 0:
        return np.empty(shape, target) if out is None else out
    # Where the columns' pieces break (Arrow chunks differ between columns), the matrix is
    # written a band of rows at a time, each band straight from the pieces that hold it.
    breaks = sorted({s for c in picked for s in c.starts} | {rows})
    if len(breaks) == 2:
        matrix = _native.interleave([c.pieces[0] for c in picked], target.name, out)
    else:
        matrix = _native.empty(list(shape), target) if out is None else out
        for start, stop in itertools.pairwise(breaks):
            band = [c.rows(start, stop) for c in picked]
            _native.interleave(band, target.name, matrix[start:stop])
    for j, column in enumerate(picked):
        for nulls in column.nulls:
            matrix[nulls, j] = np.nan
    return matrix
