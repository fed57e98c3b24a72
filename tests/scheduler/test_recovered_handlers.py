"""Tasks recovered after a restart wait for a handler the app registers after start.

An app typically does ``infra = await ensure_infra()`` and then ``@infra.handler("embed")``;
tasks recovered from the store are dispatched as the scheduler starts, before that line runs.
They must wait for the handler (up to ``handler_grace``), not fail for lack of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness import open_scheduler

from dspy_infra.models import TaskSpec, TaskStatus
from dspy_infra.scheduler.context import TaskContext
from dspy_infra.scheduler.scheduler import Scheduler


def scheduler(home: Path, **overrides: Any) -> contextlib.AbstractAsyncContextManager[Scheduler]:
    return open_scheduler(home, durable=True, shutdown_grace=0.1, **overrides)


async def forever(ctx: TaskContext) -> Mapping[str, str]:
    await asyncio.Event().wait()
    return {}


async def leave_running_task(home: Path) -> None:
    """A first process accepted `t1` (handler `late`) and stopped while it ran."""
    async with scheduler(home) as s:
        s.register_handler("late", forever)
        await s.submit(TaskSpec("t1", payload={"handler": "late"}))
        for _ in range(200):
            if (await s.get("t1")).status is TaskStatus.RUNNING:
                break
            await asyncio.sleep(0.01)
        assert (await s.get("t1")).status is TaskStatus.RUNNING


async def test_recovered_task_waits_for_a_handler_registered_after_start(tmp_path: Path) -> None:
    await leave_running_task(tmp_path)
    async with scheduler(tmp_path, handler_grace=30) as s:
        await asyncio.sleep(0.3)
        parked = await s.get("t1")
        assert parked.status is TaskStatus.PENDING, parked.error

        async def late(ctx: TaskContext) -> Mapping[str, str]:
            return {"attempt": str(ctx.attempt)}

        s.register_handler("late", late)
        done = await s.wait("t1", timeout=5)
    assert done.status is TaskStatus.COMPLETED
    # The interrupted attempt counts; waiting for the handler does not.
    assert done.result == {"attempt": "2"}


async def test_recovered_task_fails_naming_known_handlers_after_the_grace(tmp_path: Path) -> None:
    await leave_running_task(tmp_path)
    async with scheduler(tmp_path, handler_grace=0.3) as s:
        done = await s.wait("t1", timeout=5)
    assert done.status is TaskStatus.FAILED
    assert "no handler named 'late'" in done.error and "known handlers" in done.error


async def test_a_new_task_with_an_unknown_handler_still_fails_at_once(tmp_path: Path) -> None:
    async with scheduler(tmp_path, handler_grace=30) as s:
        await s.submit(TaskSpec("new", payload={"handler": "nope"}))
        done = await s.wait("new", timeout=2)
    assert done.status is TaskStatus.FAILED and "known handlers" in done.error


async def test_cancel_while_waiting_for_a_handler(tmp_path: Path) -> None:
    await leave_running_task(tmp_path)
    async with scheduler(tmp_path, handler_grace=30) as s:
        await asyncio.sleep(0.2)
        state = await s.cancel("t1")
        assert state.status is TaskStatus.CANCELLED
        s.register_handler("late", forever)  # releasing a cancelled task must not run it
        await asyncio.sleep(0.1)
        assert (await s.get("t1")).status is TaskStatus.CANCELLED
