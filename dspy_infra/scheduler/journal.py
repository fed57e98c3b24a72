"""The attempt journal: "attempt N of task T started", appended from the event loop.

An in-process handler may start once its attempt is recorded somewhere that survives the
death of this process (a handler that takes its process down must find that attempt counted
on the next start). The task store's row gets there through its writer thread, a hand-off
from the loop to the thread and back for every group of attempts; on a busy machine that
round trip, not the work, set the pace of short tasks. The journal records the same fact
with one ``os.write`` of a few dozen bytes per loop step into a file opened ``O_APPEND``:
once ``write`` returns, the bytes are in the kernel's page cache, which outlives the process
(SIGKILL, segfault, OOM kill) exactly as the store's unflushed log does. The store's row
follows through group commit as before; nobody waits for it.

Recovery (``SqliteStore.open``) reads both journal files before loading the rows and raises
each unfinished task's attempt count to the highest attempt the journal saw start (marking
it ``running``: that attempt was interrupted), commits that, and empties the files.

Two files take turns so the journal stays small: once the active one passes
``rotate_bytes`` (and the other is empty) appends go to the other, and the full one is
emptied when the store reports that every row queued before the switch is in its log (all
the attempts that file records are then in the store as well). A line is ``"<id>" N``, the
id as ASCII-escaped JSON text (no raw newline, whatever the id holds); a line that does not
parse (a write torn by a power cut) is skipped, which loses nothing the store's guarantees
promise (an unflushed attempt record of an in-process handler may be lost to a power cut,
as the store's log may be).

A task that starts at its submit, before its row is in the store's log (``submit_and_wait``
acknowledges nothing before the result, so its row need only survive this process's death
before the task runs, the level this journal gives), has its whole row journaled instead: a
line ``+[...]``, the row's values as one ASCII JSON array (``SqliteStore.record_started``).
Recovery inserts such a row when the database has neither the task nor its pruned id, then
counts its attempt as above; a task that takes its process down before its row reached the
log is then found, counted, and not run beyond its ``max_attempts``. A line ``-"<id>"`` says
the database refused that row (its submitter got the error, so it was never accepted): it is
not inserted.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from json.encoder import encode_basestring_ascii as _quote
from pathlib import Path
from typing import Any

__all__ = ["JOURNAL_FILE_NAMES", "ROTATE_BYTES", "AttemptJournal", "JournalContents", "parse_journal"]

JOURNAL_FILE_NAMES = ("attempts.0.journal", "attempts.1.journal")
#: Appends switch to the other file once the active one is this large.
ROTATE_BYTES = 1 << 20
_ROW_TEXT = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode


#: Values in a journaled row (``SqliteStore``'s insert row); its id is the first, its attempts the tenth.
ROW_LENGTH = 16
_ROW_ATTEMPTS = 9


class JournalContents:
    """What the journal files record: task id -> the highest attempt seen started, and the
    rows of tasks that started at their submit (the latest per id)."""

    __slots__ = ("attempts", "refused", "rows")

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.rows: dict[str, list[Any]] = {}
        #: Ids whose journaled row the database refused. Kept apart and applied by
        #: ``replayable_rows``, whatever the order of the lines: two files take turns, so
        #: their lines are not read in the order they were written.
        self.refused: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.attempts or self.rows)

    def replayable_rows(self) -> dict[str, list[Any]]:
        """The journaled rows to insert where the database lacks them (a row refused once is
        not: its submitter got the error; so is a later submit of the same id, rarely, which
        was not acknowledged either)."""
        return {task_id: row for task_id, row in self.rows.items() if task_id not in self.refused}


def parse_journal(data: bytes, into: JournalContents) -> None:
    """Fold the lines of one journal file into ``into``."""
    attempts = into.attempts
    for line in data.split(b"\n"):
        if line.startswith(b"-"):
            with contextlib.suppress(ValueError):
                refused = json.loads(line[1:])
                if isinstance(refused, str):
                    into.refused.add(refused)
            continue
        if line.startswith(b"+"):
            try:
                row = json.loads(line[1:])
            except ValueError:  # a torn line
                continue
            if not (isinstance(row, list) and len(row) == ROW_LENGTH and isinstance(row[0], str)):
                continue
            number = row[_ROW_ATTEMPTS]
            if type(number) is not int:
                continue
            into.rows[row[0]] = row
            if number > attempts.get(row[0], 0):
                attempts[row[0]] = number
            continue
        text, _, number_text = line.rpartition(b" ")
        try:
            task_id = json.loads(text)
            attempt = int(number_text)
        except ValueError:  # a torn or empty line
            continue
        if isinstance(task_id, str) and attempt > attempts.get(task_id, 0):
            attempts[task_id] = attempt


class AttemptJournal:
    """Two append-only files under the state directory (see the module docstring).

    ``read`` and ``open`` run off the loop (the store's open); ``append`` and ``retire`` on
    the loop (each one small system call); ``close`` after the store's last commit.
    """

    def __init__(self, home: Path, *, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.paths = tuple(Path(home) / name for name in JOURNAL_FILE_NAMES)
        self.rotate_bytes = rotate_bytes
        self._fds: list[int] = []
        self._active = 0
        self._size = 0
        #: The file waiting to be emptied (its records not yet known to be in the store).
        self._retiring: int | None = None

    def read(self) -> JournalContents:
        """What both files record."""
        seen = JournalContents()
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                parse_journal(path.read_bytes(), seen)
        return seen

    def open(self) -> None:
        """Open both files for appending, emptied (call once ``read`` is applied)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fds = [os.open(path, flags, 0o644) for path in self.paths]
        for fd in self._fds:
            os.ftruncate(fd, 0)
        self._active, self._size, self._retiring = 0, 0, None

    def append(self, entries: Iterable[tuple[str, int]]) -> bool:
        """Record that these attempts started (one write). True when the active file just
        switched: the caller calls ``retire`` once every row queued so far is in the store.

        Raises ``OSError`` when the write fails (nothing is then known to be recorded)."""
        return self._write("".join([f"{_quote(task_id)} {attempt}\n" for task_id, attempt in entries]))

    def append_rows(self, rows: Sequence[Sequence[Any]]) -> bool:
        """Record these tasks' whole rows, each with the attempt it holds as started (one
        write); otherwise as ``append``. Raises ``ValueError`` for a row JSON cannot hold
        (the caller records it another way), ``OSError`` when the write fails."""
        return self._write(
            "".join(["+" + _ROW_TEXT(list(row)) + "\n" for row in rows])  # ASCII: no raw newline
        )

    def forget(self, task_ids: Iterable[str]) -> bool:
        """The database refused these tasks' rows: a journaled row of theirs is not replayed.
        Otherwise as ``append``."""
        return self._write("".join([f"-{_quote(task_id)}\n" for task_id in task_ids]))

    def _write(self, text: str) -> bool:
        data = text.encode("ascii")
        if not data:
            return False
        fd = self._fds[self._active]
        written = os.write(fd, data)
        while written < len(data):  # a regular file writes short only when the disk is full
            more = os.write(fd, data[written:])
            if more <= 0:
                raise OSError(f"short write to {self.paths[self._active]}")
            written += more
        self._size += len(data)
        if self._size < self.rotate_bytes or self._retiring is not None:
            return False
        self._retiring, self._active, self._size = self._active, 1 - self._active, 0
        return True

    def retire(self) -> None:
        """Every attempt in the retiring file is in the store: empty it for the next turn."""
        if self._retiring is not None:
            os.ftruncate(self._fds[self._retiring], 0)
            self._retiring = None

    def close(self, *, empty: bool) -> None:
        """Close the files; ``empty``: the store holds every attempt, so empty them first."""
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                if empty:
                    os.ftruncate(fd, 0)
                os.close(fd)
