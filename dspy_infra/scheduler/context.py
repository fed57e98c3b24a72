"""What a handler gets and reads: ``TaskContext`` (the task's spec, attempt, settings and the
scheduler's ``SharedResources``), the ``Handler`` type, the typed payload readers and the
tail rule for subprocess output.

A handler is an async function of a ``TaskContext`` returning its result, a JSON object;
raising fails the attempt (retried while attempts remain), raising ``PermanentFailure`` fails
the task at once. Payload values are JSON values; old clients send every value as a string,
so the typed readers accept a number's or an object's text too, and name the field on
anything else. ``Executor`` is the contract of what runs whole classes elsewhere. The
scheduler owns these contracts; the built-in handlers live in ``dspy_infra.handlers`` and
executors in ``dspy_infra.executors``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Awaitable, Callable, Collection, Hashable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, runtime_checkable

import anyio
import attrs

from ..config import Settings
from ..errors import ConfigError, PermanentFailure
from ..models import TaskClass, TaskSpec
from ..values import preview

if TYPE_CHECKING:
    from .task_logs import TaskLog

__all__ = [
    "TAIL_BYTES",
    "BoundedExecutor",
    "DetachableExecutor",
    "Executor",
    "ExecutorFactory",
    "Handler",
    "SharedResources",
    "Tail",
    "TaskContext",
    "classes_left_running",
    "payload_json_object",
    "payload_number",
    "payload_text",
]

_R = TypeVar("_R")

#: How much of a subprocess's output the ``Tail`` rule keeps (the end of it; the ``http``
#: and ``container`` handlers use it, ``exec`` keeps more: ``RESULT_OUTPUT_BYTES``).
TAIL_BYTES = 4096


class SharedResources:
    """Long-lived resources that handlers share across attempts (an engine connection, ...).

    Owned by the scheduler: each resource is opened by the first attempt that asks for it
    (``get``) and closed by ``aclose`` when the scheduler closes, after every attempt has
    ended. A resource that fails to open is not kept, so the next attempt tries again.
    """

    def __init__(self) -> None:
        self._opened: dict[Hashable, Any] = {}
        self._locks: dict[Hashable, anyio.Lock] = {}
        self._stack = contextlib.AsyncExitStack()
        self._closed = False

    async def get(self, key: Hashable, opener: Callable[[], AbstractAsyncContextManager[_R]]) -> _R:
        """The resource under ``key``, entering ``opener()`` the first time (once, even when
        attempts ask at the same moment)."""
        if key in self._opened:
            return cast(_R, self._opened[key])
        async with self._locks.setdefault(key, anyio.Lock()):
            if key not in self._opened:
                if self._closed:
                    raise RuntimeError("the scheduler that owns these resources has closed")
                self._opened[key] = await self._stack.enter_async_context(opener())
            return cast(_R, self._opened[key])

    async def aclose(self) -> None:
        self._closed = True
        self._opened.clear()
        await self._stack.aclose()


@attrs.frozen
class TaskContext:
    """What a handler gets: the task's spec, which attempt this is (1-based), the scheduler's
    settings and the resources it owns for handlers (both None outside a scheduler), and
    where the attempt's task log goes when the caller keeps it itself (``log``: a Ray runner
    ships it back with the outcome; None: the scheduler's task log directory)."""

    spec: TaskSpec
    attempt: int
    settings: Settings | None = None
    shared: SharedResources | None = None
    log: TaskLog | None = None

    @property
    def payload(self) -> Mapping[str, Any]:
        return self.spec.payload


Handler = Callable[[TaskContext], Awaitable[Mapping[str, Any]]]


@runtime_checkable
class Executor(Protocol):
    """Runs the tasks of a class whose ``executor`` is not ``"local"`` somewhere else (Slurm,
    and the next ones). ``run`` is called once per attempt, like a handler: its result is a
    JSON object; raising fails the attempt (``PermanentFailure``: the task). An executor that
    is also an async context manager is entered when the scheduler starts and left when it
    closes (its watchers and connections live that long).

    An executor whose attempts outlive their owner process and are adopted by the task's
    next attempt after a restart (Slurm jobs, Ray attempts of a durable scheduler) sets
    ``survives_owner = True``: recovery then re-queues a task interrupted on its last
    attempt instead of failing it (the work was not lost with the process)."""

    async def run(self, ctx: TaskContext) -> Mapping[str, Any]: ...


@runtime_checkable
class BoundedExecutor(Executor, Protocol):
    """An executor whose engine reports how many attempts of a class it can run now (Ray's
    free resources): the scheduler keeps the class's adaptive limit at or below it."""

    def capacity(self, class_name: str) -> int | None:
        """Attempts of ``class_name`` the engine can hold now; None = no bound known. Cheap
        and non-blocking (the sampler calls it on the loop): return a polled figure."""
        ...


@runtime_checkable
class DetachableExecutor(Executor, Protocol):
    """An executor whose attempts can outlive their owner (``survives_owner`` True: Slurm
    jobs, Ray attempts of a durable scheduler) and be left running by a graceful stop."""

    survives_owner: bool

    def leave_running(self, class_names: frozenset[str]) -> None:
        """The owner is stopping gracefully (``Scheduler.aclose``, a SIGTERM to ``serve``):
        an attempt of one of ``class_names`` cancelled from now on is left running on the
        engine, its handle kept, for the next start to adopt; it is not ended. Called once,
        after the shutdown grace and before the running attempts are cancelled. A task
        cancel or a timeout before it still ends the attempt."""
        ...

    async def cancel_left(self, task_id: str, class_name: str) -> None:
        """End the attempt of ``task_id`` that an earlier owner left running, if any: the
        task was cancelled before its next attempt adopted it."""
        ...


def classes_left_running(
    classes: Iterable[TaskClass], detachable: Collection[str], configured: Collection[str]
) -> frozenset[str]:
    """The classes whose running attempts a graceful stop leaves to the next start: those
    run by a ``detachable`` executor, unless ``on_shutdown = "cancel"``. ``"leave"`` on a
    class whose attempts cannot outlive this process is refused (``ConfigError``), except
    for an executor not ``configured`` here (its class refuses tasks anyway)."""
    left: set[str] = set()
    for cls in classes:
        if cls.executor in detachable:
            if cls.on_shutdown != "cancel":
                left.add(cls.name)
        elif cls.on_shutdown == "leave" and (cls.executor == "local" or cls.executor in configured):
            why = (
                "a local attempt ends with its owner"
                if cls.executor == "local"
                else f"the {cls.executor!r} executor of a memory-only scheduler keeps no handle to adopt it by"
            )
            raise ConfigError(
                f'on_shutdown = "leave" but {why}',
                field=f"task_classes.{cls.name}.on_shutdown",
                fix='set durable = true for a Slurm or Ray class, or on_shutdown = "cancel"',
            )
    return frozenset(left)


#: What the ``dspy_infra_executors`` hook maps a name to: called with the scheduler's
#: settings, it returns the executor (or None when the plugin is installed but not
#: configured, e.g. ``slurm`` unset).
ExecutorFactory = Callable[[Settings], Executor | None]


def payload_json_object(payload: Mapping[str, Any], field: str, example: str) -> dict[str, str]:
    """``payload[field]`` as an object of strings (``{}`` when absent, null or empty).

    A JSON object, or its text (old clients send every payload value as a string); anything
    else is a ``PermanentFailure`` naming the field and showing ``example``.
    """
    raw = payload.get(field)
    if raw is None:
        return {}
    if isinstance(raw, dict):
        value: Any = raw
    elif isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise PermanentFailure(
                f"payload.{field}: not valid JSON ({exc}) (fix: a JSON object, e.g. {example})"
            ) from None
    else:
        raise PermanentFailure(
            f"payload.{field}: expected a JSON object, got {preview(raw)} (fix: a JSON object, e.g. {example})"
        )
    if not isinstance(value, dict):
        raise PermanentFailure(
            f"payload.{field}: expected a JSON object, got {type(value).__name__}"
            f" (fix: a JSON object, e.g. {example})"
        )
    bad = sorted(str(k) for k, v in value.items() if not isinstance(v, str))
    if bad:
        raise PermanentFailure(
            f"payload.{field}: values must be strings, not for {', '.join(preview(k) for k in bad[:5])}"
            f" (fix: quote them, e.g. {example})"
        )
    return dict(value)


class Tail:
    """Keeps the last ``TAIL_BYTES`` of a stream without holding all of it."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > 2 * TAIL_BYTES:
            del self.data[: len(self.data) - TAIL_BYTES]

    def text(self) -> str:
        return bytes(self.data[-TAIL_BYTES:]).decode("utf-8", errors="replace")


# -- typed payload fields -------------------------------------------------------------------


def payload_text(payload: Mapping[str, Any], field: str, default: str = "", *, example: str = "") -> str:
    """``payload[field]`` as text (``default`` when absent or null); anything but a string is
    a ``PermanentFailure`` naming the field."""
    value = payload.get(field)
    if value is None:
        return default
    if not isinstance(value, str):
        raise PermanentFailure(
            f"payload.{field}: expected a string, got {preview(value)}"
            + (f" (fix: e.g. {example})" if example else "")
        )
    return value


def payload_number(
    payload: Mapping[str, Any], field: str, default: float, *, lo: float = 0.0, example: str = "0.5"
) -> float:
    """``payload[field]`` as a finite number ``>= lo``: a JSON number, or its text (what old
    clients send); anything else is a ``PermanentFailure`` naming the field."""
    value = payload.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PermanentFailure(
            f"payload.{field}: expected a number, got {preview(value)} (fix: e.g. {example})"
        )
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise PermanentFailure(
            f"payload.{field}: {preview(value)} is not a number (fix: e.g. {example})"
        ) from None
    if not math.isfinite(number) or number < lo:
        raise PermanentFailure(
            f"payload.{field}: must be a finite number >= {lo:g}, got {preview(value)} (fix: e.g. {example})"
        )
    return number
