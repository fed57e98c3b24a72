"""Nothing acknowledged is lost (issue 8 item 1).

A row the store refuses is forced with a real SQLite trigger (``RAISE(ABORT)`` on a marked
payload): the refused task fails alone with a named error, its batch neighbours are accepted
and run, nothing of it stays in memory (a retry is a fresh submit), and after a SIGKILL every
acknowledged task is on disk.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from harness import NO_GPU, kill_when, open_scheduler
from hypothesis import HealthCheck, given, settings
from strategies import hostile_task_kwargs, poisoned_batches

from dspy_infra.errors import InfraError, NotFound, SpecError, Unavailable
from dspy_infra.models import TaskSpec, TaskStatus
from dspy_infra.scheduler.context import TaskContext
from dspy_infra.scheduler.journal import AttemptJournal
from dspy_infra.scheduler.scheduler import Scheduler
from dspy_infra.scheduler.store import SqliteStore
from dspy_infra.scheduler.task import TaskRecord

HW = NO_GPU
POISON = "poison-row"
TRIGGER = f"""
CREATE TRIGGER IF NOT EXISTS refuse_poison BEFORE INSERT ON tasks
WHEN NEW.payload LIKE '%{POISON}%'
BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END
"""
WORK = {"work": {"min_concurrency": 4, "base_concurrency": 4, "max_concurrency": 4, "adaptive": False}}


def poison_store(home: Path) -> None:
    """Create the schema (by opening a scheduler's store once) and add the refusing trigger."""

    async def create() -> None:
        store = SqliteStore(home)
        await store.open()
        await store.aclose()

    # Its own thread: callers may already run an event loop.
    opener = threading.Thread(target=anyio.run, args=(create,))
    opener.start()
    opener.join()
    conn = sqlite3.connect(home / "state.db")
    try:
        conn.execute(TRIGGER)
        conn.commit()
    finally:
        conn.close()


def rows(home: Path) -> dict[str, str]:
    conn = sqlite3.connect(home / "state.db")
    try:
        return dict(conn.execute("SELECT id, status FROM tasks").fetchall())
    finally:
        conn.close()


def durable(home: Path, **overrides: Any) -> contextlib.AbstractAsyncContextManager[Scheduler]:
    overrides.setdefault("shutdown_grace", 0.2)
    return open_scheduler(home, hardware=HW, durable=True, task_classes=WORK, **overrides)


@contextlib.asynccontextmanager
async def durable_recording(home: Path) -> AsyncIterator[tuple[Scheduler, list[str]]]:
    """A durable scheduler whose ``record`` handler notes the id of every task it runs."""
    ran: list[str] = []

    async def record(ctx: TaskContext) -> dict[str, Any]:
        ran.append(ctx.spec.id)
        return {}

    async with durable(home) as sched:
        sched.register_handler("record", record)
        yield sched, ran


def good(i: int) -> TaskSpec:
    return TaskSpec(f"good-{i}", "work", {"handler": "noop", "n": i})


def bad(i: int) -> TaskSpec:
    return TaskSpec(f"bad-{i}", "work", {"handler": "noop", "mark": POISON})


async def test_a_refused_row_fails_alone_and_its_neighbours_run(tmp_path: Path) -> None:
    home = tmp_path / "state"
    poison_store(home)
    specs = [good(i) for i in range(99)]
    specs.insert(37, bad(0))
    async with durable(home) as sched:
        outcomes = await sched.submit_each(specs)
        refused = [(s.id, o) for s, o in zip(specs, outcomes, strict=True) if isinstance(o, InfraError)]
        assert [task_id for task_id, _ in refused] == ["bad-0"]
        error = refused[0][1]
        assert isinstance(error, SpecError) and "could not be stored" in str(error) and error.fix
        with pytest.raises(NotFound):
            await sched.get("bad-0")  # no trace in memory
        # One unstorable task never breaks listing for everyone.
        listed = await sched.list_tasks(limit=1000)
        assert {st.id for st in listed} == {s.id for s in specs if s.id != "bad-0"}
        async for _ in sched.stream_results([s.id for s in specs if s.id != "bad-0"]):
            pass
        # A retry of the refused id is a fresh submit, refused again (not a success without a row).
        with pytest.raises(SpecError):
            await sched.submit(bad(0))
        # submit_many raises the refusal, and still accepts the neighbours.
        with pytest.raises(SpecError):
            await sched.submit_many([good(100), bad(1), good(101)])
        assert (await sched.wait("good-101", timeout=5)).status is TaskStatus.COMPLETED
    on_disk = rows(home)
    assert "bad-0" not in on_disk and "bad-1" not in on_disk
    assert {f"good-{i}" for i in range(99)} | {"good-100", "good-101"} == set(on_disk)
    assert set(on_disk.values()) == {"completed"}


async def test_a_task_runs_only_after_its_row_is_committed(tmp_path: Path) -> None:
    home = tmp_path / "state"
    poison_store(home)
    async with durable_recording(home) as (sched, ran):
        specs = [
            TaskSpec("refused", "work", {"handler": "record", "mark": POISON}),
            TaskSpec("kept", "work", {"handler": "record"}),
        ]
        outcomes = await sched.submit_each(specs)
        assert isinstance(outcomes[0], SpecError) and not isinstance(outcomes[1], InfraError)
        await sched.wait("kept", timeout=5)
        await anyio.sleep(0.05)
    assert ran == ["kept"], "a task whose row was refused must never run"


class CrashingConnection:
    """Test double for a writer-thread crash (what commit_interval=inf did: an OverflowError
    no store error handling expects): every statement raises it, even the rollback."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, *args: Any) -> Any:
        raise OverflowError("timestamp too large")

    executemany = execute

    def close(self) -> None:
        self.conn.close()


async def test_a_dead_writer_thread_fails_later_submits_instead_of_hanging(tmp_path: Path) -> None:
    async with durable(tmp_path / "state") as sched:
        store = sched.store
        assert isinstance(store, SqliteStore)
        store.wrap_connection(CrashingConnection)
        with anyio.fail_after(5), pytest.raises(Unavailable) as info:
            await sched.submit(TaskSpec("first", payload={"handler": "noop"}))
        assert "writer thread failed" in str(info.value)
        with anyio.fail_after(5), pytest.raises(Unavailable):
            await sched.submit(TaskSpec("later", payload={"handler": "noop"}))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=poisoned_batches())
def test_no_task_is_lost_or_run_twice_with_refused_rows_mixed_in(
    tmp_path_factory: pytest.TempPathFactory, batches: list[list[tuple[int, bool]]]
) -> None:
    home = tmp_path_factory.mktemp("prop") / "state"
    poison_store(home)
    runs: dict[str, int] = {}

    async def count(ctx: TaskContext) -> dict[str, Any]:
        runs[ctx.spec.id] = runs.get(ctx.spec.id, 0) + 1
        return {}

    def spec(n: int, poisoned: bool) -> TaskSpec:
        payload: dict[str, Any] = {"handler": "count"}
        if poisoned:
            payload["mark"] = POISON
        return TaskSpec(f"{'p' if poisoned else 'g'}{n}", "work", payload)

    acknowledged: set[str] = set()
    refused: set[str] = set()

    async def main() -> None:
        async with durable(home) as sched:
            sched.register_handler("count", count)

            async def send(batch: list[tuple[int, bool]]) -> None:
                specs = [spec(n, p) for n, p in batch]
                for s, outcome in zip(specs, await sched.submit_each(specs), strict=True):
                    (refused if isinstance(outcome, InfraError) else acknowledged).add(s.id)

            async with anyio.create_task_group() as tg:
                for batch in batches:
                    tg.start_soon(send, batch)
            if acknowledged:
                async for _ in sched.stream_results(sorted(acknowledged)):
                    pass

    anyio.run(main)
    assert refused == {f"p{n}" for batch in batches for n, p in batch if p}
    assert acknowledged == {f"g{n}" for batch in batches for n, p in batch if not p}
    assert runs == dict.fromkeys(acknowledged, 1), "every acknowledged task ran exactly once"
    on_disk = rows(home)
    assert set(on_disk) == acknowledged and set(on_disk.values()) <= {"completed"}


CHILD = r"""
import asyncio, os, sys

from dspy_infra.config import load_settings
from dspy_infra.errors import InfraError
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskSpec
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.scheduler import Scheduler
from dspy_infra.scheduler.task import TaskRecord

home, poison = sys.argv[1], sys.argv[2]


async def main() -> None:
    settings = load_settings(env={}, home=home, durable=True, shutdown_grace=0.1, task_classes={
        "work": {"min_concurrency": 4, "base_concurrency": 4, "max_concurrency": 4, "adaptive": False}})
    pm = build_plugin_manager(load_entry_points=False)
    async with Scheduler(settings, bus=EventBus(), metrics=InfraMetrics(), plugins=pm) as sched:
        async def client(c: int) -> None:
            for round in range(10**6):
                specs = [
                    TaskSpec(f"c{c}-r{round}-{i}", "work",
                             {"handler": "sleep", "seconds": 0.01, **({"mark": poison} if i == 3 else {})})
                    for i in range(10)
                ]
                outcomes = await sched.submit_each(specs)
                # One write per acknowledgement, after submit returned: never torn by SIGKILL.
                lines = "".join(
                    ("REFUSED " if isinstance(o, InfraError) else "ACK ") + s.id + "\n"
                    for s, o in zip(specs, outcomes)
                )
                os.write(1, lines.encode())

        await asyncio.gather(*(client(c) for c in range(20)))


asyncio.run(main())
"""


def test_sigkill_with_refused_rows_loses_no_acknowledged_task(tmp_path: Path) -> None:
    home = tmp_path / "state"
    poison_store(home)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "acks.txt"
    with out.open("wb") as sink:
        child = subprocess.Popen([sys.executable, str(script), str(home), POISON], stdout=sink)
        kill_when(child, lambda: out.stat().st_size >= 60_000, timeout=30)
    assert child.returncode == -signal.SIGKILL
    lines = out.read_text().splitlines()
    acked = {line.split()[1] for line in lines if line.startswith("ACK ")}
    refused = {line.split()[1] for line in lines if line.startswith("REFUSED ")}
    assert len(acked) > 500 and refused, (len(acked), len(refused))
    assert all(task_id.endswith("-3") for task_id in refused), "only the refused rows fail"
    on_disk = rows(home)
    lost = acked - set(on_disk)
    assert not lost, f"{len(lost)} acknowledged tasks are not on disk after SIGKILL"
    assert not refused & set(on_disk)


async def test_an_attempt_whose_record_is_refused_never_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither the attempt journal (its write fails) nor the store (a trigger refuses the
    row) holds the attempt: it never runs. (With the journal written, the journal is the
    record and the attempt runs: tests/scheduler/test_journal.py.)"""

    def unwritable(self: AttemptJournal, entries: object) -> bool:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AttemptJournal, "append", unwritable)
    home = tmp_path / "state"
    poison_store(home)
    conn = sqlite3.connect(home / "state.db")
    try:
        conn.execute(
            "CREATE TRIGGER refuse_start BEFORE UPDATE ON tasks"
            " WHEN NEW.status = 'running' AND OLD.payload LIKE '%no-start%'"
            " BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
        )
        conn.commit()
    finally:
        conn.close()
    async with durable_recording(home) as (sched, ran):
        await sched.submit_many(
            [
                TaskSpec("unstartable", "work", {"handler": "record", "mark": "no-start"}, max_attempts=3),
                TaskSpec("fine", "work", {"handler": "record"}),
            ]
        )
        assert (await sched.wait("fine", timeout=5)).status is TaskStatus.COMPLETED
        result = await sched.wait("unstartable", timeout=30)
    assert ran == ["fine"], "an attempt that could not be recorded must not run"
    assert result.status is TaskStatus.FAILED and "could not be saved" in result.error
    assert rows(home)["unstartable"] == "failed"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=hostile_task_kwargs)
def test_every_spec_that_constructs_is_stored_and_read_back_equal(
    tmp_path_factory: pytest.TempPathFactory, kwargs: dict[str, Any]
) -> None:
    """Validation is exactly what the store holds: a spec is refused with a SpecError at
    construction, or it round-trips through SQLite unchanged (never a failure in a batch)."""
    try:
        spec = TaskSpec(**kwargs)
    except SpecError:
        return
    home = tmp_path_factory.mktemp("rt")
    rejected: dict[str, InfraError] = {}

    async def roundtrip() -> Any:
        store = SqliteStore(home, on_rejected=rejected.update)
        await store.open()
        store.insert(TaskRecord(spec, 0, 1.0).insert_row())
        done = anyio.Event()
        store.after_commit(lambda error: done.set())
        await done.wait()
        await store.aclose()
        again = SqliteStore(home)
        opened = await again.open()
        await again.aclose()
        return opened

    opened = anyio.run(roundtrip)
    assert not rejected
    assert [t.spec for t in opened.tasks] == [spec]
    assert opened.tasks[0].spec.content_hash == spec.content_hash
