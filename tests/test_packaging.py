"""The wheel: abi3, a manylinux tag maturin's audit accepts, and it installs and imports in a
fresh virtual environment."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _release_wheel(tmp_path: Path) -> Path:
    """``BEAM_TURBO_WHEEL`` (.ci/run builds the release wheel once for every check that
    installs one), or a wheel built here as a user builds it."""
    given = os.environ.get("BEAM_TURBO_WHEEL")
    if given:
        return Path(given)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "maturin", "build", "--release", "--out", str(wheels)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    wheel = _release_wheel(tmp_path)
    assert "-cp311-abi3-manylinux_" in wheel.name, wheel.name

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True, timeout=900
    )
    script = (
        "import numpy as np, beam_turbo;"
        "b = beam_turbo.stack([np.arange(3)] * 2);"
        "assert b.tolist() == [[0, 1, 2]] * 2;"
        "print(beam_turbo.__version__)"
    )
    done = subprocess.run(
        [str(python), "-c", script], cwd=tmp_path, check=True, capture_output=True, text=True
    )
    assert done.stdout.strip() == "0.1.0"
