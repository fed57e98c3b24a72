"""Scheduler throughput and latency against the bare-asyncio floor, measured in one run.

Pushes ``--n`` no-op tasks through a ``Scheduler`` with durable state (SQLite, group commit)
and memory-only, and through the floor: bare asyncio tasks behind an ``asyncio.Semaphore``
of the same width. Prints tasks/s and submit-to-complete p50/p99 for each; the last line is
one JSON object with ``durable_ratio`` and ``memory_ratio`` (tasks/s over the floor's,
median over rounds, each round against its own floor).
Targets (issue 11): memory_ratio >= 0.5, durable_ratio >= 0.4.

``sequential`` is one task at a time, durable: ``--seq-n`` tasks, each submitted and waited
for before the next (its acknowledgement and its result both wait for the disk), against the
same floor; target ``sequential_ratio`` >= 0.2.

Task specs are built before the clock starts (the floor has no specs to build either);
everything from ``submit_many`` to the last committed result is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dspy_infra.config import load_settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskSpec
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.scheduler import Scheduler

__all__ = ["main"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _report(name: str, n: int, elapsed: float, latencies: list[float]) -> dict[str, float]:
    rate = n / elapsed
    p50, p99 = _percentile(latencies, 0.5) * 1000, _percentile(latencies, 0.99) * 1000
    print(f"{name:>8}: {rate:10.0f} tasks/s   p50 {p50:8.1f} ms   p99 {p99:8.1f} ms   ({elapsed:.2f} s)")
    return {"tasks_per_s": rate, "p50_ms": p50, "p99_ms": p99}


async def floor(n: int, width: int) -> dict[str, float]:
    sem = asyncio.Semaphore(width)
    latencies: list[float] = []

    async def noop() -> dict[str, str]:
        return {}

    async def one(started: float) -> None:
        async with sem:
            await noop()
        latencies.append(time.perf_counter() - started)

    t0 = time.perf_counter()
    await asyncio.gather(*[asyncio.create_task(one(t0)) for _ in range(n)])
    return _report("floor", n, time.perf_counter() - t0, latencies)


async def scheduler(n: int, width: int, *, durable: bool, home: Path) -> dict[str, float]:
    settings = load_settings(
        env={},
        home=home,
        durable=durable,
        retention=n,
        task_classes={
            "bench": {
                "min_concurrency": width,
                "base_concurrency": width,
                "max_concurrency": width,
                "adaptive": False,
            }
        },
    )
    specs = [TaskSpec(f"t{i}", task_class="bench", payload={"handler": "noop"}) for i in range(n)]
    plugins = build_plugin_manager(load_entry_points=False)
    async with Scheduler(settings, bus=EventBus(), metrics=InfraMetrics(), plugins=plugins) as sched:
        t0 = time.perf_counter()
        wall0 = time.time()
        await sched.submit_many(specs)
        latencies = [
            r.completed_at - wall0
            async for r in sched.stream_results([s.id for s in specs], include_completed=True)
        ]
        elapsed = time.perf_counter() - t0
    return _report("durable" if durable else "memory", n, elapsed, latencies)


async def sequential(n: int, width: int, *, home: Path) -> dict[str, float]:
    """One task at a time: submit, wait for its result, then the next (durable)."""
    settings = load_settings(env={}, home=home, durable=True, retention=n)
    specs = [TaskSpec(f"s{i}", payload={"handler": "noop"}) for i in range(n)]
    plugins = build_plugin_manager(load_entry_points=False)
    latencies: list[float] = []
    async with Scheduler(settings, bus=EventBus(), metrics=InfraMetrics(), plugins=plugins) as sched:
        t0 = time.perf_counter()
        for spec in specs:
            began = time.perf_counter()
            await sched.submit(spec)
            await sched.wait(spec.id)
            latencies.append(time.perf_counter() - began)
        elapsed = time.perf_counter() - t0
    return _report("sequential", n, elapsed, latencies)


NAMES = ("floor", "memory", "durable", "sequential")


async def run(n: int, width: int, rounds: int, seq_n: int = 2000) -> dict[str, float]:
    """``rounds`` rounds of floor, memory, durable back to back. On a shared machine the
    background load moves between rounds, so each round's ratio is taken against the floor
    measured in that same round, and the median round ratio is reported."""
    per_round: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="dspy-bench-") as tmp:
        for r in range(rounds):
            results: dict[str, dict[str, float]] = {}
            for name in NAMES:
                gc.collect()
                if name == "floor":
                    results[name] = await floor(n, width)
                elif name == "sequential":
                    results[name] = await sequential(seq_n, width, home=Path(tmp) / f"seq{r}")
                else:
                    home = Path(tmp) / f"{name}{r}"
                    results[name] = await scheduler(n, width, durable=name == "durable", home=home)
            per_round.append(results)
    out: dict[str, float] = {"n": n, "width": width, "rounds": rounds}
    for name in NAMES:
        for key in ("tasks_per_s", "p50_ms", "p99_ms"):
            out[f"{name}_{key}"] = round(statistics.median(r[name][key] for r in per_round), 2)
    for name in NAMES[1:]:
        ratios = [r[name]["tasks_per_s"] / r["floor"]["tasks_per_s"] for r in per_round]
        out[f"{name}_ratio"] = round(statistics.median(ratios), 3)
        out[f"{name}_ratio_best"] = round(max(ratios), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="tasks per run (default 20000)")
    parser.add_argument("--width", type=int, default=16, help="concurrency limit (default 16)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is reported (default 5)")
    parser.add_argument(
        "--seq-n", type=int, default=2000, help="tasks of the one-at-a-time run (default 2000)"
    )
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.n, args.width, args.rounds, args.seq_n))
    targets = {"memory_ratio": 0.5, "durable_ratio": 0.4, "sequential_ratio": 0.2}
    for key, target in targets.items():
        print(
            f"{key:>17}: {result[key]:6.3f} x floor (best round {result[key + '_best']:.3f}; target >= {target})"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
