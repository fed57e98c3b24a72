#!/usr/bin/env bash
# The newcomer check (CI runs it from .ci/run): what a user gets from `pip install dspy-infra`.
#
#   1. build the wheel from this checkout and install it into a clean venv, no dev extras;
#   2. with another Redis already bound to 127.0.0.1:6379 (most developers' machines have
#      one; started here as a squatter when the port is free), from a directory outside the
#      checkout so nothing is imported from it:
#      - `dspy-infra serve` answers the standard gRPC health check and HTTP /health;
#      - `dspy-infra demo` runs to the end;
#      - one task submitted to the served instance runs, and its result is read back;
#      - the pytest plugin runs a test of a project outside the checkout;
#      - the README's snippet runs, and the real `redis` client reaches Redis at the URL of
#        the service's handle (when redis-server is installed).
#
# Needs: python3 (3.11+) with venv, and the repo's .venv (`make venv`) to build the wheel.
# Usage: bash scripts/newcomer.sh     (exit 0 = every step passed; prints one line per step)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
BUILD_PY=${BUILD_PY:-$ROOT/.venv/bin/python}
STARTED=$SECONDS

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dspy-newcomer.XXXXXX")
SERVER_PID=""
SQUATTER_PID=""
cleanup() {
    local rc=$?
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ -n $SQUATTER_PID ]]; then kill "$SQUATTER_PID" 2>/dev/null || true; fi
    if [[ $rc -ne 0 && -f $WORK/serve.log ]]; then
        echo "newcomer: --- server log ---" >&2
        tail -n 40 "$WORK/serve.log" >&2 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

say() { printf 'newcomer: %s\n' "$*"; }
fail() { printf 'newcomer: FAILED: %s\n' "$*" >&2; exit 1; }

# -- 1. wheel into a clean venv --------------------------------------------------------------
[[ -x $BUILD_PY ]] || fail "$BUILD_PY not found (run \`make venv\` first)"
pip_quiet() { "$@" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log" >&2; fail "$*"; }; }
pip_quiet "$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/dspy_infra-*.whl)
"$PY" -m venv "$WORK/venv"
pip_quiet "$WORK/venv/bin/pip" install -q "$WHEEL"
BIN=$WORK/venv/bin
# No dev extras: the things only they bring must be absent, or this proves nothing.
if "$BIN/python" -c "import grpc_tools" 2>/dev/null; then fail "the clean venv has dev extras"; fi
say "installed $(basename "$WHEEL") into a clean venv ($((SECONDS - STARTED)) s)"

# -- 2. another Redis on 6379 ----------------------------------------------------------------
port_open() { "$PY" -c "import socket,sys; s=socket.socket(); s.settimeout(1); sys.exit(s.connect_ex(('127.0.0.1', int(sys.argv[1]))))" "$1"; }
if port_open 6379; then
    say "127.0.0.1:6379 is already taken (as on most developers' machines)"
else
    if command -v redis-server >/dev/null; then
        redis-server --port 6379 --bind 127.0.0.1 --save '' --appendonly no >"$WORK/squatter.log" 2>&1 &
    else
        "$PY" -c "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',6379)); s.listen(); time.sleep(3600)" &
    fi
    SQUATTER_PID=$!
    for _ in $(seq 1 50); do port_open 6379 && break; sleep 0.1; done
    port_open 6379 || fail "could not bind a squatter on 127.0.0.1:6379"
    say "started another listener on 127.0.0.1:6379 (pid $SQUATTER_PID)"
fi

# -- 3. serve, from outside the checkout -----------------------------------------------------
APP=$WORK/app
mkdir -p "$APP"
cd "$APP"
# Nothing of the checkout or of the test environment leaks in.
unset PYTHONPATH
export XDG_STATE_HOME=$WORK/state   # the user's default state directory, private to this run
for var in $(env | grep -o '^DSPY_INFRA_[A-Z_]*' || true); do unset "$var"; done
free_port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
GRPC_PORT=$(free_port); ENV_PORT=$(free_port); HTTP_PORT=$(free_port)
"$BIN/dspy-infra" --home "$WORK/home" serve --backend process \
    --grpc-port "$GRPC_PORT" --env-manager-port "$ENV_PORT" --http-port "$HTTP_PORT" \
    >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 300); do
    grep -q "dspy-infra serving" "$WORK/serve.log" && break
    kill -0 "$SERVER_PID" 2>/dev/null || fail "dspy-infra serve exited: $(tail -n 5 "$WORK/serve.log")"
    sleep 0.1
done
grep -q "dspy-infra serving" "$WORK/serve.log" || fail "dspy-infra serve not ready in 30 s"
ADDR=127.0.0.1:$GRPC_PORT

# The standard grpc.health.v1 check, with the client the wheel installs (grpclib).
"$BIN/python" - "$GRPC_PORT" <<'EOF'
import asyncio, sys
from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

async def main() -> None:
    channel = Channel("127.0.0.1", int(sys.argv[1]))
    try:
        reply = await HealthStub(channel).Check(HealthCheckRequest(service=""), timeout=10)
    finally:
        channel.close()
    assert reply.status == HealthCheckResponse.SERVING, reply

asyncio.run(main())
EOF
say "serve: gRPC health SERVING on $ADDR"
"$BIN/python" - "$HTTP_PORT" <<'EOF'
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=10) as resp:
    doc = json.load(resp)
assert resp.status == 200 and doc["healthy"] is True, doc
EOF
say "serve: HTTP /health 200 healthy on 127.0.0.1:$HTTP_PORT"

# -- 4. one remote submit, result read back --------------------------------------------------
"$BIN/dspy-infra" --addr "$ADDR" submit hello --payload handler=exec "cmd=echo hi from the wheel" \
    --wait --wait-timeout 60 --json >"$WORK/submit.json"
"$BIN/python" - "$WORK/submit.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
assert doc["status"] == "completed", doc
assert doc["result"]["stdout"].strip() == "hi from the wheel", doc
EOF
"$BIN/dspy-infra" --addr "$ADDR" tasks show hello --json >"$WORK/show.json"
"$BIN/python" -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['status']=='completed' and 'hi from the wheel' in d['result']['stdout'], d" "$WORK/show.json"
say "remote submit: task 'hello' completed on the server, result read back"

# -- 5. the demo -------------------------------------------------------------------------------
"$BIN/dspy-infra" demo >"$WORK/demo.log" 2>&1 || { tail -n 30 "$WORK/demo.log" >&2; fail "dspy-infra demo"; }
say "demo: ran to the end ($(wc -l <"$WORK/demo.log") lines of output)"

kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || fail "dspy-infra serve exited with $? on SIGTERM"
SERVER_PID=""
say "serve: stopped on SIGTERM"

# -- 6. the pytest plugin on a project outside the repo ------------------------------------
pip_quiet "$BIN/pip" install -q pytest
mkdir -p "$APP/tests"
cat >"$APP/tests/test_newcomer.py" <<'EOF_TEST'
def test_exec_task(infra):
    infra.submit_task("t1", "cpu_short", {"handler": "exec", "cmd": "echo hi"})
    result = infra.wait("t1", timeout=30)
    assert str(result.status) == "completed" and result.result["stdout"] == "hi\n"
EOF_TEST
"$BIN/python" -m pytest -q -p no:cacheprovider "$APP/tests" >"$WORK/pytest.log" 2>&1 \
    || { cat "$WORK/pytest.log" >&2; fail "the pytest plugin on a project outside the repo"; }
say "pytest plugin: the outside project's test ran green"

# -- 7. the README's snippet, and a service handle's URL used by the real redis client --------
if ! command -v redis-server >/dev/null; then
    say "README snippet: skipped (no redis-server on this machine)"
elif ! "$BIN/python" -c "import dspy_infra.services.handles" 2>/dev/null; then
    say "README snippet: skipped (this build has no service handles or free service ports yet)"
else
    pip_quiet "$BIN/pip" install -q redis
    "$BIN/python" - <<'EOF_PY' || fail "the README snippet with Redis (another listener is on 6379)"
import asyncio

import redis.asyncio as aioredis

from dspy_infra import ensure_infra, shutdown_infra


async def main() -> None:
    infra = await ensure_infra(services=["redis"])
    try:
        await infra.submit_task("t1", task_class="cpu_short", payload={"handler": "exec", "cmd": "echo hi"})
        assert (await infra.wait("t1")).result["stdout"] == "hi\n"
        url = infra.services["redis"].url
        assert not url.endswith(":6379/0"), url  # 6379 is someone else's
        client = aioredis.from_url(url)
        try:
            assert await client.ping()
            await client.set("newcomer", "yes")
            assert await client.get("newcomer") == b"yes"
        finally:
            await client.aclose()
    finally:
        await shutdown_infra()


asyncio.run(main())
EOF_PY
    say "README snippet: ran; the real redis client reached Redis at the handle's URL"
fi
say "passed in $((SECONDS - STARTED)) s"
