"""beam_turbo.BatchSizer: Beam's arguments and messages, growth then hold, the memory ceiling,
pickling with its learned state, and thread safety."""

from __future__ import annotations

import copy
import math
import pickle
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_turbo import BatchSizer
from beam_turbo.bench.batching import beam_batch_size_estimator
from beam_turbo.errors import BeamTurboError, InvalidInputError


def drive(sizer: BatchSizer, batches: int, fixed: float = 0.01, per: float = 1e-5) -> list[int]:
    sizes = []
    for _ in range(batches):
        n = sizer.next_size()
        sizes.append(n)
        sizer.record(n, fixed + per * n)
    return sizes


INVALID: list[dict[str, Any]] = [
    {"min_batch_size": 10, "max_batch_size": 5},
    {"target_batch_overhead": 1.5},
    {"target_batch_overhead": -0.5},
    {"target_batch_duration_secs": -1.0},
    {"target_batch_duration_secs_including_fixed_cost": -2.5},
    {"target_batch_overhead": None, "target_batch_duration_secs": None},
    {"target_batch_overhead": 0, "target_batch_duration_secs": 0},
]


@pytest.mark.parametrize("kwargs", INVALID)
def test_invalid_arguments_raise_beams_errors_with_beams_messages(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as beams:
        beam_batch_size_estimator(**kwargs)
    with pytest.raises(InvalidInputError) as ours:
        BatchSizer(**kwargs)
    assert str(ours.value) == str(beams.value)
    assert isinstance(ours.value, ValueError)
    assert isinstance(ours.value, BeamTurboError)


def test_arguments_beam_does_not_check_but_we_must() -> None:
    with pytest.raises(InvalidInputError, match=r"min_batch_size \(-1\) must not be negative"):
        BatchSizer(min_batch_size=-1, max_batch_size=5)
    with pytest.raises(InvalidInputError, match=r"target_batch_duration_secs \(nan\)"):
        BatchSizer(target_batch_duration_secs=math.nan)


def test_constructor_is_keyword_only_with_beams_defaults() -> None:
    with pytest.raises(TypeError):
        BatchSizer(1, 100)  # type: ignore[call-arg]
    sizer = BatchSizer()
    assert sizer.next_size() == 1
    assert (sizer.batches, sizer.failures, sizer.ceiling) == (0, 0, None)
    assert sizer.fixed_cost is None
    assert sizer.per_element_cost is None


def test_grows_to_the_target_then_holds_it() -> None:
    sizer = BatchSizer()
    sizes = drive(sizer, 30, fixed=0.5, per=1e-3)
    # 5% overhead on 0.5 s fixed + 1 ms per element: 9,500.
    assert sizes[:8] == [1, 4, 16, 64, 256, 1024, 4096, 9500]
    assert set(sizes[7:]) == {9500}
    assert sizer.fixed_cost == pytest.approx(0.5)
    assert sizer.per_element_cost == pytest.approx(1e-3)
    assert sizer.batches == 30


def test_min_equal_to_max_is_a_fixed_size() -> None:
    sizer = BatchSizer(min_batch_size=7, max_batch_size=7)
    assert drive(sizer, 5) == [7] * 5


def test_a_memory_failure_sets_a_ceiling_it_never_reaches() -> None:
    sizer = BatchSizer()
    drive(sizer, 8)
    assert sizer.next_size() == 10_000
    sizer.record_failure(10_000)
    assert sizer.ceiling == 10_000
    assert sizer.failures == 1
    sizes = drive(sizer, 200)
    assert max(sizes) < 10_000
    # It searched below the ceiling and holds within 25% of it.
    assert sizes[-1] >= 8000


def test_a_failure_not_for_memory_changes_nothing() -> None:
    sizer = BatchSizer()
    drive(sizer, 8)
    before = sizer.next_size()
    sizer.record_failure(before, memory=False)
    assert sizer.ceiling is None
    assert sizer.next_size() == before
    assert sizer.failures == 1


@pytest.mark.parametrize(
    ("size", "seconds"),
    [(4, math.nan), (4, math.inf), (4, -math.inf), (4, -1.0), (0, 1.0), (-2, 1.0), (math.nan, 1.0)],
)
def test_nonsense_timings_count_but_do_not_derail(size: float, seconds: float) -> None:
    sizer = BatchSizer()
    sizer.record(1, 0.01)
    planned = sizer.next_size()
    sizer.record(size, seconds)
    assert sizer.next_size() == planned
    assert sizer.batches == 2


def test_pickles_with_its_learned_state_cheaply() -> None:
    sizer = BatchSizer(max_batch_size=5000, target_batch_overhead=0.1)
    drive(sizer, 12, fixed=0.5, per=1e-3)
    sizer.record_failure(4000)
    data = pickle.dumps(sizer)
    assert len(data) < 1024
    restored = pickle.loads(data)
    assert restored.__getstate__() == sizer.__getstate__()
    assert (restored.ceiling, restored.batches, restored.failures) == (4000, 13, 1)
    assert restored.per_element_cost == sizer.per_element_cost
    # It continues exactly where the original is, not from scratch.
    assert drive(restored, 10, 0.5, 1e-3) == drive(sizer, 10, 0.5, 1e-3)
    assert copy.deepcopy(sizer).__getstate__() == sizer.__getstate__()


def test_a_corrupt_state_is_refused() -> None:
    sizer = BatchSizer()
    with pytest.raises(InvalidInputError, match="not a BatchSizer state"):
        sizer.__setstate__(b"garbage")
    state = sizer.__getstate__()
    with pytest.raises(InvalidInputError):
        sizer.__setstate__(state[:-3])
    assert sizer.next_size() == 1, "a refused state leaves the sizer as it was"


def test_repr_shows_what_it_knows() -> None:
    sizer = BatchSizer()
    sizer.record_failure(3, memory=True)
    assert repr(sizer) == "BatchSizer(next_size=1, batches=1, failures=1, ceiling=3)"


def test_shared_between_threads() -> None:
    sizer = BatchSizer()
    threads, per_thread = 8, 500
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(per_thread):
                n = sizer.next_size()
                assert 1 <= n <= 10_000
                sizer.record(n, 0.01 + 1e-5 * n)
                pickle.loads(pickle.dumps(sizer))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert sizer.batches == threads * per_thread
    assert sizer.next_size() == 10_000


events = st.lists(
    st.one_of(
        st.tuples(
            st.just("ok"),
            st.one_of(st.floats(-1, 1e5), st.just(math.nan)),
            st.one_of(st.floats(-1, 100), st.sampled_from([math.nan, math.inf, 0.0])),
        ),
        st.tuples(st.just("oom"), st.floats(1, 2e4), st.just(0.0)),
        st.tuples(st.just("fail"), st.floats(1, 2e4), st.just(0.0)),
    ),
    max_size=60,
)


@settings(max_examples=25, deadline=None)
@given(
    events=events,
    bounds=st.tuples(st.integers(0, 50), st.integers(1, 20_000)).filter(lambda b: b[0] <= b[1]),
)
def test_proposals_stay_within_bounds_and_below_the_ceiling(
    events: list[tuple[str, float, float]], bounds: tuple[int, int]
) -> None:
    low, high = bounds
    sizer = BatchSizer(min_batch_size=low, max_batch_size=high)
    for kind, size, seconds in events:
        if kind == "ok":
            sizer.record(size, seconds)
        else:
            sizer.record_failure(size, memory=kind == "oom")
        n = sizer.next_size()
        assert max(low, 1) <= n <= high
        if sizer.ceiling is not None and sizer.ceiling > max(low, 1):
            assert n < sizer.ceiling
    assert sizer.batches == len(events)
    assert pickle.loads(pickle.dumps(sizer)).next_size() == sizer.next_size()


def test_native_docstring_examples_run() -> None:
    """The Rust module's examples (pytest's --doctest-modules collects the .py modules')."""
    import doctest

    from beam_turbo import _native

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for name in ("BatchSizer", "ModelCache"):
        for test in finder.find(getattr(_native, name), name, globs={}):
            runner.run(test)
    assert runner.summarize(verbose=False).attempted >= 5
    assert runner.summarize(verbose=False).failed == 0


def test_bench_batching_quick_runs_and_plots(tmp_path: Any, capsys: Any) -> None:
    from beam_turbo.cli import main

    plot = tmp_path / "sizes.png"
    assert main(["bench", "batching", "--quick", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    for scenario in range(1, 8):
        assert f"\n{scenario}: " in out
    assert plot.stat().st_size > 10_000
