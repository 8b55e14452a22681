#!/usr/bin/env bash
# Create .venv (if missing) and build + install beam-turbo with all extras and the dev tools.
# Idempotent: a second run only rebuilds what changed.
# Needs CPython 3.11+, Rust 1.85+ (cargo) and about 9 GB of disk. The first run downloads
# several GB (torch, TensorFlow) and takes a few minutes; later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
step() { printf '\n[setup] %s\n' "$*"; }
command -v cargo >/dev/null || { echo "[setup] cargo not found: install Rust 1.85+ (rustup)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
    step "creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
# The build backend runs `maturin` from PATH: the venv's own, on a machine that has none.
export PATH="$PWD/.venv/bin:$PATH"
PIP=(.venv/bin/python -m pip install --progress-bar on --disable-pip-version-check)
"${PIP[@]}" --quiet --upgrade "pip>=25.1"
# pip >= 25.1 reads the [dependency-groups] table (PEP 735).
step "dev tools (pytest, ruff, mypy, maturin, ...)"
"${PIP[@]}" --quiet --group dev
# An editable install: the extension is built (release profile) into python/beam_turbo and
# rebuilt incrementally from target/ on the next run. The frameworks are most of the download.
step "beam-turbo with all extras: apache-beam, torch, TensorFlow, scikit-learn (the first time: several GB), then the Rust build"
verbosity=()  # pip's progress the first time; quiet once everything is there
.venv/bin/python -c "import beam_turbo, torch, tensorflow, sklearn" 2>/dev/null && verbosity=(--quiet)
"${PIP[@]}" "${verbosity[@]}" --no-build-isolation -e ".[all]"
.venv/bin/python -c "import beam_turbo; print('[setup] beam-turbo', beam_turbo.__version__, 'ready')"
