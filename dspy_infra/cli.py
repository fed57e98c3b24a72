"""The ``dspy-infra`` command.

Every command that needs an infra goes through ``ensure_infra()``: it talks to the server
named by ``--addr`` / ``DSPY_INFRA_ADDR``, or in ``mode=auto`` to the one at the default
address when it serves this state directory, and otherwise runs an embedded ``Infra`` on the
state directory for the length of the command (shut down at its end, saying so if it waits).

Errors are one line on stderr, ``dspy-infra: error: <text>``, where the text is the
``InfraError``'s own (it names the field and the fix), with fixes that name Python calls
rewritten as the matching ``dspy-infra`` command (``cli_fix``). Exit codes: 0 ok, 1 a failure
(a task failed, was cancelled or had no handler, a service did not come up, a server did not
answer), 2 bad input (a ``SpecError``, an unknown id, a bad argument), 130 interrupted.
``--debug`` shows the traceback instead. Results are JSON objects and print as JSON.

The settings reference (``config init`` and ``config reference``) is ``config_doc.py``'s.

Size: over 600 lines on purpose: one function per command plus the parser that names them
all, read together; the settings reference is ``config_doc.py``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import attrs

from .api import InfraAPI
from .config import CONFIG_FILE_NAME, load_settings
from .config_doc import SettingDoc, render_config_template, render_settings_markdown, settings_reference
from .errors import AlreadyExists, DeadlineExceeded, InfraError, NotFound, SpecError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "SettingDoc",
    "cli_fix",
    "main",
    "parse_pairs",
    "render_config_template",
    "render_settings_markdown",
    "settings_reference",
]

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_TERMINAL_TASK = frozenset({"completed", "failed", "cancelled"})
_TERMINAL_RUN = frozenset({"completed", "failed", "cancelled"})
_BAD_SERVICE = frozenset({"unhealthy", "failed"})

# ---------------------------------------------------------------------------------------------
# Argument helpers


class _Parser(argparse.ArgumentParser):
    """argparse that raises a one-line ``SpecError`` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise SpecError(message, field=self.prog, fix=f"see `{self.prog} --help`")


def parse_pairs(values: Sequence[str] | None, field: str) -> dict[str, str]:
    """``["k=v", ...]`` to a dict; a missing ``=``, an empty key or a repeated key is refused."""
    out: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(
                f"expected KEY=VALUE, got {item!r}", field=field, fix=f"write e.g. {field} cmd=echo"
            )
        if key in out:
            raise SpecError(f"key {key!r} given twice", field=field, fix="give each key once")
        out[key] = value
    return out


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# ---------------------------------------------------------------------------------------------
# Output helpers


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Not a terminal (a pipe, a log): wide enough that tables of ids do not wrap.
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, markup=False, soft_wrap=True, width=width)


def _ts(seconds: float) -> str:
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _value_text(value: Any) -> str:
    """A JSON value for a human: a string as is (trailing newline dropped), else compact JSON."""
    if isinstance(value, str):
        return value.rstrip("\n")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _pairs_text(mapping: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_value_text(v)}" for k, v in mapping.items())


def _as_dict(obj: Any) -> dict[str, Any]:
    """An attrs instance, a mapping or an object with a ``__dict__`` as a JSON-able dict."""
    if attrs.has(type(obj)):
        doc = attrs.asdict(obj, recurse=True)
    elif isinstance(obj, Mapping):
        doc = dict(obj)
    else:
        doc = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    return json.loads(json.dumps(doc, default=str))


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def _status_text(value: Any) -> str:
    return str(getattr(value, "value", value))


def _table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    fold: bool = False,
    right: Container[str] = (),
) -> Any:
    """A rich table of ``rows``: the human view of every listing (``--json`` is the other).
    ``fold`` wraps long cells (URLs) instead of cutting them; ``right`` aligns those columns."""
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(
            column,
            overflow="fold" if fold else "ellipsis",
            justify="right" if column in right else "left",
        )
    for row in rows:
        table.add_row(*row)
    return table


def _print_listing(
    as_json: bool,
    items: Sequence[T],
    *,
    doc: Callable[[T], Any],
    title: str,
    columns: Sequence[str],
    row: Callable[[T], Sequence[str]],
) -> int:
    """A listing command's output: ``doc`` of each item as a JSON array with ``--json``, else
    a table titled ``title (count)`` with ``row`` of each item."""
    if as_json:
        _print_json([doc(item) for item in items])
    else:
        _console().print(_table(f"{title} ({len(items)})", columns, [row(item) for item in items]))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Running against an infra


def _infra_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "config_file": args.config,
        "addr": args.addr,
        "state_dir": args.home,
        "token": args.token,
        "mode": args.mode,
        "backend": getattr(args, "backend", None),
    }


#: Seconds of a silent shutdown before the CLI says what it is waiting for.
SHUTDOWN_NOTICE_AFTER = 0.5


def _run_with_infra(args: argparse.Namespace, body: Callable[[InfraAPI], Awaitable[int]]) -> int:
    async def run() -> int:
        from .ensure import ensure_infra

        infra = await ensure_infra(**_infra_kwargs(args))
        try:
            return await body(infra)
        finally:
            await _shutdown_with_notice(infra)

    return asyncio.run(run())


async def _shutdown_with_notice(infra: InfraAPI) -> None:
    """Shut the infra down; if that takes a while (running tasks drain, services stop), say
    so on stderr instead of hanging silently."""
    from .ensure import shutdown_infra

    closing = asyncio.ensure_future(shutdown_infra())
    try:
        await asyncio.wait_for(asyncio.shield(closing), timeout=SHUTDOWN_NOTICE_AFTER)
    except TimeoutError:
        grace = infra.settings.shutdown_grace if infra.mode == "embedded" else None
        wait = f"up to {grace:g} s" if grace is not None else "a moment"
        sys.stderr.write(
            f"dspy-infra: stopping: running tasks get {wait} to finish (the rest stay stored"
            " for the next start), then the services this command started stop...\n"
        )
        sys.stderr.flush()
        await closing


# ---------------------------------------------------------------------------------------------
# Commands


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return int(demo_main() or 0)


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(
        args.config,
        home=args.home,
        token=args.token,
        backend=args.backend,
        host=args.host,
        grpc_port=args.grpc_port,
        env_manager_port=args.env_manager_port,
        http_port=args.http_port,
        mode="embedded",
    )
    from .serve import run_server

    return int(asyncio.run(run_server(settings, stop_services=args.stop_services)) or 0)


def _service_names(args: argparse.Namespace, settings_services: Mapping[str, Any]) -> list[str]:
    if args.names:
        return list(args.names)
    if settings_services:
        return list(settings_services)
    raise SpecError(
        "no services named",
        field="NAMES",
        fix=f"name them (e.g. `dspy-infra up redis`) or declare [services.NAME] tables in {CONFIG_FILE_NAME}",
    )


def _cmd_up(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn

    async def body(infra: InfraAPI) -> int:
        configured = infra.settings.services if infra.mode == "embedded" else {}
        names = _service_names(args, configured)
        out = _console()
        final: dict[str, Any] = {}
        progress = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[status]:<10} {task.fields[message]}"),
            console=out,
            transient=not out.is_terminal,
        )
        with progress:
            rows: dict[str, Any] = {}
            keep = True if args.keep else None
            async for update in infra.services.start(names, parallel=not args.sequential, keep=keep):
                name = update.service_name
                if name not in rows:
                    rows[name] = progress.add_task(name, total=100, status="", message="")
                status = _status_text(update.status)
                progress.update(rows[name], completed=update.progress, status=status, message=update.message)
                final[name] = update
        failed = []
        for name, update in final.items():
            status = _status_text(update.status)
            mark = "FAILED" if status in _BAD_SERVICE else "ok"
            out.print(f"{name}: {status} [{mark}]" + (f" {update.message}" if update.message else ""))
            if status in _BAD_SERVICE:
                failed.append(name)
        if infra.mode == "embedded" and not args.keep:
            await infra.services.stop(list(final))
            out.print(
                "note: no server is running and --keep was not given, so they were stopped again"
                " as this command ends. `dspy-infra up --keep NAMES` leaves them running (the next"
                " command adopts them; `dspy-infra down` stops them), `dspy-infra serve` supervises them."
            )
        if failed:
            raise _Failure(f"service(s) did not come up: {', '.join(failed)}")
        return EXIT_OK

    return _run_with_infra(args, body)


class _Failure(Exception):
    """A command finished but what it did failed (exit 1), with a one-line message."""


def _cmd_down(args: argparse.Namespace) -> int:
    async def body(infra: InfraAPI) -> int:
        names = list(args.names)
        if not names:
            states = await infra.services.status()
            names = [n for n, st in states.items() if _status_text(st.status) != "stopped"]
        if not names:
            _console().print("no services are running")
            return EXIT_OK
        results = await infra.services.stop(names, timeout=args.timeout)
        out = _console()
        bad = []
        for name in names:
            outcome = results.get(name, "unknown")
            out.print(f"{name}: {outcome}")
            if outcome not in ("stopped", "not running", "ok", "already stopped"):
                bad.append(name)
        if bad:
            raise _Failure(f"could not stop: {', '.join(bad)}")
        return EXIT_OK

    return _run_with_infra(args, body)


def _cmd_status(args: argparse.Namespace) -> int:
    async def body(infra: InfraAPI) -> int:
        health = await infra.health()
        services = await infra.services.status()
        queues = await infra.queue_status()
        mode = "embedded" if infra.mode == "embedded" else "server"
        if args.json:
            _print_json(
                {
                    "mode": mode,
                    "health": health,
                    "services": {n: _as_dict(s) for n, s in services.items()},
                    "queues": {n: _as_dict(q) for n, q in queues.items()},
                }
            )
            return EXIT_OK
        out = _console()
        where = (
            f"embedded, home {infra.settings.resolved_home()}"
            if mode == "embedded"
            else f"{infra.location.removeprefix('the ')}"
            + (f", home {health['home']}" if health.get("home") else "")
        )
        out.print(
            f"dspy-infra {health.get('version', '?')} ({where}): "
            + ("healthy" if health.get("healthy") else "UNHEALTHY")
        )
        service_rows = [
            (
                name,
                _status_text(st.status),
                st.backend or "-",
                ", ".join(f"{h}->{c}" for c, h in sorted(st.ports.items())) or "-",
                (st.instance_id or "-")[:12],
                _ts(st.started_at),
                str(st.restarts),
            )
            for name, st in sorted(services.items())
        ]
        service_columns = ("service", "status", "backend", "ports", "instance", "started", "restarts")
        out.print(_table("Services", service_columns, service_rows or [("(none)", "", "", "", "", "", "")]))
        queue_rows = [
            (name, str(q.depth), str(q.inflight), str(q.limit), str(q.min_limit), str(q.max_limit))
            for name, q in sorted(queues.items())
        ]
        queue_columns = ("class", "queued", "running", "limit", "min", "max")
        out.print(_table("Queues and limits", queue_columns, queue_rows, right=queue_columns[1:]))
        return EXIT_OK if health.get("healthy") else EXIT_FAILURE

    return _run_with_infra(args, body)


def _cmd_logs(args: argparse.Namespace) -> int:
    async def body(infra: InfraAPI) -> int:
        stream = infra.services.logs(args.name, follow=args.follow, tail=args.tail, since=args.since)
        async for entry in stream:
            target = sys.stderr if entry.stream == "stderr" else sys.stdout
            target.write(entry.message.rstrip("\n") + "\n")
            target.flush()
        return EXIT_OK

    return _run_with_infra(args, body)


def _task_row(state: Any) -> dict[str, Any]:
    return {
        "id": state.id,
        "class": state.spec.task_class,
        "status": _status_text(state.status),
        "attempts": state.attempts,
        "submitted_at": state.submitted_at,
        "duration_ms": state.duration_ms,
        "result": dict(state.result),
        "error": state.error,
    }


def _task_detail(state: Any) -> dict[str, Any]:
    """Everything known about a task (``tasks show``): spec, state, result, error, timings."""
    spec = state.spec
    return {
        **_task_row(state),
        "payload": dict(spec.payload),
        "priority": spec.priority,
        "timeout": spec.timeout,
        "max_attempts": spec.max_attempts,
        "workflow_id": spec.workflow_id,
        "started_at": state.started_at,
        "completed_at": state.completed_at,
    }


def _print_result(out: Any, result: Mapping[str, Any], *, indent: str) -> None:
    """One line per key; a multi-line value (command output) as an indented block."""
    for key, value in result.items():
        text = _value_text(value)
        if "\n" in text:
            out.print(f"{indent}{key}:")
            for line in text.splitlines():
                out.print(f"{indent}  {line}")
        else:
            out.print(f"{indent}{key}: {text}")


def _task_failure(task_id: str, status: str, error: str) -> _Failure:
    return _Failure(f"task {task_id} {status}: {error or 'no reason was recorded'}")


def _read_payload(args: argparse.Namespace) -> dict[str, Any]:
    """``--payload K=V ...`` (strings) or ``--payload-json OBJECT`` (any JSON values)."""
    from .values import decode_json_object

    if args.payload_json is not None:
        if args.payload:
            raise SpecError(
                "--payload and --payload-json are both given",
                field="--payload-json",
                fix="give one: --payload KEY=VALUE ... (strings) or --payload-json '{...}' (any JSON)",
            )
        return decode_json_object(args.payload_json, "--payload-json")
    return dict(parse_pairs(args.payload, "--payload"))


def _cmd_submit(args: argparse.Namespace) -> int:
    payload = _read_payload(args)

    async def body(infra: InfraAPI) -> int:
        try:
            state = await infra.submit_task(
                args.id,
                args.task_class,
                payload,
                priority=args.priority,
                timeout=args.timeout,
                max_attempts=args.max_attempts,
            )
        except AlreadyExists as exc:
            # Say why the id is taken: tasks outlive the command that submitted them.
            where = infra.location
            raise AlreadyExists(
                f"task {args.id!r} already exists in {where} with different content (tasks are"
                " kept across runs)",
                field="id",
                fix=f"use a new id, or see the stored one with `dspy-infra tasks show {args.id}`",
            ) from exc
        if not args.wait:
            return await _report_submitted(infra, state, as_json=args.json)
        return _report_result(await infra.wait(args.id, timeout=args.wait_timeout), as_json=args.json)

    return _run_with_infra(args, body)


async def _report_submitted(infra: InfraAPI, state: Any, *, as_json: bool) -> int:
    """What ``submit`` without ``--wait`` can honestly say. With a server, the task is queued
    there. Embedded (no server), the task runs only while this command lives: the command
    drains the scheduler here (what its shutdown does anyway: running tasks get
    ``shutdown_grace`` seconds, nothing new starts) and reports how the task ended; one that
    has not ended stays stored as ``pending``, to run the next time an infra starts on this
    state directory."""
    out = _console()
    if infra.mode == "embedded":
        grace = infra.settings.shutdown_grace
        try:
            return _report_result(await infra.wait(state.id, timeout=SHUTDOWN_NOTICE_AFTER), as_json=as_json)
        except DeadlineExceeded:
            pass
        sys.stderr.write(
            f"dspy-infra: stopping: no server keeps tasks running after this command, so {state.id}"
            f" gets up to {grace:g} s (shutdown_grace) to finish...\n"
        )
        sys.stderr.flush()
        await infra.drain(grace)
        now = await infra.get_task(state.id)
        if _status_text(now.status) in _TERMINAL_TASK:
            return _report_result(now.to_result(), as_json=as_json)
        row = {**_task_row(now), "status": "pending"}
        if as_json:
            _print_json(row)
        else:
            out.print(f"submitted {state.id} ({state.spec.task_class}): pending")
            out.print(
                f"note: no server is running and the task did not finish within {grace:g} s"
                " (shutdown_grace), so it stays stored, unfinished: it runs the next time an infra"
                f" starts on {infra.settings.resolved_home()} (`dspy-infra serve`); use --wait to wait for it"
            )
        return EXIT_OK
    if as_json:
        _print_json(_task_row(state))
    else:
        out.print(f"submitted {state.id} ({state.spec.task_class}): {_status_text(state.status)}")
    return EXIT_OK


def _report_result(result: Any, *, as_json: bool) -> int:
    """A finished task's result; a task that did not complete raises ``_Failure`` with why."""
    status = _status_text(result.status)
    if as_json:
        _print_json(_as_dict(result))
    else:
        out = _console()
        out.print(f"{result.task_id}: {status} in {result.duration_ms:.0f} ms")
        _print_result(out, result.result, indent="  ")
    if status != "completed":
        raise _task_failure(result.task_id, status, result.error)
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    async def body(infra: InfraAPI) -> int:
        before = _status_text((await infra.get_task(args.id)).status)
        if before in _TERMINAL_TASK:
            raise _Failure(f"task {args.id} was already {before}; nothing to cancel")
        state = await infra.cancel(args.id)
        status = _status_text(state.status)
        if args.json:
            _print_json(_task_row(state))
        else:
            _console().print(f"{state.id}: {status} (was {before})")
        if status != "cancelled":
            raise _Failure(f"task {state.id} ended {status} before it could be cancelled")
        return EXIT_OK

    return _run_with_infra(args, body)


def _cmd_tasks(args: argparse.Namespace) -> int:
    command = getattr(args, "tasks_command", None) or "list"
    if command == "show":
        return _run_with_infra(args, lambda infra: _show_task(infra, args))
    if command == "log":
        return _run_with_infra(args, lambda infra: _show_task_log(infra, args))

    async def body(infra: InfraAPI) -> int:
        return _print_listing(
            args.json,
            await infra.list_tasks(status=args.status, limit=args.limit),
            doc=_task_row,
            title="Tasks",
            columns=("id", "class", "status", "attempts", "submitted", "duration", "error"),
            row=lambda s: (
                s.id,
                s.spec.task_class,
                _status_text(s.status),
                str(s.attempts),
                _ts(s.submitted_at),
                f"{s.duration_ms:.0f} ms" if s.duration_ms else "-",
                (s.error or "")[:60],
            ),
        )

    return _run_with_infra(args, body)


async def _show_task(infra: InfraAPI, args: argparse.Namespace) -> int:
    state = await infra.get_task(args.id)
    doc = _task_detail(state)
    if args.json:
        _print_json(doc)
        return EXIT_OK
    out = _console()
    out.print(f"task {state.id}: {doc['status']}")
    out.print(
        f"  class: {doc['class']}  priority: {doc['priority']}  attempts: {state.attempts} (max_attempts {doc['max_attempts']})"
    )
    if doc["workflow_id"]:
        out.print(f"  workflow: {doc['workflow_id']}")
    out.print(f"  payload: {_value_text(doc['payload'])}")
    out.print(
        f"  submitted: {_ts(state.submitted_at)}  started: {_ts(state.started_at)}"
        f"  finished: {_ts(state.completed_at)}"
        + (f"  duration: {state.duration_ms:.0f} ms" if state.duration_ms else "")
        + (f"  timeout: {state.spec.timeout:g} s" if state.spec.timeout else "")
    )
    if state.result:
        out.print("  result:")
        _print_result(out, state.result, indent="    ")
    if state.error:
        out.print(f"  error: {state.error}")
    return EXIT_OK


async def _show_task_log(infra: InfraAPI, args: argparse.Namespace) -> int:
    text = await infra.task_log(args.id, attempt=args.attempt)
    sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
    return EXIT_OK


def _cmd_events(args: argparse.Namespace) -> int:
    async def body(infra: InfraAPI) -> int:
        # since=None means "live only" on the wire; 1 (the epoch's first second) means all kept.
        since = time.time() - args.since if args.since is not None else 1.0
        types = args.type or None
        out = _console()

        def show(event: Any) -> None:
            out.print(
                f"{_ts(event.timestamp)} {event.type} {event.resource_id} {_pairs_text(event.data)}".rstrip()
            )

        embedded = infra.mode == "embedded"
        if not args.follow and embedded:
            out.print(
                "note: no server is running; events live in a server's memory, so this embedded"
                " infra has only its own (run `dspy-infra serve`)",
                style="dim",
            )
        stream = infra.events(types, since)
        if args.follow:
            async for event in stream:
                show(event)
            return EXIT_OK
        # The stream gives history then live events without an end marker: stop when idle
        # (an embedded infra's history is all there is, so there it stops at once).
        idle = 0.5 if embedded else args.idle
        try:
            while True:
                try:
                    event = await asyncio.wait_for(anext(stream), timeout=idle)
                except (TimeoutError, StopAsyncIteration):
                    return EXIT_OK
                show(event)
        finally:
            aclose = getattr(stream, "aclose", None)  # an async generator's, when it is one
            if aclose is not None:
                await aclose()

    return _run_with_infra(args, body)


def _read_workflow_spec(path: str) -> Any:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise SpecError(
            f"cannot read {path}: {exc.strerror}", field="FILE", fix="give the path of a JSON workflow spec"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            field="FILE",
            fix="fix the JSON (a workflow spec is a JSON object with a `steps` list)",
        ) from None


def _run_update_line(update: Any) -> str:
    step = f" step={update.current_step}" if update.current_step else ""
    text = (
        f"{update.run_id}: {_status_text(update.status)} {update.steps_completed}/{update.total_steps}{step}"
    )
    if update.output:
        text += " output: " + _pairs_text(update.output)
    if update.error:
        text += f" error: {update.error}"
    return text


def _took_text(step: Any) -> str:
    took = step.completed_at - step.started_at if step.completed_at and step.started_at else 0.0
    return "-" if not took else f"{took * 1000:.0f} ms" if took < 1 else f"{took:.1f} s"


def _steps_table(run: Any, title: str = "Steps") -> Any:
    rows = [
        (
            name,
            _status_text(step.status),
            str(step.attempts),
            step.task_id or "-",
            _ts(step.started_at),
            _took_text(step),
            (step.error or "")[:60],
        )
        for name, step in run.steps.items()
    ]
    return _table(title, ("step", "status", "attempts", "task", "started", "took", "error"), rows)


def _run_doc(run: Any) -> dict[str, Any]:
    doc = _as_dict(run)
    doc["steps_completed"] = run.steps_completed
    doc["total_steps"] = run.total_steps
    return doc


async def _follow_run(infra: InfraAPI, run_id: str) -> Any:
    """Watch a run until it ends, as a live step table (like the demo's); returns its final
    state. On a terminal the table updates in place; in a pipe only the final one is printed."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    out = _console()
    run = await infra.get_run(run_id)

    def view(update: Any) -> Any:
        return Group(
            _steps_table(run, title=f"run {run_id} of {run.workflow_id}"), Text(_run_update_line(update))
        )

    last = run.to_update(run.current_step)
    with Live(view(last), console=out, auto_refresh=False, transient=False) as live:
        async for update in infra.run_status(run_id):
            run = await infra.get_run(run_id)
            last = update
            if out.is_terminal:
                live.update(view(update), refresh=True)
            if _status_text(update.status) in _TERMINAL_RUN:
                break
        live.update(view(last), refresh=True)
    return run


def _cmd_workflow(args: argparse.Namespace) -> int:
    if args.wf_command == "create":
        spec = _read_workflow_spec(args.file)

        async def create(infra: InfraAPI) -> int:
            await infra.create_workflow(args.id, args.name or args.id, args.description, spec)
            _console().print(f"created workflow {args.id}")
            return EXIT_OK

        return _run_with_infra(args, create)

    if args.wf_command == "run":
        from .values import decode_json_object

        if args.input_json is not None and args.input:
            raise SpecError(
                "--input and --input-json are both given",
                field="--input-json",
                fix="give one: --input KEY=VALUE ... (strings) or --input-json '{...}' (any JSON)",
            )
        run_input: dict[str, Any] = (
            decode_json_object(args.input_json, "--input-json")
            if args.input_json is not None
            else dict(parse_pairs(args.input, "--input"))
        )

        async def run(infra: InfraAPI) -> int:
            run_id = await infra.start_run(args.id, input=run_input, idempotency_key=args.key)
            out = _console()
            out.print(f"run {run_id} started")
            if not args.follow:
                if infra.mode == "embedded":
                    out.print(
                        "note: no server is running, so the run goes on only while this command"
                        " lives; it resumes the next time an infra starts on this state directory"
                        " (`dspy-infra serve`), or use --follow"
                    )
                return EXIT_OK
            final = await _follow_run(infra, run_id)
            status = _status_text(final.status)
            if status != "completed":
                raise _Failure(f"run {run_id} {status}: {final.error or 'no reason was recorded'}")
            return EXIT_OK

        return _run_with_infra(args, run)

    if args.wf_command == "list":

        async def listing(infra: InfraAPI) -> int:
            return _print_listing(
                args.json,
                await infra.list_workflows(),
                doc=lambda wf: {
                    "id": wf.id,
                    "name": wf.name,
                    "description": wf.description,
                    "steps": list(wf.spec.names),
                    "created_at": wf.created_at,
                },
                title="Workflows",
                columns=("id", "name", "steps", "created", "description"),
                row=lambda wf: (wf.id, wf.name, ", ".join(wf.spec.names), _ts(wf.created_at), wf.description),
            )

        return _run_with_infra(args, listing)

    if args.wf_command == "runs":

        async def runs(infra: InfraAPI) -> int:
            return _print_listing(
                args.json,
                await infra.list_runs(args.workflow_id, limit=args.limit),
                doc=_run_doc,
                title="Runs",
                columns=("run", "workflow", "status", "steps", "created", "updated", "error"),
                row=lambda r: (
                    r.run_id,
                    r.workflow_id,
                    _status_text(r.status),
                    f"{r.steps_completed}/{r.total_steps}",
                    _ts(r.created_at),
                    _ts(r.updated_at),
                    (r.error or "")[:60],
                ),
            )

        return _run_with_infra(args, runs)

    async def show(infra: InfraAPI) -> int:
        run = await infra.get_run(args.run_id)
        if args.json:
            _print_json(_run_doc(run))
            return EXIT_OK
        out = _console()
        out.print(f"run {run.run_id} of {run.workflow_id}: {_status_text(run.status)}")
        out.print(f"  steps: {run.steps_completed}/{run.total_steps} completed")
        if run.idempotency_key:
            out.print(f"  idempotency key: {run.idempotency_key}")
        out.print(f"  created: {_ts(run.created_at)}  updated: {_ts(run.updated_at)}")
        if run.input:
            out.print(f"  input: {_value_text(dict(run.input))}")
        if run.output:
            out.print("  output:")
            for key, value in run.output.items():
                out.print(f"    {key}: {_value_text(value)}")
        if run.error:
            out.print(f"  error: {run.error}")
        if run.steps:
            out.print(_steps_table(run))
        return EXIT_OK

    return _run_with_infra(args, show)


def _cmd_config(args: argparse.Namespace) -> int:
    out = _console()
    if args.cfg_command == "init":
        path = Path(args.path)
        if path.is_dir():
            path = path / CONFIG_FILE_NAME
        if path.exists() and not args.force:
            raise AlreadyExists(f"{path} already exists", field="PATH", fix="pass --force to overwrite it")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render_config_template())
        except OSError as exc:
            raise SpecError(f"cannot write {path}: {exc.strerror}", field="PATH") from None
        out.print(f"wrote {path}")
        return EXIT_OK
    if args.cfg_command == "reference":
        sys.stdout.write(render_settings_markdown())
        return EXIT_OK
    settings = load_settings(args.config, home=args.home, token=args.token, addr=args.addr, mode=args.mode)
    doc = _as_dict(settings)
    if doc.get("token"):
        doc["token"] = "***"
    doc["resolved_home"] = str(settings.resolved_home())
    doc["resolved_owner"] = settings.resolved_owner()
    _print_json(doc)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Services and catalog (the services helper's block)


def _cmd_services(args: argparse.Namespace) -> int:
    """Each running service with its status and the URL a client connects to."""

    async def body(infra: InfraAPI) -> int:
        states = await infra.services.status(list(args.names) or None)
        running = {n: st for n, st in states.items() if _status_text(st.status) != "stopped" or args.names}
        if args.json:
            _print_json(
                {
                    n: {
                        "status": _status_text(st.status),
                        "url": st.url,
                        "host": st.host,
                        "port": st.port,
                        "ports": {str(c): h for c, h in st.ports.items()},
                        "backend": st.backend,
                    }
                    for n, st in sorted(running.items())
                }
            )
            return EXIT_OK
        out = _console()
        if not running:
            out.print("no services are running (start one: dspy-infra up NAME)")
            return EXIT_OK
        rows = [
            (
                name,
                _status_text(st.status),
                st.url or "-",
                ", ".join(f"{c}->{h}" for c, h in sorted(st.ports.items())) or "-",
            )
            for name, st in sorted(running.items())
        ]
        columns = ("service", "status", "url", "ports (container->host)")
        out.print(_table("Services", columns, rows, fold=True))
        return EXIT_OK

    return _run_with_infra(args, body)


def _cmd_catalog(args: argparse.Namespace) -> int:
    """The service specs this configuration knows (built-ins, plugins, [services.NAME])."""
    from .plugins import build_plugin_manager
    from .services.catalog import build_catalog, spec_to_toml
    from .services.graph import unknown_service
    from .services.handles import default_url_template

    settings = load_settings(args.config, home=args.home)
    catalog = build_catalog(settings, build_plugin_manager(), expand_home=False)
    if args.show:
        spec = catalog.get(args.show)
        if spec is None:
            raise unknown_service(args.show, catalog, field="--show")
        sys.stdout.write(spec_to_toml(spec))
        return EXIT_OK
    rows = [
        (
            name,
            spec.image or "-",
            spec.command[0] if spec.command else "-",
            ", ".join(
                str(p.container_port) if not p.host_port else f"{p.host_port}:{p.container_port}"
                for p in spec.ports
            )
            or "-",
            spec.health.kind,
            default_url_template(spec) if spec.ports or spec.health.port else "-",
            "yes" if spec.required else "no",
        )
        for name, spec in sorted(catalog.items())
    ]
    columns = ("service", "image", "process command", "ports", "health", "url", "required")
    title = "Service catalog (dspy-infra catalog --show NAME prints one as TOML)"
    _console().print(_table(title, columns, rows, fold=True))
    return EXIT_OK


def _add_service_commands(
    command: Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser],
) -> None:
    p = command("services", _cmd_services, "running services with the URL a client connects to")
    p.add_argument("names", nargs="*", metavar="NAMES")
    p.add_argument("--json", action="store_true")
    p = command("catalog", _cmd_catalog, "the service specs you can start; --show NAME prints one as TOML")
    p.add_argument("--show", metavar="NAME", help="print NAME's spec as a [services.NAME] table to paste")


# ---------------------------------------------------------------------------------------------
# Parser


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dspy-infra",
        description="Services, tasks and workflows for AI-agent apps. Talks to a running server "
        "when one answers, else runs embedded.",
    )
    parser.add_argument("--config", metavar="FILE", help=f"settings file (default: ./{CONFIG_FILE_NAME})")
    parser.add_argument("--addr", metavar="HOST:PORT", help="gRPC address of a running server")
    parser.add_argument("--home", metavar="DIR", help="state directory (store, logs, locks)")
    parser.add_argument("--token", help="bearer token for the server")
    parser.add_argument(
        "--mode",
        choices=("auto", "embedded", "remote"),
        help="auto (default): the server of this state directory if one runs, else embedded",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(run=fn)
        return p

    p = command("serve", _cmd_serve, "serve gRPC and HTTP for other processes (until SIGTERM/SIGINT)")
    p.add_argument("--host", help="bind address (non-loopback needs --token)")
    p.add_argument("--grpc-port", type=_non_negative_int)
    p.add_argument("--env-manager-port", type=_non_negative_int)
    p.add_argument("--http-port", type=_non_negative_int)
    p.add_argument("--backend", choices=("auto", "docker", "process"))
    p.add_argument("--stop-services", action="store_true", help="stop running services on shutdown")

    p = command("up", _cmd_up, "start services (and their dependencies) with live progress")
    p.add_argument("names", nargs="*", metavar="NAMES")
    p.add_argument("--backend", choices=("auto", "docker", "process"))
    p.add_argument("--sequential", action="store_true", help="start one at a time")
    p.add_argument(
        "--keep", action="store_true", help="leave them running after this command (no server needed)"
    )

    p = command("down", _cmd_down, "stop services (default: every running one)")
    p.add_argument("names", nargs="*", metavar="NAMES")
    p.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds before a kill")

    p = command("status", _cmd_status, "health, services, queues and concurrency limits")
    p.add_argument("--json", action="store_true")

    p = command("logs", _cmd_logs, "a service's log lines")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", type=_non_negative_int, help="only the last N lines")
    p.add_argument("--since", type=float, metavar="UNIX_TIME")

    p = command("submit", _cmd_submit, "submit a task")
    p.add_argument("id", metavar="ID")
    p.add_argument("--class", dest="task_class", default="cpu_short", metavar="CLASS")
    p.add_argument(
        "--payload", nargs="*", metavar="KEY=VALUE", help="e.g. --payload handler=exec cmd='echo hi'"
    )
    p.add_argument(
        "--payload-json",
        metavar="JSON",
        help="""the payload as one JSON object, e.g. '{"handler": "sleep", "seconds": 1.5}'""",
    )
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--timeout", type=_positive_float, help="task timeout in seconds")
    p.add_argument("--max-attempts", type=int, default=1)
    p.add_argument(
        "--wait", action="store_true", help="wait for the result; exit 1 with the reason unless completed"
    )
    p.add_argument("--wait-timeout", type=_positive_float)
    p.add_argument("--json", action="store_true")

    p = command("cancel", _cmd_cancel, "cancel a pending or running task (exit 1 if it had already ended)")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true")

    p = command("tasks", _cmd_tasks, "list tasks, newest first; `tasks show ID`, `tasks log ID`")
    statuses = ("pending", "running", "completed", "failed", "cancelled")
    p.add_argument("--status", choices=statuses)
    p.add_argument("--limit", type=_non_negative_int, default=100)
    p.add_argument("--json", action="store_true")
    tasks = p.add_subparsers(dest="tasks_command", required=False, metavar="SUBCOMMAND")
    t = tasks.add_parser("list", help="list tasks, newest first (the default)")
    t.add_argument("--status", choices=statuses)
    t.add_argument("--limit", type=_non_negative_int, default=100)
    t.add_argument("--json", action="store_true")
    t = tasks.add_parser("show", help="one task: payload, status, attempts, timings, full result, error")
    t.add_argument("id", metavar="ID")
    t.add_argument("--json", action="store_true")
    t = tasks.add_parser("log", help="a task's log: what its handler wrote (exec stdout and stderr)")
    t.add_argument("id", metavar="ID")
    t.add_argument("--attempt", type=_non_negative_int, help="that attempt (default: the latest)")

    p = command("events", _cmd_events, "recent events; -f to keep following")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--type", action="append", metavar="TYPE", help="only this event type (repeatable)")
    p.add_argument("--since", type=float, metavar="SECONDS", help="only events of the last SECONDS")
    p.add_argument("--idle", type=_positive_float, default=0.5, help=argparse.SUPPRESS)

    p = command("workflow", _cmd_workflow, "create, run and watch workflows")
    wf = p.add_subparsers(dest="wf_command", required=True, metavar="SUBCOMMAND")
    c = wf.add_parser("create", help="create a workflow from a JSON spec file")
    c.add_argument("id", metavar="ID")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--name", default="")
    c.add_argument("--description", default="")
    r = wf.add_parser("run", help="start a run")
    r.add_argument("id", metavar="ID")
    r.add_argument("--input", nargs="*", metavar="KEY=VALUE")
    r.add_argument("--input-json", metavar="JSON", help="the input as one JSON object")
    r.add_argument("--key", default="", help="idempotency key: the same key returns the same run")
    r.add_argument(
        "--follow", action="store_true", help="a live step table until the run ends; exit 1 unless completed"
    )
    lw = wf.add_parser("list", help="the stored workflows")
    lw.add_argument("--json", action="store_true")
    rs = wf.add_parser("runs", help="runs, newest first")
    rs.add_argument("workflow_id", nargs="?", metavar="WORKFLOW_ID", help="only this workflow's runs")
    rs.add_argument("--limit", type=_non_negative_int, default=100)
    rs.add_argument("--json", action="store_true")
    s = wf.add_parser("show", aliases=["status"], help="a run's state with a table of its steps")
    s.add_argument("run_id", metavar="RUN_ID")
    s.add_argument("--json", action="store_true")

    p = command("config", _cmd_config, "write, show or document the settings")
    cfg = p.add_subparsers(dest="cfg_command", required=True, metavar="SUBCOMMAND")
    i = cfg.add_parser("init", help=f"write a commented {CONFIG_FILE_NAME}")
    i.add_argument("path", nargs="?", default=CONFIG_FILE_NAME, metavar="PATH")
    i.add_argument("--force", action="store_true", help="overwrite an existing file")
    cfg.add_parser("show", help="the effective settings as JSON")
    cfg.add_parser("reference", help="the settings table of docs/configuration.md (markdown)")

    command("demo", _cmd_demo, "run the demo on the embedded default (no container engine needed)")
    _add_service_commands(command)
    return parser


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, InfraError):
            return leaf
    return leaves[0] if leaves else group


#: Fixes written for Python callers, and the same advice as a command (the CLI's user types
#: commands). Each pattern is matched against an error's ``fix``; unknown fixes pass as is.
_CLI_FIXES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (
        re.compile(r"ensure\(\[(?P<names>[^\]]*)\]\)"),
        lambda m: "`dspy-infra up " + " ".join(n.strip(" '\"") for n in m["names"].split(",")) + "`",
    ),
    (
        re.compile(r"\(?infra\.services\.pull\)?"),
        lambda m: "(`docker pull IMAGE`, or `dspy-infra up` pulls it)",
    ),
    (re.compile(r"mode='embedded'"), lambda m: "--mode embedded"),
    (re.compile(r"mode='remote'"), lambda m: "--mode remote"),
    (re.compile(r"drop backend="), lambda m: "drop --backend"),
    (re.compile(r"await infra\.start\(\) first"), lambda m: "rerun the command"),
)


def cli_fix(fix: str) -> str:
    """Advice in an error as CLI advice: Python calls (``ensure(['redis'])``) become commands."""
    for pattern, replace in _CLI_FIXES:
        fix = pattern.sub(replace, fix)
    return fix


def _exit_code(err: InfraError) -> int:
    return EXIT_USAGE if isinstance(err, (SpecError, NotFound, AlreadyExists)) else EXIT_FAILURE


def _fail(text: str) -> None:
    sys.stderr.write(f"dspy-infra: error: {cli_fix(text)}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = _build_parser().parse_args(argv)
        try:
            return int(args.run(args))
        except BaseExceptionGroup as group:
            # Task groups wrap errors; report the first of ours (or the first at all).
            raise _first_leaf(group) from None
    except InfraError as err:
        if debug:
            raise
        _fail(str(err))
        return _exit_code(err)
    except _Failure as err:
        _fail(str(err))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        if debug:
            raise
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        text = str(err).splitlines()[0] if str(err) else ""
        _fail(f"unexpected {type(err).__name__}: {text} (rerun with --debug for the traceback)")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
