"""The workflow part of ``dspy-infra demo``: a fan-out / fan-in run with live per-step progress.

``prepare`` picks a word from the run's input, three ``shard-N`` steps run in parallel on it
(real subprocesses through the ``exec`` handler), and ``merge`` joins their results through
``{{ steps.NAME.result.KEY }}`` templates. The table redraws on every ``run_status`` update;
a second ``start_run`` with the same idempotency key shows that it returns the same run.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..errors import TaskError

__all__ = ["DEMO_WORKFLOW", "DEMO_WORKFLOW_ID", "workflow_section"]

DEMO_WORKFLOW_ID = "demo-fan-out-fan-in"
_SHARDS = 3

#: The spec as JSON-shaped data (what `dspy-infra workflow create` reads from a file).
DEMO_WORKFLOW: dict[str, Any] = {
    "steps": [
        {
            "name": "prepare",
            "task_class": "cpu_short",
            "payload": {"handler": "exec", "cmd": "printf %s '{{ input.word }}'"},
        },
        *(
            {
                "name": f"shard-{i}",
                "task_class": "cpu_short",
                "depends_on": ["prepare"],
                "payload": {
                    "handler": "exec",
                    # A little work per shard so the parallel phase is visible.
                    "cmd": f"sleep 0.{2 + i}; printf '%s-{i}' '{{{{ steps.prepare.result.stdout }}}}'",
                },
            }
            for i in range(1, _SHARDS + 1)
        ),
        {
            "name": "merge",
            "task_class": "cpu_short",
            "depends_on": [f"shard-{i}" for i in range(1, _SHARDS + 1)],
            "payload": {
                "handler": "exec",
                "cmd": "printf '%s' '"
                + ",".join(f"{{{{ steps.shard-{i}.result.stdout }}}}" for i in range(1, _SHARDS + 1))
                + "'",
            },
        },
    ],
    "output": {"merged": "{{ steps.merge.result.stdout }}"},
}

_STYLE = {
    "pending": "dim",
    "running": "yellow",
    "completed": "green",
    "failed": "red",
    "skipped": "magenta",
    "cancelled": "magenta",
}


def _table(run: Any, started: float) -> Table:
    table = Table(title=f"run {run.run_id}: {run.status}", title_justify="left", min_width=64)
    table.add_column("step")
    table.add_column("status")
    table.add_column("result")
    # An embedded infra reports every step; a remote one (the wire's WorkflowStatusUpdate)
    # only the current step and counts.
    steps = getattr(run, "steps", None) or {}
    for name, step in steps.items():
        status = str(step.status)
        shown = step.result.get("stdout", "") if step.result else step.error
        table.add_row(escape(name), f"[{_STYLE.get(status, '')}]{status}[/]", escape(shown[:60]))
    if not steps and run.current_step:
        table.add_row(escape(run.current_step), "[yellow]running[/]", "")
    table.caption = (
        f"{run.steps_completed}/{run.total_steps} steps completed in {time.monotonic() - started:.2f}s"
    )
    return table


async def workflow_section(infra: Any, console: Console) -> None:
    """Create the demo workflow, run it, and draw each step's status live until it ends.
    Raises ``TaskError`` if the run does not complete (the demo then reports a failure)."""
    console.rule("workflows: fan-out / fan-in")
    await infra.create_workflow(
        DEMO_WORKFLOW_ID, "fan-out / fan-in", "three parallel shards joined by a merge step", DEMO_WORKFLOW
    )
    key = f"demo-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    run_id = await infra.start_run(DEMO_WORKFLOW_ID, input={"word": "dspy"}, idempotency_key=key)
    again = await infra.start_run(DEMO_WORKFLOW_ID, input={"word": "dspy"}, idempotency_key=key)
    console.print(f"start_run twice with idempotency key {key!r}: {run_id} and {again} (one run)")
    with Live(_table(await infra.get_run(run_id), started), console=console, refresh_per_second=12) as live:
        async for _update in infra.run_status(run_id):
            live.update(_table(await infra.get_run(run_id), started))
    run = await infra.get_run(run_id)
    if str(run.status) != "completed":
        raise TaskError(
            f"the demo workflow run ended {run.status}: {run.error}", task_id=run_id, status=str(run.status)
        )
    console.print(f"[green]run completed[/]: output {escape(str(dict(run.output)))}")
