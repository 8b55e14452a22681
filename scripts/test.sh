#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite: Rust, then Python.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` for the slow tests. pytest runs
# on BEAM_TURBO_TEST_WORKERS processes (pytest-xdist; default 2, the machine's cores; 0: one
# process, as for a debugger).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --quiet
# pytest exits 5 when it collected nothing: a failure here, not a pass.
workers=${BEAM_TURBO_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
    .venv/bin/python -m pytest "$@"
else
    .venv/bin/python -m pytest -n "$workers" "$@"
fi
