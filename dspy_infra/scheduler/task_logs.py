"""Per-task log files: every attempt's output, bounded, readable after the task ended.

Layout: ``<home>/task-logs/<store>/<sha256 of the task id>/<attempt>.log``. File names come
from a hash of the task id, never from the id itself, so no id can name a path. ``<store>``
is ``durable`` for a durable scheduler; a memory-only scheduler writes under
``mem-<pid>-<start time>`` (its tasks do not outlive the process, and several such processes
may share one home), and such directories of dead processes are removed.

Bounds (see docs/tasks.md):

- one attempt's log keeps at most ``TASK_LOG_BYTES``: the first half as it is written, and
  the last half, with a line saying how many bytes in between were left out;
- the last ``TASK_LOG_ATTEMPTS`` attempts of a task are kept;
- at most ``settings.retention`` tasks keep logs (the least recently written go first).

Everything here that touches the disk blocks: the handler and ``Infra.task_log`` call it
through ``anyio.to_thread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

from ..config import Settings
from ..ownership import proc_stat, same_process

__all__ = [
    "TASK_LOG_ATTEMPTS",
    "TASK_LOG_BYTES",
    "AttemptLog",
    "MemoryLog",
    "TaskLog",
    "attempt_log_path",
    "keep_attempt_log",
    "log_root",
    "read_task_log",
    "volatile_scope",
]

#: Most bytes one attempt's log file keeps (its first and last halves).
TASK_LOG_BYTES = 2 * 1024 * 1024
#: Attempt logs kept per task (the latest ones).
TASK_LOG_ATTEMPTS = 5
#: New task log directories between two prunes (per process).
_PRUNE_EVERY = 256
_LOGS_DIR = "task-logs"
_DURABLE = "durable"


_volatile: dict[int, str] = {}


def volatile_scope() -> str:
    """This process's name for memory-only state: ``mem-<pid>-<start time>`` (unique while
    it lives, so a later process with the same pid gets another name)."""
    pid = os.getpid()
    scope = _volatile.get(pid)
    if scope is None:
        st = proc_stat(pid)
        scope = _volatile[pid] = f"mem-{pid}-{st.start_time if st is not None else 0}"
    return scope


def log_root(settings: Settings) -> Path:
    """Where the task logs of a scheduler with ``settings`` live."""
    store = _DURABLE if settings.durable else volatile_scope()
    return settings.resolved_home() / _LOGS_DIR / store


def attempt_log_path(root: Path, task_id: str, attempt: int) -> Path:
    """The file of one attempt's log under ``root`` (``log_root``)."""
    return _task_dir(root, task_id) / f"{attempt}.log"


def keep_attempt_log(settings: Settings, task_id: str, attempt: int, text: str) -> None:
    """Store ``text`` as the log of one attempt (one that ran elsewhere: its executor
    brought the log back), bounded and pruned like a log written here."""
    log = AttemptLog(log_root(settings), task_id, attempt)
    log.open()
    try:
        log.write(text.encode("utf-8", errors="replace"))
    finally:
        log.close()


def _task_dir(root: Path, task_id: str) -> Path:
    return root / hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class TaskLog:
    """One attempt's log, written as output arrives, bounded to ``limit`` bytes: the first
    half as it is written, the last half kept until ``close``, with a line saying how many
    bytes in between were left out. Where the bytes go is the subclass's: a file
    (``AttemptLog``) or memory (``MemoryLog``). ``open`` before the first ``write``; writes
    before ``open`` or after ``close`` are dropped."""

    def __init__(self, *, limit: int = TASK_LOG_BYTES) -> None:
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head_written = 0
        self._tail = bytearray()
        self._omitted = 0

    def open(self) -> None:
        raise NotImplementedError

    def _is_open(self) -> bool:
        raise NotImplementedError

    def _emit(self, data: bytes) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    @property
    def empty(self) -> bool:
        """True while nothing was written."""
        return self._head_written == 0 and not self._tail

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``: to the log while the head has room, else to the kept tail."""
        if not self._is_open():
            return
        room = self._head_limit - self._head_written
        if room > 0:
            head = chunk[:room]
            self._emit(head)
            self._head_written += len(head)
            chunk = chunk[room:]
        if chunk:
            self._tail += chunk
            if len(self._tail) > 2 * self._tail_limit:
                cut = len(self._tail) - self._tail_limit
                self._omitted += cut
                del self._tail[:cut]

    def close(self) -> None:
        """Write the kept tail (after a note of what was left out) and close the log."""
        if not self._is_open():
            return
        try:
            if len(self._tail) > self._tail_limit:
                cut = len(self._tail) - self._tail_limit
                self._omitted += cut
                del self._tail[:cut]
            if self._omitted:
                self._emit(f"\n[dspy_infra: {self._omitted} bytes of output omitted here]\n".encode())
            if self._tail:
                self._emit(bytes(self._tail))
        finally:
            self._release()
            self._tail = bytearray()


class AttemptLog(TaskLog):
    """The log file of one attempt under ``root`` (``log_root``).

    Blocking (call it off the loop); the scheduler's one-attempt-at-a-time rule means one
    writer per file.
    """

    def __init__(self, root: Path, task_id: str, attempt: int, *, limit: int = TASK_LOG_BYTES) -> None:
        super().__init__(limit=limit)
        self.root = root
        self.dir = _task_dir(root, task_id)
        self.path = attempt_log_path(root, task_id, attempt)
        self.attempt = attempt
        self._fh: int | None = None

    def open(self) -> None:
        try:
            os.mkdir(self.dir)
        except FileNotFoundError:
            self.dir.mkdir(parents=True, exist_ok=True)
            new = True
        except FileExistsError:
            new = False
        else:
            new = True
        self._fh = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        if new:
            # Nothing older in a directory just made.
            _maybe_prune(self.root)
        else:
            _drop_old_attempts(self.dir, self.attempt)

    def _is_open(self) -> bool:
        return self._fh is not None

    def _emit(self, data: bytes) -> None:
        assert self._fh is not None
        os.write(self._fh, data)

    def _release(self) -> None:
        assert self._fh is not None
        os.close(self._fh)
        self._fh = None


class MemoryLog(TaskLog):
    """One attempt's log kept in memory, bounded like a file: for an attempt whose log
    travels back to its owner (a Ray runner returns it with the outcome), so the node it
    ran on writes no file. ``text()`` after ``close``: None if it was never opened."""

    def __init__(self, *, limit: int = TASK_LOG_BYTES) -> None:
        super().__init__(limit=limit)
        self._data: bytearray | None = None
        self._open = False

    def open(self) -> None:
        self._data = bytearray()
        self._open = True

    def _is_open(self) -> bool:
        return self._open

    def _emit(self, data: bytes) -> None:
        assert self._data is not None
        self._data += data

    def _release(self) -> None:
        self._open = False

    def text(self) -> str | None:
        """What was logged (undecodable bytes as U+FFFD, as ``read_task_log`` reads a file)."""
        return None if self._data is None else self._data.decode("utf-8", errors="replace")


def _attempt_files(task_dir: Path) -> list[tuple[int, Path]]:
    out: list[tuple[int, Path]] = []
    try:
        names = os.listdir(task_dir)
    except FileNotFoundError:
        return out
    for name in names:
        stem, dot, ext = name.partition(".")
        if dot and ext == "log" and stem.isdigit():
            out.append((int(stem), task_dir / name))
    out.sort()
    return out


def _drop_old_attempts(task_dir: Path, current: int) -> None:
    files = _attempt_files(task_dir)
    # A first attempt starts a task's log afresh: what is there belongs to an earlier task
    # of the same id (one pruned from the store, say), not to this one.
    drop = files if current == 1 else files[: max(0, len(files) - TASK_LOG_ATTEMPTS)]
    for attempt, path in drop:
        if attempt != current:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


_created = 0


def _maybe_prune(root: Path) -> None:
    global _created
    _created += 1
    if _created % _PRUNE_EVERY == 1:
        prune(root)


#: Task log directories one store keeps at most (the scheduler's retention is per store;
#: this bound holds whatever retention is configured).
MAX_TASKS_WITH_LOGS = 10_000


def prune(root: Path, keep: int = MAX_TASKS_WITH_LOGS) -> None:
    """Keep the ``keep`` most recently written task log directories under ``root``, and
    remove memory-only stores of processes that are gone."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        entries = []
    dated: list[tuple[float, str]] = []
    for entry in entries:
        with contextlib.suppress(OSError):
            dated.append((entry.stat().st_mtime, entry.path))
    dated.sort()
    for _, path in dated[: max(0, len(dated) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
    _remove_dead_volatile_stores(root.parent)


def _remove_dead_volatile_stores(logs: Path) -> None:
    try:
        names = os.listdir(logs)
    except FileNotFoundError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == "mem" and parts[1].isdigit() and parts[2].isdigit():
            if not same_process(int(parts[1]), int(parts[2])):
                shutil.rmtree(logs / name, ignore_errors=True)


def read_task_log(root: Path, task_id: str, attempt: int | None = None) -> str | None:
    """The log of ``attempt`` of ``task_id`` (every kept attempt, each under a header line,
    when None). ``""`` when the task wrote no log; None when that attempt's log is not kept.
    Undecodable bytes become U+FFFD."""
    files = _attempt_files(_task_dir(root, task_id))
    if attempt is not None:
        for number, path in files:
            if number == attempt:
                return _read(path)
        return None
    parts: list[str] = []
    for number, path in files:
        parts.append(f"=== attempt {number} ===\n")
        text = _read(path)
        parts.append(text if not text or text.endswith("\n") else text + "\n")
    return "".join(parts)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
