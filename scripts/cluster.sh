#!/usr/bin/env bash
# A real Flink or Spark cluster on loopback for Beam's portable runners, and its teardown.
#
#   scripts/cluster.sh install        fetch and build everything under .cluster/ (idempotent);
#                                     BEAM_TURBO_WHEEL=PATH installs that beam-turbo wheel
#                                     instead of building one
#   scripts/cluster.sh start flink    JobManager + 2 TaskManagers, Beam's Flink job server,
#                                     and the SDK worker pool
#   scripts/cluster.sh start spark    Spark master + 2 workers, Beam's Spark job server,
#                                     and the SDK worker pool
#   scripts/cluster.sh stop           stop whatever this script started, verify nothing is left
#   scripts/cluster.sh status         what runs (exit 0 when a cluster is up, 3 when none)
#   scripts/cluster.sh env            the settings pipelines need, as shell assignments
#   scripts/cluster.sh kill-taskmanager [ID]   kill -9 a Flink TaskManager (by resource id)
#   scripts/cluster.sh heal           start TaskManagers until two are registered again
#
# Pipelines submit with Beam's PortableRunner to the job server at localhost:$JOB_PORT, with
# --environment_type=EXTERNAL --environment_config=localhost:$WORKER_POOL_PORT: SDK workers are
# processes of Beam's worker pool, which runs from .cluster/worker-venv, where beam-turbo is
# the wheel built by `maturin build --release` (as a user ships it), not the editable checkout.
# Versions: scripts/cluster/versions.env.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE="$ROOT/scripts/cluster"
# shellcheck source=cluster/versions.env
source "$HERE/versions.env"
C="$ROOT/.cluster"
RUN="$C/run"
LOG="$C/log"
PROJECT_VENV=${PROJECT_VENV:-$ROOT/.venv}
PY="$PROJECT_VENV/bin/python"
FLINK_HOME="$C/flink-$FLINK_VERSION"
SPARK_HOME="$C/spark-$SPARK_VERSION/pyspark"
WORKER_VENV="$C/worker-venv"
JOBSERVER="$C/jobserver-$BEAM_JAVA_VERSION"

# Spark's launcher.JavaModuleOptions, which spark-submit passes to a driver on Java 17.
JAVA_MODULE_OPTIONS=(-XX:+IgnoreUnrecognizedVMOptions -Djdk.reflect.useDirectMethodHandle=false)
for open in java.lang java.lang.invoke java.lang.reflect java.io java.net java.nio java.util \
    java.util.concurrent java.util.concurrent.atomic jdk.internal.ref sun.nio.ch sun.nio.cs \
    sun.security.action sun.util.calendar; do
    JAVA_MODULE_OPTIONS+=("--add-opens=java.base/$open=ALL-UNNAMED")
done

say() { printf 'cluster: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# --- install ---------------------------------------------------------------------------------

install_flink() {
    [ -f "$FLINK_HOME/.complete" ] && return
    say "Flink $FLINK_VERSION from PyPI (apache-flink-libraries: lib/, apache-flink: bin/, conf/)"
    rm -rf "$FLINK_HOME" "$C/dl-flink"
    "$PY" -m pip install --quiet --no-deps --target "$C/dl-flink/libs" \
        "apache-flink-libraries==$FLINK_VERSION"
    # apache-flink's own dependencies pin an old apache-beam: only its wheel's files are used.
    "$PY" -m pip download --quiet --no-deps --dest "$C/dl-flink/wheel" "apache-flink==$FLINK_VERSION"
    "$PY" - "$C/dl-flink" <<'PYEOF'
import pathlib, sys, zipfile
root = pathlib.Path(sys.argv[1])
(wheel,) = (root / "wheel").glob("apache_flink-*.whl")
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(("pyflink/bin/", "pyflink/conf/")):
            zf.extract(name, root / "libs")
PYEOF
    mv "$C/dl-flink/libs/pyflink" "$FLINK_HOME"
    chmod +x "$FLINK_HOME"/bin/*.sh "$FLINK_HOME/bin/flink"
    rm -rf "$C/dl-flink"
    touch "$FLINK_HOME/.complete"
}

install_spark() {
    [ -f "$C/spark-$SPARK_VERSION/.complete" ] && return
    say "Spark $SPARK_VERSION from PyPI (pyspark: jars/, sbin/)"
    rm -rf "$C/spark-$SPARK_VERSION"
    "$PY" -m pip install --quiet --no-deps --target "$C/spark-$SPARK_VERSION" \
        "pyspark==$SPARK_VERSION"
    chmod +x "$SPARK_HOME"/bin/* "$SPARK_HOME"/sbin/*
    touch "$C/spark-$SPARK_VERSION/.complete"
}

# One job server folder per runner: the runner's jars and a launcher jar whose manifest names
# them, so that `java -jar` (and Beam's --flink_job_server_jar / --spark_job_server_jar) work.
install_jobserver() { # runner artifact main-class
    local runner=$1 artifact=$2 main=$3 dir="$JOBSERVER/$1"
    [ -f "$dir/.complete" ] && return
    say "Beam $BEAM_JAVA_VERSION $runner job server from Maven Central ($artifact)"
    rm -rf "$dir"
    mkdir -p "$dir/lib"
    mvn --batch-mode --quiet -f "$HERE/pom.xml" dependency:copy-dependencies \
        -Dbeam.version="$BEAM_JAVA_VERSION" -Dbeam.job.service.version="$BEAM_JOB_SERVICE_VERSION" \
        -Drunner.artifact="$artifact" -DincludeScope=runtime -DoutputDirectory="$dir/lib"
    local cp="" jar
    for jar in "$dir"/lib/*.jar; do cp="$cp lib/$(basename "$jar")"; done
    if [ "$runner" = spark ]; then
        # Beam's Spark runner has Spark as a provided dependency: the cluster's own jars.
        for jar in "$SPARK_HOME"/jars/*.jar; do cp="$cp $jar"; done
    fi
    "$PY" - "$dir/beam-$runner-job-server.jar" "$main" "$cp" <<'PYEOF'
import sys, textwrap, zipfile
out, main, classpath = sys.argv[1], sys.argv[2], sys.argv[3].split()
# Manifest lines are at most 72 bytes; continuation lines start with one space.
body = "Class-Path: " + " ".join(classpath)
lines = [body[:70]] + [" " + c for c in textwrap.wrap(body[70:], 69, break_on_hyphens=False,
                                                       drop_whitespace=False)]
manifest = "Manifest-Version: 1.0\r\nMain-Class: " + main + "\r\n" + "\r\n".join(lines) + "\r\n\r\n"
with zipfile.ZipFile(out, "w") as zf:
    zf.writestr("META-INF/MANIFEST.MF", manifest)
PYEOF
    touch "$dir/.complete"
}

install_worker_venv() {
    local wheel=${BEAM_TURBO_WHEEL:-}
    if [ -n "$wheel" ]; then
        [ -f "$wheel" ] || die "BEAM_TURBO_WHEEL=$wheel: no such file"
        say "beam-turbo wheel: $wheel (BEAM_TURBO_WHEEL)"
    else
        say "beam-turbo wheel (maturin build --release)"
        mkdir -p "$C/wheels"
        (cd "$ROOT" && PATH="$PROJECT_VENV/bin:$PATH" maturin build --quiet --release --out "$C/wheels" >&2)
        wheel=$(ls -t "$C"/wheels/beam_turbo-*.whl | head -1)
    fi
    if [ ! -x "$WORKER_VENV/bin/python" ]; then
        say "SDK worker venv at $WORKER_VENV"
        "$PY" -m venv "$WORKER_VENV"
    fi
    # Beam, numpy, torch and scikit-learn come from the project's venv, at its pinned versions
    # (appended to sys.path after the worker venv's own site-packages); beam-turbo is the wheel.
    local own extra
    own=$("$WORKER_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    extra=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$extra" > "$own/project-venv.pth"
    "$WORKER_VENV/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheel"
    "$WORKER_VENV/bin/python" -c 'import beam_turbo, sys; assert sys.prefix in beam_turbo.__file__, beam_turbo.__file__'
}

cmd_install() {
    command -v java >/dev/null || die "java (17) is needed"
    command -v mvn >/dev/null || die "mvn is needed"
    [ -x "$PY" ] || die "no project venv at $PROJECT_VENV (run scripts/setup.sh)"
    mkdir -p "$C" "$RUN" "$LOG"
    install_flink
    install_spark
    install_jobserver flink "$FLINK_RUNNER_ARTIFACT" org.apache.beam.runners.flink.FlinkJobServerDriver
    install_jobserver spark "$SPARK_RUNNER_ARTIFACT" org.apache.beam.runners.spark.SparkJobServerDriver
    install_worker_venv
    say "installed under $C"
}

# --- start / stop ----------------------------------------------------------------------------

# Waits until a TCP port on localhost accepts connections.
wait_port() { # port what seconds
    local i
    for ((i = 0; i < $3 * 2; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.5
    done
    die "$2 did not listen on port $1 within $3 s (logs: $LOG)"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts a command in its own process group, its pid in $RUN/<name>.pid.
spawn() { # name command...
    local name=$1
    shift
    setsid "$@" >"$LOG/$name.out" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
}

# The JVM property that puts the job server's Guava before Spark's Guava 14 on the executors'
# classpath: Beam's GCS file system, which every executor registers while it reads the job's
# options, needs a newer one (docs/clusters.md, "A Spark job that never ends").
spark_executor_property() {
    local guava=("$JOBSERVER"/spark/lib/guava-*.jar)
    [ "${#guava[@]}" = 1 ] && [ -f "${guava[0]}" ] ||
        die "not one Guava jar in $JOBSERVER/spark/lib: ${guava[*]}"
    echo "-Dspark.executor.extraClassPath=${guava[0]}"
}

start_common() { # runner
    local runner=$1
    spawn worker-pool env PATH="$WORKER_VENV/bin:$PATH" "$WORKER_VENV/bin/python" \
        "$HERE/worker_pool.py" --service_port="$WORKER_POOL_PORT"
    mkdir -p "$RUN/artifacts"
    local master_arg
    if [ "$runner" = flink ]; then
        master_arg="--flink-master=localhost:$FLINK_REST_PORT"
    else
        master_arg="--spark-master-url=spark://127.0.0.1:$SPARK_MASTER_PORT"
    fi
    # Spark's job server is its driver: Java 17 needs the openings spark-submit would add.
    local properties=()
    [ "$runner" = flink ] || properties=("$(spark_executor_property)")
    spawn job-server java "${JAVA_MODULE_OPTIONS[@]}" "${properties[@]}" \
        -jar "$JOBSERVER/$runner/beam-$runner-job-server.jar" "$master_arg" --job-host=localhost \
        --job-port="$JOB_PORT" --artifact-port="$ARTIFACT_PORT" \
        --expansion-port="$EXPANSION_PORT" --artifacts-dir="$RUN/artifacts"
    wait_port "$WORKER_POOL_PORT" "the SDK worker pool" 60
    wait_port "$JOB_PORT" "Beam's $runner job server" 90
}

flink_env() {
    export FLINK_CONF_DIR="$RUN/flink-conf" FLINK_PID_DIR="$RUN" FLINK_LOG_DIR="$LOG"
}

# The number of TaskManagers registered with the JobManager.
taskmanagers() {
    curl -s "http://localhost:$FLINK_REST_PORT/taskmanagers" |
        "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)["taskmanagers"]))' 2>/dev/null ||
        echo 0
}

wait_taskmanagers() { # count
    local i n=0
    for ((i = 0; i < 120; i++)); do
        n=$(taskmanagers)
        [ "$n" = "$1" ] && return 0
        sleep 0.5
    done
    die "Flink has $n TaskManagers registered, not $1 (logs: $LOG)"
}

# A TaskManager with a resource id of its own, which Flink's REST API reports for each task,
# so that the failure test can kill one that runs its job.
start_taskmanager() {
    "$FLINK_HOME/bin/taskmanager.sh" start -D "taskmanager.resource-id=tm-$(date +%s%N)" >&2
}

start_flink() {
    flink_env
    rm -rf "$FLINK_CONF_DIR"
    cp -r "$FLINK_HOME/conf" "$FLINK_CONF_DIR"
    mkdir -p "$RUN/flink-tmp"
    sed -e "s/@FLINK_REST_PORT@/$FLINK_REST_PORT/" -e "s/@FLINK_RPC_PORT@/$FLINK_RPC_PORT/" \
        -e "s|@FLINK_TMP@|$RUN/flink-tmp|" "$HERE/flink-config.yaml" >"$FLINK_CONF_DIR/config.yaml"
    "$FLINK_HOME/bin/jobmanager.sh" start >&2
    start_taskmanager
    start_taskmanager
    wait_port "$FLINK_REST_PORT" "Flink's JobManager" 90
    wait_taskmanagers 2
    start_common flink
}

start_spark() {
    export SPARK_HOME SPARK_PID_DIR="$RUN" SPARK_LOG_DIR="$LOG" SPARK_LOCAL_IP=127.0.0.1 \
        SPARK_WORKER_DIR="$RUN/spark-work"
    "$SPARK_HOME/sbin/spark-daemon.sh" start org.apache.spark.deploy.master.Master 1 \
        --host 127.0.0.1 --port "$SPARK_MASTER_PORT" --webui-port "$SPARK_MASTER_UI_PORT" >&2
    wait_port "$SPARK_MASTER_PORT" "Spark's master" 90
    local i
    for i in 1 2; do
        SPARK_WORKER_CORES=2 SPARK_WORKER_MEMORY=3g "$SPARK_HOME/sbin/spark-daemon.sh" start \
            org.apache.spark.deploy.worker.Worker "$i" --webui-port $((8090 + i)) \
            --host 127.0.0.1 "spark://127.0.0.1:$SPARK_MASTER_PORT" >&2
    done
    local n=0
    for ((i = 0; i < 120; i++)); do
        n=$(curl -s "http://127.0.0.1:$SPARK_MASTER_UI_PORT/json/" |
            "$PY" -c 'import json,sys; print(sum(w["state"]=="ALIVE" for w in json.load(sys.stdin)["workers"]))' 2>/dev/null || echo 0)
        [ "$n" = 2 ] && break
        sleep 0.5
    done
    [ "$n" = 2 ] || die "Spark has $n workers alive, not 2 (logs: $LOG)"
    start_common spark
}

cmd_start() {
    local runner=${1:-}
    case "$runner" in flink | spark) ;; *) die "usage: cluster.sh start flink|spark" ;; esac
    [ -f "$JOBSERVER/$runner/.complete" ] && [ -x "$WORKER_VENV/bin/python" ] ||
        die "not installed: run scripts/cluster.sh install"
    if [ -f "$RUN/runner" ]; then
        die "a $(cat "$RUN/runner") cluster is already started (scripts/cluster.sh stop)"
    fi
    local port
    for port in "$FLINK_REST_PORT" "$FLINK_RPC_PORT" "$SPARK_MASTER_PORT" "$JOB_PORT" \
        "$WORKER_POOL_PORT"; do
        port_free "$port" || die "port $port is in use by a process this script did not start"
    done
    mkdir -p "$RUN" "$LOG"
    echo "$runner" >"$RUN/runner"
    # A start that fails half way leaves nothing behind.
    trap 'say "start failed: stopping"; cmd_stop || true' ERR
    "start_$runner"
    trap - ERR
    say "$runner cluster up: job endpoint localhost:$JOB_PORT, workers localhost:$WORKER_POOL_PORT"
}

# Every pid this script started: its own pid files and the engines' daemon pid files.
started_pids() {
    [ -d "$RUN" ] || return 0
    local f
    for f in "$RUN"/*.pid; do
        [ -f "$f" ] && cat "$f"
    done
}

# A pid and its descendants (SDK workers are children of the worker pool), deepest first.
with_descendants() { # pid
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do with_descendants "$child"; done
    echo "$1"
}

cmd_stop() {
    local pids="" pid i
    for pid in $(started_pids); do pids="$pids $(with_descendants "$pid")"; done
    pids=$(echo "$pids" | xargs -n1 2>/dev/null | sort -u | xargs)
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < 40; i++)); do
        local alive=""
        for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive="$alive $pid"; done
        [ -z "$alive" ] && break
        sleep 0.5
    done
    for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
    sleep 0.5
    local left=""
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && left="$left $pid"; done
    [ -z "$left" ] || die "processes still alive after stop:$left"
    rm -f "$RUN"/*.pid "$RUN/runner"
    # What the jobs left on disk, some 0.5 GB a job (their jars): Flink's working folders (a
    # killed TaskManager's are never removed) and the jars in Spark's; Spark's logs stay.
    rm -rf "$RUN/flink-tmp"
    [ ! -d "$RUN/spark-work" ] || find "$RUN/spark-work" -name '*.jar' -delete
    say "stopped (${pids:-nothing was running})"
}

cmd_status() {
    if [ ! -f "$RUN/runner" ]; then
        echo "no cluster started"
        return 3
    fi
    echo "runner: $(cat "$RUN/runner")"
    local f pid
    for f in "$RUN"/*.pid; do
        [ -f "$f" ] || continue
        for pid in $(cat "$f"); do
            if kill -0 "$pid" 2>/dev/null; then
                echo "  $(basename "$f" .pid) pid $pid running"
            else
                echo "  $(basename "$f" .pid) pid $pid DEAD"
            fi
        done
    done
}

cmd_kill_taskmanager() { # [resource id]
    [ "$(cat "$RUN/runner" 2>/dev/null)" = flink ] || die "no Flink cluster is started"
    local want=${1:-} file pid=""
    file=$(ls "$RUN"/flink-*-taskexecutor.pid)
    for pid in $(cat "$file") ""; do
        [ -z "$pid" ] && break
        [ -z "$want" ] && break
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "taskmanager.resource-id=$want" && break
    done
    [ -n "$pid" ] || die "no TaskManager of this cluster has the resource id $want"
    kill -KILL "$pid"
    # Its pid leaves the pid file: a later process could get the number.
    sed -i "/^$pid\$/d" "$file"
    echo "$pid"
}

cmd_heal() {
    [ "$(cat "$RUN/runner" 2>/dev/null)" = flink ] || die "no Flink cluster is started"
    flink_env
    local n
    n=$(grep -c . "$RUN"/flink-*-taskexecutor.pid || true)
    for ((; n < 2; n++)); do start_taskmanager; done
    wait_taskmanagers 2
}

cmd_env() {
    echo "BEAM_TURBO_CLUSTER_RUNNER=$(cat "$RUN/runner" 2>/dev/null || true)"
    echo "BEAM_TURBO_JOB_ENDPOINT=localhost:$JOB_PORT"
    echo "BEAM_TURBO_WORKER_POOL=localhost:$WORKER_POOL_PORT"
    echo "BEAM_TURBO_FLINK_REST=http://localhost:$FLINK_REST_PORT"
    echo "BEAM_TURBO_SPARK_MASTER=spark://127.0.0.1:$SPARK_MASTER_PORT"
    echo "BEAM_TURBO_FLINK_JOB_SERVER_JAR=$JOBSERVER/flink/beam-flink-job-server.jar"
    echo "BEAM_TURBO_SPARK_JOB_SERVER_JAR=$JOBSERVER/spark/beam-spark-job-server.jar"
    echo "BEAM_TURBO_SPARK_JOB_SERVER_PROPERTY=$(spark_executor_property 2>/dev/null || true)"
    echo "BEAM_TURBO_CLUSTER_RUN_DIR=$RUN"
    echo "BEAM_TURBO_WORKER_PYTHON=$WORKER_VENV/bin/python"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start "${2:-}" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    kill-taskmanager) cmd_kill_taskmanager "${2:-}" ;;
    heal) cmd_heal ;;
    *) die "usage: cluster.sh install | start flink|spark | stop | status | env | kill-taskmanager | heal" ;;
esac
