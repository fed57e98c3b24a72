"""Pruned ids in a durable store live on disk only (issue 11: a server's memory stays flat
over a long run): the ``pruned`` table refuses them through a trigger when the row is
written, including an id submitted again before its prune was committed."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from harness import NO_GPU, open_scheduler

from dspy_infra.errors import AlreadyExists, NotFound
from dspy_infra.models import TaskSpec, TaskStatus
from dspy_infra.scheduler.context import TaskContext


async def test_pruned_ids_take_no_memory_and_are_still_refused(tmp_path: Path) -> None:
    home = tmp_path / "state"
    async with open_scheduler(home, hardware=NO_GPU, durable=True, retention=5, shutdown_grace=0.2) as sched:
        specs = [TaskSpec(f"t{i}", payload={"handler": "noop"}) for i in range(200)]
        await sched.submit_many(specs)
        for spec in specs:
            # Tasks run as soon as their rows are in the log, before submit_many returns, so
            # the earliest may already be finished and pruned (NotFound) by now.
            with contextlib.suppress(NotFound):
                await sched.wait(spec.id, timeout=10)
        assert len(sched._tasks) <= 5
        assert sched._pruned == {}, "a durable scheduler keeps pruned ids on disk, not in memory"
        for again in (specs[0], TaskSpec("t0", payload={"handler": "noop", "v": 2})):
            with pytest.raises(AlreadyExists) as info:
                await sched.submit(again)
            assert info.value.field == "id" and "pruned" in str(info.value)
        same = await sched.submit_each([specs[1], TaskSpec("fresh", payload={"handler": "noop"})])
        assert isinstance(same[0], AlreadyExists) and "with the same content" in str(same[0])
        assert not isinstance(same[1], Exception)
        assert (await sched.wait("fresh", timeout=10)).status is TaskStatus.COMPLETED
    conn = sqlite3.connect(home / "state.db")
    try:
        assert conn.execute("SELECT count(*) FROM pruned").fetchone()[0] >= 195
        assert conn.execute("SELECT count(*) FROM tasks WHERE id = 't0'").fetchone()[0] == 0
    finally:
        conn.close()


@pytest.mark.parametrize("durable", [True, False])
async def test_an_id_resubmitted_before_its_prune_is_committed_never_runs_twice(
    tmp_path: Path, durable: bool
) -> None:
    """The prune of ``first`` is queued when ``second`` is delivered; submitting ``first``
    again right then lands in the same group commit as the prune."""
    runs: list[str] = []

    async def count(ctx: TaskContext) -> dict[str, Any]:
        runs.append(ctx.spec.id)
        return {}

    async with open_scheduler(
        tmp_path / "state", hardware=NO_GPU, durable=durable, retention=1, shutdown_grace=0.2
    ) as sched:
        sched.register_handler("count", count)
        first = TaskSpec("first", payload={"handler": "count"})
        for round_ in range(20):
            await sched.submit(
                first if round_ == 0 else TaskSpec(f"next{round_}", payload={"handler": "count"})
            )
            await sched.wait(first.id if round_ == 0 else f"next{round_}", timeout=10)
            if round_ >= 1:
                with pytest.raises(AlreadyExists):
                    await sched.submit(first)
    assert runs.count("first") == 1


async def test_a_prune_and_a_new_insert_of_that_id_in_one_batch_keep_the_prune(tmp_path: Path) -> None:
    """Deterministically in one group commit: the prune stands, the insert is refused."""
    import anyio

    from dspy_infra.errors import InfraError
    from dspy_infra.scheduler.store import PrunedId, SqliteStore
    from dspy_infra.scheduler.task import TaskRecord

    rejected: dict[str, InfraError] = {}
    store = SqliteStore(tmp_path / "state", on_rejected=rejected.update)
    await store.open()
    spec = TaskSpec("x", payload={"handler": "noop"})
    store.insert(TaskRecord(spec, 0, 1.0).insert_row())
    done = anyio.Event()
    store.after_commit(lambda error: done.set())
    await done.wait()
    # Queued in one loop step, so the writer takes them as one batch.
    store.prune("x", spec.content_hash)
    store.insert(TaskRecord(spec, 1, 2.0).insert_row())
    store.insert(TaskRecord(TaskSpec("y"), 2, 2.0).insert_row())
    done = anyio.Event()
    store.after_commit(lambda error: done.set())
    await done.wait()
    await store.aclose()
    assert set(rejected) == {"x"} and isinstance(rejected["x"], PrunedId)
    assert rejected["x"].content_hash == spec.content_hash
    conn = sqlite3.connect(tmp_path / "state" / "state.db")
    try:
        assert [r[0] for r in conn.execute("SELECT id FROM tasks")] == ["y"]
        assert [r[0] for r in conn.execute("SELECT id FROM pruned")] == ["x"]
    finally:
        conn.close()
