"""``beam-turbo demo``: it runs both pipelines, prints the table, and checks predictions."""

from __future__ import annotations

import argparse

import pytest

from beam_turbo import demo


@pytest.mark.parametrize(("check", "checked"), [(3_000, 4_000), (1, 2_000)])
def test_the_demo_checks_whole_chunks_of_predictions(
    capsys: pytest.CaptureFixture[str], check: int, checked: int
) -> None:
    """A --check that is not a whole number of generated chunks is rounded up to one (it
    used to count the elements written against the number asked, and report DIFFERENT)."""
    args = demo.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--elements", "100000", "--check", str(check), "--rounds", "1"]
    )
    assert demo.run(args) == 0
    out = capsys.readouterr().out
    assert f"predictions: the same for all {checked:,} elements checked (exactly)" in out
    assert "speed-up:" in out
