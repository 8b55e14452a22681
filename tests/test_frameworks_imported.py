"""beam-turbo looks at the frameworks a pipeline imported (``sys.modules``), never imports one;
a framework that another thread is still importing is not looked into. An SDK worker runs bundles
on several threads: one loading a torch model (importing torch) while another stacks a
scikit-learn batch failed that batch with "partially initialized module 'torch' has no attribute
'Tensor'" on Spark."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import pytest

from beam_turbo._frameworks import imported

#: Stacks, unbatches and classifies an error on the main thread, over and over, while a second
#: thread imports torch; prints how many calls ran during the import.
_WHILE_TORCH_IMPORTS = textwrap.dedent(
    """
    import sys, threading
    import numpy as np
    import beam_turbo
    from beam_turbo._arrays.results import rows
    from beam_turbo._running.oom import is_out_of_memory

    assert "torch" not in sys.modules
    importer = threading.Thread(target=__import__, args=("torch",))
    importer.start()
    arrays = [np.ones(4, np.float32)] * 8
    calls = 0
    while importer.is_alive():
        beam_turbo.stack(arrays)
        rows(np.ones((2, 2)))
        is_out_of_memory(ValueError("no"))
        calls += 1
    importer.join()
    assert "torch" in sys.modules and hasattr(sys.modules["torch"], "Tensor")
    print(calls)
    """
)


def test_stacking_while_another_thread_imports_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _WHILE_TORCH_IMPORTS], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout) > 0, "no call ran while torch was being imported"


def test_a_module_being_imported_is_not_imported_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = types.ModuleType("slow_to_import_sync")
    sync.started, sync.go_on = threading.Event(), threading.Event()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, sync.__name__, sync)
    (tmp_path / "slow_to_import.py").write_text(
        "from slow_to_import_sync import started, go_on\n"
        "started.set()\n"
        "go_on.wait(30)\n"
        "Tensor = object\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importer = threading.Thread(target=__import__, args=("slow_to_import",))
    importer.start()
    try:
        assert sync.started.wait(30)
        assert "slow_to_import" in sys.modules, "the import has begun"
        assert imported("slow_to_import") is None
        sync.go_on.set()
        importer.join(30)
        module = imported("slow_to_import")
        assert isinstance(module, types.ModuleType)
        assert module.Tensor is object
    finally:
        sync.go_on.set()
        importer.join(30)
        sys.modules.pop("slow_to_import", None)


def test_a_module_never_imported_is_none() -> None:
    assert imported("beam_turbo_no_such_framework") is None
    assert imported("sys") is sys
