"""Executors side by side: the local executor, Ray through dspy_infra and bare Ray, in one run.

The same two tasks on each path: ``noop`` (a handler returning ``{}``) and a short ``exec``
(``/bin/sh -c true``; bare Ray runs the same through ``subprocess.run`` in a remote
function). For each path and task:

- throughput: ``--n`` tasks submitted at once, at most ``--width`` running (the class's
  ``max_concurrency``; bare Ray is held to the same width by an ``asyncio.Semaphore``
  around awaited refs, with the same per-task ``num_cpus``), tasks/s from first submit to
  last result;
- latency: ``--m`` tasks one after another, p50 and p99 of submit-to-result.

dspy_infra's Ray path runs memory-only (``durable = false``: the scheduler submits its own
Ray task per attempt) and durable (through the detached keeper actor that lets attempts
outlive their owner, the handle fsynced before each submission, every attempt committed
to the store). Prints a table; the last line is one JSON object with, per task, the overhead
ratios of dspy_infra's Ray path over bare Ray: ``throughput_ratio`` = bare tasks/s /
dspy_infra tasks/s and ``p50_ratio`` = dspy_infra p50 / bare p50 (1.0 = no overhead;
target <= 1.2), for the memory-only and the durable path.

Needs the ray extra and a cluster: ``bash scripts/ray.sh start`` (``--address``, default
127.0.0.1:26379, with ``RAY_AUTH_MODE=token``).
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dspy_infra.config import load_settings
from dspy_infra.events import EventBus
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


async def bare_ray(kind: str, n: int, m: int, width: int) -> dict[str, float]:
    import ray

    remote = ray.remote(max_retries=0, num_cpus=TASK_CPUS)(_bare_task)
    window = asyncio.Semaphore(width)

    async def one() -> None:
        async with window:
            await remote.remote(kind)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.perf_counter() - started
    latencies = []
    for _ in range(m):
        t = time.perf_counter()
        await remote.remote(kind)
        latencies.append(time.perf_counter() - t)
    return _figures(n, elapsed, latencies)


def _figures(n: int, elapsed: float, latencies: list[float]) -> dict[str, float]:
    return {
        "tasks_per_s": n / elapsed,
        "p50_ms": _percentile(latencies, 0.5) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
    }


async def through_scheduler(
    kind: str, n: int, m: int, width: int, *, task_class: str, durable: bool, overrides: dict[str, Any]
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as home:
        settings = load_settings(env={}, home=home, durable=durable, **overrides)
        plugins = build_plugin_manager(load_entry_points=False)
        async with Scheduler(settings, bus=EventBus(), metrics=InfraMetrics(), plugins=plugins) as sched:
            payload = PAYLOADS[kind]
            specs = [TaskSpec(f"t{i}", task_class=task_class, payload=payload) for i in range(n)]
            started = time.perf_counter()
            await sched.submit_many(specs)
            for spec in specs:
                await sched.wait(spec.id, timeout=600)
            elapsed = time.perf_counter() - started
            latencies = []
            for i in range(m):
                t = time.perf_counter()
                await sched.submit(TaskSpec(f"l{i}", task_class=task_class, payload=payload))
                await sched.wait(f"l{i}", timeout=600)
                latencies.append(time.perf_counter() - t)
            await _kill_keepers(home, settings.ray_namespace if durable else None)
        return _figures(n, elapsed, latencies)


async def _kill_keepers(home: str, namespace: str | None) -> None:
    """A durable run leaves its detached keeper (that is its point): remove it afterwards."""
    if namespace is None:
        return
    import ray

    from dspy_infra.ownership import durable_scope

    def kill() -> None:
        try:
            ray.kill(ray.get_actor(f"dspy_infra-keeper-{durable_scope(Path(home))}", namespace=namespace))
        except ValueError:
            pass

    await asyncio.to_thread(kill)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    await asyncio.to_thread(ray.init, address=args.address, log_to_driver=False, configure_logging=False)
    width = args.width
    ray_overrides = {
        "ray_address": args.address,
        "ray_namespace": "dspy-bench",
        "task_classes": {
            "on_ray": {
                "executor": "ray",
                "max_concurrency": width,
                "base_concurrency": width,
                "adaptive": False,
            },
            "local": {"max_concurrency": width, "base_concurrency": width, "adaptive": False},
        },
        "ray_classes": {"on_ray": {"num_cpus": TASK_CPUS}},
    }
    paths: dict[str, Callable[[str], Awaitable[dict[str, float]]]] = {
        "local": lambda kind: through_scheduler(
            kind, args.n, args.m, width, task_class="local", durable=False, overrides=ray_overrides
        ),
        "bare_ray": lambda kind: bare_ray(kind, args.n, args.m, width),
        "dspy_ray": lambda kind: through_scheduler(
            kind, args.n, args.m, width, task_class="on_ray", durable=False, overrides=ray_overrides
        ),
        "dspy_ray_durable": lambda kind: through_scheduler(
            kind, args.n, args.m, width, task_class="on_ray", durable=True, overrides=ray_overrides
        ),
    }
    # Warm Ray's worker pool (and the keepers' code) before anything is timed.
    for kind in PAYLOADS:
        await paths["bare_ray"](kind)
        await paths["dspy_ray"](kind)
    rounds: dict[str, dict[str, list[dict[str, float]]]] = {k: {p: [] for p in paths} for k in PAYLOADS}
    for _ in range(args.rounds):
        for kind in PAYLOADS:
            for name, path in paths.items():
                rounds[kind][name].append(await path(kind))
    out: dict[str, Any] = {"n": args.n, "m": args.m, "width": width, "rounds": args.rounds}
    print(f"{'task':>5} {'path':>17} {'tasks/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, per_path in rounds.items():
        med = {
            name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            for name, runs in per_path.items()
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
