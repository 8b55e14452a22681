#!/usr/bin/env bash
# An overlay venv: its own packages first, then .venv's (with their .pth files, the editable
# beam-turbo among them), so torch and TensorFlow are installed once. pip resolves the
# requirements against .venv's packages, which it never changes: the overlay gets only what they
# need that .venv lacks or has at another version. Rebuilt when the requirements change.
# Usage: scripts/overlay.sh DIR REQUIREMENT... (prints DIR/bin/python). Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
overlay=$1
shift
wanted="$*"
if [ ! -f "$overlay/installed" ] || [ "$(cat "$overlay/installed")" != "$wanted" ]; then
    rm -rf "$overlay"
    .venv/bin/python -m venv --without-pip "$overlay"
    site=$("$overlay/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
    base=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")
    echo "import site; site.addsitedir('$base')" >"$site/zz_project_venv.pth"
    .venv/bin/python -m pip --python "$overlay/bin/python" install --quiet \
        --disable-pip-version-check "$@" >&2
    echo "$wanted" >"$overlay/installed"
fi
echo "$overlay/bin/python"
