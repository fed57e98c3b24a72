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
import subprocess
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
    PidMark,
    attempt_marker,
    durable_scope,
    find_marked,
    pid_mark,
    pids_since,
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
from ..scheduler.task_logs import AttemptLog, TaskLog, log_root, volatile_scope
from ..values import json_text, preview

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


async def _readable(fd: int) -> None:
    """Return when ``fd`` is readable (a pipe with data or at its end, a pidfd whose process
    has exited)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@attrs.define
class _Child:
    """A started command: its process, a pidfd that turns readable when it exits (not
    asyncio's child watcher: that costs a thread per process on Python 3.11, and its
    ``wait`` also waits for pipes a background child may hold), and the pid mark taken just
    before it started (``ownership.pids_since``)."""

    proc: subprocess.Popen[bytes]
    pidfd: int
    mark: PidMark | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pipes(self) -> tuple[int, int]:
        """The read ends of stdout and stderr, non-blocking."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        fds = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        for fd in fds:
            os.set_blocking(fd, False)
        return fds

    def reap(self) -> int:
        """The exit code (negative: the signal that ended it); only once the pidfd is readable."""
        code = self.proc.poll()
        assert code is not None, "reaped before it exited"
        return code

    def close(self) -> None:
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        os.close(self.pidfd)


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


def child_environment(settings: Settings | None, marker: str) -> dict[bytes, bytes]:
    """The environment of a task's command, as the system holds it (bytes): ours, without
    the server's credentials (the token under any name, the TLS key path), plus the
    attempt marker."""
    secrets: tuple[bytes, ...] = ()
    if settings is not None:
        secrets = tuple(os.fsencode(s) for s in (settings.token, settings.tls_key) if s)
    current = _environ_bytes()
    global _env_cache
    cached = _env_cache
    if cached is not None and cached[0] == current and cached[1] == secrets:
        env = cached[2].copy()
    else:
        snapshot = dict(current)  # one step: another thread may change the environment
        kept = {
            name: value
            for name, value in snapshot.items()
            if name not in _SECRET_VARS_B
            and name != _ATTEMPT_ENV_B
            and not any(value == s or (len(s) >= 8 and s in value) for s in secrets)
        }
        # Keyed by a copy of the environment: a change (os.environ, putenv through it) is
        # seen on the next call.
        _env_cache = (snapshot, secrets, kept)
        env = kept.copy()
    env[_ATTEMPT_ENV_B] = os.fsencode(marker)
    return env


_SECRET_VARS_B = frozenset(os.fsencode(name) for name in _SECRET_VARS)
_ATTEMPT_ENV_B = os.fsencode(ATTEMPT_ENV)
#: (environment it was made from, secrets it left out, the environment without them)
_env_cache: tuple[dict[bytes, bytes], tuple[bytes, ...], dict[bytes, bytes]] | None = None


def _environ_bytes() -> Mapping[bytes, bytes]:
    """This process's environment as bytes, without copying it: ``os.environ``'s own store
    (what ``os.environb`` reads; decoding it to text costs more than the rest of a spawn's
    preparation)."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        return data
    return dict(os.environb)


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

    def __init__(self, log: TaskLog | None) -> None:
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

    def take_pending(self) -> bytes:
        """The output not yet written to the log (the caller writes it)."""
        data, self._pending = bytes(self._pending), bytearray()
        return data

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


async def _drain_into(fd: int, output: _Output, capture: _Capture) -> None:
    """Read the non-blocking pipe ``fd`` to its end into ``capture`` (and the log)."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            await _readable(fd)
            continue
        if not chunk:
            return
        await output.feed(capture, chunk)


# -- the exec handler -----------------------------------------------------------------------


@attrs.frozen
class _Attempt:
    """Where one attempt's processes are recorded (``registry`` None: not recorded, as for a
    memory-only scheduler whose tasks never run again after a crash) and found (``marker``)."""

    scope: str
    marker: str
    registry: AttemptRegistry | None
    log: TaskLog | None


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
    log: TaskLog | None = ctx.log
    if log is None and settings is not None:
        log = AttemptLog(log_root(settings), ctx.spec.id, ctx.attempt)
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


def _launch(
    att: _Attempt, ctx: TaskContext, argv: list[str], cwd: str | None, env: Mapping[bytes, bytes]
) -> _Child:
    """Blocking: record the attempt, open its log, start the command in its own process
    group, record its pid. The record comes first: a crash right after the spawn still
    leaves the marker to find."""
    if att.registry is not None:
        att.registry.write(AttemptRecord(ctx.spec.id, ctx.attempt, att.marker, recorded_at=time.time()))
    if att.log is not None:
        att.log.open()
    mark = pid_mark()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            # Own session = own process group, so a kill reaches the shell's children too.
            start_new_session=True,
        )
    except OSError as exc:
        raise _spawn_failure(exc, argv, cwd) from None
    pidfd: int | None = None
    try:
        pidfd = os.pidfd_open(proc.pid)
        if att.registry is not None:
            _record_spawned(att, ctx, proc.pid)
    except BaseException:
        # Not waiting for the pipes: something that left the group may hold them.
        _kill_group(proc.pid)
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        if pidfd is not None:
            os.close(pidfd)
        raise
    return _Child(proc, pidfd, mark)


def _end_escaped(att: _Attempt, ctx: TaskContext, mark: PidMark | None) -> None:
    """Blocking: SIGKILL the attempt's descendants that left its process group (they still
    carry its marker; all started after ``mark``, when there is one)."""
    for _ in range(5):
        stray = find_marked(att.scope, {ctx.spec.id}, pids=pids_since(mark))
        if not stray:
            break
        for st in stray:
            if same_process(st.pid, st.start_time):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(st.pid, signal.SIGKILL)
        time.sleep(0.01)


def _only_the_child_since(child: _Child) -> bool:
    """True when no pid but the command's own was handed out since it started: nothing it
    started can be alive outside its (killed) group, so there is nothing to sweep. Reads
    three small ``/proc`` files (no disk), so it runs on the loop."""
    window = pids_since(child.mark)
    return window is not None and all(pid == child.pid for pids in window for pid in pids)


def _finish_attempt(
    att: _Attempt, ctx: TaskContext, log_tail: bytes, mark: PidMark | None, *, swept: bool
) -> None:
    """Blocking: end what the attempt left (unless ``swept`` already), write the rest of its
    output to its log and close it, forget its record."""
    if not swept:
        _end_escaped(att, ctx, mark)
    if att.log is not None:
        with contextlib.suppress(OSError):
            if log_tail:
                att.log.write(log_tail)
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
    child: _Child | None = None
    exited = swept = False
    try:
        # One thread hop records the attempt, opens its log and starts the command.
        # Shielded: a cancel that lands meanwhile waits for the start, then the finally
        # below ends the whole group.
        with anyio.CancelScope(shield=True):
            child = await anyio.to_thread.run_sync(_launch, att, ctx, argv, cwd, env)
        await anyio.lowlevel.checkpoint_if_cancelled()
        assert child is not None  # (the shielded scope swallows no error of the start)
        stdout, stderr = child.pipes()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_drain_into, stdout, output, output.out)
            tg.start_soon(_drain_into, stderr, output, output.err)
            await _readable(child.pidfd)
            exited = True
            # The task is the shell: background children it left behind (which may hold the
            # pipes open) end with it, those that left its group too, then the drains read
            # what is left and see EOF.
            _kill_group(child.pid)
            if not _only_the_child_since(child):
                await anyio.to_thread.run_sync(_end_escaped, att, ctx, child.mark)
            swept = True
        exit_code = child.reap()
    finally:
        with anyio.CancelScope(shield=True):
            if child is not None:
                if not exited:
                    _kill_group(child.pid)
                    await _readable(child.pidfd)
                child.reap()
                child.close()
            log_tail = output.take_pending()
            if swept and att.registry is None and not log_tail and (att.log is None or att.log.empty):
                # Nothing to sweep, remove or write: closing an empty file needs no thread.
                if att.log is not None:
                    with contextlib.suppress(OSError):
                        att.log.close()
            else:
                await anyio.to_thread.run_sync(
                    functools.partial(
                        _finish_attempt, att, ctx, log_tail, child.mark if child else None, swept=swept
                    )
                )
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
