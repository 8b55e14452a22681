"""Beam's own tests, run once on stock Beam and once with beam-turbo's classes in its place.

Copies Beam's test files for RunInference, its handlers and ``BatchElements`` out of the
installed ``apache_beam`` into ``--workdir``, beside a conftest that calls ``beam_turbo.patch()``
when ``BEAM_TURBO_CONFORMANCE=turbo`` (so every Beam name the tests use, imported before or
after, is beam-turbo's). Runs pytest on the copy twice, with junit reports, and fails unless:

- every test passes on stock Beam (the harness itself is sound), and
- every test that fails with beam-turbo is listed in the README's differences table.

The stock run's outcomes depend only on the Python, its installed packages (Beam's release among
them), the copied test files, this harness and pytest's arguments: its report is cached under
``~/.cache/beam-turbo/conformance`` (``$XDG_CACHE_HOME``) keyed by a hash of those, and reused
while they are unchanged (a report with a failure is not cached, so a flaky failure is not
kept; ``--no-cache`` runs it).

Usage: ``.venv/bin/python scripts/conformance.py [--workdir DIR] [--no-cache] [-k EXPR]``; the
exit status is 0 only when both hold. The last line is pytest's closing line for the turbo run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import apache_beam

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Outside the checkout, as pip's cache is: a clean checkout (CI's) reuses what an earlier run on
# this machine computed from the same inputs.
STOCK_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "beam-turbo" / "conformance"
)

#: Beam's test files (relative to the installed apache_beam) and the test classes to run in
#: each (empty: all).
BEAM_TESTS: dict[str, tuple[str, ...]] = {
    "ml/inference/base_test.py": (),
    "ml/inference/sklearn_inference_test.py": (),
    "ml/inference/pytorch_inference_test.py": (),
    "ml/inference/tensorflow_inference_test.py": (),
    "ml/inference/huggingface_inference_test.py": (),
    "transforms/util_test.py": ("BatchElementsTest", "SortAndBatchElementsTest"),
}

CONFTEST = '''\
"""Written by scripts/conformance.py: beam-turbo's classes in place of Beam's, on request."""
import os

# Beam's HuggingFace module imports TensorFlow before torch's triton, which aborts the process
# when both are installed (two LLVM copies); in both runs, triton comes first.
try:
    import torch
    import triton
except ImportError:
    pass

if os.environ.get("BEAM_TURBO_CONFORMANCE") == "turbo":
    import beam_turbo

    beam_turbo.patch()
'''

PYTEST_INI = """\
[pytest]
addopts = -p no:cacheprovider -p no:randomly
filterwarnings =
    ignore::DeprecationWarning
    ignore::pytest.PytestUnknownMarkWarning
    ignore::pytest.PytestCollectionWarning
"""

_LISTED = re.compile(r"^\|\s*`([\w./]+_test\.py::[\w:]+)`\s*\|")


def listed_differences(readme: Path = README) -> set[str]:
    """Test ids in the first column of the README's differences table."""
    return {m.group(1) for line in readme.read_text().splitlines() if (m := _LISTED.match(line))}


def copy_tests(workdir: Path) -> list[str]:
    """Copy Beam's test files into ``workdir``; returns pytest's arguments selecting them."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    beam_root = Path(apache_beam.__file__).parent
    args = []
    for relative, selection in BEAM_TESTS.items():
        source = beam_root / relative
        target = workdir / source.name
        shutil.copyfile(source, target)
        args += [f"{target.name}::{name}" for name in selection] or [target.name]
    (workdir / "conftest.py").write_text(CONFTEST)
    (workdir / "pytest.ini").write_text(PYTEST_INI)
    return args


def run(workdir: Path, selection: list[str], mode: str, extra: list[str]) -> dict[str, str]:
    """Run the copied tests with ``mode`` ('stock' or 'turbo'); test id -> outcome."""
    report = workdir / f"{mode}.xml"
    # A temp folder of the run's own: Beam's model manager keeps one address file per machine
    # in the temp folder, which another Beam pipeline running beside would answer.
    tmp = workdir / f"tmp-{mode}"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "BEAM_TURBO_CONFORMANCE": mode, "TMPDIR": str(tmp)}
    print(f"\n=== Beam {apache_beam.__version__}'s tests, {mode}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", f"--junitxml={report}", *selection, *extra],
        cwd=workdir,
        env=env,
        check=False,
    )
    if not report.exists():
        raise SystemExit(f"conformance: pytest wrote no report for the {mode} run")
    return outcomes_in(report)


def outcomes_in(report: Path) -> dict[str, str]:
    """A junit report's outcomes: test id -> 'passed', 'failed' or 'skipped'."""
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module, *classes = case.get("classname", "").split(".")
        test_id = "::".join([f"{module}.py", *classes, case.get("name", "")])
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            outcomes[test_id] = "failed"
        elif "skipped" in kinds:
            outcomes[test_id] = "skipped"
        else:
            outcomes[test_id] = "passed"
    return outcomes


def stock_key(workdir: Path, selection: list[str], extra: list[str]) -> str:
    """A hash of what the stock run's outcomes depend on (the copied files, before any run)."""
    digest = hashlib.sha256(sys.version.encode())
    installed = sorted(
        f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
    )
    digest.update("\n".join(installed).encode())
    digest.update(Path(__file__).read_bytes())
    for path in sorted([*workdir.glob("*.py"), workdir / "pytest.ini"]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update("\0".join([*selection, "--", *extra]).encode())
    return digest.hexdigest()[:20]


def run_stock(workdir: Path, selection: list[str], extra: list[str], cache: bool) -> dict[str, str]:
    """The stock run's outcomes: its cached report while what it depends on is unchanged."""
    cached = (
        STOCK_CACHE / f"stock-{apache_beam.__version__}-{stock_key(workdir, selection, extra)}.xml"
    )
    if cache and cached.exists():
        print(f"\n=== Beam {apache_beam.__version__}'s tests, stock: cached ({cached})", flush=True)
        shutil.copyfile(cached, workdir / "stock.xml")
        return outcomes_in(cached)
    outcomes = run(workdir, selection, "stock", extra)
    if outcomes and "failed" not in outcomes.values():
        STOCK_CACHE.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(workdir / "stock.xml", cached)
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "target" / "conformance")
    parser.add_argument("--turbo-only", action="store_true", help="skip the stock run")
    parser.add_argument("--no-cache", action="store_true", help="run stock even if cached")
    parser.add_argument("pytest_args", nargs="*", help="more arguments for pytest (e.g. -k)")
    options = parser.parse_args()
    options.workdir = options.workdir.resolve()  # pytest runs inside it
    selection = copy_tests(options.workdir)
    listed = listed_differences()
    problems = []
    if not options.turbo_only:
        stock = run_stock(options.workdir, selection, options.pytest_args, not options.no_cache)
        broken = sorted(t for t, outcome in stock.items() if outcome == "failed")
        problems += [f"fails on stock Beam (the harness is wrong): {t}" for t in broken]
    turbo = run(options.workdir, selection, "turbo", options.pytest_args)
    failed = {t for t, outcome in turbo.items() if outcome == "failed"}
    problems += [
        f"fails with beam-turbo, not a listed difference: {t}" for t in sorted(failed - listed)
    ]
    stale = sorted(listed - failed)
    for test_id in stale:
        print(f"note: listed difference passes now (remove it from the README): {test_id}")
    counts = {o: sum(1 for v in turbo.values() if v == o) for o in ("passed", "failed", "skipped")}
    print(
        f"\nbeam-turbo on Beam {apache_beam.__version__}'s tests: {len(turbo)} tests, "
        f"{len(failed & listed)} listed differences"
    )
    for problem in problems:
        print(problem)
    print(
        f"conformance: {counts['passed']} passed, {len(problems)} failed, "
        f"{counts['skipped']} skipped"
    )
    return 1 if problems or not turbo else 0


if __name__ == "__main__":
    sys.exit(main())
