#!/usr/bin/env bash
# Beam's own tests with beam-turbo's classes in place of Beam's (scripts/conformance.py), on the
# Beam releases named (default: the one in .venv). For another release, an overlay venv
# (.venv-beam-X.Y.Z) holds that apache-beam and what it needs that .venv lacks, in front of
# .venv's packages, so torch and TensorFlow are installed once. Run scripts/setup.sh first.
# Usage: scripts/conformance.sh [2.75.0 2.76.0 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
installed=$(.venv/bin/python -c "import apache_beam; print(apache_beam.__version__)")
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("$installed")
status=0
for version in "${versions[@]}"; do
    if [ "$version" = "$installed" ]; then
        python=.venv/bin/python
    else
        overlay=".venv-beam-$version"
        if [ ! -f "$overlay/installed" ]; then
            rm -rf "$overlay"
            .venv/bin/python -m venv --without-pip "$overlay"
            site=$("$overlay/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
            base=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")
            # After the overlay's own packages: .venv's, with their .pth files (the editable
            # beam-turbo among them).
            echo "import site; site.addsitedir('$base')" >"$site/zz_project_venv.pth"
            # pip resolves the release against .venv's packages, which it never changes: the
            # overlay gets what this release needs that .venv lacks or has at another version.
            .venv/bin/python -m pip --python "$overlay/bin/python" install --quiet \
                --disable-pip-version-check "apache-beam==$version"
            touch "$overlay/installed"
        fi
        python="$overlay/bin/python"
    fi
    "$python" scripts/conformance.py --workdir "target/conformance-$version" || status=1
done
exit $status
