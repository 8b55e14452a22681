#!/usr/bin/env bash
# Beam's own tests with beam-turbo's classes in place of Beam's (scripts/conformance.py), on the
# Beam releases named (default: the one in .venv). For another release, an overlay venv
# (.venv-beam-X.Y.Z, scripts/overlay.sh) holds that apache-beam and what it needs that .venv
# lacks, in front of .venv's packages, so torch and TensorFlow are installed once. Run
# scripts/setup.sh first.
# Usage: scripts/conformance.sh [2.75.0 2.76.0 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
# This checkout's beam-turbo, also where .venv's editable install names another checkout.
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
installed=$(.venv/bin/python -c "import apache_beam; print(apache_beam.__version__)")
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("$installed")
status=0
for version in "${versions[@]}"; do
    if [ "$version" = "$installed" ]; then
        python=.venv/bin/python
    else
        python=$(scripts/overlay.sh ".venv-beam-$version" "apache-beam==$version")
    fi
    start=$SECONDS
    "$python" scripts/conformance.py --workdir "target/conformance-$version" || status=1
    echo "conformance on Beam $version took $((SECONDS - start)) s"
done
exit $status
