"""Copied by scripts/conformance.py as the conftest.py beside Beam's copied tests.

With ``BEAM_TURBO_CONFORMANCE=turbo``, puts beam-turbo's classes in place of Beam's
(``beam_turbo.patch()``) before any test module is imported. In both runs, records for
scripts/conformance.py, in the JSON file ``BEAM_TURBO_CONFORMANCE_REPORT`` names:

- ``tests``: each test's outcome (passed, skipped, failed, error) and a skip's reason;
- ``files``: each test file skipped or broken whole at collection (Beam's HuggingFace tests
  raise ``SkipTest`` at import when a framework import fails), with the reason;
- ``names``: once every test module is imported, whether each Beam name in
  ``BEAM_TURBO_CONFORMANCE_NAMES`` (a JSON list of ``[module, name]``) is beam-turbo's in
  its Beam module (``ours``, ``beam``, or ``not imported``), and in every test module that
  holds it as a global;
- ``replacements``: the ``[module, name]`` pairs ``patch()`` itself lists (turbo run only).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

# Beam's HuggingFace module imports TensorFlow before torch's triton, which aborts the process
# when both are installed (two LLVM copies); in both runs, triton comes first.
try:
    import torch  # noqa: F401
    import triton  # noqa: F401
except ImportError:
    pass

if os.environ.get("BEAM_TURBO_CONFORMANCE") == "turbo":
    import beam_turbo

    beam_turbo.patch()

_REPORT: dict[str, Any] = {"tests": {}, "files": {}, "names": {}, "replacements": []}


def _reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        return str(longrepr[2])
    return str(longrepr).strip().splitlines()[-1] if longrepr else ""


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A test file skipped or failed whole at collection (import)."""
    if report.nodeid.endswith(".py") and not report.passed:
        _REPORT["files"][report.nodeid] = {
            "outcome": "skipped" if report.skipped else "error",
            "reason": _reason(report.longrepr),
        }


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    tests = _REPORT["tests"]
    entry = tests.setdefault(report.nodeid, {"outcome": "passed", "reason": ""})
    if report.failed:
        # A failing setup or teardown is an error; a failing test body, a failure.
        entry["outcome"] = "failed" if report.when == "call" else "error"
        entry["reason"] = _reason(report.longrepr)
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        entry["reason"] = _reason(report.longrepr)


def _is_ours(value: Any) -> bool:
    return str(getattr(value, "__module__", "")).startswith("beam_turbo")


def pytest_collection_finish(session: pytest.Session) -> None:
    """After every test module is imported: which of the names is beam-turbo's, and where."""
    names = json.loads(os.environ.get("BEAM_TURBO_CONFORMANCE_NAMES", "[]"))
    test_modules = {}
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None:
            test_modules[module.__name__] = module
    for module_name, name in names:
        module = sys.modules.get(module_name)
        if module is None:
            state = "not imported"
        else:
            state = "ours" if _is_ours(getattr(module, name, None)) else "beam"
        where = {module_name: state}
        for test_module in test_modules.values():
            if name in vars(test_module):
                where[test_module.__name__] = (
                    "ours" if _is_ours(vars(test_module)[name]) else "beam"
                )
        _REPORT["names"][f"{module_name}.{name}"] = where
    if os.environ.get("BEAM_TURBO_CONFORMANCE") == "turbo":
        patch_module = sys.modules[beam_turbo.patch.__module__]
        _REPORT["replacements"] = sorted(
            [module, name]
            for module, entries in patch_module._REPLACEMENTS.items()
            for name, *_ in entries
        )


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("BEAM_TURBO_CONFORMANCE_REPORT")
    if path:
        with open(path, "w") as out:
            json.dump(_REPORT, out, indent=1, sort_keys=True)
