#!/usr/bin/env bash
# The GPU check: scripts/gpu-check.sh [REPORT.md] (default gpu-report.md), after scripts/setup.sh.
#
# On a machine with an NVIDIA GPU that torch can use, within 8 minutes: the gpu-marked tests;
# `beam-turbo bench e2e --device cuda --serial` for the torch MLP, MiniLM and MobileNetV2
# (stock Beam against beam-turbo, serial against in flight where the build has batches in
# flight; the models are built locally, nothing is downloaded); the GPU's utilization and memory
# sampled every 0.5 s while they run (nvidia-smi); host-to-device bandwidth (pinned 256 MiB
# copies) against what the card's PCIe link gives. Without one, it says so and runs the CPU half
# in about 2-3 minutes: the gpu tests' clean skips and the simulated-accelerator benchmark
# (`bench e2e --framework simulated --quick`). CI runs that half.
#
# Every part runs under its own timeout; one that fails or times out does not stop the others.
# The Markdown report is written in every case (each part's status, time, GPU use and output),
# and the script exits 1 if any part failed, or if a GPU is here that torch cannot use.
set -euo pipefail
report=$(realpath -m "${1:-gpu-report.md}")
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export PYTHONUNBUFFERED=1 # a part cut off by its timeout still shows how far it got
work=$(mktemp -d)
start_all=$SECONDS
parts=()     # "name|result|seconds|first sample|last sample", one per part run
failed=0
mode=""      # gpu or cpu
why_cpu=""   # why the CPU half ran
smi_pid=""

# --- the report, written on every exit -----------------------------------------------------

# The mean and max of column $2 (1-based, in the CSV samples) over lines $3..$4 of file $1.
stats() {
    awk -F', *' -v from="$3" -v to="$4" -v col="$2" '
        NR >= from && NR <= to && $col ~ /^[0-9.]+$/ { n++; s += $col; if ($col > m) m = $col }
        END { if (n) printf "%.0f|%.0f|%d", s / n, m, n; else printf "-|-|0" }' "$1"
}

write_report() {
    local row name result took first last util mem
    {
        echo "# beam-turbo GPU check"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "- commit: \`$(git rev-parse HEAD 2>/dev/null || echo unknown)\`$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
        echo "- machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sr)"
        if [ "$mode" = gpu ]; then
            echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
        fi
        echo "- software: $(cat "$work/versions" 2>/dev/null || echo 'unknown (.venv missing?)')"
        echo "- mode: $([ "$mode" = gpu ] && echo 'GPU half' || echo "CPU half only: $why_cpu")"
        echo "- took: $((SECONDS - start_all)) s; result: $([ "$failed" = 0 ] && echo passed || echo FAILED)"
        echo
        if [ "$mode" = gpu ]; then
            echo "| part | result | seconds | GPU utilization % (mean / max) | GPU memory MiB (max) |"
            echo "| --- | --- | ---: | ---: | ---: |"
        else
            echo "| part | result | seconds |"
            echo "| --- | --- | ---: |"
        fi
        for row in "${parts[@]}"; do
            IFS='|' read -r name result took first last <<<"$row"
            if [ "$mode" = gpu ]; then
                IFS='|' read -r u_mean u_max _ <<<"$(stats "$work/util.csv" 2 "$first" "$last")"
                IFS='|' read -r _ mem _ <<<"$(stats "$work/util.csv" 3 "$first" "$last")"
                echo "| $name | $result | $took | $u_mean / $u_max | $mem |"
            else
                echo "| $name | $result | $took |"
            fi
        done
        [ "$mode" != gpu ] || echo -e "\nGPU columns: nvidia-smi's samples every 0.5 s over each part's time."
        for row in "${parts[@]}"; do
            IFS='|' read -r name result took _ _ <<<"$row"
            echo
            echo "## $name ($result, $took s)"
            echo
            echo '```'
            cat "$work/cmd.$name" 2>/dev/null
            echo
            # The tables and verdicts are at the end; a long log keeps its last 80 lines.
            tail -n 80 "$work/log.$name" 2>/dev/null
            echo '```'
        done
    } >"$report"
}

finish() {
    local status=$?
    [ -z "$smi_pid" ] || kill "$smi_pid" 2>/dev/null || true
    [ "$status" = 0 ] || failed=1
    write_report
    rm -rf "$work"
    echo "gpu-check: report in $report ($([ "$failed" = 0 ] && echo passed || echo FAILED))"
    exit $((failed || status ? 1 : 0))
}
trap finish EXIT
trap 'exit 143' TERM INT

# part NAME TIMEOUT_SECONDS COMMAND...: run one part, record its result; never stops the script.
part() {
    local name=$1 limit=$2 rc=0 first last begin
    shift 2
    echo "$*" >"$work/cmd.$name"
    printf '\n[gpu-check] %s (at most %d s): %s\n' "$name" "$limit" "$*"
    first=$(($(wc -l <"$work/util.csv") + 1))
    begin=$SECONDS
    timeout --kill-after=15 "$limit" "$@" >"$work/log.$name" 2>&1 || rc=$?
    last=$(wc -l <"$work/util.csv")
    local result=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        result="TIMED OUT after $limit s"
    elif [ "$rc" != 0 ]; then
        result="FAILED (exit $rc)"
    fi
    [ "$result" = ok ] || failed=1
    parts+=("$name|$result|$((SECONDS - begin))|$first|$last")
    tail -n 25 "$work/log.$name"
    echo "[gpu-check] $name: $result ($((SECONDS - begin)) s)"
}

: >"$work/util.csv"
if [ ! -x "$PY" ]; then
    why_cpu="no .venv: run scripts/setup.sh first"
    echo "gpu-check: $why_cpu" >&2
    exit 1
fi
"$PY" -c 'import sys, apache_beam, torch
print(f"Python {sys.version.split()[0]}, apache-beam {apache_beam.__version__}, "
      f"torch {torch.__version__} (CUDA {torch.version.cuda})")' >"$work/versions" 2>/dev/null || true

# --- GPU or not ----------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    why_cpu="no NVIDIA GPU here (no working nvidia-smi)"
elif ! cuda=$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>&1) || [ "$cuda" != True ]; then
    why_cpu="nvidia-smi sees a GPU but torch cannot use it (torch.cuda.is_available(): $cuda; driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1), torch built for CUDA $("$PY" -c 'import torch; print(torch.version.cuda)'))"
    failed=1 # a GPU machine on which the GPU half cannot run: the check failed
else
    mode=gpu
fi
if [ "$mode" != gpu ]; then
    echo "gpu-check: $why_cpu; running the CPU half"
fi

# The gpu-marked tests: on a GPU they run; without one, each must skip cleanly.
mapfile -t gpu_tests < <(grep -l 'mark\.gpu' tests/*.py)
[ "${#gpu_tests[@]}" -gt 0 ] || gpu_tests=(tests)
BENCH=("$PY" -m beam_turbo.cli bench e2e)

if [ "$mode" = gpu ]; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
        -lms 500 >"$work/util.csv" 2>/dev/null &
    smi_pid=$!
    # Budget: 60 + 30 + 90 + 150 + 130 = 460 s, within 8 minutes with the start-up.
    part "gpu tests" 60 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider "${gpu_tests[@]}"
    part "host-to-device bandwidth" 30 "$PY" scripts/gpu_bandwidth.py
    part "torch MLP on CUDA" 90 "${BENCH[@]}" --framework torch-mlp --device cuda --serial \
        --rounds 3 --sizes 20000 80000
    part "MiniLM on CUDA" 150 "${BENCH[@]}" --framework minilm --device cuda --serial --rounds 2
    part "MobileNetV2 on CUDA" 130 "${BENCH[@]}" --framework mobilenet --device cuda --serial --rounds 2
else
    part "gpu tests (skip cleanly)" 120 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider "${gpu_tests[@]}"
    part "simulated accelerator (quick)" 150 "${BENCH[@]}" --framework simulated --quick
fi
