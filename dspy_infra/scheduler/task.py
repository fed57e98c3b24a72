"""``TaskRecord``: the scheduler's mutable bookkeeping for one task (the public view is
``TaskState``), and the rows it writes to the store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import attrs

from ..config import Settings
from ..errors import (
    InfraError,
)
from ..models import TaskResult, TaskSpec, TaskState, TaskStatus
from .context import SharedResources, TaskContext
from .store import (
    STATUS_TEXT,
    InsertRow,
    UpdateRow,
    encode_json_object,
)

__all__ = ["NO_RESULT", "TaskRecord"]

_PENDING = TaskStatus.PENDING
#: The result of a task that has none yet (shared: results are replaced, never mutated).
NO_RESULT: dict[str, Any] = {}
_NO_RESULT = NO_RESULT


def _slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Callable[[Any, Any], None], ...]:
    """The setters of the slots ``names`` of the attrs class ``cls``, once it is checked that
    its constructor does nothing but store exactly these fields (no validator, converter or
    post-init step that storing them directly would skip): an import error, not a silently
    unchecked view, if ``models.py`` changes them."""
    fields = attrs.fields(cls)
    if (
        tuple(f.name for f in fields) != names
        or any(f.validator is not None or f.converter is not None for f in fields)
        or hasattr(cls, "__attrs_post_init__")
        or "__slots__" not in vars(cls)
    ):
        raise TypeError(f"{cls.__name__} is not the class TaskRecord's views were written for")
    return tuple(vars(cls)[name].__set__ for name in names)


# The public views and the handler's context are built field by field through their slots:
# all are frozen attrs classes, whose generated __init__ stores each field through
# object.__setattr__ at about twice the cost, and a task builds two or three of them
# (tests/scheduler/test_task_record.py and test_hot_path.py check them against the keyword
# forms).
_new = object.__new__
(
    _state_spec,
    _state_status,
    _state_attempts,
    _state_result,
    _state_error,
    _state_submitted_at,
    _state_started_at,
    _state_completed_at,
    _state_duration_ms,
) = _slot_setters(
    TaskState,
    (
        "spec",
        "status",
        "attempts",
        "result",
        "error",
        "submitted_at",
        "started_at",
        "completed_at",
        "duration_ms",
    ),
)
(
    _result_task_id,
    _result_status,
    _result_result,
    _result_error,
    _result_duration_ms,
    _result_completed_at,
) = _slot_setters(TaskResult, ("task_id", "status", "result", "error", "duration_ms", "completed_at"))
_context_spec, _context_attempt, _context_settings, _context_shared, _context_log = _slot_setters(
    TaskContext, ("spec", "attempt", "settings", "shared", "log")
)


class TaskRecord:
    """Mutable bookkeeping for one task (the public view is ``TaskState``)."""

    # Class-level defaults, not __slots__: a new task sets four attributes instead of
    # sixteen (accepting is on the hot path). Mutable values are always replaced, never
    # changed in place, so the shared defaults stay as they are.
    status = _PENDING
    attempts = 0
    result: dict[str, Any] = _NO_RESULT
    error = ""
    started_at = 0.0
    completed_at = 0.0
    duration_ms = 0.0
    #: True once the terminal state is committed and handed to waiters and streams.
    delivered = False
    cancel_requested = False
    #: Re-queued from the store at start (it may name a handler registered after start).
    recovered = False
    waiters: list[asyncio.Future[None]] | None = None
    worker: asyncio.Task[Any] | None = None
    timer: asyncio.TimerHandle | None = None
    #: False until the task's row is committed (durable mode); it is queued only then.
    stored = True
    #: False when the row was accepted into the store's log without waiting for its flush
    #: (``submit_and_wait``): acknowledging it again waits for a flush.
    flushed = True
    #: Why the store refused this task's row (the task was not accepted).
    rejection: InfraError | None = None
    #: Why the store refused the latest change of this (stored) task's row.
    write_error: InfraError | None = None
    #: The payload's JSON text, computed once at submit (size check and store row).
    payload_text = ""
    #: Set when the task's first attempt started with its submit (``Scheduler._intake``):
    #: resolves once the submit's row, which records that attempt, is on the disk.
    intake_gate: asyncio.Future[InfraError | None] | None = None
    #: Attempts in a row that could not start because their record was not saved.
    unsaved_starts = 0

    def __init__(self, spec: TaskSpec, seq: int, now: float) -> None:
        self.spec = spec
        self.seq = seq
        self.submitted_at = now
        self.ready_at = now

    #: Set by ``__init__``; every other attribute has a class-level default above.
    INIT_ATTRIBUTES = ("spec", "seq", "submitted_at", "ready_at")

    def insert_row(self) -> InsertRow:
        spec = self.spec
        return (
            spec.id,
            self.seq,
            spec.task_class,
            spec.priority,
            spec.timeout,
            spec.max_attempts,
            spec.workflow_id,
            self.payload_text or encode_json_object(spec.payload),
            STATUS_TEXT[self.status],
            self.attempts,
            encode_json_object(self.result) if self.result else "",
            self.error,
            self.submitted_at,
            self.started_at,
            self.completed_at,
            self.duration_ms,
        )

    def update_row(self) -> UpdateRow:
        return (
            STATUS_TEXT[self.status],
            self.attempts,
            encode_json_object(self.result) if self.result else "",
            self.error,
            self.started_at,
            self.completed_at,
            self.duration_ms,
            self.spec.id,
        )

    def state(self) -> TaskState:
        state: TaskState = _new(TaskState)  # (the slot setters above say why)
        _state_spec(state, self.spec)
        _state_status(state, self.status)
        _state_attempts(state, self.attempts)
        _state_result(state, dict(self.result))
        _state_error(state, self.error)
        _state_submitted_at(state, self.submitted_at)
        _state_started_at(state, self.started_at)
        _state_completed_at(state, self.completed_at)
        _state_duration_ms(state, self.duration_ms)
        return state

    def attempt_context(self, settings: Settings, shared: SharedResources) -> TaskContext:
        """What the handler of the attempt now starting gets (its task log: the scheduler's)."""
        ctx: TaskContext = _new(TaskContext)
        _context_spec(ctx, self.spec)
        _context_attempt(ctx, self.attempts)
        _context_settings(ctx, settings)
        _context_shared(ctx, shared)
        _context_log(ctx, None)
        return ctx

    def to_result(self) -> TaskResult:
        # Without building the TaskState first (once per task); the same as TaskResult.of.
        result: TaskResult = _new(TaskResult)
        _result_task_id(result, self.spec.id)
        _result_status(result, self.status)
        _result_result(result, dict(self.result))
        _result_error(result, self.error)
        _result_duration_ms(result, self.duration_ms)
        _result_completed_at(result, self.completed_at)
        return result


def _share_attribute_names() -> None:
    """Put every attribute name of a record in the key table its instances share.

    CPython keeps one key table per class for its instances' attributes and stores each
    instance's values in a small array; but every new instance shrinks the room left in the
    table for names not yet in it, and an instance that sets a name the table has no room
    for gets a dict of its own. A batch submitted before any task of the process ran used
    up that room, so every record grew its own dict once its task started: a second object
    per task for the garbage collector to track (and to walk in every full collection) and
    slower attribute access. Setting every name once on a throwaway record, before any real
    one exists, puts them all in the table (a record's attributes are its ``__init__``'s
    and the class-level defaults; tests/scheduler/test_hot_path.py checks that running
    tasks leaves no record with a dict of its own)."""
    probe = TaskRecord.__new__(TaskRecord)
    for name in TaskRecord.INIT_ATTRIBUTES:
        setattr(probe, name, None)
    for name, value in vars(TaskRecord).items():
        if not name.startswith("_") and not name.isupper() and not callable(value):
            setattr(probe, name, value)


_share_attribute_names()
