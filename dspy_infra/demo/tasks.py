"""``dspy-infra demo`` (what ``make demo`` runs): the main job on the embedded default.

Starts an embedded ``Infra`` in a temporary state directory (no container engine needed)
and runs the demo's sections in order. Each section is ``async def section(infra, console)``;
add one by appending it to ``SECTIONS``.

The tasks section submits a mix across classes (exec, sleep, a custom handler, priorities),
one task that fails, one that succeeds on retry, one that times out and one that is
cancelled, shows live progress, then prints the final task table and the limiter's limits.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from ..config import load_settings
from ..errors import InfraError
from ..infra import Infra
from ..models import TaskSpec, TaskState, TaskStatus
from ..scheduler.context import TaskContext
from .services import services_section
from .workflows import workflow_section

__all__ = ["SECTIONS", "DemoFailed", "main", "tasks_section"]

Section = Callable[[Infra, Console], Awaitable[None]]

_STYLE = {
    TaskStatus.PENDING: "dim",
    TaskStatus.RUNNING: "yellow",
    TaskStatus.COMPLETED: "green",
    TaskStatus.FAILED: "red",
    TaskStatus.CANCELLED: "magenta",
}


class DemoFailed(Exception):
    """A demo section saw something other than what it demonstrates."""


def _demo_specs(marker: Path) -> tuple[list[TaskSpec], dict[str, TaskStatus]]:
    """The task mix and the status each task is expected to end in."""
    flaky = (
        f"if [ -e {marker} ]; then echo 'worked on the retry'; "
        f"else touch {marker}; echo 'first attempt fails' >&2; exit 1; fi"
    )
    specs = [
        TaskSpec("hello", "cpu_short", {"handler": "exec", "cmd": "echo hello from a subprocess"}),
        TaskSpec("count-words", "cpu_short", {"handler": "word_count", "text": "one line of the demo"}),
        *(
            TaskSpec(f"batch-{i}", "cpu_short", {"handler": "sleep", "seconds": f"{0.2 + 0.1 * (i % 4):.1f}"})
            for i in range(10)
        ),
        TaskSpec("urgent", "cpu_short", {"handler": "sleep", "seconds": "0.1"}, priority=10),
        *(
            TaskSpec(f"long-{i}", "cpu_long", {"handler": "exec", "cmd": f"sleep 0.6; echo long job {i}"})
            for i in range(3)
        ),
        TaskSpec("flaky", "cpu_short", {"handler": "exec", "cmd": flaky}, max_attempts=3),
        TaskSpec(
            "doomed",
            "cpu_short",
            {"handler": "fail", "message": "this task fails on purpose"},
            max_attempts=2,
        ),
        TaskSpec("too-slow", "cpu_long", {"handler": "exec", "cmd": "sleep 30"}, timeout=0.5),
        TaskSpec("cancel-me", "cpu_long", {"handler": "sleep", "seconds": "30"}, priority=-1),
    ]
    expected = {s.id: TaskStatus.COMPLETED for s in specs}
    expected.update(
        {"doomed": TaskStatus.FAILED, "too-slow": TaskStatus.FAILED, "cancel-me": TaskStatus.CANCELLED}
    )
    return specs, expected


def _task_table(specs: list[TaskSpec], states: dict[str, TaskState], title: str) -> Table:
    table = Table(title=title)
    for column in ("task", "class", "prio", "status", "attempts", "ms", "result / error"):
        table.add_column(column, overflow="fold")
    for spec in specs:
        st = states.get(spec.id)
        status = st.status if st else TaskStatus.PENDING
        detail = ""
        if st is not None:
            detail = (
                st.error
                or st.result.get("stdout", "").strip()
                or ", ".join(f"{k}={v}" for k, v in st.result.items())
            )
        table.add_row(
            spec.id,
            spec.task_class,
            str(spec.priority),
            f"[{_STYLE[status]}]{status.value}[/]",
            str(st.attempts if st else 0),
            f"{st.duration_ms:.0f}" if st and st.status.terminal else "",
            escape(detail[:60]),
        )
    return table


def _limits_table(infra: Infra) -> Table:
    table = Table(title="adaptive limits per class")
    for column in ("class", "limit", "min", "max", "queued", "running"):
        table.add_column(column, justify="right" if column != "class" else "left")
    for name, q in infra.scheduler.queue_status().items():
        table.add_row(name, str(q.limit), str(q.min_limit), str(q.max_limit), str(q.depth), str(q.inflight))
    return table


async def tasks_section(infra: Infra, console: Console) -> None:
    """Submit the mix, follow it live, print the final tables; raise DemoFailed on surprises."""
    console.rule("[bold]tasks: classes, priorities, retries, timeouts, cancellation")

    @infra.handler("word_count")
    async def word_count(ctx: TaskContext) -> dict[str, str]:
        return {"words": str(len(ctx.payload["text"].split()))}

    # Refusals are part of the demo: they name the field and the fix.
    for task_class in ("gpu", "gpu_slurm"):
        try:
            await infra.submit_task(f"try-{task_class}", task_class=task_class, payload={"handler": "noop"})
            console.print(f"[green]{task_class}[/] accepted (this machine can run it)")
        except InfraError as exc:
            console.print(f"[yellow]{task_class} refused:[/] {escape(str(exc))}")

    with tempfile.TemporaryDirectory(prefix="dspy-infra-demo-") as tmp:
        specs, expected = _demo_specs(Path(tmp) / "flaky-marker")
        states: dict[str, TaskState] = {}
        progress = Progress(
            TextColumn("tasks"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}")
        )
        bar = progress.add_task("", total=len(specs))
        started = time.monotonic()

        def view() -> Group:
            done = sum(1 for st in states.values() if st.status.terminal)
            progress.update(bar, completed=done, description=f"{time.monotonic() - started:.1f}s")
            return Group(progress, _limits_table(infra))

        with Live(view(), console=console, auto_refresh=False, transient=True) as live:

            def on_change(state: TaskState) -> None:
                if state.id in expected:
                    states[state.id] = state
                    live.update(view(), refresh=True)

            remove = infra.scheduler.add_listener(on_change)
            try:
                for spec in specs:
                    await infra.submit_task(
                        spec.id,
                        spec.task_class,
                        spec.payload,
                        priority=spec.priority,
                        timeout=spec.timeout,
                        max_attempts=spec.max_attempts,
                    )
                async with anyio.create_task_group() as tg:

                    async def cancel_soon() -> None:
                        await anyio.sleep(0.3)
                        await infra.cancel("cancel-me")

                    tg.start_soon(cancel_soon)
                    async for _ in infra.stream_results([s.id for s in specs], include_completed=True):
                        pass
            finally:
                remove()
            for spec in specs:
                states[spec.id] = await infra.get_task(spec.id)
            live.update(view(), refresh=True)

        console.print(_task_table(specs, states, f"{len(specs)} tasks in {time.monotonic() - started:.1f}s"))
        console.print(_limits_table(infra))
        surprises = {
            tid: states[tid].status.value for tid, want in expected.items() if states[tid].status is not want
        }
        if surprises:
            raise DemoFailed(f"unexpected task outcomes: {surprises}")
        flaky = states["flaky"]
        console.print(
            escape(
                f"flaky succeeded on attempt {flaky.attempts}; doomed failed after "
                f"{states['doomed'].attempts} attempts; too-slow: {states['too-slow'].error}; "
                f"cancel-me: {states['cancel-me'].error}"
            )
        )


#: The demo's sections, in order.
SECTIONS: list[Section] = [tasks_section, services_section, workflow_section]


async def run_demo(console: Console, sections: list[Section] | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="dspy-infra-demo-home-") as home:
        settings = load_settings(
            home=home, mode="embedded", backend="process", limiter_interval=0.2, shutdown_grace=2.0
        )
        console.print(f"embedded infra, state in {home} (deleted afterwards)")
        async with Infra(settings) as infra:
            for section in sections if sections is not None else SECTIONS:
                await section(infra, console)


def main() -> int:
    """Entry point of ``dspy-infra demo``: 0 when every section showed what it should."""
    console = Console()
    try:
        asyncio.run(run_demo(console))
    except KeyboardInterrupt:
        return 130
    except (DemoFailed, InfraError) as exc:
        console.print(f"[red]demo failed:[/] {escape(str(exc))}")
        return 1
    console.print("[green]demo finished[/]")
    return 0
