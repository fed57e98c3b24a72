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
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as _quote
from pathlib import Path

__all__ = ["JOURNAL_FILE_NAMES", "ROTATE_BYTES", "AttemptJournal", "parse_journal"]

JOURNAL_FILE_NAMES = ("attempts.0.journal", "attempts.1.journal")
#: Appends switch to the other file once the active one is this large.
ROTATE_BYTES = 1 << 20


def parse_journal(data: bytes, into: dict[str, int]) -> None:
    """Fold the lines of one journal file into ``into`` (task id -> highest attempt)."""
    for line in data.split(b"\n"):
        text, _, number = line.rpartition(b" ")
        try:
            task_id = json.loads(text)
            attempt = int(number)
        except ValueError:  # a torn or empty line
            continue
        if isinstance(task_id, str) and attempt > into.get(task_id, 0):
            into[task_id] = attempt


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

    def read(self) -> dict[str, int]:
        """Task id -> the highest attempt either file records as started."""
        seen: dict[str, int] = {}
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
        data = "".join([f"{_quote(task_id)} {attempt}\n" for task_id, attempt in entries]).encode("ascii")
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
