"""Reliability: hostile input to the native code, and fork safety.

Hostile input gets a clear exception (a ``BeamTurboError`` that is also a ``ValueError`` or
``TypeError``) or a correct result, with numpy as the oracle; nothing may crash the process.
The core's own coverage-guided fuzzing lives in ``fuzz/`` (see docs/reliability.md).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import beam_turbo
from beam_turbo import BatchSizer, ModelCache
from beam_turbo.errors import InvalidInputError, InvalidTypeError

Array = np.ndarray[Any, Any]

# What a refused input may raise: beam-turbo's own errors, which are ValueError or TypeError.
REFUSED = (InvalidInputError, InvalidTypeError)


class Exporter:
    """An object that exposes memory through ``__array_interface__`` with any metadata."""

    def __init__(self, **interface: Any) -> None:
        self.__array_interface__ = {"version": 3, **interface}


def numpy_view(buf: bytearray, interface: dict[str, Any]) -> Array | None:
    """What the interface describes, built by numpy's own bounds-checked constructor; None
    when numpy refuses it (outside the buffer, a bad typestr, a bad shape)."""
    try:
        dtype = np.dtype(interface["typestr"])
        return np.ndarray(
            interface["shape"],
            dtype,
            buffer=buf,
            offset=interface.get("offset", 0),
            strides=interface.get("strides"),
        )
    except (TypeError, ValueError):
        return None


TYPESTRS = ["|u1", "<i2", "<f4", ">i4", "<f8", "<c16", "|b1", "|V3", "<U2", "<f3", "<i7", "|O8"]


@st.composite
def interfaces(draw: st.DrawFn, size: int) -> dict[str, Any]:
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.integers(0, 6)) for _ in range(ndim))
    interface: dict[str, Any] = {"typestr": draw(st.sampled_from(TYPESTRS)), "shape": shape}
    if draw(st.booleans()):
        interface["strides"] = tuple(draw(st.integers(-40, 40)) for _ in range(ndim))
    if draw(st.booleans()):
        interface["offset"] = draw(st.integers(-8, size + 8))
    return interface


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 96).flatmap(lambda n: st.tuples(st.just(n), interfaces(n), interfaces(n))))
def test_array_interface_metadata_that_does_not_add_up(
    case: tuple[int, dict[str, Any], dict[str, Any]],
) -> None:
    size, first, second = case
    buf = bytearray(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    objects = [Exporter(data=buf, **first), Exporter(data=buf, **second)]
    views = [numpy_view(buf, first), numpy_view(buf, second)]
    try:
        batch = beam_turbo.stack(objects)
    except REFUSED:
        return  # refused with a clear error: fine whatever numpy would have done
    # Accepted: then both describe memory inside the buffer, and the batch is numpy's; or
    # they are empty (a 0 dimension), read nothing, and the batch is empty.
    a, b = views
    if a is None or b is None:
        assert batch.size == 0, f"accepted {first} and {second}, which numpy's constructor refuses"
        assert batch.shape == (2, *first["shape"])
        return
    assert batch.dtype == a.dtype
    # np.stack gives native byte order; the batch keeps the inputs' bytes.
    assert batch.tobytes() == np.stack([a, b]).astype(a.dtype).tobytes()


@st.composite
def strided_views(draw: st.DrawFn) -> tuple[list[Array], Any]:
    """Views with arbitrary byte strides (unaligned, negative, zero) inside one buffer."""
    dtype = np.dtype(
        draw(st.sampled_from([np.uint8, np.int16, np.int32, np.float32, np.float64, np.complex64]))
    )
    ndim = draw(st.integers(0, 3))
    base = np.arange(4096, dtype=np.uint16).view(np.uint8)
    views = []
    for _ in range(draw(st.integers(1, 5))):
        shape = tuple(draw(st.integers(0, 4)) for _ in range(ndim))
        strides = tuple(draw(st.integers(-24, 24)) for _ in range(ndim))
        offset = draw(st.integers(0, 128))
        try:
            views.append(np.ndarray(shape, dtype, buffer=base, offset=offset, strides=strides))
        except ValueError:
            views.append(np.ndarray(shape, dtype, buffer=base, offset=offset))
    pad = draw(st.sampled_from([None, 0, 1, 7]))
    return views, pad


def padded_reference(views: list[Array], pad: Any) -> Array:
    shape = tuple(max(v.shape[d] for v in views) for d in range(views[0].ndim))
    out = np.full((len(views), *shape), pad, dtype=views[0].dtype)
    for i, v in enumerate(views):
        region: tuple[int | slice, ...] = (i, *(slice(0, n) for n in v.shape))
        out[region] = v
    return out


@settings(max_examples=150, deadline=None)
@given(strided_views())
def test_random_strides_dtypes_and_pads_match_numpy(case: tuple[list[Array], Any]) -> None:
    views, pad = case
    if pad is None:
        if len({v.shape for v in views}) > 1:
            with pytest.raises(InvalidInputError, match="pass pad="):
                beam_turbo.stack(views)
            return
        assert beam_turbo.stack(views).tobytes() == np.stack(views).tobytes()
        return
    batch, shapes = beam_turbo.stack(views, pad=pad)
    assert batch.tobytes() == padded_reference(views, pad).tobytes()
    assert shapes.tolist() == [list(v.shape) for v in views]


def test_empty_arrays_with_wild_strides_are_padding_only() -> None:
    # numpy lets an array with a 0 dimension have any strides; none may be followed.
    empty = np.lib.stride_tricks.as_strided(
        np.zeros(2, np.float32), shape=(3, 0), strides=(-(2**61), 4)
    )
    batch, shapes = beam_turbo.stack([empty, np.ones((1, 2), np.float32)], pad=0.5)
    assert batch.tolist() == [[[0.5, 0.5]] * 3, [[1.0, 1.0], [0.5, 0.5], [0.5, 0.5]]]
    assert shapes.tolist() == [[3, 0], [1, 2]]


def test_bfloat16_and_pad_values_out_of_range_are_refused_not_wrapped() -> None:
    arrays = [np.ones(2, ml_dtypes.bfloat16), np.ones(3, ml_dtypes.bfloat16)]
    batch, _ = beam_turbo.stack(arrays, pad=-1.0)
    assert batch.astype(np.float32).tolist() == [[1, 1, -1], [1, 1, 1]]
    for dtype, pad in [(np.uint8, 256), (np.int8, -129), (np.uint64, -1), (np.int64, 2**63)]:
        with pytest.raises(InvalidInputError, match="cannot be held"):
            beam_turbo.stack([np.zeros(1, dtype), np.zeros(2, dtype)], pad=pad)
    with pytest.raises(InvalidInputError, match="cannot be held"):
        beam_turbo.stack([np.zeros(1, np.int64)], pad=2**200)


def _out_cases() -> Iterator[tuple[str, Any]]:
    """``out=`` buffers that are not a writeable C-contiguous float32 array of shape (3, 4)."""
    yield "list", [[0.0] * 4] * 3
    yield "bytearray", bytearray(48)
    yield "memoryview", memoryview(bytearray(48))
    yield "wrong dtype", np.zeros((3, 4), np.float64)
    yield "same size, other dtype", np.zeros((3, 4), np.int32)
    yield "wrong shape", np.zeros((4, 3), np.float32)
    yield "flat", np.zeros(12, np.float32)
    yield "0-d", np.zeros((), np.float32)
    yield "Fortran order", np.zeros((3, 4), np.float32, order="F")
    yield "strided", np.zeros((3, 8), np.float32)[:, ::2]
    read_only = np.zeros((3, 4), np.float32)
    read_only.flags.writeable = False
    yield "read-only", read_only
    yield "object", np.empty((3, 4), object)
    yield "byte-swapped", np.zeros((3, 4), ">f4")


OUT_CASES = list(_out_cases())


@pytest.mark.parametrize(("name", "out"), OUT_CASES, ids=[n for n, _ in OUT_CASES])
def test_out_buffers_of_the_wrong_kind_are_refused_untouched(name: str, out: Any) -> None:
    arrays = [np.full(4, i + 1, np.float32) for i in range(3)]
    before = None if isinstance(out, list) else np.asarray(out).tobytes()
    with pytest.raises(REFUSED):
        beam_turbo.stack(arrays, out=out)
    if before is not None and np.asarray(out).dtype != object:
        assert np.asarray(out).tobytes() == before, f"{name}: out= was written before refusal"


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_out_that_is_an_ndarray_subclass_of_the_right_layout_is_written() -> None:
    arrays = [np.full(4, i + 1, np.float32) for i in range(3)]
    for out in [np.asmatrix(np.zeros((3, 4), np.float32)), np.zeros((3, 4), np.float32)[::1]]:
        assert beam_turbo.stack(arrays, out=out) is out
        assert np.array_equal(np.asarray(out), np.stack(arrays))


def test_out_that_is_one_of_the_inputs_is_refused() -> None:
    batch = np.zeros((3, 4), np.float32)
    with pytest.raises(InvalidInputError, match="overlaps the memory of element 0"):
        beam_turbo.stack([batch[1], np.ones(4, np.float32), np.ones(4, np.float32)], out=batch)
    # A column of the output (a strided view of its memory) overlaps too.
    square = np.zeros((4, 4), np.float32)
    with pytest.raises(InvalidInputError, match="overlaps the memory of element 3"):
        beam_turbo.stack([np.ones(4, np.float32)] * 3 + [square.T[3]], out=square)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["record", "fail", "oom", "pickle"]),
            st.one_of(
                st.floats(allow_nan=True, allow_infinity=True),
                st.integers(-(2**70), 2**70),
            ),
            st.floats(allow_nan=True, allow_infinity=True),
        ),
        max_size=60,
    ),
)
def test_batch_sizer_takes_any_sizes_and_timings(ops: list[tuple[str, Any, float]]) -> None:
    sizer = BatchSizer(min_batch_size=2, max_batch_size=500)
    for op, size, secs in ops:
        try:
            size = float(size)
        except OverflowError:
            size = float("inf")
        if op == "record":
            sizer.record(size, secs)
        elif op == "pickle":
            sizer = pickle.loads(pickle.dumps(sizer))
        else:
            sizer.record_failure(size, memory=op == "oom")
            if op == "oom" and size > 2 and size < 2**63:
                assert sizer.next_size() < int(np.ceil(size))
        assert 2 <= sizer.next_size() <= 500
    assert sizer.batches == len([op for op, *_ in ops if op != "pickle"])


def test_batch_sizer_refuses_corrupt_pickled_state() -> None:
    sizer = BatchSizer()
    sizer.record_failure(100, memory=True)
    state = sizer.__getstate__()
    assert state[118:126] == (100).to_bytes(8, "little"), "the ceiling's place in the layout"
    # The largest success at or above the ceiling: refused (found by fuzzing the core).
    inconsistent = state[:126] + (10**7).to_bytes(8, "little") + state[134:]
    fresh = BatchSizer()
    for bad in [b"", state[:-1], state + b"x", bytes(len(state)), inconsistent]:
        with pytest.raises(ValueError, match=r"BatchSizer state|must"):
            fresh.__setstate__(bad)
    fresh.__setstate__(state)
    assert fresh.ceiling == 100


# --- fork ---------------------------------------------------------------------------------

# A batch large enough for the parallel copy (4 MiB and more, on every core).
BIG = [np.arange(1 << 16, dtype=np.float64) + i for i in range(16)]


class Model:
    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.pid = os.getpid()


def _work_in_child(cache: ModelCache) -> int:
    """Everything a forked worker does; 0 when all of it is right, else which part failed."""
    batch = beam_turbo.stack(BIG)
    if batch.nbytes < 4 << 20 or not np.array_equal(batch, np.stack(BIG)):
        return 2
    out = np.empty_like(batch)
    if beam_turbo.stack(BIG, out=out) is not out or not np.array_equal(out, batch):
        return 3
    model = cache.acquire("in-flight", lambda: Model("child"))
    if model.tag != "child" or model.pid != os.getpid():
        return 4
    if cache.acquire("warm", lambda: Model("again")).tag != "warm":
        return 5
    sizer = BatchSizer(max_batch_size=1000)
    for _ in range(30):
        n = sizer.next_size()
        if n > 300:
            sizer.record_failure(n, memory=True)
        else:
            sizer.record(n, 0.01 + n * 1e-4)
    if not 1 <= sizer.next_size() < 301 or sizer.ceiling is None:
        return 6
    if pickle.loads(pickle.dumps(sizer)).next_size() != sizer.next_size():
        return 7
    return 0


@pytest.fixture
def busy_parent() -> Iterator[ModelCache]:
    """A parent with a model load in flight and threads stacking large batches."""
    cache = ModelCache()
    cache.acquire("warm", lambda: Model("warm"))
    loading, release, stop = threading.Event(), threading.Event(), threading.Event()

    def blocked() -> Model:
        loading.set()
        release.wait(60)
        return Model("parent")

    def hammer() -> None:
        while not stop.is_set():
            beam_turbo.stack(BIG)

    threads = [threading.Thread(target=cache.acquire, args=("in-flight", blocked), daemon=True)]
    threads += [threading.Thread(target=hammer, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    assert loading.wait(10)
    yield cache
    stop.set()
    release.set()
    for t in threads:
        t.join(30)
    assert cache.acquire("in-flight", lambda: Model("late")).tag == "parent"


def _wait(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("a forked child hung")
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_children_stack_load_and_size_while_the_parent_is_busy(
    busy_parent: ModelCache,
) -> None:
    codes = []
    for _ in range(6):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                signal.alarm(30)
                code = _work_in_child(busy_parent)
            finally:
                os._exit(code)
        codes.append(_wait(pid))
    assert codes == [0] * 6


def _mp_target(cache: ModelCache, out: Any) -> None:
    out.put(_work_in_child(cache))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_multiprocessing_fork_children_work(busy_parent: ModelCache) -> None:
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    children = [context.Process(target=_mp_target, args=(busy_parent, out)) for _ in range(2)]
    for child in children:
        child.start()
    codes = [out.get(timeout=60) for _ in children]
    for child in children:
        child.join(30)
        if child.is_alive():
            child.kill()
            pytest.fail("a multiprocessing child hung")
    assert codes == [0, 0]
    assert all(child.exitcode == 0 for child in children)


def test_a_grandchild_after_two_forks_still_works() -> None:
    # Run in a fresh interpreter: two generations of fork from a process that has already
    # used the parallel copy, the cache and the sizer.
    script = textwrap.dedent(
        """
        import os, sys
        sys.path[:0] = [{tests!r}]
        import numpy as np, beam_turbo
        from test_reliability import BIG, ModelCache, Model, _work_in_child
        cache = ModelCache()
        cache.acquire("warm", lambda: Model("warm"))
        beam_turbo.stack(BIG)
        def fork_and_wait(work):
            pid = os.fork()
            if pid == 0:
                os._exit(work())
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        code = fork_and_wait(lambda: fork_and_wait(lambda: _work_in_child(cache)))
        sys.exit(code)
        """
    ).format(tests=os.path.dirname(__file__))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


# --- soak (slow) --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_short_soak_loses_nothing_and_gets_every_result_right(tmp_path: Path) -> None:
    """scripts/soak.py at a small size: the pipeline counts every element out, and its
    resident memory stays flat; sixteen threads' stack and ModelCache results are all right;
    no fault loses or duplicates an element.

    The pipeline's memory is judged over ten chunks of 20,000 elements (about 20 s here), the
    last fifth against the second: 8 MiB of growth without a leak, 132 MiB with a leak of
    1 KiB an element injected on purpose, against a bound of 32 MiB. The hammer's memory is
    judged loosely (its buffer pool fills for longer than 8 s; see docs/reliability.md)."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            *("--elements", "200000", "--chunk", "20000", "--max-growth-mib", "32"),
            *("--seconds", "8", "--max-hammer-growth-mib", "1024"),
            *("--fault-elements", "400", "--fault-repeats", "1"),
            *("--out", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "soak: passed" in result.stdout
    assert "pipeline: resident memory grew" in result.stdout  # judged, not skipped
    faults = (tmp_path / "faults.csv").read_text().splitlines()
    assert len(faults) == 1 + 2 * 5  # a header, five faults in two modes
    assert (tmp_path / "soak.png").stat().st_size > 0
