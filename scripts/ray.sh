#!/usr/bin/env bash
# Start / stop / report a two-node Ray cluster on this machine for the `ray` executor's tests
# (tests/executors/test_ray.py) and benchmarks/executors.py: a head and a second node as
# separate raylets, so tasks really travel between nodes. Installs nothing: the ray extra
# (`pip install -e '.[dev,ray]'`, or `make venv EXTRAS=dev,ray`) provides the `ray` command.
#
#   bash scripts/ray.sh start     # idempotent; waits until `ray status` lists both nodes
#   bash scripts/ray.sh status
#   bash scripts/ray.sh stop      # `ray stop --force`: every Ray process of this machine
#
# Ray 2.60 wants an auth token: RAY_AUTH_MODE=token for every command and driver, the token
# in ~/.ray/auth_token (created here if missing). The head's GCS port is not Ray's default
# 6379, which is Redis's (and may be taken): $DSPY_INFRA_RAY_PORT, default 26379.
# Head: 1 CPU and the custom resource "head"; second node: 1 CPU and "worker2" (a task
# asking for {"worker2": 1} runs there). No dashboard: the executor does not use the Jobs API.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RAY=${DSPY_INFRA_RAY_BIN:-.venv/bin/ray}
PORT=${DSPY_INFRA_RAY_PORT:-26379}
ADDRESS=127.0.0.1:$PORT
READY_TIMEOUT=${DSPY_INFRA_RAY_TIMEOUT:-90}
export RAY_AUTH_MODE=token

say() { printf 'ray: %s\n' "$*"; }

need_ray() {
    [[ -x $RAY ]] || RAY=$(command -v ray) || {
        say "no 'ray' command: install the extra (.venv/bin/pip install -e '.[ray]')"
        exit 1
    }
}

# Number of alive nodes the head's GCS reports (0 when nothing answers).
alive_nodes() {
    "$RAY" status --address="$ADDRESS" 2>/dev/null | awk '
        /^Active:/ {active = 1; next}
        /^Pending:|^Recent failures:/ {active = 0}
        active && /node_/ {n++}
        END {print n + 0}'
}

wait_nodes() {
    local want=$1 deadline=$((SECONDS + READY_TIMEOUT))
    until (($(alive_nodes) >= want)); do
        if ((SECONDS >= deadline)); then
            say "cluster at $ADDRESS has $(alive_nodes) of $want nodes after ${READY_TIMEOUT}s"
            "$RAY" status --address="$ADDRESS" >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

start() {
    need_ray
    if (($(alive_nodes) >= 2)); then
        say "already up at $ADDRESS"
        return
    fi
    "$RAY" get-auth-token --generate >/dev/null
    if (($(alive_nodes) == 0)); then
        "$RAY" start --head --port="$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 \
            --resources='{"head": 1}' --include-dashboard=false --disable-usage-stats >/dev/null
    fi
    "$RAY" start --address="$ADDRESS" --node-ip-address=127.0.0.1 --num-cpus=1 \
        --resources='{"worker2": 1}' --disable-usage-stats >/dev/null
    wait_nodes 2
    say "up at $ADDRESS: $(alive_nodes) nodes"
}

status() {
    need_ray
    local n
    n=$(alive_nodes)
    say "$n node(s) alive at $ADDRESS"
    ((n >= 2))
}

main() {
    case ${1:-status} in
    start) start ;;
    stop)
        need_ray
        "$RAY" stop --force >/dev/null 2>&1 || true
        say "stopped"
        ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
    esac
}

main "$@"
