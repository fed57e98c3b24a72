"""Workflows: ``workflow create | run | list | runs | show``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..api import InfraAPI
from ..errors import SpecError
from .output import (
    as_dict,
    console,
    pairs_text,
    print_json,
    print_listing,
    status_text,
    table,
    ts,
    value_text,
)
from .run import EXIT_OK, Command, CommandFailed, non_negative_int, parse_pairs, run_with_infra

__all__ = ["register"]

_TERMINAL_RUN = frozenset({"completed", "failed", "cancelled"})


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
        f"{update.run_id}: {status_text(update.status)} {update.steps_completed}/{update.total_steps}{step}"
    )
    if update.output:
        text += " output: " + pairs_text(update.output)
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
            status_text(step.status),
            str(step.attempts),
            step.task_id or "-",
            ts(step.started_at),
            _took_text(step),
            (step.error or "")[:60],
        )
        for name, step in run.steps.items()
    ]
    return table(title, ("step", "status", "attempts", "task", "started", "took", "error"), rows)


def _run_doc(run: Any) -> dict[str, Any]:
    doc = as_dict(run)
    doc["steps_completed"] = run.steps_completed
    doc["total_steps"] = run.total_steps
    return doc


async def _follow_run(infra: InfraAPI, run_id: str) -> Any:
    """Watch a run until it ends, as a live step table (like the demo's); returns its final
    state. On a terminal the table updates in place; in a pipe only the final one is printed."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    out = console()
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
            if status_text(update.status) in _TERMINAL_RUN:
                break
        live.update(view(last), refresh=True)
    return run


def _cmd_workflow(args: argparse.Namespace) -> int:
    if args.wf_command == "create":
        spec = _read_workflow_spec(args.file)

        async def create(infra: InfraAPI) -> int:
            await infra.create_workflow(args.id, args.name or args.id, args.description, spec)
            console().print(f"created workflow {args.id}")
            return EXIT_OK

        return run_with_infra(args, create)

    if args.wf_command == "run":
        from ..values import decode_json_object

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
            out = console()
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
            status = status_text(final.status)
            if status != "completed":
                raise CommandFailed(f"run {run_id} {status}: {final.error or 'no reason was recorded'}")
            return EXIT_OK

        return run_with_infra(args, run)

    if args.wf_command == "list":

        async def listing(infra: InfraAPI) -> int:
            return print_listing(
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
                row=lambda wf: (wf.id, wf.name, ", ".join(wf.spec.names), ts(wf.created_at), wf.description),
            )

        return run_with_infra(args, listing)

    if args.wf_command == "runs":

        async def runs(infra: InfraAPI) -> int:
            return print_listing(
                args.json,
                await infra.list_runs(args.workflow_id, limit=args.limit),
                doc=_run_doc,
                title="Runs",
                columns=("run", "workflow", "status", "steps", "created", "updated", "error"),
                row=lambda r: (
                    r.run_id,
                    r.workflow_id,
                    status_text(r.status),
                    f"{r.steps_completed}/{r.total_steps}",
                    ts(r.created_at),
                    ts(r.updated_at),
                    (r.error or "")[:60],
                ),
            )

        return run_with_infra(args, runs)

    async def show(infra: InfraAPI) -> int:
        run = await infra.get_run(args.run_id)
        if args.json:
            print_json(_run_doc(run))
            return EXIT_OK
        out = console()
        out.print(f"run {run.run_id} of {run.workflow_id}: {status_text(run.status)}")
        out.print(f"  steps: {run.steps_completed}/{run.total_steps} completed")
        if run.idempotency_key:
            out.print(f"  idempotency key: {run.idempotency_key}")
        out.print(f"  created: {ts(run.created_at)}  updated: {ts(run.updated_at)}")
        if run.input:
            out.print(f"  input: {value_text(dict(run.input))}")
        if run.output:
            out.print("  output:")
            for key, value in run.output.items():
                out.print(f"    {key}: {value_text(value)}")
        if run.error:
            out.print(f"  error: {run.error}")
        if run.steps:
            out.print(_steps_table(run))
        return EXIT_OK

    return run_with_infra(args, show)


def register(command: Command) -> None:
    """Add ``workflow`` and its subcommands."""
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
    rs.add_argument("--limit", type=non_negative_int, default=100)
    rs.add_argument("--json", action="store_true")
    s = wf.add_parser("show", aliases=["status"], help="a run's state with a table of its steps")
    s.add_argument("run_id", metavar="RUN_ID")
    s.add_argument("--json", action="store_true")
