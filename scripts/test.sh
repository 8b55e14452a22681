#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite: Rust, then Python.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --quiet
# pytest exits 5 when it collected nothing: a failure here, not a pass.
.venv/bin/python -m pytest "$@"
