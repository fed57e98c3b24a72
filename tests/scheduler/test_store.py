"""The durable store: restart keeps results, recovery re-queues, group commit, retention, errors."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from harness import NO_GPU, open_scheduler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import task_specs

from dspy_infra.errors import FailedPrecondition, InfraError, NotFound, Unavailable
from dspy_infra.models import TaskSpec, TaskStatus
from dspy_infra.scheduler.scheduler import Scheduler
from dspy_infra.scheduler.store import SqliteStore, translate_sqlite_error

HW = NO_GPU


def durable(home: Path, **overrides: Any) -> contextlib.AbstractAsyncContextManager[Scheduler]:
    overrides.setdefault("shutdown_grace", 0.2)
    return open_scheduler(home, hardware=HW, durable=True, **overrides)


async def test_finished_results_survive_a_restart(state_dir: Path) -> None:
    async with durable(state_dir) as sched:
        await sched.submit(TaskSpec("ok", payload={"handler": "exec", "cmd": "printf 'ü done'"}))
        await sched.submit(TaskSpec("bad", payload={"handler": "fail", "message": "nope"}))
        await sched.wait("ok", timeout=5)
        await sched.wait("bad", timeout=5)
    async with durable(state_dir) as sched:
        ok = await sched.get("ok")
        assert ok.status is TaskStatus.COMPLETED and ok.result["stdout"] == "ü done"
        assert ok.spec == TaskSpec("ok", payload={"handler": "exec", "cmd": "printf 'ü done'"})
        bad = await sched.wait("bad", timeout=1)
        assert bad.status is TaskStatus.FAILED and bad.error == "nope"
        # Same id + same content is still the same task after the restart.
        again = await sched.submit(TaskSpec("ok", payload={"handler": "exec", "cmd": "printf 'ü done'"}))
        assert again.status is TaskStatus.COMPLETED and again.attempts == 1


async def test_queued_tasks_run_after_restart_and_interrupted_ones_count_the_attempt(state_dir: Path) -> None:
    serial = {
        "serial": {"min_concurrency": 1, "base_concurrency": 1, "max_concurrency": 1, "adaptive": False}
    }
    async with durable(state_dir, task_classes=serial) as sched:
        started = anyio.Event()
        sched.add_listener(lambda s: started.set() if s.status is TaskStatus.RUNNING else None)
        await sched.submit_many(
            [
                TaskSpec("long", "serial", {"handler": "sleep", "seconds": "30"}),
                TaskSpec("queued", "serial", {"handler": "noop"}, priority=-1),
            ]
        )
        with anyio.fail_after(5):
            await started.wait()
        # leaving now: "long" is interrupted after the grace time, "queued" never started
    async with durable(state_dir, task_classes=serial) as sched:
        assert (await sched.get("queued")).status in (TaskStatus.PENDING, TaskStatus.RUNNING)
        long = await sched.get("long")
        assert long.status is TaskStatus.RUNNING and long.attempts == 2, "re-run, attempt counted"
        await sched.cancel("long")
        done = await sched.wait("queued", timeout=5)
        assert done.status is TaskStatus.COMPLETED
        assert (await sched.get("queued")).attempts == 1


async def test_submit_returns_only_after_the_row_is_committed(state_dir: Path) -> None:
    async with durable(state_dir, commit_interval=0.05) as sched:
        await sched.submit(TaskSpec("slow", payload={"handler": "sleep", "seconds": "5"}))
        # Read with a second, independent connection: the row is on disk already.
        conn = sqlite3.connect(state_dir / "state.db")
        try:
            rows = conn.execute("SELECT id, status FROM tasks").fetchall()
        finally:
            conn.close()
        assert [r[0] for r in rows] == ["slow"]
        await sched.cancel("slow")


async def test_a_batch_is_one_group_commit(state_dir: Path) -> None:
    async with durable(state_dir, commit_interval=0.02) as sched:
        store = sched.store
        assert isinstance(store, SqliteStore)
        commits: list[str] = []
        lock = threading.Lock()

        def trace(statement: str) -> None:
            if statement == "COMMIT":
                with lock:
                    commits.append(statement)

        store.trace_statements(trace)
        specs = [TaskSpec(f"t{i}", payload={"handler": "noop"}) for i in range(500)]
        await sched.submit_many(specs)
        async for _ in sched.stream_results([s.id for s in specs]):
            pass
        # 500 inserts + 1000 state changes, grouped. Each attempt is committed before its
        # handler starts, so a worker waits for one commit per task it starts: at most one
        # transaction per task, shared by every worker that started one meanwhile.
        assert 1 <= len(commits) <= 500, len(commits)


async def test_retention_prunes_the_oldest_finished_rows_on_disk(state_dir: Path) -> None:
    async with durable(state_dir, retention=3) as sched:
        for i in range(8):
            await sched.submit(TaskSpec(f"r{i}", payload={"handler": "noop"}))
            await sched.wait(f"r{i}", timeout=5)
    conn = sqlite3.connect(state_dir / "state.db")
    try:
        ids = sorted(r[0] for r in conn.execute("SELECT id FROM tasks"))
    finally:
        conn.close()
    assert ids == ["r5", "r6", "r7"]
    async with durable(state_dir, retention=2) as sched:
        assert [s.id for s in await sched.list_tasks()] == ["r7", "r6"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(task_specs(), min_size=1, max_size=10, unique_by=lambda s: s.id))
def test_specs_round_trip_through_the_database(
    tmp_path_factory: pytest.TempPathFactory, specs: list[TaskSpec]
) -> None:
    home = tmp_path_factory.mktemp("state")

    async def scenario() -> None:
        async with durable(home) as sched:
            await sched.submit_many(specs)
            async for _ in sched.stream_results([s.id for s in specs]):
                pass
        async with durable(home) as sched:
            for s in specs:
                state = await sched.get(s.id)
                assert state.spec == s
                assert state.status is TaskStatus.COMPLETED

    anyio.run(scenario)


async def test_a_second_scheduler_on_the_same_state_dir_is_refused(state_dir: Path) -> None:
    async with durable(state_dir):
        with pytest.raises(Unavailable) as info:
            async with durable(state_dir):
                pass
        assert info.value.field == "state_dir" and "in use" in str(info.value)
    async with durable(state_dir):  # the lock went with the first one
        pass


async def test_a_corrupt_database_is_reported_with_the_fix(state_dir: Path) -> None:
    (state_dir / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(FailedPrecondition) as info:
        async with durable(state_dir):
            pass
    assert info.value.field == "state_dir" and "move" in (info.value.fix or "")
    # the failed open released its lock: a fixed directory works at once
    (state_dir / "state.db").unlink()
    async with durable(state_dir):
        pass


def test_translate_sqlite_error_is_the_one_mapping(tmp_path: Path) -> None:
    cases: list[tuple[BaseException, type[InfraError]]] = [
        (sqlite3.OperationalError("database is locked"), Unavailable),
        (sqlite3.DatabaseError("file is not a database"), FailedPrecondition),
        (sqlite3.OperationalError("disk I/O error"), Unavailable),
        (PermissionError(13, "Permission denied"), Unavailable),
        (sqlite3.IntegrityError("whatever"), Unavailable),
    ]
    for exc, kind in cases:
        err = translate_sqlite_error(exc, tmp_path / "state.db")
        assert type(err) is kind, (exc, err)
        assert str(tmp_path) in str(err)


class FailingDisk:
    """Test double for a failing disk (cannot be provoked for real here: we run as root on
    a roomy filesystem): a connection proxy whose transactions fail like a full disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.failing = True

    def execute(self, sql: str, *args: Any) -> Any:
        if self.failing and sql == "BEGIN":
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def close(self) -> None:
        self.conn.close()


async def test_a_failed_commit_reaches_the_submitter_and_the_writer_survives(state_dir: Path) -> None:
    async with durable(state_dir) as sched:
        store = sched.store
        assert isinstance(store, SqliteStore)
        disk = store.wrap_connection(FailingDisk)
        with pytest.raises(Unavailable) as info:
            await sched.submit(TaskSpec("lost-write", payload={"handler": "sleep", "seconds": "5"}))
        assert "disk is full" in str(info.value) and info.value.fix
        with pytest.raises(NotFound):
            await sched.get("lost-write")  # not accepted: no trace, a retry is a fresh submit
        disk.failing = False
        await sched.submit(TaskSpec("next", payload={"handler": "noop"}))
        assert (await sched.wait("next", timeout=5)).status is TaskStatus.COMPLETED


@settings(max_examples=200)
@given(st.dictionaries(st.text(), st.text(), max_size=5))
def test_the_fast_json_of_string_maps_is_json(value: dict[str, str]) -> None:
    import json

    from dspy_infra.scheduler.store import encode_str_map

    assert json.loads(encode_str_map(value)) == value
    assert encode_str_map(value) == json.dumps(value, separators=(",", ":"))
