"""py-spy on the real gRPC server (``dspy-infra serve``'s ``run_server``, durable, noop tasks)
while this process drives one phase of ``benchmarks/rpc.py`` against it:

- ``bulk``: ``SubmitTasks`` with ``tasks_json``, 6 x 10 batches of 1,000, two in flight;
- ``sw``: 3,000 sequential ``SubmitAndWait`` calls;
- ``many``: 6,000 ``SubmitAndWait`` calls from 32 channels at once.

``python benchmarks/profiles/rpc_server.py PHASE OUT [FORMAT]`` (FORMAT: py-spy's ``-f``,
default ``speedscope``; ``raw`` gives collapsed stacks, one line each, for grep/summaries).
Needs py-spy (``pip install -e '.[bench]'``) and permission to attach to a child process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rpc
from grpclib.client import Channel


async def _drive(phase: str, port: int) -> str:
    channel = Channel("127.0.0.1", port)
    stub = rpc.pb.OrchestratorServiceStub(channel)
    try:
        if phase == "bulk":
            rates = [await rpc._batched(stub, f"bulk{k}", 10_000, 1000, 2, typed=False) for k in range(6)]
            return f"bulk JSON: {sorted(rates)[3]:.0f} tasks/s (median of 6 rounds)"
        if phase == "sw":
            lat = await rpc._submit_and_wait(rpc._sw_call(channel, "stub"), "sw", 3000)
            return f"SubmitAndWait: p50 {rpc._pct(lat, 0.5):.3f} ms p99 {rpc._pct(lat, 0.99):.3f} ms"
        rate = await rpc._many_clients(port, "many", 6000, 32, "stub")
        return f"32 clients: {rate:.0f} tasks/s"
    finally:
        channel.close()


def main() -> int:
    phase, out = sys.argv[1], sys.argv[2]
    fmt = sys.argv[3] if len(sys.argv) > 3 else "speedscope"
    if phase not in ("bulk", "sw", "many"):
        raise SystemExit("phase: bulk, sw or many")
    with tempfile.TemporaryDirectory() as home:
        settings = {
            "home": f"{home}/durable",
            "backend": "process",
            "grpc_port": 0,
            "env_manager_port": 0,
            "http_port": 0,
            "durable": True,
            "retention": 200_000,
        }
        server, port = rpc._start(rpc.INFRA_SERVER, json.dumps(settings), cwd=home)
        spy_bin = Path(sys.executable).parent / "py-spy"
        spy = subprocess.Popen(
            [str(spy_bin), "record", "-p", str(server.pid), "-o", out, "-r", "250", "-f", fmt, "--threads"],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # py-spy attached
        try:
            print(asyncio.run(_drive(phase, port)))
        finally:
            spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
            spy.wait(60)
            rpc.stop(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
