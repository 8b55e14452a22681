"""beam_turbo.stack: results equal numpy's, one copy, clear errors, safe lifetime and threads."""

from __future__ import annotations

import gc
import threading
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import beam_turbo
from beam_turbo import _native
from beam_turbo.errors import BeamTurboError, InvalidInputError, InvalidTypeError

Array = np.ndarray[Any, Any]

DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
    ml_dtypes.bfloat16,
    np.dtype("datetime64[ns]"),
    np.dtype("S3"),
    np.dtype([("a", np.int32), ("b", np.float64)]),
]


def sample(shape: tuple[int, ...], dtype: Any, seed: int) -> Array:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 100, size=shape)
    dt = np.dtype(dtype)
    if dt.kind == "V" and dt.names:
        out = np.zeros(shape, dt)
        out["a"], out["b"] = raw, raw / 3
        return out
    if dt.kind == "M":
        return raw.astype("datetime64[ns]")
    if dt.kind == "S":
        return raw.astype("S3")
    return raw.astype(dt)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_fixed_size_dtype_matches_numpy_stack(dtype: Any) -> None:
    arrays = [sample((3, 4), dtype, seed) for seed in range(5)]
    batch = beam_turbo.stack(arrays)
    expected = np.stack(arrays)
    assert batch.dtype == expected.dtype
    assert batch.shape == expected.shape
    assert batch.tobytes() == expected.tobytes()


def test_batch_is_aligned_contiguous_writeable_and_owns_rust_memory() -> None:
    batch = beam_turbo.stack([np.arange(5, dtype=np.int16)] * 3)
    assert batch.ctypes.data % 64 == 0
    assert batch.flags.c_contiguous
    assert batch.flags.writeable
    assert isinstance(batch.base, _native.BatchMemory)
    assert batch.base.nbytes == batch.nbytes


def test_zero_d_and_zero_size_elements() -> None:
    scalars = [np.float64(i) * np.ones(()) for i in range(4)]
    assert beam_turbo.stack(scalars).tolist() == [0.0, 1.0, 2.0, 3.0]
    empty = [np.zeros((2, 0, 3), np.float32)] * 5
    batch = beam_turbo.stack(empty)
    assert batch.shape == (5, 2, 0, 3)
    assert batch.size == 0


def strided_views() -> list[tuple[str, Array]]:
    base = np.arange(2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5)
    return [
        ("transposed", base.transpose(2, 0, 1)),
        ("fortran", np.asfortranarray(base)),
        ("negative", base[:, ::-1, ::-2]),
        ("sliced", base[1:, 1:5, 2:]),
        ("broadcast", np.broadcast_to(base[0, 0], (4, 5))),
        ("unaligned", np.frombuffer(b"\0" + base.tobytes(), np.float32, count=60, offset=1)),
    ]


@pytest.mark.parametrize(
    ("name", "view"), strided_views(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_strided_inputs_are_copied_correctly(name: str, view: Array) -> None:
    arrays = [view, view + 1 if view.dtype.kind == "f" else view, view.copy()]
    assert np.array_equal(beam_turbo.stack(arrays), np.stack(arrays))


def test_large_batches_copy_in_parallel_and_correctly() -> None:
    rng = np.random.default_rng(3)
    images = [rng.random((64, 64, 3), dtype=np.float32)[:, ::-1] for _ in range(128)]
    assert np.array_equal(beam_turbo.stack(images), np.stack(images))


def test_accepts_any_sequence_and_iterable() -> None:
    arrays = [np.arange(3)] * 4
    expected = np.stack(arrays)
    assert np.array_equal(beam_turbo.stack(tuple(arrays)), expected)
    assert np.array_equal(beam_turbo.stack(iter(arrays)), expected)
    assert np.array_equal(beam_turbo.stack(a for a in arrays), expected)


def test_buffer_protocol_and_array_interface_objects() -> None:
    class Exporter:
        def __init__(self, array: Array) -> None:
            self.array = array
            self.__array_interface__ = array.__array_interface__

    values = [np.arange(6, dtype=np.int32) * i for i in range(3)]
    assert np.array_equal(beam_turbo.stack([Exporter(v) for v in values]), np.stack(values))
    raw = [bytearray(b"abc"), memoryview(b"xyz")]
    assert beam_turbo.stack(raw).tolist() == [[97, 98, 99], [120, 121, 122]]
    # bytes are one string each to numpy (dtype S3), though they expose a buffer: as numpy.
    strings = beam_turbo.stack([b"abc", b"xyz"])
    assert strings.dtype == np.dtype("S3")
    assert strings.tolist() == [b"abc", b"xyz"]
    views = [memoryview(v.data) for v in values]
    assert beam_turbo.stack(views).tolist() == np.stack(values).tolist()


def test_array_interface_that_reaches_outside_its_buffer_is_refused() -> None:
    class Liar:
        def __init__(self, **interface: Any) -> None:
            self.__array_interface__ = {"version": 3, "typestr": "<f4", **interface}

    buf = bytearray(64)
    good = Liar(shape=(16,), data=buf)
    assert beam_turbo.stack([good]).shape == (1, 16)
    for liar in [
        Liar(shape=(100,), data=buf),
        Liar(shape=(4,), data=buf, strides=(64,)),
        Liar(shape=(4,), data=buf, offset=60),
        Liar(shape=(4,), data=buf, strides=(-4,)),
    ]:
        with pytest.raises(InvalidInputError, match=r"element 1 .*outside its 64-byte buffer"):
            beam_turbo.stack([good, liar])


def test_object_that_exposes_no_memory_is_a_type_error() -> None:
    with pytest.raises(
        InvalidTypeError, match=r"element 1 is list, which does not expose its memory"
    ):
        beam_turbo.stack([np.zeros(2), [1.0, 2.0]])


def test_object_dtype_is_a_type_error() -> None:
    objects = np.array([object(), object()])
    with pytest.raises(InvalidTypeError, match=r"element 0 has shape \(2,\) and dtype object"):
        beam_turbo.stack([objects, objects])


def test_empty_input_raises_like_numpy() -> None:
    with pytest.raises(ValueError, match="need at least one array to stack"):
        np.stack([])
    with pytest.raises(InvalidInputError, match="need at least one array to stack"):
        beam_turbo.stack([])


def test_shape_mismatch_names_element_shape_dtype_and_expectation() -> None:
    arrays = [np.zeros((2, 3), np.float32)] * 3 + [np.zeros((2, 4), np.float32)]
    with pytest.raises(
        InvalidInputError,
        match=r"element 3 has shape \(2, 4\) and dtype float32, expected shape \(2, 3\)",
    ):
        beam_turbo.stack(arrays)


def test_rank_mismatch_names_the_element() -> None:
    with pytest.raises(InvalidInputError, match=r"element 1 has shape \(6,\) .* expected 2 dim"):
        beam_turbo.stack([np.zeros((2, 3)), np.zeros(6)])


def test_dtype_mismatch_is_a_type_error_naming_the_element() -> None:
    arrays = [np.zeros(3, np.float32), np.zeros(3, np.float32), np.zeros(3, np.float64)]
    with pytest.raises(
        InvalidTypeError,
        match=r"element 2 has shape \(3,\) and dtype float64, expected dtype float32",
    ):
        beam_turbo.stack(arrays)


def test_errors_are_catchable_as_stdlib_and_beam_turbo_errors() -> None:
    with pytest.raises(ValueError, match="element 1"):
        beam_turbo.stack([np.zeros(1), np.zeros(2)])
    with pytest.raises(TypeError, match="element 1"):
        beam_turbo.stack([np.zeros(1), np.zeros(1, np.int8)])
    with pytest.raises(BeamTurboError):
        beam_turbo.stack([])


# --- out= ----------------------------------------------------------------------------------


def test_out_numpy_is_written_and_returned() -> None:
    arrays = [np.arange(4, dtype=np.int64) * i for i in range(3)]
    out = np.full((3, 4), -1, np.int64)
    assert beam_turbo.stack(arrays, out=out) is out
    assert np.array_equal(out, np.stack(arrays))


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (np.zeros((3, 5), np.int64), r"out= has the wrong shape: got \(3, 5\), expected \(3, 4\)"),
        (np.zeros((3, 4), np.int32), r"out= has the wrong dtype: got int32, expected int64"),
        (np.zeros((4, 3), np.int64).T, r"out= must be C-contiguous"),
        (np.zeros((3, 4), np.int64)[::1].copy().view(), None),
    ],
)
def test_out_errors_name_what_differs(out: Array, message: str | None) -> None:
    arrays = [np.arange(4, dtype=np.int64)] * 3
    if message is None:
        assert beam_turbo.stack(arrays, out=out) is out
        return
    with pytest.raises(InvalidInputError, match=message):
        beam_turbo.stack(arrays, out=out)


def test_out_read_only_and_overlapping_and_foreign_are_refused() -> None:
    arrays = [np.arange(4, dtype=np.int64)] * 3
    read_only = np.zeros((3, 4), np.int64)
    read_only.flags.writeable = False
    with pytest.raises(InvalidInputError, match="out= must be writeable"):
        beam_turbo.stack(arrays, out=read_only)
    shared = np.zeros((3, 4), np.int64)
    with pytest.raises(InvalidInputError, match="overlaps the memory of element 2"):
        beam_turbo.stack([np.zeros(4, np.int64), np.zeros(4, np.int64), shared[2]], out=shared)
    with pytest.raises(InvalidTypeError, match="out= must be a numpy array or a CPU torch tensor"):
        beam_turbo.stack(arrays, out=[[0] * 4] * 3)


# --- pad= ----------------------------------------------------------------------------------


def test_pad_one_dimensional_tokens_and_shapes() -> None:
    tokens = [np.arange(n, dtype=np.int64) + 1 for n in (3, 1, 5)]
    batch, shapes = beam_turbo.stack(tokens, pad=0)
    assert batch.tolist() == [[1, 2, 3, 0, 0], [1, 0, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert shapes.dtype == np.int64
    assert shapes.tolist() == [[3], [1], [5]]


def test_pad_several_dimensions_and_strided_inputs() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(8, dtype=np.float32).reshape(4, 2).T  # (2, 4), strided
    batch, shapes = beam_turbo.stack([a, b], pad=np.nan)
    assert batch.shape == (2, 2, 4)
    expected = np.full((2, 2, 4), np.nan, np.float32)
    expected[0, :2, :3] = a
    expected[1, :2, :4] = b
    assert np.array_equal(batch, expected, equal_nan=True)
    assert shapes.tolist() == [[2, 3], [2, 4]]


def test_pad_into_out() -> None:
    out = np.empty((2, 3), np.int16)
    result, shapes = beam_turbo.stack([np.ones(1, np.int16), np.ones(3, np.int16)], out=out, pad=-1)
    assert result is out
    assert out.tolist() == [[1, -1, -1], [1, 1, 1]]
    assert shapes.tolist() == [[1], [3]]
    with pytest.raises(InvalidInputError, match=r"wrong shape: got \(2, 3\), expected \(2, 4\)"):
        beam_turbo.stack([np.ones(4, np.int16), np.ones(1, np.int16)], out=out, pad=0)


@pytest.mark.parametrize(
    ("dtype", "pad", "reason"),
    [
        (np.uint8, -1, r"out of range \[0, 255\]"),
        (np.int8, 300, r"out of range \[-128, 127\]"),
        (np.int32, 1.5, "not a whole number"),
        (np.bool_, 2, "bool holds only"),
        (np.float16, 1e5, "infinity"),
        (np.float32, 1j, "imaginary"),
        (np.int64, 2**200, "out of range"),
        (np.dtype("datetime64[ns]"), 0, "pad= works with"),
    ],
)
def test_pad_value_the_dtype_cannot_hold_is_a_value_error(
    dtype: Any, pad: Any, reason: str
) -> None:
    arrays = [np.zeros(2, dtype), np.zeros(3, dtype)]
    with pytest.raises(InvalidInputError, match=rf"pad=.* cannot be held by dtype .*{reason}"):
        beam_turbo.stack(arrays, pad=pad)


@pytest.mark.parametrize(
    ("dtype", "pad"),
    [
        (np.bool_, True),
        (np.uint64, 2**64 - 1),
        (np.float16, -np.inf),
        (np.complex64, 1 - 2j),
        (ml_dtypes.bfloat16, 0.5),
        (np.int8, np.int64(-5)),
        (np.float32, np.float32(0.25)),
    ],
)
def test_pad_values_each_dtype_can_hold(dtype: Any, pad: Any) -> None:
    batch, _ = beam_turbo.stack([np.zeros(1, dtype), np.zeros(2, dtype)], pad=pad)
    assert batch[0, 1] == np.array(pad).astype(dtype)


def test_pad_must_be_a_number() -> None:
    with pytest.raises(TypeError, match="pad= must be a number"):
        beam_turbo.stack([np.zeros(1), np.zeros(2)], pad="x")  # type: ignore[call-overload]


def test_pad_keeps_dtype_and_rank_checks() -> None:
    with pytest.raises(InvalidTypeError, match="element 1"):
        beam_turbo.stack([np.zeros(1), np.zeros(2, np.float32)], pad=0)
    with pytest.raises(InvalidInputError, match=r"element 1 .* expected 1 dim"):
        beam_turbo.stack([np.zeros(1), np.zeros((2, 2))], pad=0)


# --- lifetime, memory, threads ------------------------------------------------------------


def test_batch_outlives_its_inputs() -> None:
    arrays = [np.full(1000, i, np.float64) for i in range(10)]
    batch = beam_turbo.stack(arrays)
    del arrays
    gc.collect()
    assert [row[0] for row in batch.tolist()] == list(range(10))


def test_views_keep_batch_memory_alive() -> None:
    batch = beam_turbo.stack([np.arange(4)] * 2)
    row = batch[1]
    del batch
    gc.collect()
    np.arange(10_000).sum()  # reuse freed memory, if the view's memory had been freed
    assert row.tolist() == [0, 1, 2, 3]


def test_large_batch_memory_returns_to_the_pool_only_when_unreferenced() -> None:
    previous = beam_turbo.set_pool_limit(256 << 20)
    try:
        beam_turbo.set_pool_limit(0)  # start empty
        beam_turbo.set_pool_limit(256 << 20)
        big = [np.ones((1024, 512), np.float32)] * 4  # 8 MiB batch
        batch = beam_turbo.stack(big)
        view = batch[3]
        assert _native.pool_usage() == (0, 0)
        del batch
        assert _native.pool_usage() == (0, 0), "a live view still holds the memory"
        assert float(view.sum()) == 1024 * 512
        del view
        assert _native.pool_usage()[0] == 1
        again = beam_turbo.stack(big)
        assert _native.pool_usage() == (0, 0), "the pooled buffer was reused"
        assert float(again.sum()) == 4 * 1024 * 512
    finally:
        beam_turbo.set_pool_limit(previous)


def test_set_pool_limit_rejects_negative() -> None:
    with pytest.raises(InvalidInputError, match="pool limit"):
        beam_turbo.set_pool_limit(-1)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        import os

        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_ten_thousand_calls_leave_resident_memory_flat() -> None:
    arrays = [np.ones(1024, np.float32)] * 256  # 1 MiB batches, through the pool
    padded = [np.ones(n, np.int64) for n in range(1, 257)]
    for _ in range(200):
        beam_turbo.stack(arrays)
        beam_turbo.stack(padded, pad=0)
    before = _resident_bytes()
    for _ in range(10_000):
        beam_turbo.stack(arrays)
        beam_turbo.stack(padded, pad=0)
    growth = _resident_bytes() - before
    assert growth < 8 << 20, f"resident memory grew by {growth / 2**20:.1f} MiB"


def test_many_threads_at_once_get_correct_batches() -> None:
    rng = np.random.default_rng(7)
    inputs = [[rng.random((32, 32), dtype=np.float32)[:, ::2] for _ in range(64)] for _ in range(8)]
    expected = [np.stack(arrays) for arrays in inputs]
    failures: list[str] = []
    big = [rng.random((256, 256), dtype=np.float32) for _ in range(80)]  # > 4 MiB: parallel
    big_expected = np.stack(big)

    def work(worker: int) -> None:
        for i in range(60):
            k = (worker + i) % len(inputs)
            if not np.array_equal(beam_turbo.stack(inputs[k]), expected[k]):
                failures.append(f"worker {worker} call {i}")
            if i % 20 == 0 and not np.array_equal(beam_turbo.stack(big), big_expected):
                failures.append(f"worker {worker} big call {i}")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# --- property test against numpy --------------------------------------------------------

dtypes = st.sampled_from(
    [np.bool_, np.int8, np.uint16, np.int32, np.float32, np.float64, np.complex64]
)


@st.composite
def batches(draw: st.DrawFn) -> list[Array]:
    dtype = draw(dtypes)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    n = draw(st.integers(1, 6))
    arrays = []
    for _ in range(n):
        base = draw(hnp.arrays(dtype, tuple(2 * s + 1 for s in shape)))
        steps = tuple(draw(st.sampled_from([1, 2, -1, -2])) for _ in shape)
        view = base[tuple(slice(None, None, step) for step in steps)]
        view = view[tuple(slice(0, s) for s in shape)]
        if draw(st.booleans()) and view.ndim > 1:
            view = np.ascontiguousarray(view.swapaxes(0, -1)).swapaxes(0, -1)
        arrays.append(view)
    return arrays


@settings(max_examples=60, deadline=None)
@given(batches())
def test_matches_numpy_stack_on_random_strided_inputs(arrays: list[Array]) -> None:
    assert beam_turbo.stack(arrays).tobytes() == np.stack(arrays).tobytes()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        hnp.arrays(np.int32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=4)),
        min_size=1,
        max_size=5,
    ),
    st.integers(-5, 5),
)
def test_padding_matches_a_numpy_reference(arrays: list[Array], pad: int) -> None:
    rows = max(a.shape[0] for a in arrays)
    cols = max(a.shape[1] for a in arrays)
    expected = np.full((len(arrays), rows, cols), pad, np.int32)
    for i, a in enumerate(arrays):
        expected[i, : a.shape[0], : a.shape[1]] = a
    batch, shapes = beam_turbo.stack(arrays, pad=pad)
    assert np.array_equal(batch, expected)
    assert shapes.tolist() == [list(a.shape) for a in arrays]
