"""Handles of attempts that run outside this process (Slurm jobs), recorded durably so a
restarted owner adopts them instead of running the task a second time. (A Ray attempt's
handle is derived from the attempt's own store row: ``ray.py``.)

One file per task under ``<home>/executor-handles/``, named by a hash of the durable scope
(``ownership.durable_scope``) and the task id. An executor writes the handle **before** it
submits (fsync of the file and of the directory), completes it with the engine's id once
known, and removes it when the attempt has ended and its outcome is in hand. On restart the
scheduler re-queues the interrupted task; its next attempt reads the handle first: still
running -> watch it to its end; finished -> collect its outcome; gone -> run anew.

Only durable schedulers keep handles: a memory-only scheduler forgets its tasks in a crash,
so there is nothing to adopt them for. Not under ``attempts/``: a durable start empties that
directory (``ownership.end_leftover_attempts`` ends local leftovers), and remote attempts
must survive it. Everything here blocks: call it through ``anyio.to_thread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import attrs

from ..ownership import durable_scope, write_durably

__all__ = ["HANDLES_DIR", "HandleJournal", "RemoteHandle"]

HANDLES_DIR = "executor-handles"


@attrs.frozen
class RemoteHandle:
    """Where one attempt of a task runs: which executor, which attempt, and the executor's
    own fields (Slurm: job id, name, comment tag and output paths)."""

    executor: str
    task_id: str
    attempt: int
    fields: dict[str, Any] = attrs.field(factory=dict)
    recorded_at: float = attrs.field(factory=time.time)

    def with_fields(self, **changes: Any) -> RemoteHandle:
        return attrs.evolve(self, fields={**self.fields, **changes}, recorded_at=time.time())


def _decode(text: str) -> RemoteHandle | None:
    try:
        raw = json.loads(text)
        return RemoteHandle(
            executor=str(raw["executor"]),
            task_id=str(raw["task_id"]),
            attempt=int(raw["attempt"]),
            fields=dict(raw["fields"]),
            recorded_at=float(raw["recorded_at"]),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


class HandleJournal:
    """The handles of one durable state directory (one owner process at a time holds it)."""

    def __init__(self, home: Path) -> None:
        self.directory = home / HANDLES_DIR
        self.scope = durable_scope(home)

    def path_for(self, task_id: str) -> Path:
        key = f"{self.scope}\0{task_id}".encode("utf-8", "surrogatepass")
        return self.directory / (hashlib.sha256(key).hexdigest()[:40] + ".json")

    def read(self, task_id: str) -> RemoteHandle | None:
        """The recorded handle of ``task_id``; None when there is none (or it is damaged, or
        it names another task: a hash clash is treated as no handle, never adopted)."""
        try:
            text = self.path_for(task_id).read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        handle = _decode(text)
        return handle if handle is not None and handle.task_id == task_id else None

    def write(self, handle: RemoteHandle) -> None:
        """Record ``handle`` atomically and durably: a crash leaves the old file or the new
        one, and a handle written is on disk before the caller submits anything."""
        doc = json.dumps(attrs.asdict(handle), separators=(",", ":"), ensure_ascii=False)
        write_durably(self.path_for(handle.task_id), doc)

    def remove(self, task_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path_for(task_id))
