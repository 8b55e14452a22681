"""feature_matrix and _native.interleave: tables to the model's matrix, equal to numpy's
``column_stack(...).astype``, one copy, views where the layout fits, and clear errors."""

from __future__ import annotations

import itertools
import subprocess
import sys
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from beam_turbo import _native
from beam_turbo._arrays import columns as columns_module
from beam_turbo._arrays.columns import feature_matrix
from beam_turbo.errors import InvalidInputError, InvalidTypeError, MissingColumnError

Array = np.ndarray[Any, Any]

DTYPES = [
    np.dtype(name)
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
]
FLOATS = [np.dtype(np.float32), np.dtype(np.float64)]
#: Rows enough for the kernel's threads: 16 float32 columns of this many rows pass 4 MiB.
PARALLEL_ROWS = 70_001


def expected(columns: list[Array], dtype: Any, nulls: list[Array | None] | None = None) -> Array:
    """numpy's answer: the columns stacked, cast as ``astype`` casts, nulls as NaN."""
    with np.errstate(over="ignore", invalid="ignore"):
        casted = [np.asarray(c).astype(dtype) for c in columns]
    matrix = (
        np.column_stack(casted)
        if casted and len(casted[0])
        else np.empty((len(columns[0]) if columns else 0, len(columns)), dtype)
    )
    for j, mask in enumerate(nulls or []):
        if mask is not None:
            matrix[mask, j] = np.nan
    return matrix


def check(got: Array, want: Array) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


lengths = st.one_of(st.just(0), st.just(1), st.integers(2, 40))


@st.composite
def column_sets(draw: st.DrawFn) -> tuple[list[Array], np.dtype[Any]]:
    """k columns of n values, each of any supported dtype, and a target they allow."""
    n = draw(lengths)
    dtypes = draw(st.lists(st.sampled_from(DTYPES), min_size=1, max_size=5))
    columns = [draw(hnp.arrays(d, n)) for d in dtypes]
    targets = FLOATS + ([dtypes[0]] if len(set(dtypes)) == 1 else [])
    return columns, draw(st.sampled_from(targets))


@settings(max_examples=150, deadline=None)
@given(column_sets())
def test_interleave_equals_column_stack_astype(case: tuple[list[Array], np.dtype[Any]]) -> None:
    columns, target = case
    check(_native.interleave(columns, target.name), expected(columns, target))


@settings(max_examples=60, deadline=None)
@given(column_sets(), st.booleans())
def test_strided_columns_and_out_are_honoured(
    case: tuple[list[Array], np.dtype[Any]], reverse: bool
) -> None:
    columns, target = case
    # Every other value of a longer array, maybe reversed: the same values, strided.
    strided = [np.repeat(c, 2)[::-2][::-1] if reverse else np.repeat(c, 2)[::2] for c in columns]
    out = np.full((len(columns[0]), len(columns)), 7, target)
    got = _native.interleave(strided, target.name, out)
    assert got is out
    check(got, expected(columns, target))


@pytest.mark.parametrize("target", FLOATS, ids=str)
def test_large_tables_go_parallel_and_match(target: np.dtype[Any]) -> None:
    rng = np.random.default_rng(0)
    columns = [
        (rng.random(PARALLEL_ROWS) * 100 * (j + 1)).astype(DTYPES[j % len(DTYPES)])
        for j in range(16)
    ]
    check(_native.interleave(columns, target.name), expected(columns, target))
    # The same through pyarrow, chunked differently per column.
    table = pa.table(
        {f"c{j}": pa.chunked_array(np.array_split(c, 1 + j % 4)) for j, c in enumerate(columns)}
    )
    check(feature_matrix(table, None, target), expected(columns, target))


def arrow_column(values: Array, mask: Array | None, cuts: list[int]) -> pa.ChunkedArray:
    """``values`` as a chunked Arrow column, cut at ``cuts``, null where ``mask``."""
    array = pa.array(values, mask=mask)
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(values)), len(values)]
    return pa.chunked_array(
        [array.slice(a, b - a) for a, b in itertools.pairwise(bounds)], array.type
    )


@st.composite
def arrow_tables(draw: st.DrawFn) -> tuple[Any, list[Array], list[Array | None], list[str]]:
    n = draw(lengths)
    k = draw(st.integers(1, 4))
    names, columns, masks, arrow = [], [], [], {}
    for j in range(k):
        dtype = draw(st.sampled_from(DTYPES))
        values = draw(hnp.arrays(dtype, n))
        mask = draw(st.none() | hnp.arrays(np.bool_, n))
        cuts = draw(st.lists(st.integers(0, n), max_size=3))
        names.append(f"f{j}")
        columns.append(values)
        masks.append(mask if mask is not None and mask.any() else None)
        arrow[f"f{j}"] = arrow_column(values, mask, cuts)
    arrow["id"] = pa.array(np.arange(n))
    table = pa.table(arrow)
    if draw(st.booleans()):
        table = table.combine_chunks().to_batches(max_chunksize=max(n, 1))[0] if n else table
    return table, columns, masks, names


@settings(max_examples=120, deadline=None)
@given(arrow_tables(), st.sampled_from(FLOATS))
def test_arrow_tables_equal_numpy_with_nulls_as_nan(
    case: tuple[Any, list[Array], list[Array | None], list[str]], target: np.dtype[Any]
) -> None:
    table, columns, masks, names = case
    check(feature_matrix(table, names, target), expected(columns, target, masks))
    # Reusing a buffer gives the same, written in place.
    out = np.full((table.num_rows, len(names)), 3, target)
    assert feature_matrix(table, names, target, out=out) is out
    check(out, expected(columns, target, masks))


@st.composite
def frames(draw: st.DrawFn) -> tuple[pd.DataFrame, list[Array], list[Array | None]]:
    n = draw(lengths)
    k = draw(st.integers(1, 4))
    data, columns, masks = {}, [], []
    for j in range(k):
        dtype = draw(st.sampled_from(DTYPES))
        values = draw(hnp.arrays(dtype, n))
        mask = None
        nullable = {"i": "Int", "u": "UInt", "f": "Float"}.get(dtype.kind, "")
        can_be_nullable = dtype.kind in "iu" or (dtype.kind == "f" and dtype.itemsize > 2)
        if can_be_nullable and draw(st.booleans()):
            mask = draw(hnp.arrays(np.bool_, n))
            ext = pd.array(values, dtype=f"{nullable}{8 * dtype.itemsize}")
            ext[mask] = pd.NA
            data[f"f{j}"] = ext
        elif dtype.kind == "b" and draw(st.booleans()):
            mask = draw(hnp.arrays(np.bool_, n))
            ext = pd.array(values, dtype="boolean")
            ext[mask] = pd.NA
            data[f"f{j}"] = ext
        else:
            data[f"f{j}"] = values
        columns.append(values)
        masks.append(mask if mask is not None and mask.any() else None)
    data["name"] = [str(i) for i in range(n)]
    return pd.DataFrame(data), columns, masks


@settings(max_examples=80, deadline=None)
@given(frames(), st.sampled_from(FLOATS))
def test_pandas_frames_equal_numpy_with_na_as_nan(
    case: tuple[pd.DataFrame, list[Array], list[Array | None]], target: np.dtype[Any]
) -> None:
    frame, columns, masks = case
    names = [c for c in frame.columns if c != "name"]
    check(feature_matrix(frame, names, target), expected(columns, target, masks))


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from(DTYPES), hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=20)
    ),
    st.sampled_from(FLOATS),
)
def test_numpy_matrices_equal_astype(matrix: Array, target: np.dtype[Any]) -> None:
    columns = list(matrix.T)
    for layout in (matrix, np.asfortranarray(matrix), np.repeat(matrix, 2, axis=0)[::2]):
        check(feature_matrix(layout, None, target), expected(columns, target).reshape(matrix.shape))
        check(feature_matrix(layout, None, matrix.dtype), matrix)


def test_own_dtype_and_default_dtype() -> None:
    ints = pa.table({"a": pa.array([1, 2], pa.int32()), "b": pa.array([3, 4], pa.int32())})
    check(feature_matrix(ints, None, "int32"), np.array([[1, 3], [2, 4]], np.int32))
    # No dtype: the columns' shared one, else float64.
    check(feature_matrix(ints), np.array([[1, 3], [2, 4]], np.int32))
    mixed = pd.DataFrame({"a": np.array([1, 2], np.int8), "b": np.array([0.5, 1.5], np.float32)})
    check(feature_matrix(mixed), np.array([[1, 0.5], [2, 1.5]], np.float64))


@pytest.mark.parametrize("blocks", [True, False], ids=["block-manager", "public-api"])
def test_pandas_columns_read_through_blocks_or_the_public_api(
    blocks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(columns_module, "_PANDAS_BLOCKS", blocks)
    matrix = np.arange(8.0).reshape(4, 2)
    frame = pd.DataFrame(matrix, columns=["a", "b"], copy=False)
    frame["i"] = pd.array([1, None, 3, 4], dtype="Int64")
    frame["f"] = pd.array([0.5, 1.5, None, 2.5], dtype="Float32")
    frame["t"] = pd.array([True, False, None, True], dtype="boolean")
    frame["p"] = pd.Series([1.0, None, 3.0, 4.0], dtype="float32[pyarrow]")
    frame["u"] = np.array([1, 2, 3, 250], np.uint8)
    frame["s"] = ["w", "x", "y", "z"]
    arrays = columns_module._frame_arrays(frame, [0, 2])
    assert all(isinstance(a, pd.Series) for a in arrays) != blocks
    nan = np.nan
    want = np.array(
        [
            [0, 1, 1, 0.5, 1, 1, 1],
            [2, 3, nan, 1.5, 0, nan, 2],
            [4, 5, 3, nan, nan, 3, 3],
            [6, 7, 4, 2.5, 1, 4, 250],
        ]
    )
    check(feature_matrix(frame, ["a", "b", "i", "f", "t", "p", "u"], "float64"), want)
    view = feature_matrix(frame, ["a", "b"], "float64")
    assert np.shares_memory(view, matrix)
    with pytest.raises(InvalidTypeError, match=r"column 's' has type str"):
        feature_matrix(frame, ["a", "s"], "float64")
    with pytest.raises(InvalidInputError, match=r"column 'i' has a null at row 1"):
        feature_matrix(frame, ["i"], "int64")


# Zero copy: the matrix is the table's own memory where the layout already fits.


def test_a_c_contiguous_numpy_matrix_of_the_dtype_is_returned_as_is() -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert feature_matrix(matrix, None, np.float32) is matrix
    assert not np.shares_memory(feature_matrix(matrix, None, np.float64), matrix)
    assert not np.shares_memory(feature_matrix(np.asfortranarray(matrix), None, "float32"), matrix)


def test_a_single_arrow_column_of_the_dtype_is_a_view() -> None:
    chunk = pa.array(np.arange(5, dtype=np.float32))
    table = pa.table({"x": chunk, "y": pa.array(np.arange(5.0))})
    buffer = np.frombuffer(chunk.buffers()[1], np.float32)
    got = feature_matrix(table, ["x"], "float32")
    assert got.shape == (5, 1)
    assert np.shares_memory(got, buffer)
    np.testing.assert_array_equal(got[:, 0], np.arange(5))
    # Another dtype, two chunks or a null: copied.
    assert not np.shares_memory(feature_matrix(table, ["x"], "float64"), buffer)
    two = pa.table({"x": pa.chunked_array([chunk.slice(0, 2), chunk.slice(2)])})
    assert not np.shares_memory(feature_matrix(two, ["x"], "float32"), buffer)


def test_pandas_columns_of_one_row_major_block_are_a_view() -> None:
    matrix = np.arange(12.0).reshape(4, 3)
    frame = pd.DataFrame(matrix, columns=["a", "b", "c"], copy=False)
    got = feature_matrix(frame, ["a", "b", "c"], "float64")
    assert np.shares_memory(got, matrix)
    np.testing.assert_array_equal(got, matrix)
    assert not got.flags.writeable
    # A subset in order is not one block's rows: copied, and right.
    check(feature_matrix(frame, ["a", "c"], "float64"), matrix[:, [0, 2]])
    check(feature_matrix(frame, ["b", "a", "c"], "float64"), matrix[:, [1, 0, 2]])
    single = feature_matrix(frame, ["b"], "float64")
    assert single.shape == (4, 1)
    # One column of a block is strided: not a C-contiguous (n, 1) view, so copied.
    assert not np.shares_memory(single, matrix)
    own = pd.DataFrame({"x": np.arange(4.0)})
    view = feature_matrix(own, ["x"], "float64")
    assert np.shares_memory(view, own["x"].to_numpy())
    assert not view.flags.writeable


# Errors name what was wrong and what is needed.


def test_columns_of_different_lengths_name_the_column() -> None:
    with pytest.raises(InvalidInputError, match=r"column 2 has 3 rows, expected 4"):
        _native.interleave([np.zeros(4), np.zeros(4), np.zeros(3)], "float64")


@pytest.mark.parametrize(
    ("column", "shown"),
    [
        (np.zeros(3, np.complex64), "complex64"),
        (np.array(["a"], object), "object"),
        (np.zeros(3, ">f4"), ">f4 (non-native byte order)"),
        (np.zeros(3, "datetime64[ns]"), "datetime64[ns]"),
    ],
)
def test_unsupported_dtypes_are_named(column: Array, shown: str) -> None:
    with pytest.raises(
        InvalidTypeError, match=r"column 1 has dtype .*which cannot be a feature"
    ) as err:
        _native.interleave([np.zeros(len(column)), column], "float32")
    assert shown in str(err.value)
    assert "supported: bool, int8" in str(err.value)


def test_unsupported_targets_say_what_is_supported() -> None:
    with pytest.raises(
        InvalidTypeError, match=r"dtype=complex64 cannot be the output's dtype: use"
    ):
        _native.interleave([np.zeros(3)], "complex64")
    with pytest.raises(
        InvalidTypeError, match=r"column 1 has dtype float32; use float32 or float64"
    ):
        _native.interleave([np.zeros(3, np.int32), np.zeros(3, np.float32)], "int32")
    table = pa.table({"a": pa.array([1.5]), "b": pa.array([1], pa.int32())})
    with pytest.raises(InvalidTypeError, match=r"dtype=int32 .* column 'a' has dtype float64"):
        feature_matrix(table, None, "int32")


def test_wrong_out_is_refused() -> None:
    columns = [np.zeros(4, np.float32), np.zeros(4, np.float32)]
    cases: list[tuple[Array, str]] = [
        (
            np.zeros((4, 3), np.float32),
            r"out= has the wrong shape: got \(4, 3\), expected \(4, 2\)",
        ),
        (np.zeros((4, 2), np.float64), r"out= has the wrong dtype: got float64, expected float32"),
        (np.zeros((2, 4), np.float32).T, r"out= must be C-contiguous"),
    ]
    for out, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            _native.interleave(columns, "float32", out)
    readonly = np.zeros((4, 2), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(InvalidInputError, match=r"out= must be writeable"):
        _native.interleave(columns, "float32", readonly)
    shared = np.zeros((4, 2), np.float32)
    with pytest.raises(InvalidInputError, match=r"out= overlaps the memory of column 1"):
        _native.interleave([columns[0], shared[:, 1]], "float32", shared)
    with pytest.raises(InvalidInputError, match=r"out= has shape \(3, 2\) .*expected \(4, 2\)"):
        feature_matrix(
            pa.table({"a": columns[0], "b": columns[1]}), None, "float32", out=shared[:3]
        )
    not_an_array: Any = [1.0]
    with pytest.raises(TypeError, match=r"column 0 is list, not a numpy array"):
        _native.interleave([not_an_array], "float32")
    with pytest.raises(
        InvalidInputError, match=r"column 0 has shape \(2, 2\), expected a 1-D array"
    ):
        _native.interleave([np.zeros((2, 2))], "float32")
    with pytest.raises(InvalidInputError, match=r"need at least one column"):
        _native.interleave([], "float32")


def test_missing_columns_are_named_with_those_there_are() -> None:
    table = pa.table({"id": [1], "x": [2.0]})
    frame = table.to_pandas()
    for source in (table, table.to_batches()[0], frame):
        with pytest.raises(MissingColumnError) as err:
            feature_matrix(source, ["x", "y"], "float32")
        assert isinstance(err.value, KeyError)
        assert str(err.value) == "column 'y' is not in the table; its columns are: 'id', 'x'"
    wide = pa.table({f"c{i}": [i] for i in range(25)})
    with pytest.raises(MissingColumnError, match=r"'c19', \.\.\. \(5 more\)$"):
        feature_matrix(wide, ["nope"], "float32")


@pytest.mark.parametrize(
    ("column", "shown"),
    [
        (pa.array(["a", "b"]), "string"),
        (pa.array([[1.0], [2.0]]), "list<item: double>"),
        (pa.array([{"a": 1}, {"a": 2}]), "struct<a: int64>"),
        (pa.array([1, 2], pa.timestamp("s")), "timestamp[s]"),
    ],
    ids=["string", "list", "struct", "timestamp"],
)
def test_non_numeric_arrow_columns_are_named(column: Any, shown: str) -> None:
    table = pa.table({"x": [1.0, 2.0], "bad": column})
    with pytest.raises(InvalidTypeError) as err:
        feature_matrix(table, None, "float32")
    assert str(err.value).startswith(f"column 'bad' has type {shown}; a feature column must be")


@pytest.mark.parametrize(
    "column",
    [["a", "b"], pd.Categorical([1, 2]), pd.to_datetime(["2020-01-01", "2020-01-02"])],
    ids=["str", "category", "datetime"],
)
def test_non_numeric_pandas_columns_are_named(column: Any) -> None:
    frame = pd.DataFrame({"x": [1.0, 2.0], "bad": column})
    with pytest.raises(InvalidTypeError, match=r"column 'bad' has type .*; a feature column must"):
        feature_matrix(frame, None, "float32")


def test_a_null_for_an_integer_matrix_names_the_column_and_row() -> None:
    column = pa.chunked_array([pa.array([1, 2, 3]), pa.array([4, None, 6])])
    table = pa.table({"a": pa.array([1, 2, 3, 4, 5, 6]), "b": column})
    with pytest.raises(
        InvalidInputError,
        match=r"column 'b' has a null at row 4, which a matrix of dtype int64 cannot hold",
    ):
        feature_matrix(table, None, "int64")
    frame = pd.DataFrame({"b": pd.array([1, None], dtype="Int64")})
    with pytest.raises(InvalidInputError, match=r"column 'b' has a null at row 1"):
        feature_matrix(frame, None, None)
    check(feature_matrix(frame, None, "float64"), np.array([[1.0], [np.nan]]))


def test_other_inputs_are_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"a numpy array has no column names"):
        feature_matrix(np.zeros((2, 2)), ["a"], "float32")
    with pytest.raises(InvalidInputError, match=r"must be 2-D .*\(2, 2, 2\)"):
        feature_matrix(np.zeros((2, 2, 2)), None, "float32")
    with pytest.raises(InvalidTypeError, match=r"the matrix has dtype <U1"):
        feature_matrix(np.array([["a"]]), None, "float32")
    with pytest.raises(InvalidTypeError, match=r"got builtins.dict"):
        feature_matrix({"a": [1.0]}, None, "float32")
    with pytest.raises(InvalidInputError, match=r"column 'a' appears 2 times in the table"):
        feature_matrix(pa.table([[1.0], [2.0]], names=["a", "a"]), ["a"], "float32")
    twice = pd.DataFrame([[1.0, 2.0, 3.0]], columns=["a", "b", "a"])
    with pytest.raises(InvalidInputError, match=r"column 'a' appears 2 times in the frame"):
        feature_matrix(twice, ["b", "a"], "float32")
    # Every column, by position: duplicated names are no question then.
    check(feature_matrix(twice, None, "float32"), np.array([[1, 2, 3]], np.float32))


def test_one_name_is_not_taken_for_its_letters() -> None:
    table = pa.table({"x": [1.0], "xy": [2.0]})
    with pytest.raises(InvalidTypeError, match=r"pass \['xy'\]"):
        feature_matrix(table, "xy", "float32")


def test_an_all_null_column_is_all_nan() -> None:
    table = pa.table({"a": pa.nulls(3, pa.float32()), "b": pa.array([1, 2, 3], pa.int16())})
    check(feature_matrix(table, None, "float64"), np.array([[np.nan, 1], [np.nan, 2], [np.nan, 3]]))


def test_zero_rows_and_zero_columns() -> None:
    table = pa.table({"a": pa.array([], pa.float32()), "b": pa.array([], pa.int8())})
    check(feature_matrix(table, None, "float32"), np.empty((0, 2), np.float32))
    check(feature_matrix(pa.table({"a": [1.0, 2.0]}), [], "float32"), np.empty((2, 0), np.float32))
    check(feature_matrix(pd.DataFrame({"a": [1.0]}), [], "float64"), np.empty((1, 0)))


def test_frameworks_the_caller_did_not_import_stay_unimported() -> None:
    code = (
        "import sys, numpy as np; from beam_turbo._arrays.columns import feature_matrix;"
        " feature_matrix(np.zeros((2, 2)), None, 'float32');"
        " print(sorted(m for m in ('pyarrow', 'pandas') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
