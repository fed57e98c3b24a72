"""Where workflows, runs and step states live: ``<home>/workflows.db`` (SQLite, WAL; every
call runs in a worker thread), or memory when ``durable = false``."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import attrs

from ..errors import InfraError, SpecError, Unavailable
from ..scheduler.store import translate_sqlite_error
from ..values import (
    preview,
)
from .spec import RunState, RunStatus, StepState, StepStatus, Workflow
from .validate import parse_workflow_spec

__all__ = [
    "MemoryWorkflowStore",
    "WorkflowStore",
]


T = TypeVar("T")
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Storage


_SCHEMA = """
CREATE TABLE IF NOT EXISTS workflows (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT NOT NULL,
    spec TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, workflow_id TEXT NOT NULL, idempotency_key TEXT NOT NULL,
    input TEXT NOT NULL, status TEXT NOT NULL, output TEXT NOT NULL, error TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL, task_id TEXT NOT NULL,
    attempts INTEGER NOT NULL, result TEXT NOT NULL, error TEXT NOT NULL,
    started_at REAL NOT NULL, completed_at REAL NOT NULL, PRIMARY KEY (run_id, name));
"""


@attrs.define
class _Batch:
    """Step rows waiting for one transaction; ``done`` is set once it committed or failed."""

    rows: dict[tuple[str, str], tuple[Any, ...]] = attrs.field(factory=dict)
    done: anyio.Event = attrs.field(factory=anyio.Event)
    error: InfraError | None = None


class WorkflowStore:
    """SQLite persistence. Every public method is a coroutine that runs its statements in a
    worker thread; a capacity limiter of one keeps them in submission order. Step rows, the
    frequent writes, are group-committed."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._batch = _Batch()
        self._writing = False

    async def open(self) -> None:
        await self._call(self._open_sync)

    def _open_sync(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self._path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await self._call(db.close)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except (sqlite3.Error, OSError) as exc:
            raise translate_sqlite_error(exc, self._path) from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise Unavailable("the workflow store is closed", fix="start the infra first")
        return self._db

    # -- workflows

    async def insert_workflow(self, wf: Workflow) -> Workflow | None:
        """Insert ``wf`` unless the id exists; returns the existing workflow if it does."""

        def run() -> Workflow | None:
            db = self._conn()
            with db:
                row = db.execute("SELECT * FROM workflows WHERE id = ?", (wf.id,)).fetchone()
                if row is not None:
                    return _workflow_from_row(row)
                db.execute(
                    "INSERT INTO workflows VALUES (?, ?, ?, ?, ?)",
                    (wf.id, wf.name, wf.description, wf.spec.to_json(), wf.created_at),
                )
                return None

        return await self._call(run)

    async def workflows(self) -> list[Workflow]:
        rows = await self._call(
            lambda: self._conn().execute("SELECT * FROM workflows ORDER BY created_at, id").fetchall()
        )
        return await anyio.to_thread.run_sync(_workflows_from_rows, rows)

    # -- runs

    async def insert_run(self, run: RunState) -> bool:
        """Insert ``run`` and its steps; False (and nothing written) if the id exists."""

        def go() -> bool:
            db = self._conn()
            with db:
                cur = db.execute(
                    "INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                    (
                        run.run_id,
                        run.workflow_id,
                        run.idempotency_key,
                        json.dumps(run.input),
                        str(run.status),
                        json.dumps(run.output),
                        run.error,
                        run.created_at,
                        run.updated_at,
                    ),
                )
                if cur.rowcount == 0:
                    return False
                db.executemany(
                    "INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_step_row(run.run_id, s) for s in run.steps.values()],
                )
                return True

        return await self._call(go)

    async def save_run(self, run: RunState, *, cancel_requested: bool) -> None:
        def go() -> None:
            with self._conn() as db:
                db.execute(
                    "UPDATE runs SET status = ?, output = ?, error = ?, cancel_requested = ?, updated_at = ?"
                    " WHERE id = ?",
                    (
                        str(run.status),
                        json.dumps(run.output),
                        run.error,
                        int(cancel_requested),
                        run.updated_at,
                        run.run_id,
                    ),
                )

        await self._call(go)

    async def save_step(self, run_id: str, step: StepState) -> None:
        """Returns once the row is committed. Group commit: rows saved while a write is in
        flight go together in the next transaction (the first caller writes for everyone)."""
        mine = self._batch
        mine.rows[(run_id, step.name)] = _step_row(run_id, step)
        if not self._writing:
            self._writing = True
            try:
                while self._batch.rows:
                    batch, self._batch = self._batch, _Batch()
                    try:
                        await self._call(self._write_steps, list(batch.rows.values()))
                    except InfraError as exc:
                        batch.error = exc
                    finally:
                        batch.done.set()
            finally:
                self._writing = False
                if self._batch.rows:
                    # The writer was cancelled (shutdown): fail the rows it would have written
                    # rather than leave their callers waiting.
                    batch, self._batch = self._batch, _Batch()
                    batch.error = Unavailable("the workflow store stopped before this write")
                    batch.done.set()
        await mine.done.wait()
        if mine.error is not None:
            raise mine.error

    def _write_steps(self, rows: list[tuple[Any, ...]]) -> None:
        with self._conn() as db:
            db.executemany("INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    async def load_run(self, run_id: str) -> tuple[RunState, bool] | None:
        def go() -> tuple[RunState, bool] | None:
            db = self._conn()
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            steps = db.execute("SELECT * FROM steps WHERE run_id = ?", (run_id,)).fetchall()
            return _run_from_rows(row, steps)

        return await self._call(go)

    async def unfinished_run_ids(self) -> list[str]:
        rows = await self._call(
            lambda: (
                self._conn()
                .execute("SELECT id FROM runs WHERE status IN ('pending', 'running') ORDER BY created_at")
                .fetchall()
            )
        )
        return [r[0] for r in rows]

    async def run_ids(self, workflow_id: str | None, limit: int) -> list[str]:
        def go() -> list[Any]:
            db = self._conn()
            if workflow_id is None:
                return db.execute("SELECT id FROM runs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
            return db.execute(
                "SELECT id FROM runs WHERE workflow_id = ? ORDER BY created_at DESC LIMIT ?",
                (workflow_id, limit),
            ).fetchall()

        return [r[0] for r in await self._call(go)]


class MemoryWorkflowStore:
    """``WorkflowStore``'s interface over plain dicts, for ``settings.durable = False``: nothing to
    write, so nothing leaves the event loop."""

    def __init__(self) -> None:
        self._workflows: dict[str, Workflow] = {}
        #: run id -> (state, cancel requested); insertion order is creation order.
        self._runs: dict[str, tuple[RunState, bool]] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def insert_workflow(self, wf: Workflow) -> Workflow | None:
        existing = self._workflows.get(wf.id)
        if existing is None:
            self._workflows[wf.id] = wf
        return existing

    async def workflows(self) -> list[Workflow]:
        return list(self._workflows.values())

    async def insert_run(self, run: RunState) -> bool:
        if run.run_id in self._runs:
            return False
        self._runs[run.run_id] = (run, False)
        return True

    async def save_run(self, run: RunState, *, cancel_requested: bool) -> None:
        stored = self._runs[run.run_id][0]
        self._runs[run.run_id] = (
            attrs.evolve(
                stored, status=run.status, output=run.output, error=run.error, updated_at=run.updated_at
            ),
            cancel_requested,
        )

    async def save_step(self, run_id: str, step: StepState) -> None:
        stored, cancel_requested = self._runs[run_id]
        self._runs[run_id] = (attrs.evolve(stored, steps={**stored.steps, step.name: step}), cancel_requested)

    async def load_run(self, run_id: str) -> tuple[RunState, bool] | None:
        return self._runs.get(run_id)

    async def unfinished_run_ids(self) -> list[str]:
        return [rid for rid, (run, _) in self._runs.items() if not run.status.terminal]

    async def run_ids(self, workflow_id: str | None, limit: int) -> list[str]:
        ids = [rid for rid, (run, _) in self._runs.items() if workflow_id in (None, run.workflow_id)]
        return ids[::-1][:limit]


def _step_row(run_id: str, s: StepState) -> tuple[Any, ...]:
    return (
        run_id,
        s.name,
        str(s.status),
        s.task_id,
        s.attempts,
        json.dumps(s.result),
        s.error,
        s.started_at,
        s.completed_at,
    )


def _workflow_from_row(row: Sequence[Any]) -> Workflow:
    wf_id, name, description, spec, created_at = row
    # Stored specs were accepted once: the size limits (added later) do not apply to them.
    return Workflow(
        id=wf_id,
        name=name,
        description=description,
        spec=parse_workflow_spec(spec, limits=False),
        created_at=created_at,
    )


def _workflows_from_rows(rows: Sequence[Sequence[Any]]) -> list[Workflow]:
    """Stored workflows; one that today's checks refuse (stored by an older version, e.g. a
    step priority no task can hold) is left out with one error line instead of stopping
    the engine from starting (its unfinished runs are not resumed: they could not store
    their steps)."""
    out: list[Workflow] = []
    for row in rows:
        try:
            out.append(_workflow_from_row(row))
        except SpecError as exc:
            log.error("stored workflow %s is not loaded: %s", preview(row[0]), exc)
    return out


def _run_from_rows(row: Sequence[Any], step_rows: Sequence[Sequence[Any]]) -> tuple[RunState, bool]:
    run_id, wf_id, key, input_json, status, output, error, cancel_requested, created_at, updated_at = row
    steps = {
        r[1]: StepState(
            name=r[1],
            status=StepStatus(r[2]),
            task_id=r[3],
            attempts=r[4],
            result=json.loads(r[5]),
            error=r[6],
            started_at=r[7],
            completed_at=r[8],
        )
        for r in step_rows
    }
    run = RunState(
        run_id=run_id,
        workflow_id=wf_id,
        status=RunStatus(status),
        steps=steps,
        input=json.loads(input_json),
        output=json.loads(output),
        error=error,
        idempotency_key=key,
        created_at=created_at,
        updated_at=updated_at,
    )
    return run, bool(cancel_requested)
