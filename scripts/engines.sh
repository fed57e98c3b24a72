#!/usr/bin/env bash
# Start / stop / report the real engines the test suite runs against, as root, with nothing
# changed under /etc: a Docker Engine, Podman's Docker-compatible service and Debian's
# docker-registry on 127.0.0.1:5000 (insecure for both engines). Installs nothing: CI
# installs scripts/apt-packages.txt with apt first (see .ci/run).
#
#   bash scripts/engines.sh start    # idempotent; waits for each to answer /_ping
#                                    # (also a "squatter" redis-server on 127.0.0.1:6379)
#   bash scripts/engines.sh status
#   bash scripts/engines.sh stop     # kills by pidfile, removes sockets and pidfiles
#
# Tests find them at the well-known defaults (override with the same variables):
#   DSPY_INFRA_TEST_DOCKER_HOST=unix:///run/dspy-test/docker.sock
#   DSPY_INFRA_TEST_PODMAN_HOST=unix:///run/dspy-test/podman.sock
#   DSPY_INFRA_TEST_REGISTRY=127.0.0.1:5000
set -euo pipefail

RUN_DIR=/run/dspy-test
DATA_DIR=/var/tmp/dspy-test
DOCKER_SOCK=$RUN_DIR/docker.sock
PODMAN_SOCK=$RUN_DIR/podman.sock
REGISTRY_ADDR=127.0.0.1:5000
PODMAN_DIR=$DATA_DIR/podman
REGISTRY_DIR=$DATA_DIR/registry
LOG_DIR=$DATA_DIR/logs
READY_TIMEOUT=${DSPY_INFRA_ENGINES_TIMEOUT:-60}

# Podman reads its configuration from these files only (project-local, never /etc).
export CONTAINERS_CONF=$PODMAN_DIR/containers.conf
export CONTAINERS_STORAGE_CONF=$PODMAN_DIR/storage.conf
export CONTAINERS_REGISTRIES_CONF=$PODMAN_DIR/registries.conf

say() { printf 'engines: %s\n' "$*"; }
INSTALL_HINT="apt-get install -y \$(cat scripts/apt-packages.txt)"
# shellcheck source=daemon-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/daemon-lib.sh"

# A Redis on the well-known port, as most developers' machines have one: the whole suite runs
# beside it, so no test may depend on 6379 being free.
SQUATTER_PORT=6379
ping_squatter() { redis-cli -h 127.0.0.1 -p "$SQUATTER_PORT" ping 2>/dev/null | grep -q PONG; }

ping_sock() { curl -fsS --max-time 2 --unix-socket "$1" http://engine/_ping 2>/dev/null | grep -q OK; }
ping_registry() { curl -fsS --max-time 2 "http://$REGISTRY_ADDR/v2/" >/dev/null 2>&1; }


write_podman_conf() {
    mkdir -p "$PODMAN_DIR"/{root,runroot,tmp}
    # runc + cgroupfs + no default ulimits: crun cannot set rlimits here and refuses the hybrid
    # cgroup layout (see /work/shared/ENGINES.md); events to a file since there is no journald.
    cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = []
log_driver = "k8s-file"

[network]
network_backend = "netavark"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$PODMAN_DIR/events.log"
tmp_dir = "$PODMAN_DIR/tmp"
EOF
    cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "vfs"
runroot = "$PODMAN_DIR/runroot"
graphroot = "$PODMAN_DIR/root"
EOF
    cat >"$CONTAINERS_REGISTRIES_CONF" <<EOF
unqualified-search-registries = []

[[registry]]
location = "$REGISTRY_ADDR"
insecure = true
EOF
}

start_registry() {
    local pidfile=$RUN_DIR/registry.pid log=$LOG_DIR/registry.log
    if live_pid "$pidfile" >/dev/null && ping_registry; then
        say "registry already up at http://$REGISTRY_ADDR"
        return
    fi
    need docker-registry
    mkdir -p "$REGISTRY_DIR/data"
    cat >"$REGISTRY_DIR/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $REGISTRY_DIR/data
  delete:
    enabled: true
http:
  addr: $REGISTRY_ADDR
EOF
    setsid docker-registry serve "$REGISTRY_DIR/config.yml" >"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    wait_for registry "$pidfile" "$log" ping_registry
    say "registry up at http://$REGISTRY_ADDR"
}

start_squatter() {
    local pidfile=$RUN_DIR/redis-squatter.pid log=$LOG_DIR/redis-squatter.log
    if ping_squatter; then
        say "a redis already answers on 127.0.0.1:$SQUATTER_PORT"
        return
    fi
    need redis-server
    need redis-cli
    rm -f "$pidfile"
    redis-server --port "$SQUATTER_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --daemonize yes --pidfile "$pidfile" --logfile "$log"
    wait_for redis-squatter "$pidfile" "$log" ping_squatter
    say "redis squatter up on 127.0.0.1:$SQUATTER_PORT"
}

start_docker() {
    local pidfile=$RUN_DIR/dockerd.pid log=$LOG_DIR/dockerd.log
    if live_pid "$pidfile" >/dev/null && ping_sock "$DOCKER_SOCK"; then
        say "docker already up at unix://$DOCKER_SOCK"
        return
    fi
    need dockerd
    need iptables
    rm -f "$DOCKER_SOCK" "$pidfile"
    mkdir -p "$DATA_DIR/docker" "$RUN_DIR/docker-exec"
    # dockerd writes its own pidfile; setsid detaches it from this shell's process group.
    setsid dockerd --host "unix://$DOCKER_SOCK" \
        --data-root "$DATA_DIR/docker" --exec-root "$RUN_DIR/docker-exec" \
        --pidfile "$pidfile" --storage-driver vfs \
        --insecure-registry "$REGISTRY_ADDR" >"$log" 2>&1 </dev/null &
    local launcher=$!
    # Until dockerd writes its pidfile, watch the launched pid.
    local deadline=$((SECONDS + 10))
    until [[ -s $pidfile ]] || ((SECONDS >= deadline)); do sleep 0.1; done
    [[ -s $pidfile ]] || echo "$launcher" >"$pidfile"
    wait_for dockerd "$pidfile" "$log" ping_sock "$DOCKER_SOCK"
    say "docker up at unix://$DOCKER_SOCK"
}

start_podman() {
    local pidfile=$RUN_DIR/podman.pid log=$LOG_DIR/podman.log
    write_podman_conf
    if live_pid "$pidfile" >/dev/null && ping_sock "$PODMAN_SOCK"; then
        say "podman already up at unix://$PODMAN_SOCK"
        return
    fi
    need podman
    need runc
    rm -f "$PODMAN_SOCK" "$pidfile"
    setsid podman --log-level=warn system service --time=0 "unix://$PODMAN_SOCK" \
        >"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    wait_for podman "$pidfile" "$log" ping_sock "$PODMAN_SOCK"
    say "podman up at unix://$PODMAN_SOCK"
}

status() {
    local rc=0
    if ping_sock "$DOCKER_SOCK"; then say "docker   up   unix://$DOCKER_SOCK"; else say "docker   DOWN unix://$DOCKER_SOCK"; rc=1; fi
    if ping_sock "$PODMAN_SOCK"; then say "podman   up   unix://$PODMAN_SOCK"; else say "podman   DOWN unix://$PODMAN_SOCK"; rc=1; fi
    if ping_registry; then say "registry up   http://$REGISTRY_ADDR"; else say "registry DOWN http://$REGISTRY_ADDR"; rc=1; fi
    if ping_squatter; then say "redis    up   127.0.0.1:$SQUATTER_PORT (the squatter)"; else say "redis    DOWN 127.0.0.1:$SQUATTER_PORT (the squatter)"; rc=1; fi
    for bin in redis-server prometheus busybox; do
        if command -v "$bin" >/dev/null 2>&1; then say "$bin: $(command -v "$bin")"; else say "$bin: MISSING"; rc=1; fi
    done
    return $rc
}

main() {
    local cmd=${1:-status}
    if [[ $cmd != status && $(id -u) != 0 ]]; then
        say "must run as root (starts dockerd and podman's system service)"
        exit 1
    fi
    mkdir -p "$RUN_DIR" "$DATA_DIR" "$LOG_DIR"
    case $cmd in
    start)
        need curl
        start_registry
        start_docker
        start_podman
        start_squatter
        status
        ;;
    stop)
        # Podman's containers run under their own conmon, not under the API service: remove
        # them (all of them live in this project-local storage) so nothing keeps running.
        if command -v podman >/dev/null 2>&1 && [[ -f $CONTAINERS_STORAGE_CONF ]]; then
            podman rm --all --force --time 1 >/dev/null 2>&1 || true
            podman network prune --force >/dev/null 2>&1 || true
        fi
        stop_one podman "$RUN_DIR/podman.pid"
        stop_one dockerd "$RUN_DIR/dockerd.pid"
        stop_one registry "$RUN_DIR/registry.pid"
        stop_one redis-squatter "$RUN_DIR/redis-squatter.pid"
        # Only tests push to this registry (a fresh image per pull test): start empty next time.
        rm -rf "$REGISTRY_DIR/data"
        rm -f "$DOCKER_SOCK" "$PODMAN_SOCK"
        ;;
    status)
        status
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
    esac
}

main "$@"
