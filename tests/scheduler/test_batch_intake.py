"""``Scheduler.submit_batch`` (the intake of ``SubmitTasks``): for any mix of valid, invalid
and duplicate tasks in concurrent batches, each refused spec is named by its index and field
and the rest go in; every accepted task's row is in the store when the batch returns, every
accepted task runs exactly once, and a batch's tasks run in priority order, then in the
order they were sent, as with ``submit_each``."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from harness import NO_GPU, open_scheduler
from hypothesis import HealthCheck, given, settings
from strategies import batch_intake_plans

from dspy_infra.errors import InfraError
from dspy_infra.models import TaskSpec
from dspy_infra.scheduler.context import TaskContext

#: One task at a time, so that the run order is the queue's order.
SERIAL = {"work": {"min_concurrency": 1, "base_concurrency": 1, "max_concurrency": 1, "adaptive": False}}
MAX_PAYLOAD = 512
#: The field each refused kind of entry is named by.
REFUSED_FIELD = {"bad_class": "task_class", "bad_handler": "payload.handler", "too_big": "payload"}


class Expected:
    """What the plan should give, worked out without the scheduler (batches are taken in
    the order they were started: each intake's checks run before its first await)."""

    def __init__(self, plan: list[list[tuple[str, int]]]) -> None:
        self.batches: list[list[TaskSpec]] = []
        #: Per batch: {index: the field its refusal names}.
        self.refused: list[dict[int, str]] = []
        #: Per batch: its new tasks in the order they should run.
        self.run_order: list[list[str]] = []
        self.accepted: dict[str, TaskSpec] = {}
        fresh_tasks: list[TaskSpec] = []
        for b, batch in enumerate(plan):
            specs: list[TaskSpec] = []
            refused: dict[int, str] = {}
            new: list[TaskSpec] = []
            #: The first spec of each id in this batch: a later one with other content is
            #: refused even if that first one was (its id is taken within the batch).
            first: dict[str, TaskSpec] = {}
            for i, (kind, arg) in enumerate(batch):
                if kind in ("same", "clash") and not fresh_tasks:
                    kind, arg = "new", 0
                spec = self._spec(kind, arg, f"b{b}-{i}", fresh_tasks)
                specs.append(spec)
                if kind in REFUSED_FIELD:
                    refused[i] = REFUSED_FIELD[kind]
                elif first.setdefault(spec.id, spec) != spec:
                    refused[i] = "id"
                elif spec.id in self.accepted and self.accepted[spec.id] != spec:
                    refused[i] = "id"
                elif spec.id not in self.accepted:
                    self.accepted[spec.id] = spec
                    new.append(spec)
                if kind == "new":
                    fresh_tasks.append(spec)
            self.batches.append(specs)
            self.refused.append(refused)
            # Stable sort: equal priorities keep the order they were sent in.
            self.run_order.append([s.id for s in sorted(new, key=lambda s: -s.priority)])

    @staticmethod
    def _spec(kind: str, arg: int, task_id: str, fresh_tasks: list[TaskSpec]) -> TaskSpec:
        if kind == "new":
            return TaskSpec(task_id, "work", {"handler": "count"}, priority=arg)
        if kind == "same":
            return fresh_tasks[arg % len(fresh_tasks)]
        if kind == "clash":
            base = fresh_tasks[arg % len(fresh_tasks)]
            return TaskSpec(base.id, "work", {"handler": "count", "other": 1}, priority=base.priority)
        if kind == "bad_class":
            return TaskSpec(task_id, "no-such-class", {"handler": "count"})
        if kind == "bad_handler":
            return TaskSpec(task_id, "work", {"handler": 7})
        return TaskSpec(task_id, "work", {"handler": "count", "blob": "x" * MAX_PAYLOAD})


def stored_ids(home: Path) -> list[str]:
    conn = sqlite3.connect(home / "state.db")
    try:
        return [row[0] for row in conn.execute("SELECT id FROM tasks")]
    finally:
        conn.close()


@pytest.mark.parametrize("durable", [True, False])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=batch_intake_plans)
def test_a_batch_refuses_each_bad_task_alone_and_runs_the_rest_once_in_order(
    durable: bool, plan: list[list[tuple[str, int]]]
) -> None:
    expected = Expected(plan)
    runs: list[str] = []
    answers: list[list[tuple[int, InfraError]]] = [[] for _ in plan]

    async def count(ctx: TaskContext) -> dict[str, Any]:
        runs.append(ctx.spec.id)
        return {}

    async def main(home: Path) -> None:
        async with open_scheduler(
            home,
            hardware=NO_GPU,
            durable=durable,
            task_classes=SERIAL,
            max_payload_bytes=MAX_PAYLOAD,
            shutdown_grace=0.2,
        ) as sched:
            sched.register_handler("count", count)

            async def send(b: int) -> None:
                answers[b] = await sched.submit_batch(expected.batches[b])
                if durable:  # acknowledged: every task of the batch that went in has its row
                    refused = {i for i, _ in answers[b]}
                    went_in = {s.id for i, s in enumerate(expected.batches[b]) if i not in refused}
                    assert went_in <= set(stored_ids(home))

            async with anyio.create_task_group() as tg:
                for b in range(len(plan)):
                    tg.start_soon(send, b)
            if expected.accepted:
                async for _ in sched.stream_results(sorted(expected.accepted)):
                    pass
        if durable:
            on_disk = stored_ids(home)
            assert sorted(on_disk) == sorted(expected.accepted), "every accepted task stored once"

    with tempfile.TemporaryDirectory() as home:
        anyio.run(main, Path(home))
    for b, answer in enumerate(answers):
        assert [i for i, _ in answer] == sorted(expected.refused[b]), "refusals in order, by index"
        assert {i: error.field for i, error in answer} == expected.refused[b]
    assert sorted(runs) == sorted(expected.accepted), "every accepted task ran exactly once"
    for order in expected.run_order:
        assert [task_id for task_id in runs if task_id in set(order)] == order
