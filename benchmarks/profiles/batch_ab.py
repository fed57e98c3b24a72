"""``SubmitTasks`` throughput of durable servers built from different source trees, in
alternating rounds (each round one batch phase on each server, so that load from other
processes on the machine falls on all of them alike; compare the ratios, not the rates).

``python benchmarks/profiles/batch_ab.py NAME=SRC_ROOT [NAME=SRC_ROOT ...] [--rounds 6]
[--n 10000] [--spy NAME --out FILE]`` (a tree: e.g. ``git archive main | tar -x -C /tmp/main``).
``--phase sw``: sequential ``SubmitAndWait`` calls instead (``--n`` per server per round,
through ``OrchestratorClient``), p50/p99 and server CPU per call.
Also prints each server's CPU time (all threads, until 3 s after the last batch) per task:
less noisy than the rates on a busy machine. Each round: bulk JSON (``tasks_json``) and typed (``tasks``) batches of 1,000 tasks, two in
flight, as ``benchmarks/rpc.py`` sends them. ``--spy NAME``: py-spy records that server for
the whole run (``--out``, speedscope; ``--format raw`` for collapsed stacks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rpc
from grpclib.client import Channel


def _cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU of a process (all its threads), or of one of its threads."""
    where = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(where).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> tuple[float, float]:
    """(all threads, the event loop's thread: the main one) CPU seconds."""
    return _cpu_seconds(pid), _cpu_seconds(pid, pid)


#: Per server: loop CPU seconds spent while its own phases were measured (the rest is work
#: it did later: accepted tasks that ran after their batch was answered).
own: dict[str, float] = {}


async def _phase(name: str, pids: dict[str, int], phase: Awaitable[float]) -> float:
    began = _cpu_seconds(pids[name], pids[name])
    rate = await phase
    own[name] = own.get(name, 0.0) + _cpu_seconds(pids[name], pids[name]) - began
    return rate


async def _drive(
    ports: dict[str, int], rounds: int, n: int, typed: bool, pids: dict[str, int]
) -> dict[str, dict[str, list[float]]]:
    channels = {name: Channel("127.0.0.1", port) for name, port in ports.items()}
    stubs = {name: rpc.pb.OrchestratorServiceStub(ch) for name, ch in channels.items()}
    rates: dict[str, dict[str, list[float]]] = {name: {"bulk": [], "typed": []} for name in ports}
    try:
        for name, stub in stubs.items():  # warm-up
            await rpc._batched(stub, f"{name}-warm", 2000, 1000, 2, typed=False)
        for r in range(rounds):
            for name, stub in stubs.items():
                bulk = rpc._batched(stub, f"{name}-b{r}", n, 1000, 2, typed=False)
                rates[name]["bulk"].append(await _phase(name, pids, bulk))
            for name, stub in stubs.items():
                if not typed:
                    break
                typed_batches = rpc._batched(stub, f"{name}-t{r}", n // 4, 1000, 2, typed=True)
                rates[name]["typed"].append(await _phase(name, pids, typed_batches))
    finally:
        for ch in channels.values():
            ch.close()
    return rates


async def _drive_sw(ports: dict[str, int], rounds: int, n: int) -> dict[str, dict[str, list[float]]]:
    """Sequential ``SubmitAndWait`` calls through ``OrchestratorClient``, ``n`` per round."""
    channels = {name: Channel("127.0.0.1", port) for name, port in ports.items()}
    calls = {name: rpc._sw_call(ch, "client") for name, ch in channels.items()}
    latencies: dict[str, dict[str, list[float]]] = {name: {"sw": []} for name in ports}
    try:
        for name, call in calls.items():  # warm-up
            await rpc._submit_and_wait(call, f"{name}-warm", 200)
        for r in range(rounds):
            for name, call in calls.items():
                latencies[name]["sw"] += await rpc._submit_and_wait(call, f"{name}-sw{r}", n)
    finally:
        for ch in channels.values():
            ch.close()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="+", help="NAME=SRC_ROOT")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--n", type=int, default=10_000, help="bulk tasks per server per round")
    parser.add_argument("--phase", choices=("batch", "sw"), default="batch")
    parser.add_argument("--bulk-only", action="store_true", help="no typed batches")
    parser.add_argument("--spy", help="the NAME of the server to record with py-spy")
    parser.add_argument("--out", default="batch.speedscope.json")
    parser.add_argument("--format", default="speedscope")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.trees)
    procs: list[subprocess.Popen[str]] = []
    ports: dict[str, int] = {}
    spy: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory() as home:
        try:
            for name, root in trees.items():
                settings = {
                    "home": f"{home}/{name}",
                    "backend": "process",
                    "grpc_port": 0,
                    "env_manager_port": 0,
                    "http_port": 0,
                    "durable": True,
                    "retention": 2 * args.n * (args.rounds + 1) + 10_000,
                }
                proc, ports[name] = rpc._start(
                    rpc.INFRA_SERVER, json.dumps(settings), cwd=home, root=Path(root)
                )
                procs.append(proc)
                if name == args.spy:
                    spy_bin = Path(sys.executable).parent / "py-spy"
                    spy = subprocess.Popen(
                        [
                            str(spy_bin),
                            "record",
                            "-p",
                            str(proc.pid),
                            "-o",
                            args.out,
                            "-r",
                            "250",
                            "-f",
                            args.format,
                            "--threads",
                        ],
                        stdout=subprocess.DEVNULL,
                    )
                    time.sleep(1.0)  # py-spy attached
            began = time.time()
            cpu_before = {name: _cpu(proc.pid) for name, proc in zip(trees, procs, strict=True)}
            if args.phase == "sw":
                rates = asyncio.run(_drive_sw(ports, args.rounds, args.n))
            else:
                pids = {name: proc.pid for name, proc in zip(trees, procs, strict=True)}
                rates = asyncio.run(_drive(ports, args.rounds, args.n, not args.bulk_only, pids))
            time.sleep(3.0)  # accepted tasks still running finish (their CPU is the batch's too)
            cpu = {
                name: tuple(a - b for a, b in zip(_cpu(proc.pid), cpu_before[name], strict=True))
                for name, proc in zip(trees, procs, strict=True)
            }
        finally:
            if spy is not None:
                spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
                spy.wait(60)
            for proc in procs:
                rpc.stop(proc)
    print(f"{args.rounds} rounds, {time.time() - began:.0f} s, load {os.getloadavg()[0]:.1f}")
    first = next(iter(rates))
    if args.phase == "sw":
        tasks = 200 + args.rounds * args.n
        for name, per in rates.items():
            total, loop = cpu[name]
            print(
                f"SubmitAndWait {name:>8}: p50 {rpc._pct(per['sw'], 0.5):.3f} ms p99 {rpc._pct(per['sw'], 0.99):.3f}"
                f" ms ({rpc._pct(per['sw'], 0.5) / rpc._pct(rates[first]['sw'], 0.5):.2f}x {first});"
                f" server CPU {total / tasks * 1e6:.0f} us per call, its loop thread {loop / tasks * 1e6:.0f} us"
            )
        return 0
    tasks = 2000 + args.rounds * (args.n + (0 if args.bulk_only else args.n // 4))
    for name in rates:
        total, loop = cpu[name]
        print(
            f"server CPU {name:>8}: {total / tasks * 1e6:6.1f} us per task, its loop thread"
            f" {loop / tasks * 1e6:6.1f} us ({tasks} tasks;"
            f" {own[name] / loop:.0%} of it while its own batches were measured)"
        )
    for kind in ("bulk",) if args.bulk_only else ("bulk", "typed"):
        for name, per in rates.items():
            med = statistics.median(per[kind])
            ratios = [a / b for a, b in zip(per[kind], rates[first][kind], strict=True)]
            print(
                f"{kind:>5} {name:>8}: median {med:7.0f} tasks/s  rounds "
                + " ".join(f"{x:.0f}" for x in per[kind])
                + f"  / {first} per round: "
                + " ".join(f"{x:.2f}" for x in ratios)
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
