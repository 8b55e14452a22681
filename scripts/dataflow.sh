#!/usr/bin/env bash
# Dataflow, as far as it can be checked without Google Cloud (docs/clusters.md#dataflow): a
# beam-turbo pipeline translates for Dataflow Runner v2 and the job stages the wheel, without
# submitting (tests/test_dataflow.py). Builds the wheel (maturin build --release, as a user ships
# it), unless BEAM_TURBO_WHEEL names one already built, and an overlay venv with apache-beam[gcp]
# at .venv's Beam release (scripts/overlay.sh), then runs the test there; with no network at all
# where the kernel lets `unshare -n` run.
# Usage: scripts/dataflow.sh [pytest arguments]. Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
beam=$(.venv/bin/python -c "import apache_beam; print(apache_beam.__version__)")
python=$(scripts/overlay.sh .venv-beam-gcp "apache-beam[gcp]==$beam")
wheel=${BEAM_TURBO_WHEEL:-}
if [ -z "$wheel" ]; then
    rm -rf target/dataflow/wheels
    PATH="$PWD/.venv/bin:$PATH" maturin build --quiet --release --out target/dataflow/wheels
    wheel=$(ls "$PWD"/target/dataflow/wheels/beam_turbo-*.whl)
fi
offline=()
unshare --net true 2>/dev/null && offline=(unshare --net)
BEAM_TURBO_WHEEL="$wheel" "${offline[@]}" "$python" -m pytest -m dataflow tests/test_dataflow.py "$@"
