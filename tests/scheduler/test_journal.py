"""The attempt journal: in-process attempts are recorded from the loop (one ``os.write``), their
rows follow through group commit; a kill at any point must leave every started attempt counted
on the next start, and no attempt counted that did not start.

The property test drives a real ``SqliteStore``: its connection is wrapped so that the writer
thread can be held before a batch (rows queued but not in the log, as at a kill), and the
"kill" copies what a crash leaves on disk (the journal files, then the database through
SQLite's backup API) into a fresh directory that a new store opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from harness import NO_GPU, crash_image, open_scheduler
from hypothesis import HealthCheck, given, settings
from strategies import attempt_journal_plans, submit_and_wait_plans

from dspy_infra.config import load_settings
from dspy_infra.errors import AlreadyExists, NotFound, SpecError
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskSpec, TaskStatus
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.journal import JOURNAL_FILE_NAMES, AttemptJournal, JournalContents, parse_journal
from dspy_infra.scheduler.scheduler import Scheduler
from dspy_infra.scheduler.store import SqliteStore
from dspy_infra.scheduler.task import TaskRecord

IDS = ("plain", 'odd "id"\nwith a newline', "ünï ✓")
#: Tasks submitted during the plan, starting at their submit (their rows journaled whole).
LATE_IDS = ("late", 'late "odd"\n✓')


class Held:
    """The writer's connection, held before each statement while ``go`` is clear."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.go = threading.Event()
        self.go.set()
        #: When set, a prune's statements wait (in its open transaction) for ``prunes_go``.
        self.prunes_wait = False
        self.prunes = threading.Event()
        self.prunes_go = threading.Event()

    def execute(self, *args: Any) -> Any:
        self.go.wait(30)
        if self.prunes_wait and str(args[0]).startswith("DELETE"):
            self.prunes.set()
            self.prunes_go.wait(30)
        return self.conn.execute(*args)

    def close(self) -> None:
        self.conn.close()


@contextlib.asynccontextmanager
async def _writer_held(sched: Scheduler) -> AsyncIterator[Held]:
    """No row of ``sched`` reaches the store's log inside the block."""
    assert isinstance(sched.store, SqliteStore)
    held = sched.store.wrap_connection(Held)
    held.go.clear()
    try:
        yield held
    finally:
        held.go.set()


async def _crash_once_running(ran: anyio.Event, home: Path, image: Path) -> None:
    """Once the handler runs, copy what a crash would leave of ``home`` into ``image``."""
    with anyio.fail_after(10):
        await ran.wait()
    await anyio.sleep(0.01)
    crash_image(home, image)


async def _written(store: SqliteStore) -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    store.after_write(lambda error: fut.set_result(None))
    await fut


async def _run_plan(tmp: Path, plan: list[tuple[str, int]]) -> tuple[dict[str, int], dict[str, Any]]:
    """Play ``plan`` on a live store, kill, reopen: (attempts started per id, what was found)."""
    store = SqliteStore(tmp / "live", journal_rotate_bytes=16)  # rotates every attempt or two
    await store.open()
    held = store.wrap_connection(Held)
    recs: dict[str, TaskRecord] = {}
    pruned: set[str] = set()
    #: Finished tasks whose end is in the log: only those are delivered, and so pruned.
    delivered: set[str] = set()
    try:
        for seq, task_id in enumerate((*IDS, *LATE_IDS)):
            recs[task_id] = TaskRecord(TaskSpec(task_id, payload={"handler": "noop"}), seq, 1.0)
        for task_id in IDS:
            store.insert(recs[task_id].insert_row())
        await _written(store)
        held.go.clear()  # from here on rows wait for a "commit" step
        started = dict.fromkeys(IDS, 0)
        for what, index in plan:
            rec = recs[(*IDS, *LATE_IDS)[index]]
            task_id = rec.spec.id
            if what == "commit":
                held.go.set()
                await _written(store)
                held.go.clear()
                delivered.update(i for i, r in recs.items() if r.status.terminal)
            elif task_id in pruned:
                continue
            elif what == "prune":
                if task_id in delivered:
                    store.prune(task_id, rec.spec.content_hash)
                    pruned.add(task_id)
                    assert store.is_pruned(task_id), "a queued prune counts at once"
            elif rec.status.terminal:
                continue
            elif what == "start" and task_id not in started:
                # Submitted and started at once (Scheduler._intake for submit_and_wait).
                assert not store.is_pruned(task_id)
                rec.status, rec.attempts = TaskStatus.RUNNING, 1
                store.record_started([rec.insert_row()])
                started[task_id] = 1
            elif what == "start" and rec.status is not TaskStatus.RUNNING:
                rec.status, rec.attempts = TaskStatus.RUNNING, rec.attempts + 1
                store.put(rec.update_row())  # queued first, as Scheduler._start does
                store.record_attempts([(task_id, rec.attempts)])
                started[task_id] = rec.attempts
            elif what in ("fail", "complete") and rec.status is TaskStatus.RUNNING:
                rec.status = TaskStatus.PENDING if what == "fail" else TaskStatus.COMPLETED
                store.put(rec.update_row())
        await anyio.sleep(0.01)  # let the writer reach its held statement with what it took
        crash_image(tmp / "live", tmp / "image")
    finally:
        held.go.set()
        await store.aclose()
    again = SqliteStore(tmp / "image")
    opened = await again.open()
    try:
        refused = {task_id for task_id in pruned if again.is_pruned(task_id)}
        journal_after = AttemptJournal(tmp / "image").read()
    finally:
        await again.aclose()
    found = {row.spec.id: (row.status, row.attempts) for row in opened.tasks}
    return started, {
        "rows": found,
        "pruned": pruned,
        "pruned_refused_after": refused,
        "journal_after_open": (journal_after.attempts, journal_after.rows),
    }


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=attempt_journal_plans)
def test_a_kill_at_any_point_counts_every_started_attempt_and_no_other(
    tmp_path_factory: pytest.TempPathFactory, plan: list[tuple[str, int]]
) -> None:
    started, after = anyio.run(_run_plan, tmp_path_factory.mktemp("journal"), plan)
    rows, pruned = after["rows"], after["pruned"]
    # A pruned task's row may be gone or not yet (its prune not in the log at the kill), but
    # it never comes back from the journal as unfinished work.
    kept = {task_id: row for task_id, row in rows.items() if task_id not in pruned}
    assert set(kept) == set(started) - pruned, "no task lost, none made up (a late one only once started)"
    for task_id in pruned & set(rows):
        assert rows[task_id][0] is TaskStatus.COMPLETED, (task_id, rows[task_id])
    for task_id, attempts in started.items():
        if task_id in pruned:
            continue
        status, found = rows[task_id]
        # Lost: an attempt that ran but is not counted (it could run once too often).
        # Phantom: an attempt counted that never started (a task failed for nothing).
        assert found == attempts, (task_id, status, found, attempts)
        if not status.terminal and attempts:
            # Running at the kill, or its end not yet in the log: that attempt was
            # interrupted (recovery retries it only while attempts remain).
            assert status in (TaskStatus.RUNNING, TaskStatus.PENDING)
    gone = pruned - set(rows)
    assert after["pruned_refused_after"] >= gone, "a pruned id whose row is gone stays refused"
    assert after["journal_after_open"] == ({}, {}), "opening applies the journal, then empties it"


def test_torn_and_foreign_lines_are_skipped() -> None:
    seen = JournalContents()
    row = ["r", 7, "cpu_short", 0, None, 3, "", "{}", "running", 2, "", "", 1.0, 1.5, 0.0, 0.0]
    data = b'"a" 1\n"a" 3\n"b" 2\n"a" 2\n"c" 4\n"torn\n[1] 5\n"d" x\n"e\n'
    data += b"+" + json.dumps(row).encode() + b"\n+" + json.dumps(row).encode()[:30] + b"\n+[1,2]\n+{}\n"
    parse_journal(data, seen)
    assert seen.attempts == {"a": 3, "b": 2, "c": 4, "r": 2}
    assert seen.rows == {"r": row} and seen.replayable_rows() == {"r": row}
    parse_journal(b'-"r"\n-"torn\n-[1]\n', seen)  # (in either file: the order of files does not matter)
    assert seen.refused == {"r"} and seen.replayable_rows() == {}


async def test_in_process_attempts_do_not_wait_for_the_writer_thread(tmp_path: Path) -> None:
    """While the writer thread is held, an in-process attempt still starts (its record is the
    journal's), and a kill then leaves it counted; its row follows later."""
    one = {"min_concurrency": 1, "base_concurrency": 1, "max_concurrency": 1, "adaptive": False}
    cfg = load_settings(
        env={}, home=tmp_path / "state", durable=True, shutdown_grace=0.2, task_classes={"one": one}
    )
    pm = build_plugin_manager(load_entry_points=False)
    release, ran = anyio.Event(), anyio.Event()
    async with Scheduler(cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=pm, hardware=NO_GPU) as sched:

        async def blocker(ctx: Any) -> dict[str, Any]:
            await release.wait()
            return {}

        async def probe(ctx: Any) -> dict[str, Any]:
            ran.set()
            await anyio.sleep(3600)
            return {}

        sched.register_handler("blocker", blocker)
        sched.register_handler("probe", probe)
        await sched.submit(TaskSpec("first", "one", {"handler": "blocker"}))
        await sched.submit(TaskSpec("t", "one", {"handler": "probe"}, max_attempts=1))  # queued
        async with _writer_held(sched):
            release.set()  # "t" starts now, while no row can reach the log
            await _crash_once_running(ran, cfg.resolved_home(), tmp_path / "image")
        rows = sqlite3.connect(tmp_path / "image" / "state.db").execute(
            "SELECT status, attempts FROM tasks WHERE id = 't'"
        )
        assert rows.fetchall() == [("pending", 0)], "the row had not followed yet"
        await sched.cancel("t")
    cfg2 = load_settings(
        env={}, home=tmp_path / "image", durable=True, shutdown_grace=0.2, task_classes={"one": one}
    )
    async with Scheduler(cfg2, bus=EventBus(), metrics=InfraMetrics(), plugins=pm, hardware=NO_GPU) as sched:
        state = await sched.get("t")
        assert state.status is TaskStatus.FAILED and state.attempts == 1, state
        assert "during attempt 1 of 1" in state.error


async def test_a_journaled_attempt_the_database_refuses_fails_alone_at_start(tmp_path: Path) -> None:
    """Replaying the journal must not keep the store from starting: a row the database refuses
    keeps what it had (and the refusal is logged), the others take their attempts."""
    home = tmp_path / "state"
    store = SqliteStore(home)
    await store.open()
    for seq, task_id in enumerate(("refused", "fine")):
        store.insert(TaskRecord(TaskSpec(task_id, payload={"handler": "noop"}), seq, 1.0).insert_row())
    await _written(store)
    await store.aclose()
    conn = sqlite3.connect(home / "state.db")
    try:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON tasks WHEN OLD.id = 'refused'"
            " BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
        )
        conn.commit()
    finally:
        conn.close()
    (home / JOURNAL_FILE_NAMES[1]).write_bytes(b'"refused" 2\n"fine" 3\n')
    again = SqliteStore(home)
    opened = await again.open()
    await again.aclose()
    found = {row.spec.id: (row.status, row.attempts) for row in opened.tasks}
    assert found == {"refused": (TaskStatus.PENDING, 0), "fine": (TaskStatus.RUNNING, 3)}


async def test_submit_and_wait_starts_a_task_before_its_row_is_in_the_log(tmp_path: Path) -> None:
    """``submit_and_wait`` acknowledges nothing before the result, so an in-process task
    starts at once, its whole row in the journal: with the writer thread held it still runs,
    and a kill then leaves it found and counted (it takes its process down at most
    ``max_attempts`` times). Its result waits for the flush of both rows."""
    cfg = load_settings(env={}, home=tmp_path / "state", durable=True, shutdown_grace=0.2)
    pm = build_plugin_manager(load_entry_points=False)
    ran = anyio.Event()
    async with Scheduler(cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=pm, hardware=NO_GPU) as sched:

        async def probe(ctx: Any) -> dict[str, Any]:
            ran.set()
            await anyio.sleep(3600)
            return {}

        sched.register_handler("probe", probe)
        async with _writer_held(sched):
            waiter = asyncio.ensure_future(
                sched.submit_and_wait(TaskSpec("t", payload={"handler": "probe"}, max_attempts=1))
            )
            await _crash_once_running(ran, cfg.resolved_home(), tmp_path / "image")
        rows = sqlite3.connect(tmp_path / "image" / "state.db").execute("SELECT id FROM tasks")
        assert rows.fetchall() == [], "the row had not reached the log"
        await sched.cancel("t")
        result = await waiter
        assert result.status is TaskStatus.CANCELLED
    cfg2 = load_settings(env={}, home=tmp_path / "image", durable=True, shutdown_grace=0.2)
    async with Scheduler(cfg2, bus=EventBus(), metrics=InfraMetrics(), plugins=pm, hardware=NO_GPU) as sched:
        state = await sched.get("t")
        assert state.status is TaskStatus.FAILED and state.attempts == 1, state
        assert "during attempt 1 of 1" in state.error
        assert state.spec.payload == {"handler": "probe"}


@pytest.mark.parametrize("prune_in_the_log", [True, False], ids=["pruned-in-log", "prune-still-queued"])
async def test_submit_and_wait_never_runs_a_pruned_id_again(tmp_path: Path, prune_in_the_log: bool) -> None:
    """A task starting at its submit runs before the store's trigger could refuse a pruned id:
    the id is checked first, in the database or among the prunes still queued for it."""
    # (a state directory whose path a URI must escape: the store's read-only connection is
    # opened by URI)
    cfg = load_settings(env={}, home=tmp_path / "state ?#%20 ü", durable=True, retention=1)
    pm = build_plugin_manager(load_entry_points=False)
    runs: dict[str, int] = {}
    async with Scheduler(cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=pm, hardware=NO_GPU) as sched:

        async def count(ctx: Any) -> dict[str, Any]:
            runs[ctx.spec.id] = runs.get(ctx.spec.id, 0) + 1
            return {}

        sched.register_handler("count", count)
        assert isinstance(sched.store, SqliteStore)
        held = sched.store.wrap_connection(Held)
        await sched.submit_and_wait(TaskSpec("a", payload={"handler": "count"}))
        held.prunes_wait = not prune_in_the_log  # "a"'s prune then waits in its transaction
        await sched.submit_and_wait(TaskSpec("b", payload={"handler": "count"}))  # "a" leaves
        assert "a" not in sched._tasks, "a left retention"
        if prune_in_the_log:
            await sched.submit_and_wait(TaskSpec("c", payload={"handler": "count"}))  # after a's prune
            # The answer comes from the database (no prune is queued now), and is exact.
            assert sched.store.is_pruned("a") and not sched.store.is_pruned("never-submitted")
        else:
            await anyio.to_thread.run_sync(held.prunes.wait, 10)
        again = asyncio.ensure_future(sched.submit_and_wait(TaskSpec("a", payload={"handler": "count"})))
        await anyio.sleep(0.05)
        held.prunes_go.set()
        with pytest.raises(AlreadyExists, match="pruned|already"):
            await again
    assert runs.get("a") == 1 and runs.get("b") == 1


async def test_a_started_task_whose_row_the_database_refused_does_not_come_back(tmp_path: Path) -> None:
    """A task that started at its submit runs before the database sees its row. If the
    database then refuses the row, the submitter gets the error (the task was never
    accepted), and the journal must not bring the row back at the next start, even once
    the database would take it (a full disk that has space again)."""
    home = tmp_path / "state"
    store = SqliteStore(home)
    await store.open()
    await store.aclose()
    conn = sqlite3.connect(home / "state.db")
    conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON tasks WHEN NEW.id = 'refused'"
        " BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
    )
    conn.commit()
    conn.close()
    cfg = load_settings(env={}, home=home, durable=True, shutdown_grace=0.2)
    pm = build_plugin_manager(load_entry_points=False)
    runs: list[str] = []

    async def count(ctx: Any) -> dict[str, Any]:
        runs.append(ctx.spec.id)
        return {}

    async with Scheduler(cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=pm, hardware=NO_GPU) as sched:
        sched.register_handler("count", count)
        with pytest.raises(SpecError, match="could not be stored"):
            await sched.submit_and_wait(TaskSpec("refused", payload={"handler": "count"}))
        fine = await sched.submit_and_wait(TaskSpec("fine", payload={"handler": "count"}))
        assert fine.status is TaskStatus.COMPLETED
    # "refused" started at its submit; whether its handler ran before the refusal came back
    # is a race (a refused task that has not run yet never does).
    assert runs in (["refused", "fine"], ["fine"]), runs
    conn = sqlite3.connect(home / "state.db")
    conn.execute("DROP TRIGGER refuse")
    conn.commit()
    conn.close()
    async with Scheduler(cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=pm, hardware=NO_GPU) as sched:
        assert (await sched.get("fine")).status is TaskStatus.COMPLETED
        with pytest.raises(NotFound):
            await sched.get("refused")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=submit_and_wait_plans)
def test_tasks_started_at_their_submit_run_once_whatever_is_resubmitted_or_pruned(
    tmp_path_factory: pytest.TempPathFactory, plan: list[list[tuple[str, int, str]]]
) -> None:
    """``submit_and_wait`` starts a lone task at once, before its row is written: concurrent
    and repeated submissions of the same ids (same or other content, through any intake,
    before and after the id left retention) never run an id twice, never accept other
    content for an id, and each accepted ``submit_and_wait`` gets the task's result."""
    home = tmp_path_factory.mktemp("sw")

    async def scenario() -> tuple[Counter[str], dict[str, int], list[tuple[str, int, bool]]]:
        runs = Counter[str]()
        ran_with: dict[str, int] = {}

        async def count(ctx: Any) -> dict[str, Any]:
            runs[ctx.spec.id] += 1
            ran_with[ctx.spec.id] = int(ctx.spec.payload["variant"])
            await anyio.lowlevel.checkpoint()
            return {"variant": ctx.spec.payload["variant"]}

        outcomes: list[tuple[str, int, bool]] = []
        async with open_scheduler(home, durable=True, retention=2, shutdown_grace=0.5) as sched:
            sched.register_handler("count", count)

            async def one(task_id: str, variant: int, how: str) -> None:
                spec = TaskSpec(task_id, payload={"handler": "count", "variant": variant})
                try:
                    if how == "submit_and_wait":
                        result = await sched.submit_and_wait(spec, timeout=10)
                        assert result.status is TaskStatus.COMPLETED, result
                        assert result.result == {"variant": variant}
                    elif how == "submit":
                        await sched.submit(spec)
                    else:
                        await sched.submit_many([spec, spec])
                except AlreadyExists:
                    outcomes.append((task_id, variant, False))
                    return
                outcomes.append((task_id, variant, True))
                with contextlib.suppress(NotFound):  # (gone: finished and already pruned)
                    await sched.wait(task_id, timeout=10)

            for round_ in plan:
                await asyncio.gather(*(one(*submission) for submission in round_))
        return runs, ran_with, outcomes

    runs, ran_with, outcomes = anyio.run(scenario)
    assert all(n == 1 for n in runs.values()), runs
    for task_id, variant, accepted in outcomes:
        if accepted:
            assert ran_with.get(task_id) == variant, "only the content that ran is ever accepted"
    assert set(runs) == {task_id for task_id, _, accepted in outcomes if accepted}
