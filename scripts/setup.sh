#!/usr/bin/env bash
# Create .venv (if missing) and build + install beam-turbo with all extras and the dev tools.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# The build backend runs `maturin` from PATH: the venv's own, on a machine that has none.
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/python -m pip install --quiet --upgrade "pip>=25.1"
# pip >= 25.1 reads the [dependency-groups] table (PEP 735).
.venv/bin/python -m pip install --quiet --group dev
# An editable install: the extension is built (release profile) into python/beam_turbo and
# rebuilt incrementally from target/ on the next run.
.venv/bin/python -m pip install --quiet --no-build-isolation -e ".[all]"
