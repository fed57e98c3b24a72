"""Executors side by side: the local executor, Ray through dspy_infra and bare Ray, in one run.

The same two tasks on each path: ``noop`` (a handler returning ``{}``) and a short ``exec``
(``/bin/sh -c true``; bare Ray runs the same through ``subprocess.run`` in a remote
function). For each path and task:

- throughput: ``--n`` tasks submitted at once, at most ``--width`` running (the class's
  ``max_concurrency``; every path, bare Ray included, goes through the same
  ``asyncio.Semaphore`` of that width around awaited results, with the same per-task
  ``num_cpus`` on Ray), tasks/s from first submit to last result;
- latency: ``--m`` tasks one after another, p50 and p99 of submit-to-result, interleaved
  task by task across the paths (so a busy machine weighs on all of them alike).

dspy_infra's Ray path runs memory-only (``durable = false``: attempts run on the scheduler's
own warm runner actors) and durable (on detached, named runners that let attempts outlive
their owner, every attempt's row flushed to the store before it is submitted);
``local_durable`` shows what the durable store alone costs. ``exec`` on the dspy_infra paths is dspy_infra's ``exec`` handler (task log, process-group and marker
sweep), which costs more than a bare ``subprocess.run`` on any executor: compare ``local``
with ``bare_ray`` to see it. Prints a table; the last line is one JSON object with, per task, the overhead
ratios of dspy_infra's Ray path over bare Ray: ``throughput_ratio`` = bare tasks/s /
dspy_infra tasks/s and ``p50_ratio`` = dspy_infra p50 / bare p50 (1.0 = no overhead;
target <= 1.2), for the memory-only and the durable path.

A runner holds its class's resources while it waits for the next attempt, and the test
cluster has 2 CPUs: one path's runners would starve the next path. So before each timed run
every executor's idle runners are released (``RayExecutor.release_idle``) until the
cluster's CPUs are all free again, and every path, bare Ray included, gets an untimed
warm-up run of its own right before its timed one (the runners it starts are what a warm
app has). A durable run leaves no runners behind (the executor ends its idle ones when it
closes; any left are killed at the end).

Needs the ray extra and a cluster: ``bash scripts/ray.sh start`` (``--address``, default
127.0.0.1:26379, with ``RAY_AUTH_MODE=token``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dspy_infra.config import load_settings
from dspy_infra.events import EventBus
from dspy_infra.executors.ray import COLLECT_DELAY, RayExecutor
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskSpec
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.scheduler import Scheduler

__all__ = ["main"]

#: CPU share of one task on every Ray path (several run at once on the 2-CPU test cluster).
TASK_CPUS = 0.25
PAYLOADS: dict[str, dict[str, Any]] = {
    "noop": {"handler": "noop"},
    "exec": {"handler": "exec", "cmd": "true"},
}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _bare_task(kind: str) -> dict[str, Any]:
    if kind == "exec":
        done = subprocess.run(["/bin/sh", "-c", "true"], capture_output=True, check=False)
        return {"exit_code": done.returncode, "stdout": done.stdout.decode(), "stderr": done.stderr.decode()}
    return {}


class RunPath:
    """One way to run a task: ``one(kind)`` runs one task and returns when it has ended."""

    def __init__(self, name: str, one: Callable[[str], Awaitable[object]]) -> None:
        self.name = name
        self.one = one


async def throughput(path: RunPath, kind: str, n: int, width: int) -> float:
    """Tasks/s of ``n`` tasks, at most ``width`` at once (the class's limit holds the
    scheduler paths to it; the semaphore is a no-op for them)."""
    window = asyncio.Semaphore(width)

    async def one() -> None:
        async with window:
            await path.one(kind)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - started)


def scheduler_path(name: str, sched: Scheduler, task_class: str) -> RunPath:
    ids = itertools.count()

    async def one(kind: str) -> None:
        task_id = f"{name}-{next(ids)}"
        await sched.submit(TaskSpec(task_id, task_class=task_class, payload=PAYLOADS[kind]))
        result = await sched.wait(task_id, timeout=600)
        assert result.status.value == "completed", result.error

    return RunPath(name, one)


def bare_ray_path() -> RunPath:
    import ray

    remote = ray.remote(max_retries=0, num_cpus=TASK_CPUS)(_bare_task)

    async def one(kind: str) -> None:
        await remote.remote(kind)

    return RunPath("bare_ray", one)


async def open_scheduler(
    stack: contextlib.AsyncExitStack, home: str, durable: bool, overrides: dict[str, Any]
) -> Scheduler:
    settings = load_settings(env={}, home=home, durable=durable, **overrides)
    plugins = build_plugin_manager(load_entry_points=False)
    sched = Scheduler(settings, bus=EventBus(), metrics=InfraMetrics(), plugins=plugins)
    return await stack.enter_async_context(sched)


def ray_executor(sched: Scheduler) -> RayExecutor:
    """The scheduler's Ray executor (its ``run`` is what the scheduler holds)."""
    executor = sched._executors["ray"].__self__  # type: ignore[attr-defined]
    assert isinstance(executor, RayExecutor)
    return executor


async def release_runners(executors: list[RayExecutor]) -> None:
    """Untimed: end every idle runner and wait until the cluster's CPUs are all free."""
    import ray

    await asyncio.sleep(COLLECT_DELAY + 0.1)  # outcomes in hand that long are collected first
    for executor in executors:
        await executor.release_idle()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        free, total = await asyncio.to_thread(lambda: (ray.available_resources(), ray.cluster_resources()))
        if free.get("CPU", 0.0) >= total.get("CPU", 0.0) - 1e-6:
            return
        await asyncio.sleep(0.1)


async def _kill_runners(home: str, namespace: str) -> None:
    """A durable run's runners are detached (that is their point): the executor ends its
    idle ones when it closes; kill any left."""
    import ray

    from dspy_infra.ownership import durable_scope

    prefix = f"dspy_infra-runner-{durable_scope(Path(home))}-"

    def kill() -> None:
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] == namespace and actor["name"].startswith(prefix):
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(actor["name"], namespace=namespace))

    await asyncio.to_thread(kill)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    await asyncio.to_thread(ray.init, address=args.address, log_to_driver=False, configure_logging=False)
    width = args.width
    fixed = {"max_concurrency": width, "base_concurrency": width, "adaptive": False}
    overrides = {
        "ray_address": args.address,
        "ray_namespace": "dspy-bench",
        "task_classes": {"on_ray": {"executor": "ray", **fixed}, "local": fixed},
        "ray_classes": {"on_ray": {"num_cpus": TASK_CPUS}},
    }
    async with contextlib.AsyncExitStack() as stack:
        homes = {name: stack.enter_context(tempfile.TemporaryDirectory()) for name in ("mem", "durable")}
        memory = await open_scheduler(stack, homes["mem"], False, overrides)
        durable = await open_scheduler(stack, homes["durable"], True, overrides)
        stack.push_async_callback(_kill_runners, homes["durable"], "dspy-bench")
        executors = [ray_executor(memory), ray_executor(durable)]
        paths = [
            scheduler_path("local", memory, "local"),
            scheduler_path("local_durable", durable, "local"),
            bare_ray_path(),
            scheduler_path("dspy_ray", memory, "on_ray"),
            scheduler_path("dspy_ray_durable", durable, "on_ray"),
        ]
        # Warm Ray's worker pool and the code paths before anything is timed.
        for kind in PAYLOADS:
            for path in paths:
                await throughput(path, kind, 2 * width, width)
                await release_runners(executors)
        rates: dict[str, dict[str, list[float]]] = {k: {p.name: [] for p in paths} for k in PAYLOADS}
        latencies: dict[str, dict[str, list[float]]] = {k: {p.name: [] for p in paths} for k in PAYLOADS}
        for _ in range(args.rounds):
            for kind in PAYLOADS:
                for path in paths:
                    await release_runners(executors)
                    await throughput(path, kind, 2 * width, width)  # warm-up
                    rates[kind][path.name].append(await throughput(path, kind, args.n, width))
                await release_runners(executors)
                for path in paths:  # warm-up: one runner per dspy path, a warm worker for bare Ray
                    for _ in range(3):
                        await path.one(kind)
                # Latency interleaved task by task, so every path sees the same machine.
                for _ in range(args.m):
                    for path in paths:
                        started = time.perf_counter()
                        await path.one(kind)
                        latencies[kind][path.name].append(time.perf_counter() - started)
    out: dict[str, Any] = {"n": args.n, "m": args.m, "width": width, "rounds": args.rounds}
    print(f"{'task':>5} {'path':>17} {'tasks/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for kind in PAYLOADS:
        med = {
            path.name: {
                "tasks_per_s": statistics.median(rates[kind][path.name]),
                "p50_ms": _percentile(latencies[kind][path.name], 0.5) * 1000,
                "p99_ms": _percentile(latencies[kind][path.name], 0.99) * 1000,
            }
            for path in paths
        }
        for name, fig in med.items():
            print(f"{kind:>5} {name:>17} {fig['tasks_per_s']:9.0f} {fig['p50_ms']:8.2f} {fig['p99_ms']:8.2f}")
        bare = med["bare_ray"]
        out[kind] = {
            "figures": med,
            "throughput_ratio": bare["tasks_per_s"] / med["dspy_ray"]["tasks_per_s"],
            "p50_ratio": med["dspy_ray"]["p50_ms"] / bare["p50_ms"],
            "durable_throughput_ratio": bare["tasks_per_s"] / med["dspy_ray_durable"]["tasks_per_s"],
            "durable_p50_ratio": med["dspy_ray_durable"]["p50_ms"] / bare["p50_ms"],
        }
        print(
            f"{kind:>5} overhead over bare Ray: throughput x{out[kind]['throughput_ratio']:.2f},"
            f" p50 x{out[kind]['p50_ratio']:.2f} (durable: x{out[kind]['durable_throughput_ratio']:.2f},"
            f" x{out[kind]['durable_p50_ratio']:.2f}); target <= 1.2"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:26379", help="Ray head (default 127.0.0.1:26379)")
    parser.add_argument("--n", type=int, default=400, help="tasks per throughput run (default 400)")
    parser.add_argument("--m", type=int, default=50, help="sequential tasks per latency run (default 50)")
    parser.add_argument("--width", type=int, default=8, help="tasks running at once (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default 3)")
    result = asyncio.run(run(parser.parse_args(argv)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
