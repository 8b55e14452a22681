#!/usr/bin/env bash
# The packages beyond the host's wheel (tests/test_packaging.py checks that one):
#
# sdist    `maturin sdist`, then `pip install` of it into a fresh venv (pip builds the Rust from
#          source, as a user without a wheel for their host does), an import from that venv and
#          one beam_turbo.RunInference pipeline checked against the model's own predictions
#          (scripts/wheel_smoke.py). The venv reads .venv's packages (apache-beam, numpy,
#          scikit-learn) through a .pth after its own, as scripts/overlay.sh's do: the check is
#          the sdist, not a second download of Beam.
# aarch64  a manylinux aarch64 wheel cross-built with maturin --zig (Graviton, Dataflow's Arm
#          workers), then, under qemu's user-mode emulation: the core's Rust tests (cargo test
#          --target aarch64-unknown-linux-gnu), and the wheel in an arm64 Debian Python (a
#          debootstrap'ed bookworm under ~/.cache/beam-turbo/arm64, numpy and pytest from PyPI's aarch64
#          wheels): scripts/wheel_smoke.py stack and tests/test_stack.py.
#
# Installs what it needs: the Rust std for aarch64 (rustup), ziglang (PyPI, into a venv of its
# own), and Debian's qemu-user-static, gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and
# debootstrap (apt-get, as root). The arm64 root and the tools are kept in
# ~/.cache/beam-turbo between runs. Run scripts/setup.sh first.
# Usage: scripts/wheels.sh [sdist|aarch64]...   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
ROOT=$PWD
PY=$ROOT/.venv/bin/python
PIP=("$PY" -m pip --disable-pip-version-check)
TARGET=aarch64-unknown-linux-gnu
SUITE=bookworm  # Beam's SDK containers' Debian; its python3 is 3.11, the wheel's abi3 floor
# The arm64 root and the tools are kept outside the checkout, as pip's cache is, so that a clean
# checkout (CI's) reuses them.
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/beam-turbo
ARM64=$CACHE/arm64

step() { printf '\n=== wheels: %s (at %d s)\n' "$*" "$SECONDS"; }
die() { printf 'wheels: error: %s\n' "$*" >&2; exit 1; }

apt_install() { # command-to-check package...
    local check=$1
    shift
    command -v "$check" >/dev/null && return 0
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null ||
        die "$check is missing: install the Debian packages $* (apt-get, as root)"
    step "installing $* (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

sdist() {
    step "sdist (maturin sdist)"
    rm -rf target/sdist
    PATH="$ROOT/.venv/bin:$PATH" maturin sdist --out target/sdist
    local archive venv own base
    archive=$(ls "$ROOT"/target/sdist/beam_turbo-*.tar.gz)
    step "pip install $(basename "$archive") into a fresh venv (builds the Rust from source)"
    venv=$ROOT/target/sdist-venv
    rm -rf "$venv"
    "$PY" -m venv --without-pip "$venv"
    own=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    base=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import site; site.addsitedir('$base')" >"$own/zz_project_venv.pth"
    # pip builds in an isolated environment with maturin from PyPI, as for a user. What this
    # checks is that the sdist holds what a build needs, not the optimized binary (the release
    # wheel is checked elsewhere): no fat LTO, parallel codegen (a minute less), and the crates'
    # build outputs kept in target/sdist-build between runs. Its dependencies are .venv's
    # (--no-deps); --force-reinstall, as .venv's own beam-turbo is visible too (pip leaves that
    # one alone: it is outside this venv).
    CARGO_TARGET_DIR=$ROOT/target/sdist-build CARGO_PROFILE_RELEASE_LTO=off \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 "${PIP[@]}" --python "$venv/bin/python" install \
        --quiet --no-deps --force-reinstall "$archive"
    step "the sdist's install: import and one pipeline (scripts/wheel_smoke.py sdist)"
    # From outside the checkout, so that python/beam_turbo cannot shadow the install.
    (cd "$venv" && "$venv/bin/python" "$ROOT/scripts/wheel_smoke.py" sdist)
}

aarch64_tools() {
    if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
        step "the Rust std for $TARGET (rustup target add)"
        rustup target add "$TARGET"
    fi
    apt_install qemu-aarch64-static qemu-user-static
    apt_install aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu libc6-dev-arm64-cross
    apt_install debootstrap debootstrap
    if [ ! -x "$CACHE"/wheel-tools/bin/python ] ||
        ! "$CACHE"/wheel-tools/bin/python -m ziglang version >/dev/null 2>&1; then
        step "ziglang (PyPI) for maturin --zig"
        rm -rf "$CACHE"/wheel-tools
        "$PY" -m venv "$CACHE"/wheel-tools
        "$CACHE"/wheel-tools/bin/python -m pip install --quiet --disable-pip-version-check ziglang
    fi
}

# An arm64 Debian with its python3, unpacked without running any of its scripts (that would need
# binfmt_misc, which a container rarely has): qemu runs its python3 directly, with -L naming the
# root for its loader and libraries.
arm64_root() {
    local want="$SUITE python3 + numpy>=2 pytest hypothesis ml-dtypes"
    [ "$(cat "$ARM64/root.ok" 2>/dev/null)" = "$want" ] && return 0
    step "an arm64 Debian $SUITE root with python3 (debootstrap --foreign, unpacked)"
    rm -rf "$ARM64"
    mkdir -p "$ARM64"
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 "$SUITE" \
        "$ARM64/root" http://deb.debian.org/debian >"$ARM64/debootstrap.log" 2>&1 ||
        { tail -20 "$ARM64/debootstrap.log"; die "debootstrap failed"; }
    local deb
    for deb in "$ARM64"/root/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ARM64/root"; done
    [ -x "$ARM64/root/usr/bin/python3" ] || die "no python3 in the arm64 root"
    # numpy 2 and the test tools from PyPI's aarch64 wheels (bookworm's numpy is 1.24).
    "${PIP[@]}" install --quiet --target "$ARM64/deps" --only-binary=:all: --implementation cp \
        --python-version 3.11 --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
        "numpy>=2" pytest hypothesis ml-dtypes
    echo "$want" >"$ARM64/root.ok"
}

aarch64() {
    aarch64_tools
    step "manylinux aarch64 wheel (maturin build --release --zig --target $TARGET)"
    rm -rf target/wheels-aarch64
    PATH="$CACHE/wheel-tools/bin:$ROOT/.venv/bin:$PATH" maturin build --quiet --release \
        --zig --target "$TARGET" --out target/wheels-aarch64
    local wheel
    wheel=$(ls "$ROOT"/target/wheels-aarch64/beam_turbo-*.whl)
    case "$wheel" in
        *-cp311-abi3-manylinux_*_aarch64.whl) echo "$wheel" ;;
        *) die "not an abi3 manylinux aarch64 wheel: $wheel" ;;
    esac

    step "the core's tests on aarch64 under qemu (cargo test -p beam-turbo-core --target $TARGET)"
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu" \
        cargo test --quiet -p beam-turbo-core --target "$TARGET"

    arm64_root
    step "the aarch64 wheel in an arm64 Python under qemu: stack, BatchSizer, tests/test_stack.py"
    rm -rf "$ARM64/wheel" "$ARM64/tests"
    "${PIP[@]}" install --quiet --no-deps --only-binary=:all: --implementation cp \
        --python-version 3.11 --platform "$(basename "$wheel" .whl | sed 's/.*-abi3-//')" \
        --target "$ARM64/wheel" "$wheel"
    mkdir -p "$ARM64/tests"
    cp tests/test_stack.py tests/conftest.py "$ARM64/tests/"
    local python=(qemu-aarch64-static -L "$ARM64/root" "$ARM64/root/usr/bin/python3")
    # The wheel first, then its dependencies; run outside the checkout (no python/ in reach).
    (
        cd "$ARM64"
        export PYTHONPATH="$ARM64/wheel:$ARM64/deps" PYTHONDONTWRITEBYTECODE=1
        "${python[@]}" -c 'import platform; m = platform.machine(); print("python on", m); assert m == "aarch64"'
        "${python[@]}" "$ROOT/scripts/wheel_smoke.py" stack
        "${python[@]}" -m pytest -q -p no:cacheprovider -o addopts= "$ARM64/tests/test_stack.py"
    )
}

what=("$@")
[ ${#what[@]} -gt 0 ] || what=(sdist aarch64)
for part in "${what[@]}"; do
    case "$part" in
        sdist | aarch64) "$part" ;;
        *) die "usage: scripts/wheels.sh [sdist|aarch64]..." ;;
    esac
done
step "all passed (${what[*]})"
