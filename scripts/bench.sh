#!/usr/bin/env bash
# Run the pytest-benchmark suites in benches/ (all, or the files given), after setting up.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pytest -o python_files='bench_*.py' -p no:cacheprovider \
    --benchmark-only --benchmark-columns=min,median,mean,ops,rounds -m "" "${@:-benches}"
