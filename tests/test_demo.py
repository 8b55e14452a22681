"""``beam-turbo demo``: it runs both pipelines, prints the table, and checks predictions."""

from __future__ import annotations

from pathlib import Path

import pytest

from beam_turbo.bench import e2e
from beam_turbo.cli import main


@pytest.mark.parametrize(("check", "checked"), [(3_000, 4_000), (1, 2_000)])
def test_the_demo_checks_whole_chunks_of_predictions(
    capsys: pytest.CaptureFixture[str], check: int, checked: int
) -> None:
    """A --check that is not a whole number of generated chunks is rounded up to one (it
    used to count the elements written against the number asked, and report DIFFERENT). Through
    the command line, as a user runs it (CI runs no separate demo)."""
    assert main(["demo", "--elements", "100000", "--check", str(check), "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert f"predictions: the same for all {checked:,} elements checked (exactly)" in out
    assert "speed-up:" in out


def test_bench_e2e_reads_batch_sizes_from_the_workers_and_grows_short_runs(
    tmp_path: Path,
) -> None:
    """On a runner, ``bench e2e`` reads the batch sizes the workers report through metrics
    (here the DirectRunner's, which reports them as a cluster's do), and grows a large run
    that takes too little longer than the small one."""
    framework = e2e.make_framework("sklearn", str(tmp_path))
    for which in ("stock", "turbo"):
        reported = e2e.Reported()
        _, large = e2e.per_element_secs(framework, which, 2_000, 6_000, 1, (), reported)
        assert large == 6_000
        assert reported.batched == 6_000, f"{which}: every element in one reported batch"
        assert 1 <= reported.batches <= 6_000
        assert 1 <= reported.largest_batch <= 6_000
        assert reported.peak_mib > 0, f"{which}: no peak memory reported"
        # beam-turbo's batches report what the sizer gathered them for; Beam's do not.
        if which == "turbo":
            assert reported.targets == reported.batches
            assert reported.targeted >= reported.batched, "a batch past its target"
        else:
            assert reported.targets == 0
    # 6,000 sklearn rows take a fraction of a second: a 1-second minimum grows the run.
    _, large = e2e.per_element_secs(framework, "floor", 2_000, 6_000, 1, (), min_work_secs=1.0)
    assert 6_000 < large <= e2e.MAX_LARGE
    assert large % e2e.CHUNK == 0


def test_a_large_run_faster_than_the_small_one_is_noise_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a minimum of work (the demo's case), a large run that a loaded machine makes
    faster than the small one ends the round; it used to divide zero by zero."""
    times = iter([2.0, 1.5])
    monkeypatch.setattr(e2e, "run_pipeline", lambda *args, **kwargs: next(times))
    per_element, large = e2e.per_element_secs(None, "stock", 2_000, 6_000, 1)  # type: ignore[arg-type]
    assert large == 6_000
    assert 0 < per_element < 1e-9
