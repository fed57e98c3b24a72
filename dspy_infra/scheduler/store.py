"""Durable task state: SQLite (stdlib ``sqlite3``, WAL) at ``<home>/state.db``.

Threading: every sqlite call runs on one dedicated writer thread that owns the connection;
the event loop only puts operations on a queue (never blocks on disk). Group commit: the
writer takes what is queued (while busy, after collecting for ``commit_interval`` seconds),
coalesces them per task id (only the latest row of a task is written) and commits the lot
in one transaction. Callbacks registered with ``after_commit`` run on the loop once the
batch that holds every operation queued before them is committed *and flushed to the disk*;
that is how ``submit`` returns only after its row is on disk, and how a result is delivered
only once its row is.

Two levels of "saved", because they guard against different failures:

- ``after_commit``: on the disk (``fdatasync`` of the write-ahead log; what SQLite's
  ``synchronous=FULL`` does at every commit). Survives a power cut or a kernel crash. Every
  acknowledgement (a submit) and every delivered result waits for this.
- ``after_write``: committed into the write-ahead log through the operating system, not yet
  flushed. Survives the death of this process (SIGKILL, segfault, OOM kill), which is what
  an attempt record guards against: a handler that takes its process down must find its
  attempt counted. The flush follows within one group commit.

In-process attempts reach the second level without the writer thread: ``record_attempts``
appends them to the attempt journal (``journal.py``) from the loop, and ``open`` replays the
journal into the rows before loading them. ``record_started`` does the same for whole rows
(a task that starts at its submit, for a caller that acknowledges nothing before its
result); such a caller first asks ``is_pruned``, since the ``pruned`` trigger would refuse
the row only after the task ran: one indexed read on a read-only connection (in WAL mode
readers take no lock and never wait for the writer), or none while nothing was pruned.

The connection runs with ``synchronous=NORMAL`` (commits write the log but do not flush it)
and a second thread, the *syncer*, flushes the log once for every group of commits that
someone waits on: while it waits for the disk, the writer already commits the next group,
so attempts start at memory speed and acknowledgements still cost one flush per group, not
one per commit. Nothing is acknowledged before the flush that covers it, so acknowledged work
is exactly as safe as under ``synchronous=FULL``. If the database cannot use WAL (some
network file systems), the connection stays at ``FULL`` and every commit is flushed.

A batch whose transaction fails is split and written again in halves, down to single rows,
so a row the database refuses (a trigger, a constraint, a value that slipped past
validation) fails alone: ``on_rejected`` is told which task ids could not be written (and
why) before any callback of that batch runs, and its neighbours are committed as usual.
If the writer thread itself fails, every pending and later operation fails with
``Unavailable``; nothing waits forever.

The scheduler keeps every live task (and up to ``retention`` finished ones) in memory, so
the store is write-only after ``open()`` has loaded the rows. Pruned tasks leave their id and
content hash in the ``pruned`` table (about 40 bytes per short id on disk), so a pruned id cannot
silently run again: a trigger refuses the insert of such an id (``PrunedId``, found when the
batch is written, like any row the database refuses), so the ids need no memory and a
server's memory stays flat however many tasks it has run. Recovery (re-queueing tasks
that were pending or running) is the scheduler's job; the store just returns what it has.

Workflows keep their own file, ``<home>/workflows.db``; this module owns ``state.db``. An
exclusive lock on ``<home>/state.lock`` keeps two processes from running the same state.

``MemoryStore`` has the same interface and keeps nothing (``settings.durable = False``).

Size: a little over 600 lines: the writer thread, its group commit and the schema, one idea.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import functools
import json
import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from json.encoder import encode_basestring_ascii as _quote
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio
import attrs

from ..errors import AlreadyExists, FailedPrecondition, InfraError, SpecError, Unavailable
from ..models import TaskSpec, TaskStatus
from ..values import json_text, preview
from .journal import ROTATE_BYTES, ROW_LENGTH, AttemptJournal, JournalContents

__all__ = [
    "DB_FILE_NAME",
    "LOCK_FILE_NAME",
    "STATUS_TEXT",
    "CommitCallback",
    "InsertRow",
    "MemoryStore",
    "OpenedState",
    "PrunedId",
    "RejectedCallback",
    "SqliteStore",
    "StoredTask",
    "UpdateRow",
    "encode_json_object",
    "encode_str_map",
    "translate_sqlite_error",
]

DB_FILE_NAME = "state.db"
LOCK_FILE_NAME = "state.lock"
log = logging.getLogger(__name__)

_SCHEMA_VERSION = 1  # the pruned table is an addition older versions ignore

#: Called on the event loop after a commit: ``None`` on success, else the translated error.
CommitCallback = Callable[[InfraError | None], None]


class PrunedId(AlreadyExists):
    """A task's row was refused because its id belongs to a task pruned from retention;
    ``content_hash`` is what that task had (the scheduler words the error)."""

    def __init__(self, task_id: str, content_hash: str) -> None:
        self.task_id = task_id
        self.content_hash = content_hash
        super().__init__(f"task {preview(task_id)} already ran and its result was pruned", field="id")


class _Written:
    """An ``after_write`` callback in the queue (plain callables are ``after_commit`` ones)."""

    __slots__ = ("callback",)

    def __init__(self, callback: CommitCallback) -> None:
        self.callback = callback

    def __call__(self, error: InfraError | None) -> None:
        self.callback(error)


#: Called on the event loop, before the commit callbacks of a batch, with the task ids whose
#: rows could not be written and why (inserts and updates alike).
RejectedCallback = Callable[[dict[str, InfraError]], None]

#: A newly accepted task, in column order (``COLUMNS``). Rows hold only str, int, float and
#: None: such tuples drop out of the garbage collector's view at once, which matters while
#: thousands of them wait in the queue for a commit.
InsertRow = tuple[Any, ...]
#: A changed task: (status, attempts, result JSON, error, started_at, completed_at,
#: duration_ms, id), the parameters of the UPDATE in order.
UpdateRow = tuple[str, int, str, str, float, float, float, str]
_INSERT_LEN = ROW_LENGTH  # (16: the journal keeps such rows too)
_UPDATE_LEN = 8
#: A pruned task: (id, content hash): its row goes, its id stays in ``pruned``.
_PRUNE_LEN = 2


@attrs.frozen
class StoredTask:
    """One task row as loaded at open."""

    spec: TaskSpec
    seq: int
    status: TaskStatus
    attempts: int
    result: dict[str, Any]
    error: str
    submitted_at: float
    started_at: float
    completed_at: float
    duration_ms: float


def translate_sqlite_error(exc: BaseException, path: Path | str) -> InfraError:
    """The one place that turns sqlite3 (and OS) errors about the state file into ours."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        return Unavailable(
            f"state database {path} is locked by another process: {text}",
            fix="stop the other dspy-infra process or use another state_dir",
        )
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "corrupt" in text
    ):
        return FailedPrecondition(
            f"state database {path} is unreadable: {text}",
            field="state_dir",
            fix=f"move {path} aside (tasks in it are lost) or point state_dir elsewhere",
        )
    if isinstance(exc, sqlite3.OperationalError | OSError):
        return Unavailable(
            f"cannot use state database {path}: {text}",
            fix="check that the state directory exists, is writable and its disk is not full",
        )
    return Unavailable(f"state database {path} failed: {type(exc).__name__}: {text}")


def encode_str_map(value: Mapping[str, str]) -> str:
    """JSON for a ``map<string,string>``: the same text ``json.dumps`` gives with compact
    separators, at a third of its cost."""
    return "{" + ",".join([_quote(k) + ":" + _quote(v) for k, v in value.items()]) + "}"


def encode_json_object(value: Mapping[str, Any]) -> str:
    """JSON text of a payload or result (checked JSON objects): the fast path for flat maps of
    strings (most payloads), ``values.json_text`` for everything else (nested values, numbers)."""
    try:
        return encode_str_map(value)
    except TypeError:  # a value that is not a str: numbers, lists, objects, null
        return json_text(value)


@attrs.frozen
class OpenedState:
    """What ``open()`` found: every task row, and the ids (-> content hash) of pruned tasks."""

    tasks: list[StoredTask]
    pruned: dict[str, str]


def _stored(row: tuple[Any, ...]) -> StoredTask | None:
    """A row as loaded; a row this version cannot read becomes a failed task naming why (one
    unreadable row must not keep the scheduler from starting), or None without a usable id."""
    (task_id, seq, task_class, priority, timeout, max_attempts, workflow_id, payload) = row[:8]
    status, attempts, result, error = row[8], row[9], row[10], row[11]
    try:
        spec = TaskSpec(
            id=task_id,
            task_class=task_class,
            payload=json.loads(payload),
            priority=priority,
            timeout=timeout,
            max_attempts=max_attempts,
            workflow_id=workflow_id,
        )
        loaded_status = TaskStatus(status)
        loaded_result = json.loads(result) if result else {}
        if not isinstance(loaded_result, dict):
            raise ValueError("the stored result is not a JSON object")
    except (InfraError, ValueError, TypeError, RecursionError) as exc:
        try:
            spec = TaskSpec(
                id=task_id, task_class="cpu_short" if not isinstance(task_class, str) else task_class
            )
        except InfraError:
            try:
                spec = TaskSpec(id=task_id)
            except InfraError:
                log.error("state.db: skipped a task row with an unusable id %s: %s", preview(task_id), exc)
                return None
        log.error("state.db: task %s could not be read (%s); it is marked failed", preview(task_id), exc)
        loaded_status, loaded_result = TaskStatus.FAILED, {}
        error = f"this task's stored row could not be read ({preview(str(exc), 200)}); it was not run again"
    return StoredTask(
        spec=spec,
        seq=seq,
        status=loaded_status,
        attempts=attempts,
        result=loaded_result,
        error=error,
        submitted_at=row[12],
        started_at=row[13],
        completed_at=row[14],
        duration_ms=row[15],
    )


_COLUMNS = (
    "id, seq, task_class, priority, timeout, max_attempts, workflow_id, payload,"
    " status, attempts, result, error, submitted_at, started_at, completed_at, duration_ms"
)
_CREATE = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    task_class TEXT NOT NULL,
    priority INTEGER NOT NULL,
    timeout REAL,
    max_attempts INTEGER NOT NULL,
    workflow_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    result TEXT NOT NULL,
    error TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    started_at REAL NOT NULL,
    completed_at REAL NOT NULL,
    duration_ms REAL NOT NULL
)
"""
# Ids of finished tasks that left retention, with the content hash they had: a reused id is
# refused instead of running again (idempotency outlives retention).
_CREATE_PRUNED = """
CREATE TABLE IF NOT EXISTS pruned (
    id TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL
) WITHOUT ROWID
"""
# A pruned id never gets a row again (idempotency outlives retention, without memory).
_PRUNED_MARK = "dspy_infra: pruned id"
_CREATE_PRUNED_GUARD = f"""
CREATE TRIGGER IF NOT EXISTS refuse_pruned_ids BEFORE INSERT ON tasks
WHEN EXISTS (SELECT 1 FROM pruned WHERE id = NEW.id)
BEGIN SELECT RAISE(ABORT, '{_PRUNED_MARK}'); END
"""
# Multi-row statements: sqlite3 releases and re-takes the GIL around every statement step,
# so one statement per few hundred rows (not one per row) keeps the writer thread from
# trading the GIL with the event loop tens of thousands of times a second.
_ROWS_PER_STATEMENT = 256


@functools.cache
def _insert_sql(rows: int) -> str:
    one = "(" + ",".join("?" * 16) + ")"
    return f"INSERT OR REPLACE INTO tasks ({_COLUMNS}) VALUES " + ",".join([one] * rows)


@functools.cache
def _update_sql(rows: int) -> str:
    # Later changes of a task leave its spec alone: no need to serialise it again.
    one = "(" + ",".join("?" * 8) + ")"
    return (
        "UPDATE tasks SET status=v.column1, attempts=v.column2, result=v.column3, error=v.column4,"
        " started_at=v.column5, completed_at=v.column6, duration_ms=v.column7"
        " FROM (VALUES " + ",".join([one] * rows) + ") AS v WHERE tasks.id = v.column8"
    )


@functools.cache
def _delete_sql(rows: int) -> str:
    return "DELETE FROM tasks WHERE id IN (" + ",".join("?" * rows) + ")"


@functools.cache
def _pruned_sql(rows: int) -> str:
    return "INSERT OR REPLACE INTO pruned (id, content_hash) VALUES " + ",".join(["(?,?)"] * rows)


def _write_rows(conn: sqlite3.Connection, sql: Callable[[int], str], rows: list[tuple[Any, ...]]) -> None:
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        # chain in C: this runs on the writer thread, and every Python step there holds the
        # GIL the event loop needs.
        conn.execute(sql(len(chunk)), list(chain.from_iterable(chunk)))


_SELECT = f"SELECT {_COLUMNS} FROM tasks ORDER BY seq"
_SELECT_PRUNED = "SELECT id, content_hash FROM pruned"
#: TaskStatus -> its plain str (rows must hold plain values, see InsertRow).
STATUS_TEXT = {s: s.value for s in TaskStatus}

_STOP = object()


class MemoryStore:
    """Keeps nothing: for ``durable = False``. Callbacks run at once."""

    durable = False

    async def open(self) -> OpenedState:
        return OpenedState([], {})

    def insert(self, row: InsertRow) -> None:
        pass

    def insert_many(self, rows: list[InsertRow]) -> None:
        pass

    def put(self, row: UpdateRow) -> None:
        pass

    def prune(self, task_id: str, content_hash: str) -> None:
        pass

    def record_attempts(self, attempts: list[tuple[str, int]]) -> None:
        pass

    def record_started(self, rows: list[InsertRow]) -> None:
        pass

    def is_pruned(self, task_id: str) -> bool:
        return False  # (the scheduler keeps a memory-only server's pruned ids itself)

    def after_commit(self, callback: CommitCallback) -> None:
        callback(None)

    def after_write(self, callback: CommitCallback) -> None:
        callback(None)

    async def aclose(self) -> None:
        pass


#: Whatever ``SqliteStore.wrap_connection`` is handed back (a test double of the connection).
_Wrapper = TypeVar("_Wrapper")


class _Wakeup:
    """A thread's wake-up call: ``set`` (from one other thread) wakes ``wait``; a set that
    nobody consumed yet is not repeated. A raw lock used as a binary semaphore, where
    ``threading.Event`` runs a ``Condition`` (Python code taking a lock) on every set: the
    loop sets these once or twice per task, and each set cost more than the rest of what
    the loop does for the store."""

    __slots__ = ("_lock", "_pending")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # locked: nothing to wake for
        self._pending = False

    def set(self) -> None:
        # Only the setting thread makes _pending True, and only after the sleeper consumed
        # the last set (it resets _pending after taking the lock), so the lock is held here.
        if not self._pending:
            self._pending = True
            self._lock.release()

    def wait(self, timeout: float = -1) -> bool:
        """Sleep until set (at most ``timeout`` seconds); True if it was."""
        if self._lock.acquire(timeout=timeout):
            self._pending = False
            return True
        return False

    def clear(self) -> None:
        """Consume a set that came meanwhile."""
        if self._lock.acquire(blocking=False):
            self._pending = False


class SqliteStore:
    """Durable store in ``<home>/state.db`` with one writer thread and group commit."""

    durable = True

    def __init__(
        self,
        home: Path,
        *,
        commit_interval: float = 0.005,
        on_rejected: RejectedCallback | None = None,
        journal_rotate_bytes: int = ROTATE_BYTES,
    ) -> None:
        self.home = Path(home)
        self._on_rejected = on_rejected
        #: Set (before anything else) when the writer thread has failed: every op fails.
        self._dead: InfraError | None = None
        self.path = self.home / DB_FILE_NAME
        self._interval = commit_interval
        # deque append/popleft are atomic: the loop appends, the writer pops, no lock per op.
        self._ops: deque[Any] = deque()
        self._wake = _Wakeup()
        #: Set when someone waits on a queued operation (a callback, the stop marker): ends
        #: the group-commit window at once, since waiters add nothing until they are answered.
        self._waiting = _Wakeup()
        #: False once the writer has started draining: the next op must set ``_wake``.
        self._awake = False
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        #: The write-ahead log, opened read-only for the syncer's fdatasync (None: not WAL,
        #: every commit is flushed by SQLite itself).
        self._wal_fd: int | None = None
        #: Written groups whose ``after_commit`` callbacks wait for the next flush, in order.
        self._unsynced: deque[Any] = deque()
        self._sync_wake = _Wakeup()
        self._syncer: threading.Thread | None = None
        #: Set when a flush failed: what the log holds may not be on disk, nothing more is
        #: acknowledged.
        self._sync_error: InfraError | None = None
        self._lock_fd: int | None = None
        self._call_soon: Callable[..., Any] | None = None
        #: Attempts of in-process handlers, recorded from the loop (journal.py).
        self._journal = AttemptJournal(self.home, rotate_bytes=journal_rotate_bytes)
        #: Set (writer thread) when a commit failed or refused rows: the journal is then
        #: kept at close, since the rows it stands in for may be missing.
        self._rows_lost = False
        #: A read-only connection for ``is_pruned``, used on the loop only.
        self._reader: sqlite3.Connection | None = None
        #: Whether the ``pruned`` table may hold an id (False: ``is_pruned`` needs no read).
        self._any_pruned = True
        #: Ids whose prune is queued but not yet in the log (the reader cannot see them yet).
        self._pruning: set[str] = set()
        self._pruning_batch: list[str] | None = None
        #: Whether ``record_started`` journaled rows (a refused one is then marked there).
        self._rows_journaled = False

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> OpenedState:
        """Lock the state directory, open (or create) the database, return every row."""
        # Commit callbacks run as loop callbacks, outside any task; with sniffio installed,
        # anyio finds the running library only through its context variable, so they run in
        # a context that names asyncio (else the scheduler's start_soon in them fails).
        context = contextvars.copy_context()
        with contextlib.suppress(ImportError):
            import sniffio

            context.run(sniffio.current_async_library_cvar.set, "asyncio")
        self._call_soon = functools.partial(asyncio.get_running_loop().call_soon_threadsafe, context=context)
        opened = await anyio.to_thread.run_sync(self._open_sync)
        self._syncer = threading.Thread(target=self._sync_loop, name="dspy_infra-store-sync", daemon=True)
        self._syncer.start()
        self._thread = threading.Thread(target=self._writer, name="dspy_infra-store", daemon=True)
        self._thread.start()
        return opened

    def _open_sync(self) -> OpenedState:
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.home / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise translate_sqlite_error(exc, self.home) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise Unavailable(
                f"state directory {self.home} is in use by another scheduler",
                field="state_dir",
                fix="connect to that process (ensure_infra(addr=...)) or use another state_dir",
            ) from None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            wal = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower() == "wal"
            # NORMAL with WAL: a commit is in the log (safe from a crash of this process) when
            # it returns; the syncer flushes the log before anything is acknowledged, so an
            # accepted task survives a power cut as under FULL (see the module docstring).
            # Without WAL, FULL: every commit is flushed before it returns.
            conn.execute("PRAGMA synchronous=NORMAL" if wal else "PRAGMA synchronous=FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"state database {self.path} has schema {version}, newer than this dspy-infra"
                    f" understands ({_SCHEMA_VERSION})",
                    field="state_dir",
                    fix="upgrade dspy-infra or use another state_dir",
                )
            conn.execute(_CREATE)
            conn.execute(_CREATE_PRUNED)
            conn.execute(_CREATE_PRUNED_GUARD)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            _replay_journal(conn, self._journal.read())
            rows = [task for r in conn.execute(_SELECT) if (task := _stored(r)) is not None]
            self._any_pruned = conn.execute("SELECT EXISTS (SELECT 1 FROM pruned)").fetchone()[0] == 1
            self._journal.open()
            if wal:
                # The log exists once the connection has written (user_version above); it
                # keeps its inode while the connection is open (no journal_size_limit).
                self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
                self._reader = self._open_reader()
        except sqlite3.Error as exc:
            self._release_lock()
            raise translate_sqlite_error(exc, self.path) from None
        except OSError as exc:
            conn.close()
            self._close_reader()
            self._release_lock()
            raise translate_sqlite_error(exc, self.path) from None
        except BaseException:
            self._release_lock()
            raise
        self._conn = conn
        # The pruned ids stay on disk (the trigger refuses them); none are loaded.
        return OpenedState(rows, {})

    def _open_reader(self) -> sqlite3.Connection | None:
        """The read-only connection ``is_pruned`` uses (WAL only: WAL readers never wait for
        the writer, and see each commit once it is in the log). None if it cannot be opened:
        ``is_pruned`` then answers "maybe", and callers take the slower path."""
        try:
            return sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            log.debug("no read-only connection to %s: %s", self.path, exc)
            return None

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(sqlite3.Error):
                reader.close()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    async def aclose(self) -> None:
        """Commit everything queued, stop the writer thread, close and unlock."""
        if self._thread is None:
            return
        self._enqueue(_STOP)
        self._waiting.set()
        thread, self._thread = self._thread, None
        await anyio.to_thread.run_sync(thread.join)
        self._close_reader()
        # Every row is written (or it is not known that they are): empty the journal only then.
        self._journal.close(empty=self._dead is None and not self._rows_lost)

    # -- operations (called on the event loop; never block) -------------------------------

    def insert(self, row: InsertRow) -> None:
        """A newly accepted task."""
        self._enqueue(row)

    def insert_many(self, rows: list[InsertRow]) -> None:
        """Newly accepted tasks, queued at once (the writer takes them in one transaction)."""
        self._ops.extend(rows)
        self._wake_writer()

    def put(self, row: UpdateRow) -> None:
        """A changed task (its row exists, or its insert is queued before this)."""
        self._enqueue(row)

    def prune(self, task_id: str, content_hash: str) -> None:
        """A finished task leaves retention: its row goes, its id and hash stay."""
        self._enqueue((task_id, content_hash))
        # Until the prune is in the log, ``is_pruned`` answers from memory: one marker per
        # loop step (after all of that step's prunes) says when.
        self._any_pruned = True
        self._pruning.add(task_id)
        if self._pruning_batch is None:
            self._pruning_batch = []
            asyncio.get_running_loop().call_soon(self._seal_pruning_batch)
        self._pruning_batch.append(task_id)

    def _seal_pruning_batch(self) -> None:
        batch, self._pruning_batch = self._pruning_batch or [], None

        def written(error: InfraError | None) -> None:
            if error is None:  # (a failed prune keeps its id here: "maybe pruned" is safe)
                self._pruning.difference_update(batch)

        self._enqueue(_Written(written))

    def is_pruned(self, task_id: str) -> bool:
        """Whether ``task_id`` was pruned (reusing it is refused), or may have been: True
        also when the store cannot tell (no reader). For a caller about to run a task before
        its row is written (``record_started``), which the ``pruned`` trigger would refuse
        only afterwards. On the loop: one indexed point read (WAL readers take no lock),
        and none at all while nothing was ever pruned."""
        if not self._any_pruned:
            return False
        if task_id in self._pruning or self._reader is None:
            return True
        try:
            return (
                self._reader.execute("SELECT 1 FROM pruned WHERE id = ?", (task_id,)).fetchone() is not None
            )
        except sqlite3.Error:
            return True

    def record_attempts(self, attempts: list[tuple[str, int]]) -> None:
        """Record (task id, attempt) as started, in the journal: in the kernel when this
        returns, so it survives this process's death, like ``after_write``'s level, without
        the writer thread (their rows are queued before, with ``put``, and follow through
        group commit). Raises ``OSError`` when the write fails: nothing is recorded then."""
        if self._journal.append(attempts):
            # The other file is written from now on; the full one is emptied once every row
            # queued so far (those of all the attempts it holds) is in the log.
            self._enqueue(_Written(self._retire_journal))

    def record_started(self, rows: list[InsertRow]) -> None:
        """Tasks that start at their submit, before their rows are in the log: each row
        (recording its first attempt as running) is queued for the writer and written whole
        to the journal, so it survives this process's death when this returns, like
        ``after_write``'s level, without waiting for the writer thread. For a caller that
        acknowledges nothing before the flush of the task's result (``submit_and_wait``).

        Raises ``OSError`` (or ``ValueError``) when the journal write fails: the rows are
        queued, but nothing is known to be recorded yet."""
        if self._thread is None:
            raise OSError("the task store is closed")
        self.insert_many(rows)  # before the journal's retire marker, if it switches files
        self._rows_journaled = True
        if self._journal.append_rows(rows):
            self._enqueue(_Written(self._retire_journal))

    def _retire_journal(self, error: InfraError | None) -> None:
        if error is None:
            try:
                self._journal.retire()
            except OSError as exc:  # kept: it is read again at the next start, harmlessly
                log.warning("could not empty the attempt journal: %s", exc)

    def after_commit(self, callback: CommitCallback) -> None:
        """``callback(error)`` on the loop once every operation queued before it is committed
        and flushed to the disk (survives a power cut)."""
        if self._thread is None:
            callback(Unavailable("the task store is closed"))
            return
        self._enqueue(callback)
        self._waiting.set()
        if self._dead is not None:
            # The writer died after (or while) draining: fail what it will never take.
            self._fail_queued(self._dead)

    def after_write(self, callback: CommitCallback) -> None:
        """``callback(error)`` on the loop once every operation queued before it is committed
        to the write-ahead log (survives this process's death; flushed soon after)."""
        if self._thread is None:
            callback(Unavailable("the task store is closed"))
            return
        self._enqueue(_Written(callback))
        self._waiting.set()
        if self._dead is not None:
            # The writer died after (or while) draining: fail what it will never take.
            self._fail_queued(self._dead)

    def _enqueue(self, op: Any) -> None:
        self._ops.append(op)
        self._wake_writer()

    def _wake_writer(self) -> None:
        if not self._awake:
            self._awake = True
            self._wake.set()

    def _fail_queued(self, error: InfraError) -> None:
        """Fail every queued callback with ``error`` (any thread; each op is popped once)."""
        callbacks: list[CommitCallback] = []
        while True:
            try:
                op = self._ops.popleft()
            except IndexError:
                break
            if callable(op) and type(op) is not tuple and type(op) is not str:
                callbacks.append(op)
        if callbacks and self._call_soon is not None:
            with contextlib.suppress(RuntimeError):
                self._call_soon(_run_callbacks, callbacks, error)

    # -- the writer thread --------------------------------------------------------------

    def _writer(self) -> None:
        assert self._conn is not None
        ops = self._ops
        stop = False
        busy = False
        #: The batch being written: if the thread dies while writing it, its callbacks fail.
        batch: list[Any] = []
        try:
            while not stop:
                self._wake.wait()
                # The group-commit window, only while busy: after a large batch, let more
                # operations arrive before taking them all (fewer, bigger transactions). After
                # a small one the store is nearly idle, and a lone submit should wait only for
                # its own commit; what arrives meanwhile forms the next batch anyway.
                # The window ends early when a waiter's callback is queued: the rows it waits
                # for were queued before it (callbacks are registered a loop step after their
                # rows, so the rows alone must not hold it for a whole window).
                if busy:
                    self._waiting.wait(self._interval)
                self._waiting.clear()
                self._wake.clear()
                self._awake = False  # before draining: an op appended after this wakes us again
                batch = [ops.popleft() for _ in range(len(ops))]
                # Not while someone waits on this batch (a submitter, an attempt about to
                # start): they add nothing until it commits, so the window would only delay
                # them; what arrives during the commit forms the next group anyway.
                busy = len(batch) >= _BUSY_BATCH and not any(
                    type(op) is not tuple and op is not _STOP for op in batch
                )
                stop = self._commit(batch)
                batch = []
        except BaseException as exc:
            # Whatever killed the loop, nobody may wait forever: fail what is queued now and,
            # through ``_dead``, everything queued later.
            self._dead = Unavailable(
                f"the task store's writer thread failed ({type(exc).__name__}: {preview(str(exc), 200)});"
                " accepted work up to its last commit is safe",
                fix="restart the process; if it happens again, report it with the log",
            )
            self._ops.extendleft(reversed(batch))
            self._fail_queued(self._dead)
            log.error("the task store's writer thread failed", exc_info=True)
        finally:
            if self._dead is None:
                # Anything queued after the stop marker is still written, callbacks still run.
                leftovers = [ops.popleft() for _ in range(len(ops))]
                if leftovers:
                    self._commit(leftovers)
            # The syncer flushes what is handed to it, then stops; only then may the
            # connection close (closing checkpoints and removes the log).
            self._unsynced.append(_STOP)
            self._sync_wake.set()
            if self._syncer is not None:
                self._syncer.join()
            if self._wal_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._wal_fd)
                self._wal_fd = None
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._release_lock()

    def _sync_loop(self) -> None:
        """The syncer thread: one flush of the log for every group of written batches whose
        ``after_commit`` callbacks wait, then those callbacks, in order."""
        pending = self._unsynced
        stop = False
        while not stop:
            self._sync_wake.wait()
            self._sync_wake.clear()
            groups: list[tuple[list[CommitCallback], InfraError | None]] = []
            for _ in range(len(pending)):
                item = pending.popleft()
                if item is _STOP:
                    stop = True
                else:
                    groups.append(item)
            if not groups:
                continue
            if self._wal_fd is not None and self._sync_error is None:
                try:
                    os.fdatasync(self._wal_fd)
                except OSError as exc:
                    # After a failed flush the kernel may have dropped the pages: what the
                    # log holds is not known to be on disk, so nothing more is acknowledged.
                    self._sync_error = Unavailable(
                        f"cannot flush the task store's log {self.path}-wal to disk: {exc}",
                        fix="check the disk (space, errors), then restart the process",
                    )
                    log.error("flushing the task store's log failed: %s", exc)
            if self._call_soon is not None:
                for callbacks, error in groups:
                    with contextlib.suppress(RuntimeError):  # loop already closed: nobody waits
                        self._call_soon(_run_callbacks, callbacks, error or self._sync_error)

    def _commit(self, batch: list[Any]) -> bool:
        """Write one batch; True when it held the stop marker.

        One transaction for the whole batch; if it fails, the rows are written again in
        halves (each half one transaction) down to single rows, so only rows the database
        refuses fail. Their ids go to ``on_rejected`` before the batch's callbacks run.
        """
        assert self._conn is not None
        # Per task id: its latest insert row (len 16), update row (len 8) or prune (len 2).
        latest: dict[str, tuple[Any, ...]] = {}
        callbacks: list[CommitCallback] = []
        written: list[CommitCallback] = []
        stop = False
        rejected: dict[str, InfraError] = {}
        for op in batch:
            if type(op) is tuple:
                if len(op) == _INSERT_LEN:
                    before = latest.get(op[0])
                    if before is not None and len(before) == _PRUNE_LEN:
                        # Pruned, then submitted again within one batch: the prune stands.
                        rejected[op[0]] = PrunedId(op[0], before[1])
                        continue
                    latest[op[0]] = op
                    continue
                if len(op) == _PRUNE_LEN:
                    latest[op[0]] = op
                    continue
                task_id = op[7]
                before = latest.get(task_id)
                if before is not None and len(before) == _INSERT_LEN:
                    # Accepted and changed within one batch: insert it as it is now.
                    latest[task_id] = (*before[:8], *op[:4], before[12], *op[4:7])
                else:
                    latest[task_id] = op
            elif op is _STOP:
                stop = True
            elif type(op) is _Written:
                written.append(op.callback)
            else:
                callbacks.append(op)
        error: InfraError | None = None
        if latest:
            rows = list(latest.values())
            try:
                self._write(rows)
            except Exception as exc:
                self._rollback()
                if len(rows) == 1:
                    refused = {_row_id(rows[0]): self._row_error(_row_id(rows[0]), exc)}
                else:
                    refused = self._write_apart(rows)
                rejected.update(refused)
                self._rows_lost = True
                # A store that refuses everything (disk full, I/O error, locked) is not a bad
                # row: the callbacks of the batch learn it too.
                if refused and len(refused) == len(rows):
                    first = next(iter(refused.values()))
                    if isinstance(first, Unavailable | FailedPrecondition):
                        error = first
        if self._call_soon is not None and (rejected or written):
            with contextlib.suppress(RuntimeError):  # loop already closed: nobody waits
                self._call_soon(self._report, rejected, written, error)
        if callbacks:
            # After the written callbacks were handed to the loop: for one batch they run first.
            self._unsynced.append((callbacks, error))
            self._sync_wake.set()
        return stop

    def _report(
        self, rejected: dict[str, InfraError], callbacks: list[CommitCallback], error: InfraError | None
    ) -> None:
        """On the loop: rejected rows first (so no callback sees them as written), then callbacks."""
        if rejected and self._rows_journaled:
            # A refused row was never accepted (its caller got the error): the journal must
            # not bring it back at the next start.
            try:
                if self._journal.forget(rejected):
                    self._enqueue(_Written(self._retire_journal))
            except OSError as exc:
                log.warning("could not mark refused rows in the attempt journal: %s", exc)
        try:
            if rejected and self._on_rejected is not None:
                self._on_rejected(rejected)
        except Exception:
            log.exception("handling rows the store refused failed")
        _run_callbacks(callbacks, error)

    def _rollback(self) -> None:
        assert self._conn is not None
        with contextlib.suppress(sqlite3.Error):  # "no transaction is active" is fine too
            self._conn.execute("ROLLBACK")

    def _write_apart(self, rows: list[tuple[Any, ...]]) -> dict[str, InfraError]:
        """Write ``rows`` in ever smaller groups until only refused rows are left."""
        rejected: dict[str, InfraError] = {}
        pending = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
        while pending:
            group = pending.pop()
            if not group:
                continue
            try:
                self._write(group)
            except Exception as exc:
                self._rollback()
                if len(group) == 1:
                    rejected[_row_id(group[0])] = self._row_error(_row_id(group[0]), exc)
                else:
                    pending += [group[: len(group) // 2], group[len(group) // 2 :]]
        return rejected

    def _row_error(self, task_id: str, exc: BaseException) -> InfraError:
        if isinstance(exc, sqlite3.IntegrityError) and _PRUNED_MARK in str(exc):
            assert self._conn is not None
            found = self._conn.execute("SELECT content_hash FROM pruned WHERE id = ?", (task_id,)).fetchone()
            return PrunedId(task_id, found[0] if found else "")
        if isinstance(exc, sqlite3.OperationalError | OSError) or (
            isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError)
        ):
            return translate_sqlite_error(exc, self.path)
        return SpecError(
            f"task {preview(task_id)} could not be stored ({type(exc).__name__}:"
            f" {preview(str(exc), 200)}); it was not accepted",
            field="task",
            fix="check the task's values; other tasks of the same batch are not affected",
        )

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        """One transaction: inserts of new tasks, updates of changed ones, prunes."""
        assert self._conn is not None
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        pruned: list[tuple[Any, ...]] = []
        for row in rows:
            if len(row) == _INSERT_LEN:
                inserts.append(row)
            elif len(row) == _UPDATE_LEN:
                updates.append(row)
            else:
                pruned.append(row)
        self._conn.execute("BEGIN")
        _write_rows(self._conn, _insert_sql, inserts)
        _write_rows(self._conn, _update_sql, updates)
        if pruned:
            _write_rows(self._conn, _delete_sql, [(row[0],) for row in pruned])
            _write_rows(self._conn, _pruned_sql, pruned)
        self._conn.execute("COMMIT")

    # -- diagnostics (in-process only: nothing on the gRPC or HTTP face reaches these) ------

    def trace_statements(self, callback: Callable[[str], None] | None) -> None:
        """Call ``callback`` (from the writer thread) with each SQL statement it runs; None
        stops. For an operator diagnosing commit behaviour, and for tests counting commits."""
        self._open_connection().set_trace_callback(callback)

    def wrap_connection(self, wrap: Callable[[sqlite3.Connection], _Wrapper]) -> _Wrapper:
        """Route the writer thread's SQL through ``wrap(connection)`` (an object with the
        connection's ``execute`` and ``close``) and return it: the fault-injection seam for
        tests (a full disk, a writer thread that dies). In-process only, like
        ``trace_statements``; call it while the store is open."""
        wrapper = wrap(self._open_connection())
        self._conn = cast(sqlite3.Connection, wrapper)
        return wrapper

    def _open_connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise FailedPrecondition("the task store is not open", fix="use it while the scheduler runs")
        return self._conn


def _replay_journal(conn: sqlite3.Connection, journal: JournalContents) -> None:
    """Insert each journaled row the database lacks (a task that started at its submit
    before its row reached the log; not if its id was pruned since), then raise each
    unfinished task's attempts to the highest the journal saw start (that attempt was
    interrupted: ``running``), flushed before the journal is emptied."""
    if not journal:
        return
    level = int(conn.execute("PRAGMA synchronous").fetchone()[0])
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("BEGIN")
    for task_id, row in journal.replayable_rows().items():
        known = conn.execute(
            "SELECT 1 FROM tasks WHERE id = ? UNION ALL SELECT 1 FROM pruned WHERE id = ?", (task_id, task_id)
        ).fetchone()
        if known is None:
            _replay_one(conn, task_id, "its journaled row", _insert_sql(1), row)
    for task_id, attempt in journal.attempts.items():
        _replay_one(
            conn,
            task_id,
            f"its journaled attempt {attempt}",
            "UPDATE tasks SET status = 'running', attempts = ? WHERE id = ? AND attempts < ?"
            " AND status IN ('pending', 'running')",
            (attempt, task_id, attempt),
        )
    conn.execute("COMMIT")
    conn.execute(f"PRAGMA synchronous={level}")


def _replay_one(conn: sqlite3.Connection, task_id: str, what: str, sql: str, params: Sequence[Any]) -> None:
    # One statement per task: a row the database refuses (as it refused the task's own row)
    # keeps what it had and fails alone, never the store's start.
    try:
        conn.execute("SAVEPOINT replay")
        conn.execute(sql, params)
        conn.execute("RELEASE replay")
    except sqlite3.DatabaseError as exc:
        conn.execute("ROLLBACK TO replay")
        conn.execute("RELEASE replay")
        log.error("task %s: %s could not be saved: %s", preview(task_id), what, exc)


def _row_id(row: tuple[Any, ...]) -> str:
    """The task id of an insert, update or prune row (updates carry it last)."""
    return str(row[7] if len(row) == _UPDATE_LEN else row[0])


#: A batch at least this large means the store is busy: the next one waits for the window.
_BUSY_BATCH = 32


def _run_callbacks(callbacks: list[CommitCallback], error: InfraError | None) -> None:
    for callback in callbacks:
        # One failing callback must not leave the others' waiters hanging.
        try:
            callback(error)
        except Exception:
            log.exception("a commit callback failed")
