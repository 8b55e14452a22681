#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/beam-turbo demo "$@"
