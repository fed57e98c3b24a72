"""SubmitTask over gRPC against the floor: a bare grpclib echo of the same messages.

Both servers run as subprocesses of this script (the same process layout); the client is
this process, using the generated betterproto2/grpclib stubs for both. Measured in one run:

- round trip: ``--n`` sequential calls, p50/p99 (SubmitTask vs echo);
- throughput: ``--n`` calls, ``--concurrency`` in flight on one channel (submit_per_s);
- batched: ``SubmitTasks`` (an addition to the contract) in batches of ``--batch``;
- submit -> result (issue 11): ``SubmitAndWait`` round trips (p50/p99, sequential) and
  ``--clients`` concurrent callers doing them (tasks/s), on the durable server (and the
  sequential round trips on the memory-only server: the store's share), next to the
  same through two calls (``SubmitTask`` then ``WaitTask``) and next to the peers
  (``benchmarks/peers.py``: Ray ``ray.get(f.remote())``, Celery ``delay().get()``, each
  where installed, else skipped with the reason). The echo answers ``SubmitAndWait`` too and
  is measured the same way in the same rounds (sequential and ``--clients``): the floor of
  this transport and client, printed against the durable server and against each peer.

The dspy-infra server is the real one (``run_server``: embedded Infra + InfraServer, noop
tasks), measured with the durable SQLite store (the default) and memory-only. Last line: one JSON object with
``submit_p50_ratio`` (target <= 1.5), ``submit_per_s`` and ``batch_tasks_per_s`` (goal >=
20,000/s), plus the floor figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpclib.client import Channel  # noqa: E402

from dspy_infra.models import TaskSpec  # noqa: E402
from dspy_infra.rpc._gen.orchestrator import v1 as pb  # noqa: E402
from dspy_infra.rpc.client import OrchestratorClient  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from peers import run_peer  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from _rpc_support import stop_process as stop  # noqa: E402

__all__ = ["main"]

ECHO_SERVER = """
import asyncio, socket, sys
from grpclib.server import Server
from dspy_infra.rpc._gen.orchestrator import v1 as pb

class Echo(pb.OrchestratorServiceBase):
    async def submit_task(self, message):
        return pb.SubmitTaskResponse(success=True, task_id=message.id, status="pending")

    async def submit_tasks(self, message):
        return pb.SubmitTasksResponse(accepted=len(message.tasks))

    async def submit_and_wait(self, message):
        return pb.TaskResult(task_id=message.task.id, status="completed", result_json="{}")

    async def health(self, message):
        return pb.HealthResponse(healthy=True)

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
from dspy_infra.serve import run_server
# own_process: as `dspy-infra serve` runs it
raise SystemExit(asyncio.run(run_server(load_settings(**json.loads(sys.argv[1])), own_process=True)))
"""

_PORT = re.compile(r"grpc=127\.0\.0\.1:(\d+)")


def _start(code: str, *args: str, cwd: str, root: Path = ROOT) -> tuple[subprocess.Popen[str], int]:
    """A server running ``code`` with ``root``'s dspy_infra (another tree for A/B runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env, cwd=cwd
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        match = _PORT.search(line)
        if match:
            return proc, int(match[1])
    raise SystemExit(f"server did not start (exit {proc.wait()})")


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
    stub: pb.OrchestratorServiceStub, prefix: str, n: int, batch: int, concurrency: int, *, typed: bool
) -> float:
    """SubmitTasks in batches: typed (``tasks``) or the JSON bulk encoding (``tasks_json``)."""
    batches = []
    for start in range(0, n, batch):
        ids = range(start, min(n, start + batch))
        if typed:
            batches.append(pb.SubmitTasksRequest(tasks=[_request(prefix, i) for i in ids]))
        else:
            docs = [{"id": f"{prefix}-{i}", "payload": {"handler": "noop", "n": str(i)}} for i in ids]
            batches.append(pb.SubmitTasksRequest(tasks_json=json.dumps(docs).encode()))
    it = iter(batches)

    async def worker() -> None:
        for req in it:
            resp = await stub.submit_tasks(req)
            assert not resp.rejected, resp.rejected[0].error

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - began)


#: One SubmitAndWait of a noop task with the given id and number; its status and error.
_SubmitAndWait = Callable[[str, int], Awaitable[tuple[str, str]]]


def _sw_call(channel: Channel, client: str) -> _SubmitAndWait:
    """``client``: "client" is ``OrchestratorClient.submit_and_wait`` with a ``TaskSpec`` (what
    ``RemoteInfra`` and ``ensure_infra`` users call, as Ray is measured through its API);
    "stub" the generated betterproto2 stub with a hand-built request (earlier rounds' figures).
    The request is built inside the timed call either way. No timeout through the client
    (it would add a gRPC deadline, a timer on both sides, ~0.13 ms here): Ray's ``get`` and
    the stub are measured without one too."""
    if client == "stub":
        stub = pb.OrchestratorServiceStub(channel)

        async def by_stub(prefix: str, i: int) -> tuple[str, str]:
            req = pb.SubmitAndWaitRequest(task=_request(prefix, i), timeout_seconds=60)
            result = await stub.submit_and_wait(req)
            return result.status, result.error

        return by_stub
    orchestrator = OrchestratorClient(channel, "benchmark", token=None, owns_channel=False)

    async def by_client(prefix: str, i: int) -> tuple[str, str]:
        spec = TaskSpec(id=f"{prefix}-{i}", payload={"handler": "noop", "n": str(i)})
        result = await orchestrator.submit_and_wait(spec)
        return str(result.status), result.error

    return by_client


async def _submit_and_wait(call: _SubmitAndWait, prefix: str, n: int) -> list[float]:
    latencies = []
    for i in range(n):
        began = time.perf_counter()
        status, error = await call(prefix, i)
        latencies.append(time.perf_counter() - began)
        assert status == "completed", error
    return latencies


async def _two_calls(stub: pb.OrchestratorServiceStub, prefix: str, n: int) -> list[float]:
    latencies = []
    for i in range(n):
        req = _request(prefix, i)
        began = time.perf_counter()
        await stub.submit_task(req)
        await stub.wait_task(pb.WaitTaskRequest(task_id=req.id, timeout_seconds=60))
        latencies.append(time.perf_counter() - began)
    return latencies


async def _many_clients(port: int, prefix: str, n: int, clients: int, client_kind: str = "client") -> float:
    """``clients`` callers, each with its own channel (connection), doing SubmitAndWait."""
    channels = [Channel("127.0.0.1", port) for _ in range(clients)]
    left = iter(range(n))

    async def client(channel: Channel) -> None:
        call = _sw_call(channel, client_kind)
        for i in left:
            status, error = await call(prefix, i)
            assert status == "completed", error

    try:
        for channel in channels:  # connect first: the figure is about calls, not handshakes
            await pb.OrchestratorServiceStub(channel).health(pb.HealthRequest())
        began = time.perf_counter()
        await asyncio.gather(*(client(ch) for ch in channels))
        return n / (time.perf_counter() - began)
    finally:
        for channel in channels:
            channel.close()


async def _round_trip_phase(ports: dict[str, int], args: argparse.Namespace) -> dict[str, float]:
    """The submit -> result figures of the durable server, in short rounds alternating with
    the same calls on the bare grpclib echo (same messages, same client, no work): the floor
    of this transport and client on this machine, measured in the same minutes."""
    channel = Channel("127.0.0.1", ports["durable"])
    stub = pb.OrchestratorServiceStub(channel)
    durable = _sw_call(channel, args.client)
    echo_channel = Channel("127.0.0.1", ports["echo"])
    echo = _sw_call(echo_channel, args.client)
    # The memory-only server too: the same scheduler and gRPC work without the store, so the
    # store's share of the round trip (its thread hand-offs and the flush) shows.
    memory_channel = Channel("127.0.0.1", ports["memory"])
    memory = _sw_call(memory_channel, args.client)
    one: list[float] = []
    memory_one: list[float] = []
    two: list[float] = []
    floor: list[float] = []
    many_elapsed = echo_many_elapsed = 0.0
    rounds = 5
    per_round = args.tp_n // rounds
    try:
        await _submit_and_wait(durable, "sw-warm", 100)
        await _submit_and_wait(echo, "echo-warm", 100)
        await _submit_and_wait(memory, "memory-warm", 100)
        for r in range(rounds):
            one += await _submit_and_wait(durable, f"sw{r}", args.rt_n // rounds)
            floor += await _submit_and_wait(echo, f"echo-sw{r}", args.rt_n // rounds)
            memory_one += await _submit_and_wait(memory, f"memory-sw{r}", args.rt_n // rounds)
            two += await _two_calls(stub, f"two{r}", args.rt_n // rounds)
            many_elapsed += per_round / await _many_clients(
                ports["durable"], f"many{r}", per_round, args.clients, args.client
            )
            echo_many_elapsed += per_round / await _many_clients(
                ports["echo"], f"echo-many{r}", per_round, args.clients, args.client
            )
    finally:
        channel.close()
        echo_channel.close()
        memory_channel.close()
    return {
        "sw_p50_ms": _pct(one, 0.5),
        "sw_p99_ms": _pct(one, 0.99),
        "echo_sw_p50_ms": _pct(floor, 0.5),
        "echo_sw_p99_ms": _pct(floor, 0.99),
        "memory_sw_p50_ms": _pct(memory_one, 0.5),
        "memory_sw_p99_ms": _pct(memory_one, 0.99),
        "two_call_p50_ms": _pct(two, 0.5),
        "two_call_p99_ms": _pct(two, 0.99),
        "many_clients_per_s": per_round * rounds / many_elapsed,
        "echo_many_clients_per_s": per_round * rounds / echo_many_elapsed,
    }


async def _measure(ports: dict[str, int], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each phase alternates between the servers in short rounds, so that load from other
    processes on the machine falls on all of them alike and the ratios stay meaningful."""
    channels = {name: Channel("127.0.0.1", port) for name, port in ports.items()}
    stubs = {name: pb.OrchestratorServiceStub(ch) for name, ch in channels.items()}
    lat: dict[str, list[float]] = {name: [] for name in ports}
    elapsed: dict[str, dict[str, float]] = {name: {"tp": 0.0, "typed": 0.0, "bulk": 0.0} for name in ports}
    rounds = 10
    try:
        for name, stub in stubs.items():
            await _round_trips(stub.submit_task, f"{name}-warm", 200)
        for r in range(rounds):
            per_round = args.n // rounds
            for name, stub in stubs.items():
                lat[name] += await _round_trips(stub.submit_task, f"{name}-rt{r}", per_round)
            for name, stub in stubs.items():
                rate = await _throughput(stub.submit_task, f"{name}-tp{r}", per_round, args.concurrency)
                elapsed[name]["tp"] += per_round / rate
            for name, stub in stubs.items():
                n_typed = max(args.batch, args.batch_n // 4 // rounds)
                rate = await _batched(stub, f"{name}-typed{r}", n_typed, args.batch, 2, typed=True)
                elapsed[name]["typed"] += n_typed / rate
                n_bulk = max(args.batch, args.batch_n // rounds)
                rate = await _batched(stub, f"{name}-bulk{r}", n_bulk, args.batch, 2, typed=False)
                elapsed[name]["bulk"] += n_bulk / rate
    finally:
        for ch in channels.values():
            ch.close()
    per_round = args.n // rounds
    n_typed = max(args.batch, args.batch_n // 4 // rounds)
    n_bulk = max(args.batch, args.batch_n // rounds)
    return {
        name: {
            "p50_ms": _pct(lat[name], 0.5),
            "p99_ms": _pct(lat[name], 0.99),
            "per_s": per_round * rounds / elapsed[name]["tp"],
            "typed_batch_per_s": n_typed * rounds / elapsed[name]["typed"],
            "batch_per_s": n_bulk * rounds / elapsed[name]["bulk"],
        }
        for name in ports
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="calls per phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1000, help="tasks per SubmitTasks call")
    parser.add_argument("--batch-n", type=int, default=40_000, help="tasks submitted in bulk batches")
    parser.add_argument("--rt-n", type=int, default=1000, help="submit -> result round trips (each kind)")
    parser.add_argument("--tp-n", type=int, default=3000, help="tasks for the many-clients figure")
    parser.add_argument("--clients", type=int, default=32, help="concurrent callers (own connection each)")
    parser.add_argument("--no-peers", action="store_true", help="skip Ray and Celery")
    parser.add_argument(
        "--client",
        choices=("client", "stub"),
        default="client",
        help="SubmitAndWait rows through OrchestratorClient (default) or the bare generated stub",
    )
    args = parser.parse_args()

    procs: list[subprocess.Popen[str]] = []
    ports: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as home:
        try:
            echo, ports["echo"] = _start(ECHO_SERVER, cwd=home)
            procs.append(echo)
            for durable in (True, False):
                name = "durable" if durable else "memory"
                settings = {
                    "home": str(Path(home) / name),
                    "backend": "process",
                    "grpc_port": 0,
                    "env_manager_port": 0,
                    "http_port": 0,
                    "durable": durable,
                    # Keep every submitted task: pruning is not what is measured here.
                    "retention": 2 * args.n
                    + 2 * args.batch_n
                    + 20 * args.batch
                    + 2 * (args.rt_n + args.tp_n)
                    + 10_000,
                }
                proc, ports[name] = _start(INFRA_SERVER, json.dumps(settings), cwd=home)
                procs.append(proc)
            results = asyncio.run(_measure(ports, args))
            round_trip = asyncio.run(_round_trip_phase(ports, args))
        finally:
            for proc in procs:
                stop(proc)

    print(
        f"machine: {os.cpu_count()} cores; n={args.n} concurrency={args.concurrency} batch={args.batch};"
        f" SubmitAndWait rows through {'OrchestratorClient' if args.client == 'client' else 'the bare stub'}"
    )
    for name, r in results.items():
        print(
            f"{name:>8}: p50 {r['p50_ms']:6.3f} ms  p99 {r['p99_ms']:6.3f} ms  {r['per_s']:7.0f} calls/s"
            f"  batched typed {r['typed_batch_per_s']:7.0f} tasks/s  bulk JSON {r['batch_per_s']:7.0f} tasks/s"
        )
    floor, real, memory = results["echo"], results["durable"], results["memory"]
    summary = {
        "submit_p50_ms": round(real["p50_ms"], 4),
        "submit_p99_ms": round(real["p99_ms"], 4),
        "echo_p50_ms": round(floor["p50_ms"], 4),
        "echo_p99_ms": round(floor["p99_ms"], 4),
        "submit_p50_ratio": round(real["p50_ms"] / floor["p50_ms"], 3),
        "submit_p99_ratio": round(real["p99_ms"] / floor["p99_ms"], 3),
        "submit_per_s": round(real["per_s"], 1),
        "echo_per_s": round(floor["per_s"], 1),
        "batch_tasks_per_s": round(real["batch_per_s"], 1),
        "typed_batch_tasks_per_s": round(real["typed_batch_per_s"], 1),
        "memory_submit_p50_ratio": round(memory["p50_ms"] / floor["p50_ms"], 3),
        "memory_submit_per_s": round(memory["per_s"], 1),
        "memory_batch_tasks_per_s": round(memory["batch_per_s"], 1),
    }
    peers: dict[str, dict[str, object]] = {}
    for peer in ("ray", "celery"):
        if args.no_peers:
            peers[peer] = {"skipped": "--no-peers"}
        else:
            peers[peer] = run_peer(peer, n=args.rt_n, tp_n=args.tp_n, clients=args.clients)
    rt = round_trip
    print(
        f"submit->result, durable: SubmitAndWait p50 {rt['sw_p50_ms']:.3f} ms p99 {rt['sw_p99_ms']:.3f} ms;"
        f" SubmitTask+WaitTask p50 {rt['two_call_p50_ms']:.3f} ms p99 {rt['two_call_p99_ms']:.3f} ms;"
        f" {args.clients} clients {rt['many_clients_per_s']:.0f} tasks/s"
    )
    print(
        f"    echo floor (same SubmitAndWait messages, no work): p50 {rt['echo_sw_p50_ms']:.3f} ms"
        f" p99 {rt['echo_sw_p99_ms']:.3f} ms; {args.clients} clients {rt['echo_many_clients_per_s']:.0f} calls/s"
        f" -> dspy p50 {rt['sw_p50_ms'] / rt['echo_sw_p50_ms']:.2f}x,"
        f" many clients {rt['many_clients_per_s'] / rt['echo_many_clients_per_s']:.2f}x of the floor"
    )
    print(
        f"    memory-only server (no store): SubmitAndWait p50 {rt['memory_sw_p50_ms']:.3f} ms"
        f" p99 {rt['memory_sw_p99_ms']:.3f} ms -> the durable store adds"
        f" {rt['sw_p50_ms'] - rt['memory_sw_p50_ms']:.3f} ms at the p50"
    )
    summary.update({k: round(v, 4) for k, v in rt.items()})
    for peer, fig in peers.items():
        if "skipped" in fig:
            print(f"{peer:>8}: skipped ({fig['skipped']})")
            continue
        p50, p99, per_s = float(fig["p50_ms"]), float(fig["p99_ms"]), float(fig["per_s"])  # type: ignore[arg-type]
        print(
            f"{peer:>8}: p50 {p50:.3f} ms p99 {p99:.3f} ms, {args.clients} clients {per_s:.0f} tasks/s  ->"
            f" dspy p50 {rt['sw_p50_ms'] / p50:.2f}x, p99 {rt['sw_p99_ms'] / p99:.2f}x,"
            f" many clients {rt['many_clients_per_s'] / per_s:.2f}x"
        )
        summary[f"{peer}_p50_ms"] = round(p50, 4)
        summary[f"{peer}_p99_ms"] = round(p99, 4)
        summary[f"{peer}_per_s"] = round(per_s, 1)
        summary[f"sw_p50_vs_{peer}"] = round(rt["sw_p50_ms"] / p50, 3)
        summary[f"sw_p99_vs_{peer}"] = round(rt["sw_p99_ms"] / p99, 3)
        summary[f"many_clients_vs_{peer}"] = round(rt["many_clients_per_s"] / per_s, 3)
        summary[f"echo_many_clients_vs_{peer}"] = round(rt["echo_many_clients_per_s"] / per_s, 3)
        summary[f"echo_sw_p50_vs_{peer}"] = round(rt["echo_sw_p50_ms"] / p50, 3)
        summary[f"memory_sw_p50_vs_{peer}"] = round(rt["memory_sw_p50_ms"] / p50, 3)
        print(
            f"{'':>8}  the memory-only server against {peer}: p50 {rt['memory_sw_p50_ms'] / p50:.2f}x,"
            f" p99 {rt['memory_sw_p99_ms'] / p99:.2f}x"
        )
        print(
            f"{'':>8}  the echo floor against {peer}: p50 {rt['echo_sw_p50_ms'] / p50:.2f}x,"
            f" {args.clients} clients {rt['echo_many_clients_per_s'] / per_s:.2f}x"
        )
    print(f"batch submit over gRPC, durable: {summary['batch_tasks_per_s']:.0f} tasks/s (target >= 30,000)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
