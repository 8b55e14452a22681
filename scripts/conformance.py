"""Beam's own tests, run once on stock Beam and once with beam-turbo's classes in its place.

Copies Beam's test files for RunInference, its handlers and ``BatchElements`` out of the
installed ``apache_beam`` into ``--workdir``, beside a conftest (scripts/conformance_conftest.py)
that calls ``beam_turbo.patch()`` when ``BEAM_TURBO_CONFORMANCE=turbo`` (so every Beam name the
tests use, imported before or after, is beam-turbo's) and records what each run did. Runs pytest
on the copy twice, prints per test file the passed, skipped, failed and error counts of both
runs, and fails unless:

- every test file runs at least one test in each run: none is skipped whole (Beam's
  HuggingFace tests raise ``SkipTest`` at import when a framework import fails) or collects
  nothing;
- every test passes or is skipped on stock Beam (the harness itself is sound);
- each test has the same outcome in both runs, but for the tests in the differences table
  (docs/run-inference.md), which may fail with beam-turbo (and then only those: a test
  skipped in one run only, or run in one only, is a difference too);
- in the patched run, once the test modules are imported, every Beam name in ``PATCHED`` is
  beam-turbo's (in its Beam module and in any test module that holds it), and in the stock run
  none is; and ``PATCHED`` lists every name ``patch()`` replaces.

The stock run's record depends only on the Python, its installed packages (Beam's release among
them), the copied test files, this harness and pytest's arguments: it is cached under
``~/.cache/beam-turbo/conformance`` (``$XDG_CACHE_HOME``) keyed by a hash of those, and reused
while they are unchanged, as pip's cache is (a record with a failure is not cached, so a flaky
failure is not kept; ``--no-cache`` runs it).

Usage: ``.venv/bin/python scripts/conformance.py [--workdir DIR] [--no-cache] [-- PYTEST_ARGS]``;
the exit status is 0 only when all hold. With ``PYTEST_ARGS`` (e.g. ``-- -k EXPR``), a file that
runs no test is a note, not a failure, unless it was skipped or broken whole at collection.
The last line is the verdict.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import apache_beam

ROOT = Path(__file__).resolve().parent.parent
DIFFERENCES = ROOT / "docs" / "run-inference.md"  # its differences table
CONFTEST = Path(__file__).resolve().parent / "conformance_conftest.py"
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

_BATCHING = ("BatchElements", "SortAndBatchElements")
_INFERENCE = "apache_beam.ml.inference"

#: The Beam names ``patch()`` must replace (its docs' table, and the README's drop-in table),
#: module by module. Written out here, not read from ``patch()``, so that a name ``patch()``
#: stops replacing fails the run; ``patch()`` replacing a name not listed here fails it too.
PATCHED: dict[str, tuple[str, ...]] = {
    f"{_INFERENCE}.base": ("RunInference",),
    _INFERENCE: ("RunInference",),
    "apache_beam": _BATCHING,
    "apache_beam.transforms": _BATCHING,
    "apache_beam.transforms.util": _BATCHING,
    f"{_INFERENCE}.pytorch_inference": (
        "PytorchModelHandlerTensor",
        "PytorchModelHandlerKeyedTensor",
    ),
    f"{_INFERENCE}.sklearn_inference": ("SklearnModelHandlerNumpy", "SklearnModelHandlerPandas"),
    f"{_INFERENCE}.tensorflow_inference": ("TFModelHandlerNumpy", "TFModelHandlerTensor"),
    f"{_INFERENCE}.huggingface_inference": (
        "HuggingFaceModelHandlerKeyedTensor",
        "HuggingFaceModelHandlerTensor",
        "HuggingFacePipelineModelHandler",
    ),
}

PYTEST_INI = """\
[pytest]
addopts = -p no:cacheprovider -p no:randomly
filterwarnings =
    ignore::DeprecationWarning
    ignore::pytest.PytestUnknownMarkWarning
    ignore::pytest.PytestCollectionWarning
"""

_LISTED = re.compile(r"^\|\s*`([\w./]+_test\.py::[\w:]+)`\s*\|")


def listed_differences(readme: Path = DIFFERENCES) -> set[str]:
    """Test ids in the first column of the differences table (docs/run-inference.md)."""
    return {m.group(1) for line in readme.read_text().splitlines() if (m := _LISTED.match(line))}


OUTCOMES = ("passed", "skipped", "failed", "error")


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
    shutil.copyfile(CONFTEST, workdir / "conftest.py")
    (workdir / "pytest.ini").write_text(PYTEST_INI)
    return args


def run(workdir: Path, selection: list[str], mode: str, extra: list[str]) -> dict[str, Any]:
    """Run the copied tests with ``mode`` ('stock' or 'turbo'); the conftest's record."""
    report = workdir / f"{mode}.json"
    # A temp folder of the run's own: Beam's model manager keeps one address file per machine
    # in the temp folder, which another Beam pipeline running beside would answer.
    tmp = workdir / f"tmp-{mode}"
    tmp.mkdir(exist_ok=True)
    names = [[module, name] for module, names in PATCHED.items() for name in names]
    env = {
        **os.environ,
        "BEAM_TURBO_CONFORMANCE": mode,
        "BEAM_TURBO_CONFORMANCE_REPORT": str(report),
        "BEAM_TURBO_CONFORMANCE_NAMES": json.dumps(names),
        "TMPDIR": str(tmp),
    }
    print(f"\n=== Beam {apache_beam.__version__}'s tests, {mode}", flush=True)
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *selection, *extra],
        cwd=workdir,
        env=env,
        check=False,
    )
    print(f"({mode} run: {time.monotonic() - start:.0f} s)", flush=True)
    if not report.exists():
        raise SystemExit(f"conformance: pytest wrote no report for the {mode} run")
    record: dict[str, Any] = json.loads(report.read_text())
    return record


def file_of(test_id: str) -> str:
    return test_id.split("::")[0]


def counts(record: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Test file -> outcome -> how many tests had it."""
    table: dict[str, dict[str, int]] = {}
    for test_id, entry in record["tests"].items():
        row = table.setdefault(file_of(test_id), dict.fromkeys(OUTCOMES, 0))
        row[entry["outcome"]] += 1
    return table


def file_table(files: list[str], runs: dict[str, dict[str, Any]]) -> list[str]:
    """The per-file counts of each run, as a Markdown table."""
    header = ["test file"] + [f"{mode} {o}" for mode in runs for o in OUTCOMES] + ["whole file"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" + " ---: |" * (len(header) - 2)]
    lines[-1] += " --- |"
    tables = {mode: counts(record) for mode, record in runs.items()}
    for name in files:
        cells = [f"`{name}`"]
        for mode in runs:
            row = tables[mode].get(name, dict.fromkeys(OUTCOMES, 0))
            cells += [str(row[o]) for o in OUTCOMES]
        whole = [
            f"{mode}: {runs[mode]['files'][name]['outcome']}"
            for mode in runs
            if name in runs[mode]["files"]
        ]
        lines.append("| " + " | ".join([*cells, "; ".join(whole) or "collected"]) + " |")
    return lines


def vanished(files: list[str], mode: str, record: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The test files skipped or broken whole at collection in this run, and those that ran
    no test otherwise (each skipped, or none collected or selected)."""
    table = counts(record)
    problems, missing = [], []
    for name in files:
        row = table.get(name, dict.fromkeys(OUTCOMES, 0))
        whole = record["files"].get(name)
        if whole:
            problems.append(
                f"{name} is {whole['outcome']} whole in the {mode} run: {whole['reason']}"
            )
        elif row["passed"] + row["failed"] + row["error"] == 0:
            skipped = f" ({row['skipped']} skipped)" if row["skipped"] else ""
            missing.append(f"{name} runs no test in the {mode} run{skipped}")
    return problems, missing


def differences(stock: dict[str, Any], turbo: dict[str, Any], listed: set[str]) -> list[str]:
    """Each test whose outcome differs between the runs, unless it is a listed difference
    that passes on stock Beam and fails with beam-turbo."""
    problems = []
    absent = {"outcome": "absent", "reason": "not run"}
    for test_id in sorted(stock["tests"].keys() | turbo["tests"].keys()):
        before = stock["tests"].get(test_id, absent)
        after = turbo["tests"].get(test_id, absent)
        if before["outcome"] == after["outcome"]:
            continue
        if test_id in listed and before["outcome"] == "passed" and after["outcome"] == "failed":
            continue
        if after["outcome"] in ("failed", "error") and test_id not in listed:
            what = f"{after['outcome']} with beam-turbo, not a listed difference"
        else:
            what = f"{before['outcome']} on stock Beam, {after['outcome']} with beam-turbo"
        reason = after["reason"] or before["reason"]
        problems.append(f"{what}: {test_id}" + (f" ({reason})" if reason else ""))
    return problems


def unswapped(mode: str, record: dict[str, Any]) -> list[str]:
    """Names that are not beam-turbo's in the patched run, or are in the stock run."""
    problems = []
    for module, names in PATCHED.items():
        for name in names:
            where = record["names"].get(f"{module}.{name}", {module: "not recorded"})
            if mode == "turbo":  # beam-turbo's wherever it is; its module imported
                wrong = {place: state for place, state in where.items() if state != "ours"}
            else:  # Beam's wherever it is (a module not imported is the tests' concern)
                wrong = {place: state for place, state in where.items() if state == "ours"}
            if wrong:
                said = ", ".join(f"{place}: {state}" for place, state in sorted(wrong.items()))
                if mode == "turbo":
                    problems.append(f"not swapped by patch() in the patched run: {name} ({said})")
                else:
                    problems.append(f"beam-turbo's in the stock run: {name} ({said})")
    if mode == "turbo":
        listed = {(module, name) for module, names in PATCHED.items() for name in names}
        for module, name in record["replacements"]:
            if (module, name) not in listed:
                problems.append(
                    f"patch() replaces {module}.{name}, which conformance.py's PATCHED lacks"
                )
    return problems


def stock_key(workdir: Path, selection: list[str], extra: list[str]) -> str:
    """A hash of what the stock run's record depends on (the copied files, before any run)."""
    digest = hashlib.sha256(sys.version.encode())
    installed = sorted(
        f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
    )
    digest.update("\n".join(installed).encode())
    digest.update(Path(__file__).read_bytes())
    digest.update(CONFTEST.read_bytes())
    for path in sorted([*workdir.glob("*.py"), workdir / "pytest.ini"]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update("\0".join([*selection, "--", *extra]).encode())
    return digest.hexdigest()[:20]


def run_stock(workdir: Path, selection: list[str], extra: list[str], cache: bool) -> dict[str, Any]:
    """The stock run's record: its cached copy while what it depends on is unchanged."""
    key = stock_key(workdir, selection, extra)
    cached = STOCK_CACHE / f"stock-{apache_beam.__version__}-{key}.json"
    if cache and cached.exists():
        print(f"\n=== Beam {apache_beam.__version__}'s tests, stock: cached ({cached})", flush=True)
        shutil.copyfile(cached, workdir / "stock.json")
        record: dict[str, Any] = json.loads(cached.read_text())
        return record
    record = run(workdir, selection, "stock", extra)
    healthy = not record["files"] and all(
        entry["outcome"] in ("passed", "skipped") for entry in record["tests"].values()
    )
    if cache and healthy:
        STOCK_CACHE.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(workdir / "stock.json", cached)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "target" / "conformance")
    parser.add_argument("--turbo-only", action="store_true", help="skip the stock run")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="judge the runs recorded in --workdir again, without running the tests",
    )
    parser.add_argument("--no-cache", action="store_true", help="run stock even if cached")
    parser.add_argument("pytest_args", nargs="*", help="more arguments for pytest (e.g. -k)")
    options = parser.parse_args()
    options.workdir = options.workdir.resolve()  # pytest runs inside it
    selection = [] if options.reuse else copy_tests(options.workdir)
    files = [Path(relative).name for relative in BEAM_TESTS]
    listed = listed_differences()
    problems: list[str] = []
    notes: list[str] = []
    runs: dict[str, dict[str, Any]] = {}
    for mode in ("turbo",) if options.turbo_only else ("stock", "turbo"):
        if options.reuse:
            runs[mode] = json.loads((options.workdir / f"{mode}.json").read_text())
        elif mode == "stock":
            runs[mode] = run_stock(
                options.workdir, selection, options.pytest_args, not options.no_cache
            )
        else:
            runs[mode] = run(options.workdir, selection, mode, options.pytest_args)
    turbo = runs["turbo"]
    for mode, record in runs.items():
        whole, missing = vanished(files, mode, record)
        problems += whole
        # With a -k selection, a file may rightly run nothing.
        (notes if options.pytest_args else problems).extend(missing)
        problems += unswapped(mode, record)
    if "stock" in runs:
        stock = runs["stock"]
        problems += [
            f"{entry['outcome']} on stock Beam (the harness is wrong): {test_id}"
            for test_id, entry in sorted(stock["tests"].items())
            if entry["outcome"] in ("failed", "error")
        ]
        problems += differences(stock, turbo, listed)
    else:
        problems += [
            f"{entry['outcome']} with beam-turbo, not a listed difference: {test_id}"
            for test_id, entry in sorted(turbo["tests"].items())
            if entry["outcome"] in ("failed", "error") and test_id not in listed
        ]
    failed = {t for t, entry in turbo["tests"].items() if entry["outcome"] == "failed"}
    for test_id in sorted(listed - failed):
        if test_id in turbo["tests"]:
            notes.append(
                f"listed difference passes now (remove it from docs/run-inference.md): {test_id}"
            )
    print(f"\nBeam {apache_beam.__version__}'s tests per file (whole file: skipped or broken at")
    print("collection, in which run):\n")
    print("\n".join(file_table(files, runs)))
    total = dict.fromkeys(OUTCOMES, 0)
    for entry in turbo["tests"].values():
        total[entry["outcome"]] += 1
    print(
        f"\nbeam-turbo on Beam {apache_beam.__version__}'s tests: {len(turbo['tests'])} tests, "
        f"{len(failed & listed)} listed differences"
    )
    for note in notes:
        print(f"note: {note}")
    for problem in problems:
        print(f"FAIL: {problem}")
    print(
        f"conformance: {'FAILED' if problems else 'ok'}, {len(problems)} problems; with "
        f"beam-turbo {total['passed']} passed, {total['failed']} failed, "
        f"{total['error']} errors, {total['skipped']} skipped"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
