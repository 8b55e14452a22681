#!/usr/bin/env bash
# Beam's own tests with beam-turbo's classes in place of Beam's (scripts/conformance.py), on the
# Beam releases named (default: the one in .venv). For another release, an overlay venv
# (.venv-beam-X.Y.Z, scripts/overlay.sh) holds that apache-beam and what it needs that .venv
# lacks, in front of .venv's packages, so torch and TensorFlow are installed once. Run
# scripts/setup.sh first.
#
# Releases run BEAM_TURBO_CONFORMANCE_JOBS at a time (default 4: Beam's tests wait more than
# they compute; the four releases two at a time took 8:55 here with 4:51 of CPU, one at a
# time 15:13), each into target/conformance-X.Y.Z.log; each log is printed whole, in the
# order named, with its time, once all are done. The exit status is 1 if any release failed.
# Usage: scripts/conformance.sh [2.75.0 2.76.0 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
# This checkout's beam-turbo, also where .venv's editable install names another checkout.
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
installed=$(.venv/bin/python -c "import apache_beam; print(apache_beam.__version__)")
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("$installed")
jobs=${BEAM_TURBO_CONFORMANCE_JOBS:-4}
mkdir -p target

one() { # version: its overlay (made in turn, below), its run, its time, into its log
    local version=$1 python start
    start=$SECONDS
    if [ "$version" = "$installed" ]; then
        python=.venv/bin/python
    else
        python=.venv-beam-$version/bin/python
    fi
    local status=0
    "$python" scripts/conformance.py --workdir "target/conformance-$version" || status=1
    echo "conformance on Beam $version took $((SECONDS - start)) s"
    return $status
}

# The overlays first, one at a time (pip), so that the runs only run.
for version in "${versions[@]}"; do
    [ "$version" = "$installed" ] || scripts/overlay.sh ".venv-beam-$version" "apache-beam==$version" >/dev/null
done

for version in "${versions[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
        wait -n || true  # each run's status is in its .status file
    done
    rm -f "target/conformance-$version.status"
    {
        if one "$version" >"target/conformance-$version.log" 2>&1; then echo 0; else echo 1; fi \
            >"target/conformance-$version.status"
    } &
done
wait
status=0
for version in "${versions[@]}"; do
    printf '\n=== conformance on Beam %s (target/conformance-%s.log)\n' "$version" "$version"
    cat "target/conformance-$version.log"
    [ "$(cat "target/conformance-$version.status" 2>/dev/null)" = 0 ] || status=1
done
exit $status
