"""Task handlers: what actually runs when a task starts.

A task names its handler in ``payload["handler"]``. A handler is an async function of a
``TaskContext`` returning the result map (``dict[str, str]``); raising fails the attempt (the
scheduler retries while attempts remain), raising ``PermanentFailure`` fails the task at once.

Built-ins, registered through the ``dspy_infra_handlers`` hook like any plugin's handlers:

- ``exec``: ``payload["cmd"]`` through ``/bin/sh -c`` as an asyncio subprocess in its own
  process group; timeout or cancel kills the whole group, and so does the shell's exit
  (nothing it started outlives the task). Result: ``exit_code`` and the last 4 KiB of
  ``stdout`` / ``stderr``; a non-zero exit fails the attempt with the stderr tail.
  Optional ``payload["cwd"]``.
- ``noop``: returns ``{}`` at once (benchmarks).
- ``sleep``: sleeps ``payload["seconds"]`` (default 1) and returns ``{"slept": seconds}``.
- ``fail``: always fails with ``payload["message"]``.

``http`` (``http_handler.py``) and ``container`` (``container_handler.py``) live in their own
modules, registered the same way; they share this module's tail rule and
``payload_json_object`` for JSON-object payload fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Awaitable, Callable, Hashable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar, cast

import anyio
import attrs

from ..config import Settings
from ..hookspecs import hookimpl
from ..models import TaskSpec

__all__ = [
    "TAIL_BYTES",
    "ExecFailed",
    "Handler",
    "PermanentFailure",
    "SharedResources",
    "TaskContext",
    "dspy_infra_handlers",
    "exec_handler",
    "fail_handler",
    "noop_handler",
    "payload_json_object",
    "sleep_handler",
]

_R = TypeVar("_R")

#: How much of a subprocess's stdout / stderr a result keeps (the end of it).
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
    settings and the resources it owns for handlers (both None outside a scheduler)."""

    spec: TaskSpec
    attempt: int
    settings: Settings | None = None
    shared: SharedResources | None = None

    @property
    def payload(self) -> dict[str, str]:
        return self.spec.payload


Handler = Callable[[TaskContext], Awaitable[Mapping[str, str]]]


class PermanentFailure(Exception):
    """Raised by a handler for a failure no retry can fix (bad payload, unknown handler)."""


def payload_json_object(payload: Mapping[str, str], field: str, example: str) -> dict[str, str]:
    """``payload[field]`` parsed as a JSON object of strings (``{}`` when absent or empty).

    Payload values are strings on the wire, so structured fields arrive as JSON text; a
    malformed one is a ``PermanentFailure`` naming the field and showing ``example``.
    """
    raw = payload.get(field, "")
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise PermanentFailure(
            f"payload.{field}: not valid JSON ({exc}) (fix: a JSON object, e.g. {example})"
        ) from None
    if not isinstance(value, dict):
        raise PermanentFailure(
            f"payload.{field}: expected a JSON object, got {type(value).__name__}"
            f" (fix: a JSON object, e.g. {example})"
        )
    bad = sorted(str(k) for k, v in value.items() if not isinstance(v, str))
    if bad:
        raise PermanentFailure(
            f"payload.{field}: values must be strings, not for {', '.join(map(repr, bad))}"
            f" (fix: quote them, e.g. {example})"
        )
    return value


class _Tail:
    """Keeps the last ``TAIL_BYTES`` of a stream without holding all of it."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > 2 * TAIL_BYTES:
            del self.data[: len(self.data) - TAIL_BYTES]

    def text(self) -> str:
        return bytes(self.data[-TAIL_BYTES:]).decode("utf-8", errors="replace")


async def _drain(stream: asyncio.StreamReader | None, tail: _Tail) -> None:
    if stream is None:
        return
    while chunk := await stream.read(65536):
        tail.feed(chunk)


async def _exited(pid: int) -> None:
    """Return when process ``pid`` has exited.

    Not ``Process.wait()``: asyncio's wait also waits for the pipes to close, which a
    background child of the shell can hold open for as long as it likes.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already exited and reaped
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _spawn(cmd: str, cwd: str | None) -> asyncio.subprocess.Process:
    """Start ``cmd`` under ``/bin/sh -c`` in its own process group.

    The spawn itself is shielded: cancelled mid-spawn, asyncio would kill only the shell and
    then wait for pipes that the shell's children still hold, hanging the cancel for as long
    as the command runs. Instead, a cancel that lands here waits for the spawn to finish,
    kills the whole group, and re-raises.
    """
    spawning = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            # Own session = own process group, so a kill reaches the shell's children too.
            start_new_session=True,
        )
    )
    try:
        return await asyncio.shield(spawning)
    except asyncio.CancelledError:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                proc = await spawning
                _kill_group(proc.pid)
                await proc.wait()
        raise


async def exec_handler(ctx: TaskContext) -> dict[str, str]:
    cmd = ctx.payload.get("cmd", "")
    if not cmd.strip():
        raise PermanentFailure('payload.cmd: missing (fix: give the shell command, e.g. {"cmd": "echo hi"})')
    proc = await _spawn(cmd, ctx.payload.get("cwd") or None)
    out, err = _Tail(), _Tail()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_drain, proc.stdout, out)
            tg.start_soon(_drain, proc.stderr, err)
            await _exited(proc.pid)
            # The task is the shell: background children it left behind (which may hold the
            # pipes open) end with it, then the drains read what is left and see EOF.
            _kill_group(proc.pid)
        exit_code = await proc.wait()
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            with anyio.CancelScope(shield=True):
                await proc.wait()
    result = {"exit_code": str(exit_code), "stdout": out.text(), "stderr": err.text()}
    if exit_code != 0:
        raise ExecFailed(exit_code, result)
    return result


class ExecFailed(Exception):
    """An ``exec`` command exited non-zero; carries the result map (exit code and tails)."""

    def __init__(self, exit_code: int, result: dict[str, str]) -> None:
        self.exit_code = exit_code
        self.result = result
        tail = result["stderr"].strip() or result["stdout"].strip()
        super().__init__(f"command exited with {exit_code}" + (f": {tail}" if tail else ""))


async def noop_handler(ctx: TaskContext) -> dict[str, str]:
    return {}


def _seconds(ctx: TaskContext) -> float:
    raw = ctx.payload.get("seconds", "1")
    try:
        seconds = float(raw)
    except ValueError:
        raise PermanentFailure(f"payload.seconds: {raw!r} is not a number (fix: e.g. 0.5)") from None
    if seconds < 0:
        raise PermanentFailure(f"payload.seconds: must be >= 0, got {raw!r}")
    return seconds


async def sleep_handler(ctx: TaskContext) -> dict[str, str]:
    seconds = _seconds(ctx)
    await anyio.sleep(seconds)
    return {"slept": f"{seconds:g}"}


async def fail_handler(ctx: TaskContext) -> dict[str, str]:
    raise RuntimeError(ctx.payload.get("message", "failed on purpose"))


@hookimpl
def dspy_infra_handlers() -> Mapping[str, Handler]:
    """The built-in handlers."""
    return {"exec": exec_handler, "noop": noop_handler, "sleep": sleep_handler, "fail": fail_handler}
