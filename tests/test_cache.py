"""beam_turbo.ModelCache: single flight, refresh, eviction, no leaks, pickling, fork, threads."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import pickle
import random
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_turbo import ModelCache
from beam_turbo.errors import InvalidInputError


class Model:
    """A stand-in for a loaded model: records what it was loaded for, and can be weakly held."""

    def __init__(self, key: object = None, tag: object = None) -> None:
        self.key = key
        self.tag = tag
        self.pid = os.getpid()


class LoadError(Exception):
    pass


class CountingLoader:
    """A loader that counts its calls."""

    def __init__(self, make: Callable[[], object] = Model) -> None:
        self.calls = 0
        self.make = make

    def __call__(self) -> object:
        self.calls += 1
        return self.make()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# --- the basics ---------------------------------------------------------------------------


def test_acquire_loads_once_then_hits() -> None:
    cache = ModelCache()
    loader = CountingLoader()
    first = cache.acquire("bert", loader)
    assert cache.acquire("bert", loader) is first
    assert loader.calls == 1
    stats = cache.stats()
    assert set(stats) >= {"hits", "misses", "loads", "load_seconds", "evictions", "models"}
    assert (stats["hits"], stats["misses"], stats["loads"], stats["models"]) == (1, 1, 1, 1)
    assert isinstance(stats["load_seconds"], float)
    assert stats["load_seconds"] >= 0


def test_none_is_a_model_like_any_other() -> None:
    cache = ModelCache()
    loader = CountingLoader(lambda: None)
    assert cache.acquire("k", loader) is None
    assert cache.acquire("k", loader) is None
    assert loader.calls == 1


def test_keys_compare_like_dict_keys() -> None:
    cache = ModelCache()
    loader = CountingLoader()
    model = cache.acquire(1, loader)
    assert cache.acquire(1.0, loader) is model  # 1 == 1.0 and hash(1) == hash(1.0)
    tuple_model = cache.acquire(("a", 1), loader)
    assert cache.acquire(tuple(["a", 1]), loader) is tuple_model  # equal, not identical
    nan = float("nan")
    nan_model = cache.acquire(nan, loader)
    assert cache.acquire(nan, loader) is nan_model  # identity first, as a dict does
    assert loader.calls == 3


def test_tags_compare_with_eq_none_included() -> None:
    cache = ModelCache()
    loader = CountingLoader()
    untagged = cache.acquire("k", loader)
    assert cache.acquire("k", loader, None) is untagged
    v1 = cache.acquire("k", loader, tag="".join(["v", "1"]))
    assert v1 is not untagged
    assert cache.acquire("k", loader, tag="v1") is v1  # an equal string, not the same object
    assert cache.acquire("k", loader, tag=1) is not v1
    assert cache.acquire("k", loader, tag=1.0) is cache.acquire("k", loader, tag=1)
    assert loader.calls == 3


def test_bad_arguments_raise_clear_errors() -> None:
    cache = ModelCache()
    with pytest.raises(TypeError, match="unhashable"):
        cache.acquire(["a", "list"], Model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loader must be a callable"):
        cache.acquire("k", 42)  # type: ignore[arg-type]
    for bad in (0, -1):
        with pytest.raises(InvalidInputError, match="max_models must be at least 1"):
            ModelCache(max_models=bad)
    assert ModelCache(max_models=3).max_models == 3
    assert ModelCache().max_models is None


def test_a_loader_acquiring_its_own_key_is_refused_not_deadlocked() -> None:
    cache = ModelCache()

    def reentrant() -> object:
        return cache.acquire("k", Model)

    with pytest.raises(ValueError, match="acquired the key it is loading"):
        cache.acquire("k", reentrant)
    assert cache.acquire("k", Model) is not None  # nothing stuck behind


def test_default_is_one_process_wide_cache() -> None:
    assert ModelCache.default() is ModelCache.default()
    assert "default" in repr(ModelCache.default())


# --- loader errors ------------------------------------------------------------------------


def test_a_loader_error_reaches_every_waiter_and_leaves_no_entry() -> None:
    cache = ModelCache()
    calls = 0
    threads_n = 8

    def failing() -> object:
        nonlocal calls
        calls += 1
        # Hold the load until every thread has missed, so they all wait on this one.
        wait_until(lambda: cache.stats()["misses"] >= threads_n)
        time.sleep(0.2)
        raise LoadError("weights not found")

    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            cache.acquire("k", failing)
        except LoadError as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    assert calls == 1
    assert len(errors) == threads_n, "every waiter re-raises the loader's exception"
    assert all(str(e) == "weights not found" for e in errors)
    stats = cache.stats()
    assert (stats["models"], stats["load_errors"], stats["loads"]) == (0, 1, 0)
    loader = CountingLoader()
    assert isinstance(cache.acquire("k", loader), Model), "the next acquire tries again"
    assert loader.calls == 1


def test_a_failed_refresh_keeps_the_previous_model() -> None:
    cache = ModelCache()
    v1 = cache.acquire("k", Model, tag="v1")

    def failing() -> object:
        raise LoadError("bad v2")

    with pytest.raises(LoadError):
        cache.acquire("k", failing, tag="v2")
    assert cache.acquire("k", Model, tag="v1") is v1


# --- single flight ------------------------------------------------------------------------


def test_eight_threads_racing_on_a_cold_key_load_once() -> None:
    cache = ModelCache()
    calls = 0
    threads_n = 8

    def slow_python_loader() -> object:
        nonlocal calls
        calls += 1
        wait_until(lambda: cache.stats()["misses"] >= threads_n)
        # Pure Python work: it only progresses if the waiters released the GIL.
        deadline = time.monotonic() + 0.2
        spins = 0
        while time.monotonic() < deadline:
            spins += 1
        return Model("k")

    barrier = threading.Barrier(threads_n)
    got: list[object] = []

    def worker() -> None:
        barrier.wait()
        got.append(cache.acquire("k", slow_python_loader))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a waiter held the GIL and starved the loader"
    assert calls == 1
    assert len(got) == threads_n
    assert all(m is got[0] for m in got)
    stats = cache.stats()
    assert (stats["loads"], stats["misses"]) == (1, threads_n)


def test_a_signal_interrupts_a_waiting_thread() -> None:
    cache = ModelCache()
    release = threading.Event()
    loading = threading.Event()

    def blocked() -> object:
        loading.set()
        release.wait(30)
        return Model()

    class AlarmError(Exception):
        pass

    def on_alarm(signum: int, frame: object) -> None:
        raise AlarmError

    loader_thread = threading.Thread(target=cache.acquire, args=("k", blocked), daemon=True)
    loader_thread.start()
    loading.wait(10)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(AlarmError):
            cache.acquire("k", Model)  # waits on the other thread's load until the alarm
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.set()
        loader_thread.join(10)
    assert cache.stats()["models"] == 1


# --- refresh, eviction, invalidation ------------------------------------------------------


def test_refresh_while_a_model_is_held() -> None:
    cache = ModelCache()
    old = cache.acquire("k", lambda: Model("k", "v1"), tag="v1")
    old_ref = weakref.ref(old)
    new = cache.acquire("k", lambda: Model("k", "v2"), tag="v2")
    assert (old.tag, new.tag) == ("v1", "v2")
    assert old_ref() is old, "the holder of the old model keeps it"
    assert cache.stats()["models"] == 1
    assert cache.acquire("k", Model, tag="v2") is new
    del old
    gc.collect()
    assert old_ref() is None, "the old model is freed once released"


def test_refresh_in_another_thread_while_a_batch_runs_on_the_old_model() -> None:
    cache = ModelCache()
    held = cache.acquire("k", lambda: Model("k", 1), tag=1)
    held_ref = weakref.ref(held)
    refreshed = threading.Event()

    def refresh() -> None:
        cache.acquire("k", lambda: Model("k", 2), tag=2)
        refreshed.set()

    threading.Thread(target=refresh, daemon=True).start()
    assert refreshed.wait(10)
    assert held.tag == 1  # the "batch" finishes on the model it started with
    del held
    assert held_ref() is None


def test_eviction_frees_the_least_recently_used_model() -> None:
    cache = ModelCache(max_models=2)
    a = weakref.ref(cache.acquire("a", lambda: Model("a")))
    b = weakref.ref(cache.acquire("b", lambda: Model("b")))
    cache.acquire("a", Model)  # a is now more recent than b
    cache.acquire("c", lambda: Model("c"))
    assert b() is None, "b was evicted and nothing else held it"
    assert a() is not None
    stats = cache.stats()
    assert (stats["models"], stats["evictions"]) == (2, 1)
    one = ModelCache(max_models=1)
    first = weakref.ref(one.acquire("x", Model))
    one.acquire("y", Model)
    assert first() is None


def test_invalidate_and_clear_free_models() -> None:
    cache = ModelCache()
    a = weakref.ref(cache.acquire("a", Model))
    b = weakref.ref(cache.acquire("b", Model))
    assert cache.invalidate("a") is True
    assert cache.invalidate("a") is False
    assert a() is None
    assert b() is not None
    cache.clear()
    assert b() is None
    assert cache.stats()["models"] == 0
    loader = CountingLoader()
    cache.acquire("a", loader)
    assert loader.calls == 1


# --- references ---------------------------------------------------------------------------


def test_no_reference_leak_over_100000_acquires() -> None:
    cache = ModelCache(max_models=2)
    key, tag = "model-key", ("v", 1)
    model = Model()
    loader: Callable[[], object] = lambda: model  # noqa: E731

    def failing() -> object:
        raise LoadError

    cache.acquire(key, loader, tag)
    gc.collect()
    before = [sys.getrefcount(x) for x in (key, tag, model, loader, failing)]
    objects_before = len(gc.get_objects())
    for _ in range(100_000):
        cache.acquire(key, loader, tag)
    for i in range(200):  # the miss, load, error and eviction paths too
        cache.acquire(i, loader, tag)
        with pytest.raises(LoadError):
            cache.acquire(("fail", i), failing)
    cache.clear()  # back to the state counted before: one model for key
    cache.acquire(key, loader, tag)
    gc.collect()
    after = [sys.getrefcount(x) for x in (key, tag, model, loader, failing)]
    assert after == before
    assert len(gc.get_objects()) - objects_before < 100


# --- pickling -----------------------------------------------------------------------------


def test_the_default_cache_pickles_to_the_default_of_the_unpickling_process() -> None:
    cloudpickle: Any = pytest.importorskip("cloudpickle")
    default = ModelCache.default()
    assert pickle.loads(pickle.dumps(default)) is default
    assert cloudpickle.loads(cloudpickle.dumps(default)) is default


def test_a_constructed_cache_pickles_to_a_reference_to_itself() -> None:
    cloudpickle: Any = pytest.importorskip("cloudpickle")
    cache = ModelCache(max_models=3)
    model = cache.acquire("k", Model)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        copy = loads(dumps(cache))
        assert copy.max_models == 3
        assert copy.acquire("k", Model) is model, "in its own process it is the same cache"
    assert pickle.loads(pickle.dumps(ModelCache())).stats()["models"] == 0


def _acquire_in_worker(payload: bytes) -> tuple[int, int, int, bool]:
    first, second = pickle.loads(payload)
    a = first.acquire("k", Model)
    b = second.acquire("k", Model)
    default = pickle.loads(pickle.dumps(ModelCache.default())) is ModelCache.default()
    return os.getpid(), a.pid, first.stats()["loads"], (a is b) and default


def test_a_pickled_cache_resolves_in_another_process() -> None:
    cache = ModelCache(max_models=2)
    parent_model = cache.acquire("k", Model)
    # Two separate pickles of one cache: in the worker both name the same (new) cache.
    payload = pickle.dumps((cache, pickle.loads(pickle.dumps(cache))))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pid, model_pid, loads, shared = pool.apply(_acquire_in_worker, (payload,))
    assert pid != os.getpid()
    assert model_pid == pid, "the worker loaded its own model"
    assert loads == 1
    assert shared
    assert cache.acquire("k", Model) is parent_model


# --- fork ---------------------------------------------------------------------------------


def _child_acquires(cache: ModelCache) -> int:
    """Runs in a forked child: 0 if the cache works there, else a failure code."""
    model = cache.acquire("in-flight", lambda: Model("child"))
    if not isinstance(model, Model) or model.key != "child" or model.pid != os.getpid():
        return 2
    if cache.acquire("warm", Model).pid == os.getpid():
        return 3  # the parent's loaded model should have been inherited
    # Single flight still works in the child.
    got: list[object] = []
    threads = [
        threading.Thread(target=lambda: got.append(cache.acquire("child-key", Model)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    return 0 if len(got) == 4 and all(m is got[0] for m in got) else 4


@pytest.fixture
def parent_loading() -> Iterator[ModelCache]:
    """A cache with a warm model and a load of "in-flight" blocked in another thread."""
    cache = ModelCache()
    cache.acquire("warm", Model)
    loading, release = threading.Event(), threading.Event()

    def blocked() -> object:
        loading.set()
        release.wait(30)
        return Model("parent")

    thread = threading.Thread(target=cache.acquire, args=("in-flight", blocked), daemon=True)
    thread.start()
    assert loading.wait(10)
    yield cache
    release.set()
    thread.join(10)
    assert cache.acquire("in-flight", Model).key == "parent"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_loads_even_with_a_load_in_flight_in_the_parent(
    parent_loading: ModelCache,
) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            signal.alarm(20)
            code = _child_acquires(parent_loading)
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the forked child hung in the cache")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0


def _fork_child_target(cache: ModelCache, out: Any) -> None:
    out.put(_child_acquires(cache))


def test_multiprocessing_fork_child_gets_a_working_cache(parent_loading: ModelCache) -> None:
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_fork_child_target, args=(parent_loading, out))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the cache")
    assert out.get(timeout=5) == 0


# --- threads ------------------------------------------------------------------------------


def test_many_threads_stress() -> None:
    cache = ModelCache(max_models=3)
    keys = [f"k{i}" for i in range(6)]
    stop = threading.Event()
    failures: list[str] = []
    acquires = [0]
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        try:
            while not stop.is_set():
                key, tag = rng.choice(keys), rng.choice(["v1", "v2"])
                roll = rng.random()
                if roll < 0.02:
                    cache.invalidate(key)
                elif roll < 0.025:
                    cache.clear()
                elif roll < 0.05:
                    n += 1
                    with pytest.raises(LoadError):
                        # A tag of its own: loads of good tags never join a failing one.
                        cache.acquire(key, _raise_load_failed, tag="broken")
                else:
                    n += 1
                    model = cache.acquire(key, _loader_for(key, tag), tag=tag)
                    if (model.key, model.tag) != (key, tag):
                        failures.append(f"asked {key}/{tag}, got {model.key}/{model.tag}")
        except BaseException as err:
            failures.append(repr(err))
        with lock:
            acquires[0] += n

    threads = [threading.Thread(target=worker, args=(seed,), daemon=True) for seed in range(16)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert failures == []
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == acquires[0]
    assert stats["models"] <= 3
    assert stats["evictions"] > 0


def _loader_for(key: str, tag: str) -> Callable[[], Model]:
    return lambda: Model(key, tag)


def _raise_load_failed() -> object:
    raise LoadError("broken")


# --- a real multi-process pipeline --------------------------------------------------------


class _PipelineModel:
    def __init__(self) -> None:
        self.pid = os.getpid()


def _use_caches_fn(default: ModelCache, own: ModelCache) -> Any:
    import apache_beam as beam

    class UseCaches(beam.DoFn):
        def __init__(self) -> None:
            self.default = default
            self.own = own

        def process(self, element: int) -> Iterator[str]:
            a = self.default.acquire("pipeline-default", _PipelineModel)
            b = self.own.acquire("pipeline-own", _PipelineModel)
            yield json.dumps([element, os.getpid(), a.pid, b.pid, id(a), id(b)])

    return UseCaches()


@pytest.mark.slow
def test_a_multi_process_pipeline_uses_a_cache_in_each_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import apache_beam
    from apache_beam.options.pipeline_options import PipelineOptions

    beam: Any = apache_beam  # Beam's transforms are untyped
    # The workers import this module to unpickle the DoFn.
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, *sys.path]))
    options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    n = 200
    own = ModelCache(max_models=1)
    with beam.Pipeline(options=options) as p:
        (
            p
            | beam.Create(list(range(n)), reshuffle=False)
            | beam.Reshuffle()
            | beam.ParDo(_use_caches_fn(ModelCache.default(), own))
            | beam.io.WriteToText(str(tmp_path / "out"))
        )
    rows = [json.loads(line) for f in tmp_path.glob("out*") for line in f.read_text().splitlines()]
    assert sorted(r[0] for r in rows) == list(range(n))
    pids = {r[1] for r in rows}
    assert os.getpid() not in pids, "the DoFn ran in worker processes"
    for element, pid, default_pid, own_pid, _, _ in rows:
        assert default_pid == pid, f"element {element}: a model loaded elsewhere"
        assert own_pid == pid, f"element {element}: a model loaded elsewhere"
    for pid in pids:
        mine = [r for r in rows if r[1] == pid]
        assert len({r[4] for r in mine}) == 1, "one default-cache model per worker"
        assert len({r[5] for r in mine}) == 1, "one constructed-cache model per worker"
    assert own.stats()["loads"] == 0, "the pipeline's copies did not load into this process"


_GIL_SCRIPT = """
import threading, time
from beam_turbo import ModelCache

cache = ModelCache()

def loader():
    # Pure Python work while seven threads wait: it needs the GIL they must have released.
    while cache.stats()["misses"] < 8:
        time.sleep(0.001)
    total = 0
    for i in range(2_000_000):
        total += i
    return total

threads = [threading.Thread(target=cache.acquire, args=("k", loader)) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert cache.stats()["loads"] == 1
print("ok")
"""


def test_waiting_threads_release_the_gil() -> None:
    # In a subprocess: a waiter that kept the GIL would deadlock the whole interpreter, so the
    # failure shows as a timeout here instead of a hung test run.
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        [sys.executable, "-c", _GIL_SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- against a reference model ------------------------------------------------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 4), st.integers(0, 2)),
        st.tuples(st.just("invalidate"), st.integers(0, 4), st.just(0)),
        st.tuples(st.just("clear"), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=_OPS, bound=st.one_of(st.none(), st.integers(1, 4)))
def test_single_threaded_behaviour_matches_an_exact_lru_model(
    ops: list[tuple[str, int, int]], bound: int | None
) -> None:
    cache = ModelCache(max_models=bound)
    reference: dict[int, tuple[int, Model]] = {}  # key -> (tag, model), least recent first
    evictions = 0
    for op, key, tag in ops:
        if op == "invalidate":
            assert cache.invalidate(key) is (reference.pop(key, None) is not None)
        elif op == "clear":
            cache.clear()
            reference.clear()
        else:
            loader = CountingLoader(lambda k=key, t=tag: Model(k, t))  # type: ignore[misc]
            model = cache.acquire(key, loader, tag)
            held = reference.pop(key, None)
            if held is not None and held[0] == tag:
                assert loader.calls == 0
                assert model is held[1]
            else:
                assert loader.calls == 1
                assert (model.key, model.tag) == (key, tag)
            reference[key] = (tag, model)
            while bound is not None and len(reference) > bound:
                del reference[next(iter(reference))]
                evictions += 1
        stats = cache.stats()
        assert stats["models"] == len(reference)
        assert stats["evictions"] == evictions
