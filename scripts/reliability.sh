#!/usr/bin/env bash
# The core under hostile input and memcheck: a short coverage-guided fuzz run of each cargo-fuzz
# target (stable toolchain, so `-s none`: no sanitizer, overflow checks on), then the core's
# unit tests under valgrind's memcheck. Exits non-zero on any crash, failed check or memory error.
#
#   scripts/reliability.sh                 # 25 s per fuzz target
#   FUZZ_SECONDS=300 scripts/reliability.sh
#
# New inputs the fuzzer finds go to a temporary directory; the committed seeds in
# fuzz/corpus/<target>/ are only read. A crash leaves its input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
FUZZ_SECONDS=${FUZZ_SECONDS:-25}

step() { printf '\n=== %s\n' "$*"; }

if ! command -v cargo-fuzz >/dev/null; then
    step "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi
if ! command -v valgrind >/dev/null; then
    step "installing valgrind"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
    else
        echo "valgrind is missing and cannot be installed here" >&2
        exit 1
    fi
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

FUZZ_FLAGS=(--sanitizer none --release --debug-assertions)
step "cargo fmt --check (fuzz crate, outside the main workspace)"
(cd fuzz && cargo fmt --check)
step "cargo fuzz build"
cargo fuzz build "${FUZZ_FLAGS[@]}"

for target in $(cargo fuzz list); do
    step "fuzz $target for ${FUZZ_SECONDS}s"
    mkdir -p "$scratch/$target"
    log="$scratch/$target.log"
    if ! cargo fuzz run "${FUZZ_FLAGS[@]}" "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz target $target failed; its input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    seeds=$(find "fuzz/corpus/$target" -type f | wc -l)
    found=$(find "$scratch/$target" -type f | wc -l)
    echo "$target: $execs executions in ${FUZZ_SECONDS}s ($rate/s), $seeds seeds, $found new inputs, no failure"
done

step "valgrind memcheck: the core's unit tests"
mapfile -t binaries < <(cargo test -p beam-turbo-core --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
if [ "${#binaries[@]}" -eq 0 ]; then
    echo "no test binary found for beam-turbo-core" >&2
    exit 1
fi
# The fork test's child leaves with _exit and so "leaks" the parent's threads' memory: it runs
# on its own without leak accounting; every other test counts definite leaks as errors.
FORK_TEST=cache::tests::a_forked_child_loads_although_the_parent_was_loading
for binary in "${binaries[@]}"; do
    valgrind -q --error-exitcode=9 --fair-sched=yes --leak-check=full \
        --errors-for-leak-kinds=definite --show-leak-kinds=definite "$binary" --test-threads=1 --skip "$FORK_TEST"
    valgrind -q --error-exitcode=9 --fair-sched=yes --leak-check=no --child-silent-after-fork=yes \
        "$binary" --test-threads=1 --exact "$FORK_TEST"
done
step "reliability: all passed"
