"""Attempts are durable (issue 8 item 2): an attempt is committed before its handler starts,
so a task that takes its process down uses up its attempts and cannot crash-loop a server.

The child process holds the scheduler; the task's command is ``kill -9 $PPID`` (a real
SIGKILL of that process), and the test restarts the child until the task is terminal.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from harness import NO_GPU, crash_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import attempt_plans

from dspy_infra.config import load_settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskSpec, TaskStatus
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.context import TaskContext
from dspy_infra.scheduler.scheduler import Scheduler

HW = NO_GPU

CHILD = r"""
import asyncio, json, sys

from dspy_infra.config import load_settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskSpec
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.scheduler import Scheduler

mode, home, runs, attempts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


async def main() -> None:
    settings = load_settings(env={}, home=home, durable=True, shutdown_grace=0.2)
    pm = build_plugin_manager(load_entry_points=False)
    async with Scheduler(settings, bus=EventBus(), metrics=InfraMetrics(), plugins=pm) as sched:
        print("READY", flush=True)
        if mode == "submit":
            cmd = f"echo run >> {runs}; kill -9 $PPID; sleep 5"
            await sched.submit(TaskSpec("killer", payload={"handler": "exec", "cmd": cmd},
                                        max_attempts=attempts))
        await sched.submit(TaskSpec("witness", payload={"handler": "noop"}))
        await sched.wait("witness", timeout=10)
        try:
            result = await sched.wait("killer", timeout=10)
        except Exception as exc:
            print(json.dumps({"error": type(exc).__name__}), flush=True)
            return
        state = await sched.get("killer")
        print(json.dumps({"status": result.status.value, "error": result.error,
                          "attempts": state.attempts}), flush=True)


asyncio.run(main())
"""


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_a_task_that_kills_its_server_runs_at_most_max_attempts_times(
    tmp_path: Path, max_attempts: int
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    home, runs = tmp_path / "state", tmp_path / "runs.txt"

    def start(mode: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(script), mode, str(home), str(runs), str(max_attempts)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    outcomes = [start("submit")]
    for _ in range(max_attempts + 3):
        if outcomes[-1].returncode == 0:
            break
        outcomes.append(start("restart"))
    killed = [o for o in outcomes if o.returncode == -signal.SIGKILL]
    # Every start got as far as READY: no restart died before the server was up.
    assert all(o.stdout.startswith("READY") for o in outcomes), [o.stderr[-500:] for o in outcomes]
    last = outcomes[-1]
    assert last.returncode == 0, last.stderr[-2000:]
    n_runs = len(runs.read_text().splitlines())
    assert n_runs == len(killed) == max_attempts, "the task ran once per attempt, never more"
    final = json.loads(last.stdout.splitlines()[-1])
    assert final["status"] == "failed"
    assert final["attempts"] == max_attempts
    assert (
        f"the process running this task stopped (crash or kill) during attempt {max_attempts}"
        f" of {max_attempts}; not retried" in final["error"]
    )
    # And the server starts cleanly afterwards, with the record intact.
    again = start("restart")
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1]) == final


async def _incarnations(tmp: Path, plan: list[str], max_attempts: int) -> tuple[list[str], Any]:
    """Run one task through scheduler restarts. A "crash" run copies the committed database
    (SQLite's backup API) and the attempt journal (exactly what a crash at that moment leaves
    on disk) to a fresh home and the next incarnation starts from that copy; the abandoned one
    is just closed."""
    runs: list[str] = []
    crash_events: list[anyio.Event] = []  # one per incarnation; the newest is live
    home = tmp / "h0"

    async def step(ctx: TaskContext) -> dict[str, Any]:
        what = plan[len(runs)] if len(runs) < len(plan) else "ok"
        runs.append(what)
        if what == "fail":
            raise RuntimeError("failed on purpose")
        if what == "crash":
            crash_image(ctx.settings.resolved_home(), tmp / f"h{len(runs)}")
            crash_events[-1].set()
            await anyio.sleep(3600)
        return {"run": len(runs)}

    pm = build_plugin_manager(load_entry_points=False)
    submitted = False
    for _ in range(len(plan) + 2):
        crash_events.append(anyio.Event())
        cfg = load_settings(env={}, home=home, durable=True, shutdown_grace=0.05)
        async with Scheduler(cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=pm, hardware=HW) as sched:
            sched.register_handler("step", step)
            if not submitted:
                await sched.submit(TaskSpec("t", payload={"handler": "step"}, max_attempts=max_attempts))
                submitted = True
            final: list[Any] = []
            async with anyio.create_task_group() as tg:

                async def finish(sched: Scheduler, out: list[Any], scope: anyio.CancelScope) -> None:
                    await sched.wait("t", timeout=30)
                    out.append(await sched.get("t"))
                    scope.cancel()

                async def crash(event: anyio.Event, scope: anyio.CancelScope) -> None:
                    await event.wait()
                    scope.cancel()

                tg.start_soon(finish, sched, final, tg.cancel_scope)
                tg.start_soon(crash, crash_events[-1], tg.cancel_scope)
            if final:
                return runs, final[0]
        home = tmp / f"h{len(runs)}"
    raise AssertionError(f"never finished: {runs}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=attempt_plans, max_attempts=st.integers(min_value=1, max_value=4))
def test_attempts_never_exceed_max_attempts_across_crash_points(
    tmp_path_factory: pytest.TempPathFactory, plan: list[str], max_attempts: int
) -> None:
    tmp = tmp_path_factory.mktemp("crash")
    runs, final = anyio.run(_incarnations, tmp, plan, max_attempts)
    assert 1 <= len(runs) <= max_attempts, runs
    assert final.attempts == len(runs)
    if runs[-1] == "ok":
        assert final.status is TaskStatus.COMPLETED
    else:
        assert final.status is TaskStatus.FAILED and len(runs) == max_attempts
        if runs[-1] == "crash":
            assert f"during attempt {max_attempts} of {max_attempts}" in final.error


async def test_cancelling_one_attempt_at_its_start_gate_leaves_its_neighbours_running(tmp_path: Path) -> None:
    """Attempts started in one loop step share one commit gate. Cancelling one of them while
    it waits there used to cancel the shared gate: its neighbours' workers died with a stray
    CancelledError and took the scheduler's task group (and the whole infra) down."""
    settings = load_settings(env={}, home=tmp_path / "state", durable=True, shutdown_grace=0.2)
    async with Scheduler(
        settings,
        bus=EventBus(),
        metrics=InfraMetrics(),
        plugins=build_plugin_manager(load_entry_points=False),
        hardware=HW,
    ) as sched:
        for round_ in range(5):
            ids = [f"r{round_}-{i}" for i in range(4)]
            await sched.submit_many(
                [TaskSpec(ids[0], payload={"handler": "sleep", "seconds": 30})]
                + [TaskSpec(i, payload={"handler": "noop"}) for i in ids[1:]]
            )
            cancelled = await sched.cancel(ids[0])  # lands while the attempts wait on their gate
            assert cancelled.status is TaskStatus.CANCELLED
            for task_id in ids[1:]:
                assert (await sched.wait(task_id, timeout=10)).status is TaskStatus.COMPLETED
        await sched.submit(TaskSpec("after", payload={"handler": "noop"}))
        assert (await sched.wait("after", timeout=10)).status is TaskStatus.COMPLETED
