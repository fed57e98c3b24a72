"""Tasks: ``submit``, ``cancel``, ``tasks`` (list, show, log) and ``events``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping
from typing import Any

from ..api import InfraAPI
from ..errors import AlreadyExists, DeadlineExceeded, SpecError
from .output import as_dict, console, pairs_text, print_json, print_listing, status_text, ts, value_text
from .run import (
    EXIT_OK,
    SHUTDOWN_NOTICE_AFTER,
    Command,
    CommandFailed,
    non_negative_int,
    parse_pairs,
    positive_float,
    run_with_infra,
)

__all__ = ["register"]

_TERMINAL_TASK = frozenset({"completed", "failed", "cancelled"})


def _task_row(state: Any) -> dict[str, Any]:
    return {
        "id": state.id,
        "class": state.spec.task_class,
        "status": status_text(state.status),
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
        text = value_text(value)
        if "\n" in text:
            out.print(f"{indent}{key}:")
            for line in text.splitlines():
                out.print(f"{indent}  {line}")
        else:
            out.print(f"{indent}{key}: {text}")


def _task_failure(task_id: str, status: str, error: str) -> CommandFailed:
    return CommandFailed(f"task {task_id} {status}: {error or 'no reason was recorded'}")


def _read_payload(args: argparse.Namespace) -> dict[str, Any]:
    """``--payload K=V ...`` (strings) or ``--payload-json OBJECT`` (any JSON values)."""
    from ..values import decode_json_object

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

    return run_with_infra(args, body)


async def _report_submitted(infra: InfraAPI, state: Any, *, as_json: bool) -> int:
    """What ``submit`` without ``--wait`` can honestly say. With a server, the task is queued
    there. Embedded (no server), the task runs only while this command lives: the command
    drains the scheduler here (what its shutdown does anyway: running tasks get
    ``shutdown_grace`` seconds, nothing new starts) and reports how the task ended; one that
    has not ended stays stored as ``pending``, to run the next time an infra starts on this
    state directory."""
    out = console()
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
        if status_text(now.status) in _TERMINAL_TASK:
            return _report_result(now.to_result(), as_json=as_json)
        row = {**_task_row(now), "status": "pending"}
        if as_json:
            print_json(row)
        else:
            out.print(f"submitted {state.id} ({state.spec.task_class}): pending")
            out.print(
                f"note: no server is running and the task did not finish within {grace:g} s"
                " (shutdown_grace), so it stays stored, unfinished: it runs the next time an infra"
                f" starts on {infra.settings.resolved_home()} (`dspy-infra serve`); use --wait to wait for it"
            )
        return EXIT_OK
    if as_json:
        print_json(_task_row(state))
    else:
        out.print(f"submitted {state.id} ({state.spec.task_class}): {status_text(state.status)}")
    return EXIT_OK


def _report_result(result: Any, *, as_json: bool) -> int:
    """A finished task's result; a task that did not complete raises ``CommandFailed`` with why."""
    status = status_text(result.status)
    if as_json:
        print_json(as_dict(result))
    else:
        out = console()
        out.print(f"{result.task_id}: {status} in {result.duration_ms:.0f} ms")
        _print_result(out, result.result, indent="  ")
    if status != "completed":
        raise _task_failure(result.task_id, status, result.error)
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    async def body(infra: InfraAPI) -> int:
        before = status_text((await infra.get_task(args.id)).status)
        if before in _TERMINAL_TASK:
            raise CommandFailed(f"task {args.id} was already {before}; nothing to cancel")
        state = await infra.cancel(args.id)
        status = status_text(state.status)
        if args.json:
            print_json(_task_row(state))
        else:
            console().print(f"{state.id}: {status} (was {before})")
        if status != "cancelled":
            raise CommandFailed(f"task {state.id} ended {status} before it could be cancelled")
        return EXIT_OK

    return run_with_infra(args, body)


def _cmd_tasks(args: argparse.Namespace) -> int:
    command = getattr(args, "tasks_command", None) or "list"
    if command == "show":
        return run_with_infra(args, lambda infra: _show_task(infra, args))
    if command == "log":
        return run_with_infra(args, lambda infra: _show_task_log(infra, args))

    async def body(infra: InfraAPI) -> int:
        return print_listing(
            args.json,
            await infra.list_tasks(status=args.status, limit=args.limit),
            doc=_task_row,
            title="Tasks",
            columns=("id", "class", "status", "attempts", "submitted", "duration", "error"),
            row=lambda s: (
                s.id,
                s.spec.task_class,
                status_text(s.status),
                str(s.attempts),
                ts(s.submitted_at),
                f"{s.duration_ms:.0f} ms" if s.duration_ms else "-",
                (s.error or "")[:60],
            ),
        )

    return run_with_infra(args, body)


async def _show_task(infra: InfraAPI, args: argparse.Namespace) -> int:
    state = await infra.get_task(args.id)
    doc = _task_detail(state)
    if args.json:
        print_json(doc)
        return EXIT_OK
    out = console()
    out.print(f"task {state.id}: {doc['status']}")
    out.print(
        f"  class: {doc['class']}  priority: {doc['priority']}  attempts: {state.attempts} (max_attempts {doc['max_attempts']})"
    )
    if doc["workflow_id"]:
        out.print(f"  workflow: {doc['workflow_id']}")
    out.print(f"  payload: {value_text(doc['payload'])}")
    out.print(
        f"  submitted: {ts(state.submitted_at)}  started: {ts(state.started_at)}"
        f"  finished: {ts(state.completed_at)}"
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
        out = console()

        def show(event: Any) -> None:
            out.print(
                f"{ts(event.timestamp)} {event.type} {event.resource_id} {pairs_text(event.data)}".rstrip()
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

    return run_with_infra(args, body)


def register(command: Command) -> None:
    """Add ``submit``, ``cancel``, ``tasks`` and ``events``."""
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
    p.add_argument("--timeout", type=positive_float, help="task timeout in seconds")
    p.add_argument("--max-attempts", type=int, default=1)
    p.add_argument(
        "--wait", action="store_true", help="wait for the result; exit 1 with the reason unless completed"
    )
    p.add_argument("--wait-timeout", type=positive_float)
    p.add_argument("--json", action="store_true")

    p = command("cancel", _cmd_cancel, "cancel a pending or running task (exit 1 if it had already ended)")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true")

    p = command("tasks", _cmd_tasks, "list tasks, newest first; `tasks show ID`, `tasks log ID`")
    statuses = ("pending", "running", "completed", "failed", "cancelled")
    p.add_argument("--status", choices=statuses)
    p.add_argument("--limit", type=non_negative_int, default=100)
    p.add_argument("--json", action="store_true")
    tasks = p.add_subparsers(dest="tasks_command", required=False, metavar="SUBCOMMAND")
    t = tasks.add_parser("list", help="list tasks, newest first (the default)")
    t.add_argument("--status", choices=statuses)
    t.add_argument("--limit", type=non_negative_int, default=100)
    t.add_argument("--json", action="store_true")
    t = tasks.add_parser("show", help="one task: payload, status, attempts, timings, full result, error")
    t.add_argument("id", metavar="ID")
    t.add_argument("--json", action="store_true")
    t = tasks.add_parser("log", help="a task's log: what its handler wrote (exec stdout and stderr)")
    t.add_argument("id", metavar="ID")
    t.add_argument("--attempt", type=non_negative_int, help="that attempt (default: the latest)")

    p = command("events", _cmd_events, "recent events; -f to keep following")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--type", action="append", metavar="TYPE", help="only this event type (repeatable)")
    p.add_argument("--since", type=float, metavar="SECONDS", help="only events of the last SECONDS")
    p.add_argument("--idle", type=positive_float, default=0.5, help=argparse.SUPPRESS)
