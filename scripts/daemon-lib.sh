# Helpers shared by engines.sh and slurm.sh for running daemons without systemd.
# The sourcing script defines `say` (its log prefix), READY_TIMEOUT and INSTALL_HINT first.

need() {
    command -v "$1" >/dev/null 2>&1 || {
        say "missing '$1': $INSTALL_HINT"
        exit 1
    }
}

# pid from a pidfile if that process is alive (zombies count as dead: PID 1 reaps late here).
live_pid() {
    local pidfile=$1 pid state
    # The daemon may remove its pidfile between any two of these steps.
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [[ -n $pid && -d /proc/$pid ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo Z)
    [[ $state != Z ]] || return 1
    echo "$pid"
}

# wait_for NAME PIDFILE LOG CHECK...: until CHECK succeeds; fail with LOG's tail if the daemon
# dies or READY_TIMEOUT passes.
wait_for() {
    local name=$1 pidfile=$2 log=$3
    shift 3
    local deadline=$((SECONDS + READY_TIMEOUT))
    until "$@"; do
        if ! live_pid "$pidfile" >/dev/null; then
            # A daemonizing process writes its pidfile late: give it the first few seconds.
            if ((SECONDS + READY_TIMEOUT - deadline > 5)) || [[ -s $pidfile ]]; then
                say "$name is not running; last lines of $log:"
                tail -n 20 "$log" >&2 || true
                return 1
            fi
        fi
        if ((SECONDS >= deadline)); then
            say "$name not ready within ${READY_TIMEOUT}s; last lines of $log:"
            tail -n 20 "$log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

# stop_one NAME PIDFILE: SIGTERM, up to 10 s, then SIGKILL.
stop_one() {
    local name=$1 pidfile=$2 pid i
    if pid=$(live_pid "$pidfile"); then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            live_pid "$pidfile" >/dev/null || break
            sleep 0.1
        done
        if live_pid "$pidfile" >/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "$name stopped (pid $pid)"
    else
        say "$name not running"
    fi
    rm -f "$pidfile"
}
