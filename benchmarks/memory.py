"""Memory of the scheduler and the server (issue 11): RSS per 100k queued tasks, per 10k
retained finished tasks, and a soak of a real server at a steady submit rate.

- queued: a durable ``Scheduler`` whose one class runs one task at a time, held by a task
  that sleeps; ``--queued`` no-op tasks are submitted behind it and the RSS growth is
  reported per 100k queued tasks.
- retained: ``--retained`` no-op tasks run to the end (retention keeps them all); RSS growth
  per 10k finished tasks kept for ``wait``/``get``.
- ``--soak SECONDS``: a real server (``run_server``, durable, default retention 10,000) in a
  subprocess, fed ``--rate`` tasks/s over gRPC (``SubmitTasks`` every 0.1 s) for SECONDS;
  its RSS is printed every ``--every`` seconds. Flat means: the RSS of the last quarter grows
  by less than 5 % over the RSS once retention is full. 0 (the default) skips the soak.

Each in-process figure runs in a fresh subprocess (RSS is never given back to the system,
so a figure measured after another would hide its growth). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _rpc_support import stop_process as stop  # noqa: E402

__all__ = ["main"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


async def _queued(n: int, home: Path) -> dict[str, float]:
    from dspy_infra.config import load_settings
    from dspy_infra.events import EventBus
    from dspy_infra.metrics import InfraMetrics
    from dspy_infra.models import TaskSpec
    from dspy_infra.plugins import build_plugin_manager
    from dspy_infra.scheduler.scheduler import Scheduler

    one = {"min_concurrency": 1, "base_concurrency": 1, "max_concurrency": 1, "adaptive": False}
    settings = load_settings(env={}, home=home, durable=True, task_classes={"held": one}, shutdown_grace=0.1)
    plugins = build_plugin_manager(load_entry_points=False)
    async with Scheduler(settings, bus=EventBus(), metrics=InfraMetrics(), plugins=plugins) as sched:
        await sched.submit(
            TaskSpec("holder", task_class="held", payload={"handler": "sleep", "seconds": 3600})
        )
        specs = [TaskSpec(f"q{i}", task_class="held", payload={"handler": "noop"}) for i in range(n)]
        gc.collect()
        before = rss_bytes()
        for start in range(0, n, 10_000):
            await sched.submit_many(specs[start : start + 10_000])
        del specs
        gc.collect()
        after = rss_bytes()
        depth = sched.queue_status()["held"].depth
        assert depth == n, depth
        await sched.cancel("holder")
    return {"queued": n, "rss_before_mib": _mib(before), "rss_after_mib": _mib(after),
            "mib_per_100k_queued": round(_mib(after - before) * 100_000 / n, 1)}  # fmt: skip


async def _retained(n: int, home: Path) -> dict[str, float]:
    from dspy_infra.config import load_settings
    from dspy_infra.events import EventBus
    from dspy_infra.metrics import InfraMetrics
    from dspy_infra.models import TaskSpec
    from dspy_infra.plugins import build_plugin_manager
    from dspy_infra.scheduler.scheduler import Scheduler

    settings = load_settings(env={}, home=home, durable=True, retention=n + 10)
    plugins = build_plugin_manager(load_entry_points=False)
    bus = EventBus()
    async with Scheduler(settings, bus=bus, metrics=InfraMetrics(), plugins=plugins) as sched:
        # Warm up the paths (and fill the event ring buffer, which is bounded) first, so the
        # growth below is what retention keeps.
        warm = [TaskSpec(f"w{i}", payload={"handler": "noop"}) for i in range(2000)]
        await sched.submit_many(warm)
        async for _ in sched.stream_results([s.id for s in warm], include_completed=True):
            pass
        specs = [TaskSpec(f"r{i}", payload={"handler": "noop"}) for i in range(n)]
        ids = [s.id for s in specs]
        gc.collect()
        before = rss_bytes()
        for start in range(0, n, 5_000):
            await sched.submit_many(specs[start : start + 5_000])
        del specs
        async for _ in sched.stream_results(ids, include_completed=True):
            pass
        gc.collect()
        after = rss_bytes()
    return {"retained": n, "rss_before_mib": _mib(before), "rss_after_mib": _mib(after),
            "mib_per_10k_retained": round(_mib(after - before) * 10_000 / n, 1)}  # fmt: skip


SERVER = """
import asyncio, json, sys
from dspy_infra.config import load_settings
from dspy_infra.serve import run_server
# own_process: as `dspy-infra serve` runs it
raise SystemExit(asyncio.run(run_server(load_settings(**json.loads(sys.argv[1])), own_process=True)))
"""
_PORT = re.compile(r"grpc=127\.0\.0\.1:(\d+)")


async def _feed(port: int, seconds: float, rate: int, every: float, pid: int) -> list[tuple[float, int]]:
    from grpclib.client import Channel

    from dspy_infra.rpc._gen.orchestrator import v1 as pb

    channel = Channel("127.0.0.1", port)
    stub = pb.OrchestratorServiceStub(channel)
    samples: list[tuple[float, int]] = []
    per_tick = max(1, rate // 10)
    began = time.monotonic()
    next_sample = began
    sent = 0
    tick = 0
    try:
        while (now := time.monotonic()) - began < seconds:
            docs = [{"id": f"s{sent + i}", "payload": {"handler": "noop"}} for i in range(per_tick)]
            resp = await stub.submit_tasks(pb.SubmitTasksRequest(tasks_json=json.dumps(docs).encode()))
            assert not resp.rejected, resp.rejected[0].error
            sent += per_tick
            if now >= next_sample:
                rss = rss_bytes(pid)
                samples.append((round(now - began, 1), rss))
                print(
                    f"  t={now - began:6.1f} s  sent={sent:8d}  server RSS {_mib(rss):7.1f} MiB", flush=True
                )
                next_sample += every
            tick += 1
            await asyncio.sleep(max(0.0, began + tick * 0.1 - time.monotonic()))
    finally:
        channel.close()
    samples.append((round(time.monotonic() - began, 1), rss_bytes(pid)))
    return samples


def _soak(seconds: float, rate: int, every: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dspy-soak-") as home:
        settings = {"home": home, "backend": "process", "grpc_port": 0, "env_manager_port": 0,
                    "http_port": 0, "durable": True}  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
        env["PYTHONPATH"] = str(ROOT)
        proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(settings)], stdout=subprocess.PIPE,
                                text=True, env=env, cwd=home)  # fmt: skip
        try:
            assert proc.stdout is not None
            port = 0
            for line in proc.stdout:
                match = _PORT.search(line)
                if match:
                    port = int(match[1])
                    break
            if not port:
                raise SystemExit(f"server did not start (exit {proc.wait()})")
            samples = asyncio.run(_feed(port, seconds, rate, every, proc.pid))
        finally:
            stop(proc)
    # Retention (10,000 finished tasks) is full after ~10 s at 1k/s; compare from a quarter on.
    rss = [r for _, r in samples]
    quarter = max(1, len(rss) // 4)
    settled = rss[quarter]
    last = max(rss[-quarter:])
    return {"soak_seconds": seconds, "soak_rate": rate, "soak_rss_start_mib": _mib(rss[0]),
            "soak_rss_settled_mib": _mib(settled), "soak_rss_end_mib": _mib(rss[-1]),
            "soak_rss_max_mib": _mib(max(rss)), "soak_growth_after_settle": round(last / settled - 1, 3),
            "soak_flat": last <= settled * 1.05}  # fmt: skip


def _child(kind: str, n: int) -> dict[str, Any]:
    """Run one in-process figure in a fresh interpreter."""
    with tempfile.TemporaryDirectory(prefix="dspy-mem-") as home:
        code = (
            f"import asyncio, json, sys, pathlib; sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
            f" import memory; print(json.dumps(asyncio.run(memory._{kind}({n}, pathlib.Path({home!r})))))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=900, check=False
        )
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--retained", type=int, default=10_000)
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="0 = no soak (default)")
    parser.add_argument("--rate", type=int, default=1000, help="soak submit rate, tasks/s")
    parser.add_argument("--every", type=float, default=10.0, help="soak: seconds between RSS lines")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {}
    queued = _child("queued", args.queued)
    print(f"  queued: {queued['mib_per_100k_queued']:6.1f} MiB per 100k queued tasks"
          f" (RSS {queued['rss_before_mib']} -> {queued['rss_after_mib']} MiB)")  # fmt: skip
    retained = _child("retained", args.retained)
    print(f"retained: {retained['mib_per_10k_retained']:6.1f} MiB per 10k retained finished tasks"
          f" (RSS {retained['rss_before_mib']} -> {retained['rss_after_mib']} MiB)")  # fmt: skip
    out.update(mib_per_100k_queued=queued["mib_per_100k_queued"],
               mib_per_10k_retained=retained["mib_per_10k_retained"])  # fmt: skip
    if args.soak > 0:
        print(f"soak: {args.rate} tasks/s for {args.soak:g} s against a durable server")
        soak = _soak(args.soak, args.rate, args.every)
        print(f"soak: RSS {soak['soak_rss_start_mib']} -> settled {soak['soak_rss_settled_mib']} -> end"
              f" {soak['soak_rss_end_mib']} MiB; growth after settling {soak['soak_growth_after_settle']:+.1%}"
              f" ({'flat' if soak['soak_flat'] else 'NOT flat'})")  # fmt: skip
        out.update(soak)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
