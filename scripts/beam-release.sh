#!/usr/bin/env bash
# A new Beam release, checked in one run (docs/beam-releases.md): installs apache-beam==VERSION
# in an overlay venv (.venv-beam-VERSION, scripts/overlay.sh), reports what changed in the
# private Beam names beam-turbo uses between .venv's Beam and VERSION (scripts/beam_names.py),
# and runs the whole conformance (scripts/conformance.py) against VERSION with beam-turbo's
# version gate opened to it in a copy of python/ (the checkout is not changed). Everything it
# prints is also kept in target/beam-release-VERSION/. Exit status: the conformance's.
# Usage: scripts/beam-release.sh VERSION (e.g. 2.79.0). Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/beam-release.sh VERSION}
out=target/beam-release-$version
rm -rf "$out"
mkdir -p "$out"
start=$SECONDS

echo "=== installing apache-beam==$version in .venv-beam-$version"
python=$(scripts/overlay.sh ".venv-beam-$version" "apache-beam==$version")

# beam-turbo as checked out, with SUPPORTED_BEAM opened to VERSION (if it is not in it yet).
cp -r python "$out/python"
gate=$(grep -rl --include='*.py' '^SUPPORTED_BEAM = ' "$out/python")
minor=$(echo "$version" | cut -d. -f1-2)
.venv/bin/python - "$gate" "$minor" <<'EOF'
import re, sys
path, minor = sys.argv[1:]
text = open(path).read()
gate = re.search(r"^SUPPORTED_BEAM = \((.*)\)$", text, re.M)
if f'"{minor}"' not in gate.group(1):
    text = text[: gate.end(1)] + f', "{minor}"' + text[gate.end(1) :]
    open(path, "w").write(text)
    print(f"(gate opened to {minor} in the copy: {path})")
EOF

echo
echo "=== private Beam names beam-turbo uses: .venv's Beam against $version"
PYTHONPATH="$PWD/$out/python" .venv/bin/python scripts/beam_names.py --against "$python" \
    2> >(grep -v -e '^WARNING:root' -e '^I0000' >&2) | tee "$out/names.txt"
names_s=$((SECONDS - start))

echo
echo "=== conformance: Beam $version's own tests, stock and with beam-turbo in place"
set +e
PYTHONPATH="$PWD/$out/python" "$python" scripts/conformance.py --workdir "$out/conformance" \
    2>&1 | tee "$out/conformance.txt"
status=${PIPESTATUS[0]}
set -e

echo
echo "=== Beam $version: names report and install ${names_s} s, all $((SECONDS - start)) s"
grep -m1 '^Beam names' "$out/names.txt" || true
tail -n1 "$out/conformance.txt"
if [ "$status" -eq 0 ]; then
    echo "Conformance passes: add \"$minor\" to SUPPORTED_BEAM ($(grep -rl --include='*.py' \
'^SUPPORTED_BEAM = ' python)), raise apache-beam's upper bound in pyproject.toml, and add \
$version to the conformance line in .ci/run (docs/beam-releases.md)."
fi
exit "$status"
