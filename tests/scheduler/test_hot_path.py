"""What the scheduler's hot path keeps cheap without changing what callers see: every task
record keeps its attributes in the class's shared key table (no dict of its own); a class's
queue orders tasks by one int key exactly as by (priority desc, submission order); a
handler's context built through its slots equals the constructor's."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import task_specs

from dspy_infra.config import load_settings
from dspy_infra.models import TaskSpec
from dspy_infra.scheduler.context import SharedResources, TaskContext
from dspy_infra.scheduler.queue import queue_key
from dspy_infra.scheduler.task import TaskRecord

#: Run in a fresh interpreter: the key table is shared by every record of the process, and
#: what an earlier test did to it must not decide this one.
_RECORDS_WITHOUT_OWN_DICT = textwrap.dedent(
    """
    import asyncio, gc, tempfile
    from pathlib import Path
    from dspy_infra.config import load_settings
    from dspy_infra.events import EventBus
    from dspy_infra.metrics import InfraMetrics
    from dspy_infra.models import TaskSpec
    from dspy_infra.plugins import build_plugin_manager
    from dspy_infra.scheduler.scheduler import Scheduler

    async def main() -> None:
        with tempfile.TemporaryDirectory() as home:
            settings = load_settings(env={}, home=Path(home), durable=DURABLE, retention=10_000)
            plugins = build_plugin_manager(load_entry_points=False)
            async with Scheduler(
                settings, bus=EventBus(), metrics=InfraMetrics(), plugins=plugins
            ) as sched:
                # A batch first (every record exists before any task starts), then a
                # failing task, a cancelled one and a lone one: each path sets attributes.
                specs = [TaskSpec(f"t{i}", payload={"handler": "noop"}) for i in range(500)]
                await sched.submit_many(specs)
                await sched.submit(TaskSpec("f", payload={"handler": "fail"}))
                await sched.submit(TaskSpec("s", payload={"handler": "sleep", "seconds": 30}))
                await sched.cancel("s")
                await sched.submit(TaskSpec("w", payload={"handler": "noop"}))
                for task_id in [s.id for s in specs] + ["f", "s", "w"]:
                    await sched.wait(task_id)
                records = list(sched._tasks.values())
                # A record whose values are its own refers to its spec directly; one that
                # grew a dict of its own refers to that dict instead.
                own = sum(1 for r in records if not any(x is r.spec for x in gc.get_referents(r)))
                print(len(records), own)

    asyncio.run(main())
    """
)


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython's shared-key instance dicts")
@pytest.mark.parametrize("durable", [False, True])
def test_records_keep_no_dict_of_their_own(durable: bool) -> None:
    """Regression: records of a batch created before any task ran each grew a dict once
    their task started (a second object per task for the garbage collector)."""
    done = subprocess.run(
        [sys.executable, "-c", _RECORDS_WITHOUT_OWN_DICT.replace("DURABLE", str(durable))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    records, own = map(int, done.stdout.split())
    assert records == 503
    assert own == 0


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**63), 2**63 - 1)),
        unique_by=lambda entry: entry[1],
    )
)
def test_queue_key_orders_as_priority_then_submission(entries: list[tuple[int, int]]) -> None:
    by_key = sorted(entries, key=lambda entry: queue_key(*entry))
    assert by_key == sorted(entries, key=lambda entry: (-entry[0], entry[1]))


@settings(deadline=None)  # a shared machine: the first example may wait for the CPU
@given(spec=task_specs(), attempts=st.integers(1, 1000))
def test_attempt_context_equals_the_constructed_one(spec: TaskSpec, attempts: int) -> None:
    cfg, shared = load_settings(env={}), SharedResources()
    rec = TaskRecord(spec, 0, 1.0)
    rec.attempts = attempts
    ctx = rec.attempt_context(cfg, shared)
    assert ctx == TaskContext(spec=spec, attempt=attempts, settings=cfg, shared=shared)
    assert type(ctx) is TaskContext and ctx.log is None and ctx.payload is spec.payload
