"""Workflow engine overhead against hand-driven scheduler tasks, measured in one run.

Two shapes of no-op steps, each run durable (SQLite) and memory-only:

- ``chain``: ``--chain`` steps, each depending on the one before (latency-bound);
- ``fan``: one root and ``--fan`` steps depending on it (throughput-bound).

The floor is the same DAG driven by hand on the same scheduler: submit a step, ``wait`` for
it, submit what became ready (the fan's leaves with one ``submit_many``). The workflow run is
timed from ``start_run`` to the end of its ``run_status`` stream. Prints seconds and
ms per step for both and their ratio; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dspy_infra.config import load_settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskSpec
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.scheduler import Scheduler
from dspy_infra.workflows import WorkflowEngine

__all__ = ["main"]

_NOOP = {"handler": "noop"}


def _chain(n: int) -> dict[str, Any]:
    return {
        "steps": [
            {"name": f"s{i}", "depends_on": [f"s{i - 1}"] if i else [], "payload": _NOOP} for i in range(n)
        ]
    }


def _fan(n: int) -> dict[str, Any]:
    leaves = [{"name": f"f{i}", "depends_on": ["root"], "payload": _NOOP} for i in range(n)]
    return {"steps": [{"name": "root", "payload": _NOOP}, *leaves]}


async def _floor_chain(scheduler: Scheduler, n: int) -> float:
    prefix = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    for i in range(n):
        await scheduler.submit(TaskSpec(id=f"{prefix}.{i}", payload=_NOOP))
        await scheduler.wait(f"{prefix}.{i}")
    return time.perf_counter() - started


async def _floor_fan(scheduler: Scheduler, n: int) -> float:
    prefix = uuid.uuid4().hex[:8]
    leaves = [TaskSpec(id=f"{prefix}.{i}", payload=_NOOP) for i in range(n)]
    started = time.perf_counter()
    await scheduler.submit(TaskSpec(id=f"{prefix}.root", payload=_NOOP))
    await scheduler.wait(f"{prefix}.root")
    await scheduler.submit_many(leaves)
    for spec in leaves:
        await scheduler.wait(spec.id)
    return time.perf_counter() - started


async def _workflow(engine: WorkflowEngine, spec: dict[str, Any]) -> float:
    wf_id = "bench-" + uuid.uuid4().hex[:8]
    await engine.create_workflow(wf_id, spec=spec)
    started = time.perf_counter()
    run_id = await engine.start_run(wf_id)
    async for _ in engine.run_status(run_id):
        pass
    elapsed = time.perf_counter() - started
    run = await engine.get_run(run_id)
    if str(run.status) != "completed":
        raise SystemExit(f"benchmark run ended {run.status}: {run.error}")
    return elapsed


def _line(label: str, steps: int, engine_s: float, floor_s: float) -> dict[str, float]:
    ratio = engine_s / floor_s
    print(
        f"{label:>14}: workflow {engine_s:7.3f} s ({engine_s / steps * 1000:6.2f} ms/step)"
        f"   floor {floor_s:7.3f} s ({floor_s / steps * 1000:6.2f} ms/step)   ratio {ratio:5.2f}"
    )
    return {"workflow_s": engine_s, "floor_s": floor_s, "ratio": ratio}


async def _measure(durable: bool, chain: int, fan: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as home:
        settings = load_settings(home=home, durable=durable, env={})
        bus = EventBus()
        plugins = build_plugin_manager(load_entry_points=False)
        async with Scheduler(settings, bus=bus, metrics=InfraMetrics(), plugins=plugins) as scheduler:
            async with WorkflowEngine(settings, scheduler=scheduler, bus=bus) as engine:
                kind = "durable" if durable else "memory"
                await _workflow(engine, _chain(3))  # warm up both paths
                await _floor_chain(scheduler, 3)
                return {
                    f"{kind}_chain": _line(
                        f"{kind} chain",
                        chain,
                        await _workflow(engine, _chain(chain)),
                        await _floor_chain(scheduler, chain),
                    ),
                    f"{kind}_fan": _line(
                        f"{kind} fan",
                        fan + 1,
                        await _workflow(engine, _fan(fan)),
                        await _floor_fan(scheduler, fan),
                    ),
                }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", type=int, default=50, help="steps in the chain (default 50)")
    parser.add_argument("--fan", type=int, default=200, help="leaves of the fan (default 200)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"chain_steps": args.chain, "fan_steps": args.fan + 1}
    for durable in (True, False):
        results.update(asyncio.run(_measure(durable, args.chain, args.fan)))
    print(json.dumps(results, sort_keys=True))
    return results


if __name__ == "__main__":
    main()
