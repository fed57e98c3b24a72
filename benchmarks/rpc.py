"""SubmitTask over gRPC against the floor: a bare grpclib echo of the same messages.

Both servers run as subprocesses of this script (the same process layout); the client is
this process, using the generated betterproto2/grpclib stubs for both. Measured in one run:

- round trip: ``--n`` sequential calls, p50/p99 (SubmitTask vs echo);
- throughput: ``--n`` calls, ``--concurrency`` in flight on one channel (submit_per_s);
- batched: ``SubmitTasks`` (an addition to the contract) in batches of ``--batch``.

The dspy-infra server is the real one (``run_server``: embedded Infra + InfraServer, noop
tasks, durable SQLite store unless ``--memory``). Last line: one JSON object with
``submit_p50_ratio`` (target <= 1.5), ``submit_per_s`` and ``batch_tasks_per_s`` (goal >=
20,000/s), plus the floor figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpclib.client import Channel  # noqa: E402

from dspy_infra.rpc._gen.orchestrator import v1 as pb  # noqa: E402

__all__ = ["main"]

ECHO_SERVER = """
import asyncio, socket, sys
from grpclib.server import Server
from dspy_infra.rpc._gen.orchestrator import v1 as pb

class Echo(pb.OrchestratorServiceBase):
    async def submit_task(self, message):
        return pb.SubmitTaskResponse(success=True, task_id=message.id, status="pending")

    async def submit_tasks(self, message):
        return pb.SubmitTasksResponse(
            results=[pb.SubmitTaskResponse(success=True, task_id=t.id, status="pending") for t in message.tasks]
        )

async def main():
    # proto=IPPROTO_TCP so asyncio sets TCP_NODELAY on accepted sockets (as the real server does).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    server = Server([Echo()])
    await server.start(sock=sock)
    print(f"echo serving grpc=127.0.0.1:{sock.getsockname()[1]}", flush=True)
    await server.wait_closed()

asyncio.run(main())
"""

INFRA_SERVER = """
import asyncio, json, sys
from dspy_infra.config import load_settings
from dspy_infra.rpc.server import run_server
raise SystemExit(asyncio.run(run_server(load_settings(**json.loads(sys.argv[1])))))
"""

_PORT = re.compile(r"grpc=127\.0\.0\.1:(\d+)")


def _start(code: str, *args: str, cwd: str) -> tuple[subprocess.Popen[str], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env, cwd=cwd
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        match = _PORT.search(line)
        if match:
            return proc, int(match[1])
    raise SystemExit(f"server did not start (exit {proc.wait()})")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _request(prefix: str, i: int) -> pb.SubmitTaskRequest:
    return pb.SubmitTaskRequest(
        id=f"{prefix}-{i}", class_="cpu_short", payload={"handler": "noop", "n": str(i)}
    )


async def _round_trips(
    call: Callable[[pb.SubmitTaskRequest], Awaitable[object]], prefix: str, n: int
) -> list[float]:
    requests = [_request(prefix, i) for i in range(n)]
    latencies = []
    for req in requests:
        began = time.perf_counter()
        await call(req)
        latencies.append(time.perf_counter() - began)
    return latencies


async def _throughput(
    call: Callable[[pb.SubmitTaskRequest], Awaitable[object]], prefix: str, n: int, concurrency: int
) -> float:
    requests = [_request(prefix, i) for i in range(n)]
    it = iter(requests)

    async def worker() -> None:
        for req in it:
            await call(req)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - began)


async def _batched(
    stub: pb.OrchestratorServiceStub, prefix: str, n: int, batch: int, concurrency: int
) -> float:
    batches = [
        pb.SubmitTasksRequest(tasks=[_request(prefix, i) for i in range(start, min(n, start + batch))])
        for start in range(0, n, batch)
    ]
    it = iter(batches)

    async def worker() -> None:
        for req in it:
            resp = await stub.submit_tasks(req)
            assert all(r.success for r in resp.results), resp.results[0].error

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - began)


async def _measure(port: int, prefix: str, args: argparse.Namespace) -> dict[str, float]:
    channel = Channel("127.0.0.1", port)
    stub = pb.OrchestratorServiceStub(channel)
    try:
        await _round_trips(stub.submit_task, f"{prefix}-warm", 200)
        lat = await _round_trips(stub.submit_task, f"{prefix}-rt", args.n)
        rate = await _throughput(stub.submit_task, f"{prefix}-tp", args.n, args.concurrency)
        batch_rate = await _batched(stub, f"{prefix}-batch", args.batch_n, args.batch, 2)
    finally:
        channel.close()
    return {"p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99), "per_s": rate, "batch_per_s": batch_rate}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="calls per phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1000, help="tasks per SubmitTasks call")
    parser.add_argument("--batch-n", type=int, default=40_000, help="tasks submitted in batches")
    parser.add_argument("--memory", action="store_true", help="memory-only store (durable=False)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home:
        settings = {
            "home": home,
            "backend": "process",
            "grpc_port": 0,
            "env_manager_port": 0,
            "http_port": 0,
            "durable": not args.memory,
            # Keep every submitted task: pruning is not what is measured here.
            "retention": 10 * (3 * args.n + args.batch_n + 1000),
        }
        echo, echo_port = _start(ECHO_SERVER, cwd=home)
        try:
            floor = asyncio.run(_measure(echo_port, "echo", args))
        finally:
            _stop(echo)
        infra, infra_port = _start(INFRA_SERVER, json.dumps(settings), cwd=home)
        try:
            real = asyncio.run(_measure(infra_port, "task", args))
        finally:
            _stop(infra)

    store = "memory" if args.memory else "durable"
    print(f"machine: {os.cpu_count()} cores; store: {store}; n={args.n} concurrency={args.concurrency}")
    for name, r in (("echo", floor), ("SubmitTask", real)):
        print(
            f"{name:>10}: p50 {r['p50_ms']:6.3f} ms  p99 {r['p99_ms']:6.3f} ms  "
            f"{r['per_s']:8.0f} calls/s  batched {r['batch_per_s']:8.0f} tasks/s"
        )
    result = {
        "store": store,
        "submit_p50_ms": round(real["p50_ms"], 4),
        "submit_p99_ms": round(real["p99_ms"], 4),
        "echo_p50_ms": round(floor["p50_ms"], 4),
        "echo_p99_ms": round(floor["p99_ms"], 4),
        "submit_p50_ratio": round(real["p50_ms"] / floor["p50_ms"], 3),
        "submit_p99_ratio": round(real["p99_ms"] / floor["p99_ms"], 3),
        "submit_per_s": round(real["per_s"], 1),
        "echo_per_s": round(floor["per_s"], 1),
        "submit_throughput_ratio": round(real["per_s"] / floor["per_s"], 3),
        "batch_tasks_per_s": round(real["batch_per_s"], 1),
        "echo_batch_tasks_per_s": round(floor["batch_per_s"], 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
