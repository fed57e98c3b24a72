"""Task handlers: what actually runs when a task starts.

A task names its handler in ``payload["handler"]``. A handler is an async function of a
``TaskContext`` returning its result, a JSON object (``dict[str, Any]``); raising fails the
attempt (the scheduler retries while attempts remain), raising ``PermanentFailure`` fails the
task at once. Payload values are JSON values; old clients send every value as a string, so
the typed readers here (``payload_text``, ``payload_number``, ``payload_json_object``) accept
a number's or an object's text too, and name the field on anything else.

Built-ins, registered through the ``dspy_infra_handlers`` hook like any plugin's handlers:

- ``exec``: ``payload["cmd"]``, a string run through ``/bin/sh -c`` or a list of strings run
  as is, in its own process group; timeout or cancel kills the whole group, and so does the
  command's exit (nothing it started outlives the task, including descendants that left the
  group: they carry the attempt's ``DSPY_INFRA_ATTEMPT`` marker). The attempt's processes are
  recorded under the state directory while it runs (``dspy_infra.ownership``), so a restart
  after a crash ends them before the task runs again. The command never sees the server's
  token or TLS key path. Result: ``exit_code`` (int), ``stdout`` / ``stderr`` whole up to
  ``RESULT_OUTPUT_BYTES`` each (beyond that their head and tail, plus ``truncated: true``,
  ``stdout_omitted_bytes`` and ``stderr_omitted_bytes``); every attempt's output also goes to
  the task's log (``task_logs``, ``Infra.task_log``). A non-zero exit fails the attempt with
  the end of stderr. Optional ``payload["cwd"]``. Refused under ``exec_policy = "deny"``.
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
import errno
import functools
import json
import os
import signal
import time
from collections.abc import Mapping
from typing import Any, TypeVar

import anyio
import attrs

from ..config import Settings
from ..errors import HandlerFailure, PermanentFailure
from ..hookspecs import hookimpl
from ..ownership import (
    ATTEMPT_ENV,
    ATTEMPTS_DIR,
    AttemptRecord,
    AttemptRegistry,
    attempt_marker,
    durable_scope,
    find_marked,
    proc_stat,
    same_process,
)
from ..scheduler.context import (
    TAIL_BYTES,
    Handler,
    SharedResources,
    TaskContext,
    payload_json_object,
    payload_number,
    payload_text,
)
from ..values import json_text, preview
from .task_logs import AttemptLog, log_root, volatile_scope

__all__ = [
    "RESULT_OUTPUT_BYTES",
    "TAIL_BYTES",
    "ExecFailed",
    "Handler",
    "PermanentFailure",
    "SharedResources",
    "TaskContext",
    "child_environment",
    "dspy_infra_handlers",
    "exec_handler",
    "fail_handler",
    "noop_handler",
    "payload_json_object",
    "payload_number",
    "payload_text",
    "sleep_handler",
]

_R = TypeVar("_R")


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


async def _spawn(argv: list[str], cwd: str | None, env: dict[str, str]) -> asyncio.subprocess.Process:
    """Start ``argv`` in its own process group.

    The spawn itself is shielded: cancelled mid-spawn, asyncio would kill only the shell and
    then wait for pipes that the shell's children still hold, hanging the cancel for as long
    as the command runs. Instead, a cancel that lands here waits for the spawn to finish,
    kills the whole group, and re-raises.
    """
    spawning = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=env,
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


_CMD_FIX = 'fix: a shell command, e.g. {"cmd": "echo hi"}, or an argument list, e.g. {"cmd": ["echo", "hi"]}'


def _command(payload: Mapping[str, Any]) -> list[str]:
    """The argv of an ``exec`` payload: a string runs under ``/bin/sh -c``, a list of strings
    runs as is (no shell)."""
    cmd = payload.get("cmd")
    if cmd is None or (isinstance(cmd, str) and not cmd.strip()) or (isinstance(cmd, list) and not cmd):
        raise PermanentFailure(f"payload.cmd: missing ({_CMD_FIX})")
    if isinstance(cmd, str):
        argv = ["/bin/sh", "-c", cmd]
    elif isinstance(cmd, list):
        for i, arg in enumerate(cmd):
            if not isinstance(arg, str):
                raise PermanentFailure(
                    f"payload.cmd[{i}]: expected a string, got {preview(arg)} ({_CMD_FIX})"
                )
        argv = list(cmd)
    else:
        raise PermanentFailure(
            f"payload.cmd: expected a string or a list of strings, got {preview(cmd)} ({_CMD_FIX})"
        )
    for i, arg in enumerate(argv if isinstance(cmd, list) else [cmd]):
        if "\0" in arg:
            where = f"payload.cmd[{i}]" if isinstance(cmd, list) else "payload.cmd"
            raise PermanentFailure(f"{where}: contains a NUL character, which no command line can hold")
    return argv


# -- who may run commands -------------------------------------------------------------------

#: Variables never passed to a task's command: the server's credentials.
_SECRET_VARS = frozenset({"DSPY_INFRA_TOKEN", "DSPY_INFRA_TLS_KEY"})


def child_environment(settings: Settings | None, marker: str) -> dict[str, str]:
    """The environment of a task's command: ours, without the server's credentials (the
    token under any name, the TLS key path), plus the attempt marker."""
    secrets: list[str] = []
    if settings is not None:
        if settings.token:
            secrets.append(settings.token)
        if settings.tls_key:
            secrets.append(settings.tls_key)
    env: dict[str, str] = {}
    for name, value in os.environ.items():
        if name in _SECRET_VARS or name == ATTEMPT_ENV:
            continue
        if any(value == s or (len(s) >= 8 and s in value) for s in secrets):
            continue
        env[name] = value
    env[ATTEMPT_ENV] = marker
    return env


def _check_exec_allowed(settings: Settings | None) -> None:
    # The surfaces refuse such tasks at submit; this is the backstop for anything that got
    # past them (a task recovered from the store, a plugin submitting directly).
    if settings is not None and settings.exec_policy == "deny":
        raise PermanentFailure(
            "exec_policy: 'deny' forbids running commands, so the exec handler refuses this task"
            ' (fix: set exec_policy = "allow" or "embedded" in dspy-infra.toml or'
            " DSPY_INFRA_EXEC_POLICY, then submit it again)"
        )


# -- exec output ----------------------------------------------------------------------------

#: Most of each stream (stdout, stderr) an ``exec`` result keeps: the first and last halves,
#: with a note of how much was cut between them. The whole output is in the task log
#: (bounded by ``task_logs.TASK_LOG_BYTES``).
RESULT_OUTPUT_BYTES = 256 * 1024


class _Capture:
    """Keeps the first and last ``limit // 2`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int = RESULT_OUTPUT_BYTES) -> None:
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > 2 * self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    def text(self, budget: int = RESULT_OUTPUT_BYTES) -> tuple[str, int]:
        """``(text, omitted bytes)``: the whole output if it fits ``budget`` once encoded as
        JSON, else its head and tail around a note of what was cut (halving the kept part
        while control characters make the JSON text too big)."""
        data = bytes(self.head) + bytes(self.tail[-self.tail_limit :])
        keep = len(data)
        while True:
            if keep >= self.total:
                text, omitted = data.decode("utf-8", errors="replace"), 0
            else:
                half = keep // 2
                head = data[:half]
                tail = data[len(data) - (keep - half) :] if keep > half else b""
                omitted = self.total - len(head) - len(tail)
                text = (
                    head.decode("utf-8", errors="replace")
                    + f"\n[dspy_infra: {omitted} bytes omitted; the task log has more]\n"
                    + tail.decode("utf-8", errors="replace")
                )
            if keep == 0 or len(json.dumps(text, ensure_ascii=False)) <= budget + 100:
                return text, omitted
            keep //= 2


class _Output:
    """Where an attempt's output goes: the result's captures and the attempt's log file.

    Log writes are batched and done off the event loop; the drains wait for them, so a
    command cannot outrun the disk by more than one batch per stream.
    """

    _BATCH = 256 * 1024

    def __init__(self, log: AttemptLog | None) -> None:
        self.out, self.err = _Capture(), _Capture()
        self.log = log
        self._pending = bytearray()
        self._lock = anyio.Lock()

    async def feed(self, capture: _Capture, chunk: bytes) -> None:
        capture.feed(chunk)
        if self.log is not None:
            self._pending += chunk
            if len(self._pending) >= self._BATCH:
                await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            if self.log is not None and self._pending:
                data, self._pending = bytes(self._pending), bytearray()
                await anyio.to_thread.run_sync(self.log.write, data)

    def result(self, exit_code: int) -> dict[str, Any]:
        stdout, out_cut = self.out.text()
        stderr, err_cut = self.err.text()
        result: dict[str, Any] = {"exit_code": exit_code, "stdout": stdout, "stderr": stderr}
        if out_cut or err_cut:
            # Only when something was cut: a plain result stays three keys (workflow outputs
            # and templates see exactly what a command printed).
            result.update(truncated=True, stdout_omitted_bytes=out_cut, stderr_omitted_bytes=err_cut)
        return result


async def _drain_into(stream: asyncio.StreamReader | None, output: _Output, capture: _Capture) -> None:
    if stream is None:
        return
    while chunk := await stream.read(65536):
        await output.feed(capture, chunk)


# -- the exec handler -----------------------------------------------------------------------


@attrs.frozen
class _Attempt:
    """Where one attempt's processes are recorded (``registry`` None: not recorded, as for a
    memory-only scheduler whose tasks never run again after a crash) and found (``marker``)."""

    scope: str
    marker: str
    registry: AttemptRegistry | None
    log: AttemptLog | None


def _attempt(ctx: TaskContext) -> _Attempt:
    settings = ctx.settings
    if settings is not None and settings.durable:
        home = settings.resolved_home()
        scope = durable_scope(home)
        registry: AttemptRegistry | None = AttemptRegistry(home / ATTEMPTS_DIR)
    elif settings is not None:
        # Memory-only: nothing to recover, so no record; the marker is this process's and
        # this home's (two such schedulers in one process must not end each other's tasks).
        scope, registry = f"{volatile_scope()}-{durable_scope(settings.resolved_home())}", None
    else:
        scope, registry = volatile_scope(), None
    log = AttemptLog(log_root(settings), ctx.spec.id, ctx.attempt) if settings is not None else None
    return _Attempt(scope, attempt_marker(scope, ctx.spec.id, ctx.attempt), registry, log)


def _record_spawned(att: _Attempt, ctx: TaskContext, pid: int) -> None:
    """Blocking: rewrite the attempt's record with the process's pid, start time and group."""
    assert att.registry is not None
    st = proc_stat(pid)
    att.registry.write(
        AttemptRecord(
            task_id=ctx.spec.id,
            attempt=ctx.attempt,
            marker=att.marker,
            pid=pid,
            pgid=pid,  # start_new_session: the command leads its own group
            start_time=st.start_time if st is not None else 0,
            recorded_at=time.time(),
        )
    )


def _end_escaped(att: _Attempt, ctx: TaskContext) -> None:
    """Blocking: SIGKILL the attempt's descendants that left its process group (they still
    carry its marker)."""
    for _ in range(5):
        stray = [st for st in find_marked(att.scope, {ctx.spec.id}) if st.pid != os.getpid()]
        if not stray:
            break
        for st in stray:
            if same_process(st.pid, st.start_time):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(st.pid, signal.SIGKILL)
        time.sleep(0.01)


def _finish_attempt(att: _Attempt, ctx: TaskContext, *, swept: bool) -> None:
    """Blocking: end what the attempt left (unless ``swept`` already), close its log,
    forget its record."""
    if not swept:
        _end_escaped(att, ctx)
    if att.log is not None:
        with contextlib.suppress(OSError):
            att.log.close()
    if att.registry is not None:
        att.registry.remove(ctx.spec.id, ctx.attempt)


async def exec_handler(ctx: TaskContext) -> dict[str, Any]:
    _check_exec_allowed(ctx.settings)
    argv = _command(ctx.payload)
    cwd = payload_text(ctx.payload, "cwd", example='{"cwd": "/tmp"}') or None
    att = _attempt(ctx)
    env = child_environment(ctx.settings, att.marker)
    output = _Output(att.log)
    proc: asyncio.subprocess.Process | None = None
    swept = False
    try:
        # Recorded before the spawn: a crash right after it still leaves the marker to find.
        await anyio.to_thread.run_sync(_start_attempt, att, ctx)
        try:
            proc = await _spawn(argv, cwd, env)
        except OSError as exc:
            raise _spawn_failure(exc, argv, cwd) from None
        async with anyio.create_task_group() as tg:
            if att.registry is not None:
                tg.start_soon(anyio.to_thread.run_sync, _record_spawned, att, ctx, proc.pid)
            tg.start_soon(_drain_into, proc.stdout, output, output.out)
            tg.start_soon(_drain_into, proc.stderr, output, output.err)
            await _exited(proc.pid)
            # The task is the shell: background children it left behind (which may hold the
            # pipes open) end with it, those that left its group too, then the drains read
            # what is left and see EOF.
            _kill_group(proc.pid)
            await anyio.to_thread.run_sync(_end_escaped, att, ctx)
            swept = True
        exit_code = await proc.wait()
    finally:
        with anyio.CancelScope(shield=True):
            if proc is not None and proc.returncode is None:
                _kill_group(proc.pid)
                await proc.wait()
            with contextlib.suppress(Exception):
                await output.flush()
            await anyio.to_thread.run_sync(functools.partial(_finish_attempt, att, ctx, swept=swept))
    result = output.result(exit_code)
    if exit_code != 0:
        raise ExecFailed(exit_code, result)
    return result


def _spawn_failure(exc: OSError, argv: list[str], cwd: str | None) -> Exception:
    """What a failed spawn means: a bad ``cwd`` or program is the payload's fault (no retry
    can fix it), anything else (out of processes, say) may pass."""
    if cwd is not None and exc.filename == cwd:
        return PermanentFailure(f"payload.cwd: {preview(cwd)}: {exc.strerror} (fix: an existing directory)")
    if exc.errno == errno.E2BIG:
        return PermanentFailure(
            "payload.cmd: the command line is too long for the system (fix: pass data in a file)"
        )
    if isinstance(exc, FileNotFoundError | PermissionError | NotADirectoryError) or exc.filename == argv[0]:
        return PermanentFailure(
            f"payload.cmd[0]: cannot run {preview(argv[0])}: {exc.strerror}"
            " (fix: a program on PATH or an absolute path to an executable)"
        )
    return exc


def _start_attempt(att: _Attempt, ctx: TaskContext) -> None:
    """Blocking: record the attempt (no pid yet) and open its log."""
    if att.registry is not None:
        att.registry.write(AttemptRecord(ctx.spec.id, ctx.attempt, att.marker, recorded_at=time.time()))
    if att.log is not None:
        att.log.open()


#: How much of a failed command's output its error message shows (the end of it).
_ERROR_TAIL_CHARS = 2000


class ExecFailed(HandlerFailure):
    """An ``exec`` command exited non-zero; carries the result (exit code and output)."""

    def __init__(self, exit_code: int, result: Mapping[str, Any]) -> None:
        self.exit_code = exit_code
        tail = str(result.get("stderr", "")).strip() or str(result.get("stdout", "")).strip()
        if len(tail) > _ERROR_TAIL_CHARS:
            tail = "..." + tail[-_ERROR_TAIL_CHARS:]
        super().__init__(f"command exited with {exit_code}" + (f": {tail}" if tail else ""), result)


async def noop_handler(ctx: TaskContext) -> dict[str, Any]:
    return {}


async def sleep_handler(ctx: TaskContext) -> dict[str, Any]:
    seconds = payload_number(ctx.payload, "seconds", 1.0)
    await anyio.sleep(seconds)
    return {"slept": seconds}


async def fail_handler(ctx: TaskContext) -> dict[str, Any]:
    message = ctx.payload.get("message", "failed on purpose")
    raise RuntimeError(message if isinstance(message, str) else json_text(message))


@hookimpl
def dspy_infra_handlers() -> Mapping[str, Handler]:
    """The built-in handlers."""
    return {"exec": exec_handler, "noop": noop_handler, "sleep": sleep_handler, "fail": fail_handler}
