"""``beam-turbo bench report``: the README's benchmark table as Markdown, with what it ran on.

The quick run is a smoke test of the structure (every row a figure and a spread), not of the
figures: benchmarks are not timed tests.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import beam_turbo
from beam_turbo import cli
from beam_turbo.bench import report

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"[\d.]+[kM]?"
RATE = re.compile(rf"^({NUMBER}) (?:el/s|/s) \(({NUMBER})-({NUMBER})\)$")
SPEEDUP = re.compile(r"^([\d.]+)x \(([\d.]+)-([\d.]+)x\)$")
MEMORY = re.compile(r"^[\d.]+x$")


def _value(text: str) -> float:
    scale = {"k": 1e3, "M": 1e6}.get(text[-1], 1.0)
    return float(text.rstrip("kM")) * scale


def _in_a_checkout() -> bool:
    folder = os.path.dirname(os.path.abspath(beam_turbo.__file__))
    done = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True)
    return done.returncode == 0


def _table(out: str) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the one Markdown table in ``out``."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, f"no table in:\n{out}"
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert all(set(c) <= {"-", ":"} for c in cells[1]), f"not a separator: {lines[1]}"
    return cells[0], cells[2:]


def check_report(out: str, command: str, labels: list[str]) -> None:
    """What every report must hold: its provenance, then one row per label, each with a
    median and a spread that holds it, a speed-up and its spread, and a memory ratio."""
    head = {line.split(":", 1)[0]: line for line in out.splitlines() if line.startswith("- ")}
    commit = head.get("- commit", "")
    if _in_a_checkout():
        assert re.fullmatch(r"- commit: `[0-9a-f]{40}`( \(dirty: .+\))?", commit), commit
    else:
        assert "not run from a git checkout" in commit, commit
    assert re.fullmatch(r"- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", head.get("- date", ""))
    assert re.fullmatch(r"- took \d+ min; load average at the end .+", out.splitlines()[-1])
    machine = head.get("- machine", "")
    assert re.match(r"- machine: \d+ cores.*, .+; load average", machine), machine
    assert head.get("- command") == f"- command: `{command}`"
    assert "- method" in head
    assert "- software" in head
    header, rows = _table(out)
    assert tuple(header) == report.HEADERS
    assert [row[0] for row in rows] == labels
    for row in rows:
        assert len(row) == len(header), row
        for cell in row[1:3]:
            found = RATE.match(cell)
            assert found, f"{row[0]}: no figure and spread in {cell!r}"
            median, low, high = (_value(v) for v in found.groups())
            assert low <= median <= high, cell
        found = SPEEDUP.match(row[3])
        assert found, f"{row[0]}: no speed-up and spread in {row[3]!r}"
        median, low, high = (float(v) for v in found.groups())
        assert 0 < low <= median <= high, row[3]
        assert MEMORY.match(row[4]), f"{row[0]}: no memory ratio in {row[4]!r}"


def test_a_quick_report_says_what_it_ran_on_and_gives_every_row_a_figure_and_a_spread(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["bench", "report", "--quick", "--only", "sklearn"]) == 0
    out = capsys.readouterr().out
    check_report(
        out,
        "beam-turbo bench report --rounds 2 --quick --only sklearn",
        [report.SMALL_MODELS["sklearn"]],
    )


@pytest.mark.slow
def test_the_whole_quick_report_has_the_readmes_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "report", "--quick"]) == 0
    out = capsys.readouterr().out
    labels = [*report.SMALL_MODELS.values()]
    labels += [label for rows in report.REAL_ROWS.values() for _, label in rows]
    check_report(out, "beam-turbo bench report --rounds 2 --quick", labels)


def test_the_readmes_table_is_a_reports_table() -> None:
    """The README's benchmark table is a pasted report: its header and rows are the report's,
    and the lines above it say the commit and the command that made it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Benchmark", 1)[1].split("\n## ", 1)[0]
    header, rows = _table(section)
    assert tuple(header) == report.HEADERS
    labels = [*report.SMALL_MODELS.values()]
    labels += [label for found in report.REAL_ROWS.values() for _, label in found]
    assert [row[0] for row in rows] == labels
    assert re.search(r"at\s+commit\s+`[0-9a-f]{7,40}`", section)
    assert re.search(r"`beam-turbo bench report --rounds \d+`", section)


def test_the_commit_names_head_and_says_dirty_only_for_tracked_changes(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    assert "not run from a git checkout" in report.commit(str(tmp_path))
    git("init", "-q")
    (tmp_path / "a.txt").write_text("one")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert report.commit(str(tmp_path)) == f"`{head}`"
    (tmp_path / "untracked.txt").write_text("not part of the commit")
    assert report.commit(str(tmp_path)) == f"`{head}`"
    (tmp_path / "a.txt").write_text("two")
    assert report.commit(str(tmp_path)).startswith(f"`{head}` (dirty")


def test_rounds_pair_where_both_sides_gave_a_slope_else_the_bounds_widen() -> None:
    paired = report.Row("m", "/s", [4.0, 3.0, 6.0], [2.0, 1.0, 2.0], 1.0, 3)
    assert paired.speedups() == [2.0, 3.0, 3.0]
    assert paired.cells()[3] == "3.00x (2.00-3.00x)"
    # A round without beam-turbo's slope: the slowest stock over the fastest beam-turbo.
    unpaired = report.Row("m", "/s", [4.0, 3.0, 6.0], [2.0, 1.0], 1.0, 3)
    speedups = unpaired.speedups()
    assert min(speedups) == 3.0 / 2.0
    assert max(speedups) == 6.0 / 1.0
    assert statistics.median(speedups) == pytest.approx(4.0 / 1.5)
    assert report.Row("m", "/s", [], [1.0], 1.0, 1).cells()[3] == "n/a (too noisy)"


def test_a_large_run_no_slower_than_the_small_one_gives_no_slope_and_no_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a loaded machine the large run can take less time than the small one; without a
    minimum of work asked, bench e2e used to divide by zero trying to grow it. The report
    counts such a round as no slope."""
    from beam_turbo.bench import e2e

    seconds = {2_000: 2.0, 6_000: 1.0}  # the large run the faster
    monkeypatch.setattr(e2e, "run_pipeline", lambda _f, _w, n, *a, **k: seconds[n])
    slope, large = e2e.per_element_secs(None, "stock", 2_000, 6_000, 1)  # type: ignore[arg-type]
    assert large == 6_000
    assert slope * (6_000 - 2_000) <= 1e-9  # clamped: what the report reads as no slope


def test_torch_is_imported_before_tensorflow_so_all_rows_run_in_one_process() -> None:
    """TensorFlow then torch's triton in one process aborts it (LLVM's options registered
    twice): the full report crashed at MobileNetV2's row, after TensorFlow's."""
    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    script = (
        "from beam_turbo.bench import report\n"
        "report.torch_before_tensorflow()\n"
        "import tensorflow, torchvision\n"
        "print('both loaded')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "both loaded" in done.stdout
