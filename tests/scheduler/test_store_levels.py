"""The store's two levels of "saved" (issue 11): ``after_write`` once every row queued before
it is committed to the write-ahead log (safe from this process's death: what an attempt
record needs), ``after_commit`` once those rows are also flushed to the disk (what an
acknowledgement and a delivered result need). Attempts of in-process handlers wait for the
first, ``exec``/``container`` attempts and acknowledgements for the second.

Checked against the real database: each callback reads the rows through a second SQLite
connection, and a flush counter wrapped around the store's ``fdatasync`` shows that an
``after_commit`` callback never runs before a flush that began after its rows were written.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from harness import NO_GPU
from hypothesis import HealthCheck, given, settings
from strategies import store_op_plans

from dspy_infra.config import load_settings
from dspy_infra.errors import DeadlineExceeded, InfraError
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskSpec, TaskStatus
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler import store as store_module
from dspy_infra.scheduler.scheduler import Scheduler
from dspy_infra.scheduler.store import SqliteStore
from dspy_infra.scheduler.task import TaskRecord


class FlushCounter:
    """Counts flushes of the log that have *finished*, and which write each one covered."""

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.lock = threading.Lock()
        self.real = os.fdatasync

    def __call__(self, fd: int) -> None:
        with self.lock:
            self.started += 1
            number = self.started
        self.real(fd)
        with self.lock:
            self.finished = max(self.finished, number)


@pytest.fixture
def stalled_flush(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The store's ``fdatasync`` hangs until the event is set, then flushes for real."""
    release = threading.Event()
    real = os.fdatasync

    def stalled(fd: int) -> None:
        release.wait(30)
        real(fd)

    monkeypatch.setattr(store_module.os, "fdatasync", stalled)
    yield release
    release.set()  # nothing may hang past its test


def _attempts(path: Path) -> dict[str, int]:
    """Task id -> attempts, as a second connection reads the database now."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT id, attempts FROM tasks").fetchall())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=store_op_plans)
def test_each_callback_runs_only_once_its_level_covers_every_earlier_row(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, plan: list[tuple[str, int]]
) -> None:
    home = tmp_path_factory.mktemp("levels")
    flushes = FlushCounter()
    monkeypatch.setattr(store_module.os, "fdatasync", flushes)
    problems: list[str] = []
    fired: list[str] = []

    async def run() -> None:
        store = SqliteStore(home)
        await store.open()
        expected: dict[str, int] = {}
        records: list[TaskRecord] = []
        pending = 0
        all_done = anyio.Event()

        def check(kind: str, want: dict[str, int], flushes_before: int) -> Any:
            def callback(error: InfraError | None) -> None:
                nonlocal pending
                pending -= 1
                fired.append(kind)
                if error is not None:
                    problems.append(f"{kind}: {error}")
                seen = _attempts(store.path)
                # A row may already hold a later change (queued after this callback), never an
                # older one: attempts only grow.
                missing = [k for k, attempts in want.items() if k not in seen or seen[k] < attempts]
                if missing:
                    problems.append(f"{kind} ran before {len(missing)} earlier rows were committed")
                if kind == "after_commit" and flushes.finished <= flushes_before:
                    problems.append("after_commit ran before a flush covering its rows")
                if pending == 0:
                    all_done.set()

            return callback

        for op, n in plan:
            if op == "insert":
                for _ in range(n):
                    rec = TaskRecord(TaskSpec(f"t{len(records)}"), len(records), 1.0)
                    records.append(rec)
                    store.insert(rec.insert_row())
                    expected[rec.spec.id] = 0
            elif op == "update":
                for rec in records[-n:]:
                    rec.status = TaskStatus.RUNNING
                    rec.attempts += 1
                    store.put(rec.update_row())
                    expected[rec.spec.id] = rec.attempts
            elif op == "yield":
                await anyio.lowlevel.checkpoint()
            else:
                pending += 1
                with flushes.lock:
                    before = flushes.started
                callback = check(op, dict(expected), before)
                if op == "after_write":
                    store.after_write(callback)
                else:
                    store.after_commit(callback)
        if pending:
            with anyio.fail_after(30):
                await all_done.wait()
        await store.aclose()
        # Everything queued is on disk after close, whatever was waited on.
        assert _attempts(store.path) == expected

    anyio.run(run)
    assert problems == []
    assert len(fired) == sum(1 for op, _ in plan if op in ("after_write", "after_commit"))


def test_a_written_callback_does_not_wait_for_a_stalled_flush_but_an_acknowledgement_does(
    tmp_path: Path, stalled_flush: threading.Event
) -> None:
    """While the disk flush hangs, rows still reach the log and ``after_write`` callbacks
    run; ``after_commit`` (acknowledgements, results) waits for the flush."""
    release = stalled_flush
    order: list[str] = []

    async def run() -> None:
        store = SqliteStore(tmp_path / "state")
        await store.open()
        store.insert(TaskRecord(TaskSpec("a"), 0, 1.0).insert_row())
        committed, written = anyio.Event(), anyio.Event()

        def on_commit(error: object) -> None:
            order.append("commit")
            committed.set()

        def on_write(error: object) -> None:
            order.append("write")
            written.set()

        store.after_commit(on_commit)
        store.insert(TaskRecord(TaskSpec("b"), 1, 1.0).insert_row())
        store.after_write(on_write)
        with anyio.fail_after(10):
            await written.wait()
        assert set(_attempts(store.path)) == {"a", "b"}
        assert not committed.is_set(), "acknowledged before the flush"
        release.set()
        with anyio.fail_after(10):
            await committed.wait()
        await store.aclose()

    anyio.run(run)
    assert order == ["write", "commit"]


@pytest.mark.parametrize("handler", ["probe", "exec"])
async def test_an_exec_attempt_starts_only_after_its_record_is_flushed(
    tmp_path: Path, stalled_flush: threading.Event, handler: str
) -> None:
    """issue 8: an exec attempt is on disk before its process starts. An in-process handler's
    attempt needs only the log (its guard is against this process's death), so it starts
    while the flush hangs, before the submit that acknowledges it returns (the task is queued
    once its row is in the log; only the acknowledgement waits for the flush)."""
    release = stalled_flush
    marker = tmp_path / "ran"
    cfg = load_settings(env={}, home=tmp_path / "state", durable=True, shutdown_grace=0.2)
    pm = build_plugin_manager(load_entry_points=False)
    try:
        async with Scheduler(
            cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=pm, hardware=NO_GPU
        ) as sched:

            async def probe(ctx: Any) -> dict[str, Any]:
                marker.touch()
                return {}

            sched.register_handler("probe", probe)
            payload: dict[str, Any] = {"handler": handler}
            if handler == "exec":
                payload["cmd"] = f"touch {marker}"
            acknowledged = anyio.Event()

            async def submit() -> None:
                await sched.submit(TaskSpec("t", payload=payload))
                acknowledged.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(submit)
                with anyio.move_on_after(1.0 if handler == "exec" else 10.0):
                    while not marker.exists():  # noqa: ASYNC110 (a file written by another process)
                        await anyio.sleep(0.01)
                assert not acknowledged.is_set(), "acknowledged before the flush"
                if handler == "exec":
                    assert not marker.exists(), "the exec process started before its attempt was flushed"
                else:
                    assert marker.exists(), "an in-process attempt waited for the disk flush"
                release.set()
            result = await sched.wait("t", timeout=20)
            assert result.status is TaskStatus.COMPLETED, result.error
            assert marker.exists()
    finally:
        release.set()


async def test_submit_and_wait_flushes_once_per_task_and_a_timeout_answers_only_after_the_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is acknowledged before the result, so the row needs only the log before it
    runs and the result's flush covers both rows: one flush per task, where submit then
    wait takes two. A timeout says the task stays queued, so its row is flushed first; an
    acknowledged resubmit of a task accepted this way waits for a flush too."""
    flushes = FlushCounter()
    monkeypatch.setattr(store_module.os, "fdatasync", flushes)
    cfg = load_settings(env={}, home=tmp_path / "state", durable=True, shutdown_grace=0.2)
    pm = build_plugin_manager(load_entry_points=False)
    async with Scheduler(cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=pm, hardware=NO_GPU) as sched:
        await sched.submit_and_wait(TaskSpec("warm", payload={"handler": "noop"}), timeout=10)
        before = flushes.finished
        for i in range(20):
            result = await sched.submit_and_wait(TaskSpec(f"sw{i}", payload={"handler": "noop"}), timeout=10)
            assert result.status is TaskStatus.COMPLETED
        one_call = flushes.finished - before
        before = flushes.finished
        for i in range(20):
            await sched.submit(TaskSpec(f"two{i}", payload={"handler": "noop"}))
            await sched.wait(f"two{i}", timeout=10)
        two_calls = flushes.finished - before
        # submit then wait: a flush before the acknowledgement, one before the result (they
        # may coincide when the task ends before the first flush starts).
        assert one_call <= 20 <= two_calls <= 40, (one_call, two_calls)

        slow = TaskSpec("slow", payload={"handler": "sleep", "seconds": 30})
        with pytest.raises(DeadlineExceeded):
            await sched.submit_and_wait(slow, timeout=0.2)
        assert "slow" in _attempts(sched.settings.resolved_home() / "state.db")
        marked = flushes.started
        state = await sched.submit(slow)  # acknowledged: waits for a flush of its own
        assert state.id == "slow" and flushes.finished > marked
        await sched.cancel("slow")


async def test_a_lone_exec_task_s_submit_flush_records_its_attempt_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exec attempt must be on disk before its process starts. A lone task submitted while
    a slot is free starts with its submit, its inserted row recording the attempt: the flush
    that acknowledges the submit covers the attempt too, so submit then wait costs two
    flushes (acknowledgement, result), not three. The row on disk says attempt 1 before the
    command runs (the command reads it through its own connection)."""
    flushes = FlushCounter()
    monkeypatch.setattr(store_module.os, "fdatasync", flushes)
    cfg = load_settings(env={}, home=tmp_path / "state", durable=True, shutdown_grace=0.2)
    pm = build_plugin_manager(load_entry_points=False)
    db = tmp_path / "state" / "state.db"
    query = "SELECT status, attempts FROM tasks WHERE id = ?"
    probe = f"import sqlite3, sys; print(sqlite3.connect({str(db)!r}).execute({query!r}, (sys.argv[1],)).fetchone())"
    async with Scheduler(cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=pm, hardware=NO_GPU) as sched:
        await sched.submit(TaskSpec("warm", payload={"handler": "exec", "cmd": "true"}))
        await sched.wait("warm", timeout=20)
        before = flushes.finished
        for i in range(10):
            await sched.submit(TaskSpec(f"e{i}", payload={"handler": "exec", "cmd": "true"}))
            result = await sched.wait(f"e{i}", timeout=20)
            assert result.status is TaskStatus.COMPLETED, result.error
        assert flushes.finished - before <= 20, flushes.finished - before
        argv = [sys.executable, "-c", probe, "row"]
        await sched.submit(TaskSpec("row", payload={"handler": "exec", "cmd": argv}))
        result = await sched.wait("row", timeout=20)
        assert result.status is TaskStatus.COMPLETED, result.error
        assert result.result["stdout"].strip() == "('running', 1)"


def test_a_wakeup_is_never_lost_between_a_setter_and_its_sleeper() -> None:
    """The store's threads sleep on ``_Wakeup`` (a lock used as a binary semaphore): whatever
    the interleaving, an item appended before ``set`` is seen by the sleeper's next drain,
    and a set nobody consumed yet is not doubled (a second release would raise)."""
    from collections import deque

    from dspy_infra.scheduler.store import _Wakeup

    wake, items, seen = _Wakeup(), deque[int](), list[int]()
    n = 20_000

    def sleeper() -> None:
        while len(seen) < n:
            if not wake.wait(10):
                return  # lost: the assertion below says so
            if len(seen) % 7 == 0:
                wake.clear()  # as the writer does after its window
            while items:
                seen.append(items.popleft())

    thread = threading.Thread(target=sleeper)
    thread.start()
    for i in range(n):
        items.append(i)
        wake.set()
    thread.join(30)
    assert seen == list(range(n))
