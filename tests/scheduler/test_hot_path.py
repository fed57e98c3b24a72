"""What the scheduler's hot path keeps cheap without changing what callers see: every task
record keeps its attributes in the class's shared key table (no dict of its own); a class's
queue orders tasks by one int key exactly as by (priority desc, submission order); a
handler's context built through its slots equals the constructor's; a memory-only scheduler
that skips encoding a plainly small payload refuses and accepts exactly what a durable one
does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness import open_scheduler
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import task_specs

from dspy_infra.config import load_settings
from dspy_infra.errors import SpecError
from dspy_infra.models import TaskSpec
from dspy_infra.scheduler.context import SharedResources, TaskContext
from dspy_infra.scheduler.queue import queue_key
from dspy_infra.scheduler.scheduler import _plainly_within
from dspy_infra.scheduler.store import encode_json_object
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


@settings(deadline=None)
@given(
    payload=st.dictionaries(
        st.text(st.characters(codec="utf-8"), max_size=8),
        st.text(st.characters(codec="utf-8"), max_size=30),
        max_size=6,
    ),
    limit=st.integers(2, 1200),
)
def test_a_plainly_small_payload_is_within_the_limit(payload: dict[str, str], limit: int) -> None:
    """Whatever the characters (escapes, quotes, multi-byte, astral), the bound from lengths
    alone is never below the size the scheduler measures (its JSON text in UTF-8 bytes)."""
    size = len(encode_json_object(payload).encode("utf-8"))
    if _plainly_within(payload, limit):
        assert size <= limit
    assert _plainly_within(payload, 12 * size + 2)  # and a generous limit is told at once


@pytest.mark.parametrize("size", [150, 190, 196, 198, 199, 200, 201, 202, 210, 400])
async def test_memory_and_durable_refuse_the_same_payloads(tmp_path: Path, size: int) -> None:
    """A memory-only scheduler skips encoding a payload plainly below the limit; near the
    limit it encodes like a durable one, so both refuse (or accept) the same payloads."""
    frame = len(encode_json_object({"handler": "noop", "data": ""}))
    payloads = [
        {"handler": "noop", "data": "x" * (size - frame)},  # 1 byte each
        {"handler": "noop", "data": "\x01" * ((size - frame) // 6)},  # escaped: 6 bytes each
        {"handler": "noop", "data": "\U0001f600" * ((size - frame) // 12)},  # 12 bytes each
        {"handler": "noop", "data": ["x" * (size - frame - 2)]},  # not a flat map of strings
    ]
    outcomes: dict[bool, list[str]] = {}
    for durable in (False, True):
        async with open_scheduler(tmp_path / str(durable), durable=durable, max_payload_bytes=200) as sched:
            got = []
            for i, payload in enumerate(payloads):
                try:
                    await sched.submit(TaskSpec(f"p{i}", payload=payload))
                    got.append("accepted")
                except SpecError as exc:
                    assert exc.field == "payload"
                    got.append(str(exc))
            outcomes[durable] = got
    assert outcomes[False] == outcomes[True]
    assert (outcomes[False][0] == "accepted") == (size <= 200)  # the edge is exercised
