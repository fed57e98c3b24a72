"""The ``exec`` handler's own cost against its floors, measured in one run.

Sequential runs of one short command (``--cmd``, default ``true``, through ``/bin/sh -c``),
the variants taking turns within each round so load on the machine hits all alike:

- floor ``subprocess.run``: ``/bin/sh -c CMD`` with stdout and stderr captured;
- floor asyncio: ``asyncio.create_subprocess_exec`` of the same, then ``communicate()``;
- the handler called directly with a memory-only scheduler's settings (what a Ray worker
  runs: no attempt record) and with a durable one's (attempt record before the spawn);
- an ``exec`` task through a real memory-only and a real durable ``Scheduler`` (submit,
  then wait; the durable one also flushes its store before the command starts).

Prints p50 and p99 of each (ms) with its ratio to both floors; the last line is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dspy_infra.config import load_settings  # noqa: E402
from dspy_infra.events import EventBus  # noqa: E402
from dspy_infra.handlers.basic import exec_handler  # noqa: E402
from dspy_infra.metrics import InfraMetrics  # noqa: E402
from dspy_infra.models import TaskSpec, TaskStatus  # noqa: E402
from dspy_infra.plugins import build_plugin_manager  # noqa: E402
from dspy_infra.scheduler.context import TaskContext  # noqa: E402
from dspy_infra.scheduler.scheduler import Scheduler  # noqa: E402

__all__ = ["main"]

Variant = Callable[[int], Awaitable[object]]


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(n: int, rounds: int, cmd: str) -> dict[str, float]:
    argv = ["/bin/sh", "-c", cmd]
    counter = 0

    def task_id() -> str:
        nonlocal counter
        counter += 1
        return f"e{counter}"

    async def floor_run(_i: int) -> None:
        # The blocking call, as a plain script makes it (the loop has nothing else to do).
        subprocess.run(argv, capture_output=True, check=True)  # noqa: ASYNC221

    async def floor_asyncio(_i: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        await proc.communicate()

    with tempfile.TemporaryDirectory() as tmp:
        memory = load_settings(env={}, home=Path(tmp) / "memory", durable=False)
        durable = load_settings(env={}, home=Path(tmp) / "durable", durable=True)

        def direct(settings: object) -> Variant:
            async def run(_i: int) -> None:
                spec = TaskSpec(task_id(), payload={"handler": "exec", "cmd": cmd})
                await exec_handler(TaskContext(spec, 1, settings))  # type: ignore[arg-type]

            return run

        pm = build_plugin_manager(load_entry_points=False)
        sched_memory = Scheduler(
            load_settings(env={}, home=Path(tmp) / "sched-memory", durable=False),
            bus=EventBus(),
            metrics=InfraMetrics(),
            plugins=pm,
        )
        sched_durable = Scheduler(
            load_settings(env={}, home=Path(tmp) / "sched-durable", durable=True),
            bus=EventBus(),
            metrics=InfraMetrics(),
            plugins=pm,
        )
        async with sched_memory, sched_durable:

            def through(sched: Scheduler) -> Variant:
                async def run(_i: int) -> None:
                    tid = task_id()
                    await sched.submit(TaskSpec(tid, payload={"handler": "exec", "cmd": cmd}))
                    result = await sched.wait(tid, timeout=60)
                    assert result.status is TaskStatus.COMPLETED, result.error

                return run

            variants: dict[str, Variant] = {
                "floor_subprocess_run": floor_run,
                "floor_asyncio": floor_asyncio,
                "handler_memory": direct(memory),
                "handler_durable": direct(durable),
                "task_memory": through(sched_memory),
                "task_durable": through(sched_durable),
            }
            samples: dict[str, list[float]] = {name: [] for name in variants}
            cpu: dict[str, float] = dict.fromkeys(variants, 0.0)
            for variant in variants.values():  # warm-up
                for i in range(5):
                    await variant(i)
            for _ in range(rounds):
                for i in range(n):
                    for name, variant in variants.items():
                        cpu_started, started = time.process_time(), time.perf_counter()
                        await variant(i)
                        samples[name].append((time.perf_counter() - started) * 1000)
                        cpu[name] += time.process_time() - cpu_started

    floor = statistics.median(samples["floor_subprocess_run"])
    floor_aio = statistics.median(samples["floor_asyncio"])
    figures: dict[str, float] = {}
    print(f"exec of /bin/sh -c {cmd!r}, {rounds} x {n} sequential runs per variant, taking turns")
    print("(cpu: this process's CPU time per run, all its threads, not the command's)")
    print(f"{'variant':<22} {'p50 ms':>8} {'p99 ms':>8} {'/ run':>7} {'/ asyncio':>10} {'cpu ms':>7}")
    for name, values in samples.items():
        p50, p99 = statistics.median(values), _pct(values, 0.99)
        cpu_ms = cpu[name] * 1000 / len(values)
        figures[f"{name}_p50_ms"] = round(p50, 3)
        figures[f"{name}_p99_ms"] = round(p99, 3)
        figures[f"{name}_cpu_ms"] = round(cpu_ms, 3)
        if not name.startswith("floor_subprocess"):
            figures[f"{name}_ratio"] = round(p50 / floor, 2)
        print(f"{name:<22} {p50:8.3f} {p99:8.3f} {p50 / floor:6.2f}x {p50 / floor_aio:9.2f}x {cpu_ms:7.3f}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200, help="runs per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cmd", default="true", help="the shell command every variant runs")
    args = parser.parse_args(argv)
    figures = asyncio.run(bench(args.n, args.rounds, args.cmd))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
