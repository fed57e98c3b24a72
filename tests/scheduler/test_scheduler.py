"""The Scheduler: classes, priorities, retries, timeouts, cancel, idempotency, streams, limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from harness import NO_GPU, fast_retries, open_scheduler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import priorities, task_outcomes

from dspy_infra.errors import (
    AlreadyExists,
    ConfigError,
    DeadlineExceeded,
    NotFound,
    ResourceUnavailable,
    SpecError,
    Unavailable,
)
from dspy_infra.events import EventBus
from dspy_infra.hookspecs import hookimpl
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import GPUInfo, HardwareInfo, TaskSpec, TaskState, TaskStatus
from dspy_infra.scheduler.context import TaskContext
from dspy_infra.scheduler.scheduler import Scheduler, retry_delay

TWO_GPUS = HardwareInfo(cpu_cores=2, memory_bytes=8 << 30, gpus=(GPUInfo(0, "A100"), GPUInfo(1, "A100")))
#: A class that runs one task at a time and never adapts: dispatch order is observable.
SERIAL = {"serial": {"min_concurrency": 1, "base_concurrency": 1, "max_concurrency": 1, "adaptive": False}}


def fixed_width(width: int) -> dict[str, dict[str, int]]:
    """One task class ``w`` that runs exactly ``width`` tasks at a time."""
    return {"w": {"min_concurrency": width, "base_concurrency": width, "max_concurrency": width}}


def record_terminal(sched: Scheduler) -> dict[str, list[TaskStatus]]:
    """Every terminal status each task of ``sched`` reaches, in order (filled by a listener)."""
    terminal: dict[str, list[TaskStatus]] = {}

    def listen(state: TaskState) -> None:
        if state.status.terminal:
            terminal.setdefault(state.id, []).append(state.status)

    sched.add_listener(listen)
    return terminal


def running(home: Path, **overrides: Any) -> contextlib.AbstractAsyncContextManager[Scheduler]:
    overrides.setdefault("durable", False)
    overrides.setdefault("shutdown_grace", 0.5)
    return open_scheduler(home, **overrides)


def spec(task_id: str, handler: str = "noop", task_class: str = "cpu_short", **kw: Any) -> TaskSpec:
    payload = {"handler": handler, **kw.pop("payload", {})}
    return TaskSpec(task_id, task_class=task_class, payload=payload, **kw)


# -- the basics ---------------------------------------------------------------------------


async def test_exec_task_runs_durably_and_is_queryable(state_dir: Path) -> None:
    async with running(state_dir, durable=True) as sched:
        accepted = await sched.submit(spec("hello", "exec", payload={"cmd": "echo hi"}))
        assert accepted.status in (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.COMPLETED)
        result = await sched.wait("hello", timeout=10)
        assert result.status is TaskStatus.COMPLETED
        assert result.result["stdout"] == "hi\n" and result.result["exit_code"] == 0
        assert result.completed_at > 0 and result.duration_ms > 0
        state = await sched.get("hello")
        assert state.attempts == 1 and state.status is TaskStatus.COMPLETED
        assert [s.id for s in await sched.list_tasks(status="completed")] == ["hello"]
    assert (state_dir / "state.db").exists()


async def test_memory_only_mode_writes_no_file(state_dir: Path) -> None:
    async with running(state_dir, durable=False) as sched:
        await sched.submit(spec("a"))
        assert (await sched.wait("a", timeout=5)).status is TaskStatus.COMPLETED
    assert not (state_dir / "state.db").exists()


async def test_unknown_class_and_big_payload_are_refused_naming_the_field(tmp_path: Path) -> None:
    async with running(tmp_path, max_payload_bytes=100) as sched:
        with pytest.raises(SpecError) as info:
            await sched.submit(spec("x", task_class="cpu_huge"))
        assert info.value.field == "task_class"
        assert "cpu_short" in str(info.value) and "cpu_long" in str(info.value)
        with pytest.raises(SpecError) as info:
            await sched.submit(spec("y", payload={"blob": "z" * 200}))
        assert info.value.field == "payload" and "limit of 100" in str(info.value)
        # multi-byte characters count as bytes, not characters
        with pytest.raises(SpecError):
            await sched.submit(spec("y", payload={"blob": "é" * 60}))
        await sched.submit(spec("y", payload={"blob": "z" * 50}))
        with pytest.raises(NotFound):
            await sched.get("x")


async def test_unknown_handler_fails_listing_known_handlers_and_is_not_lost(tmp_path: Path) -> None:
    async with running(tmp_path) as sched:
        await sched.submit(spec("lost?", "embed", max_attempts=3))
        result = await sched.wait("lost?", timeout=5)
        assert result.status is TaskStatus.FAILED
        for name in ("exec", "noop", "sleep", "fail", "embed"):
            assert name in result.error
        assert (await sched.get("lost?")).attempts == 1, "an unknown handler is not retried"


async def test_registered_handler_runs_with_context(tmp_path: Path) -> None:
    seen: list[TaskContext] = []

    async def echo(ctx: TaskContext) -> Mapping[str, str]:
        seen.append(ctx)
        return {"text": ctx.payload["text"], "n": 3}

    async with running(tmp_path) as sched:
        sched.register_handler("echo", echo)
        assert "echo" in sched.handler_names()
        await sched.submit(spec("e", "echo", payload={"text": "hi"}))
        result = await sched.wait("e", timeout=5)
        assert result.result == {"text": "hi", "n": 3}, "JSON values keep their type"
        assert seen[0].attempt == 1 and seen[0].spec.id == "e"
        with pytest.raises(SpecError):
            sched.register_handler("", echo)


async def test_submit_after_close_is_unavailable(tmp_path: Path) -> None:
    async with running(tmp_path) as sched:
        pass
    with pytest.raises(Unavailable):
        await sched.submit(spec("late"))


# -- idempotency ------------------------------------------------------------------------


async def test_idempotent_submit_never_runs_twice(tmp_path: Path) -> None:
    runs = Counter[str]()

    async def count(ctx: TaskContext) -> dict[str, str]:
        runs[ctx.spec.id] += 1
        await anyio.sleep(0.01)
        return {}

    async with running(tmp_path, durable=True) as sched:
        sched.register_handler("count", count)
        same = spec("once", "count")
        states = await asyncio.gather(*[sched.submit(same) for _ in range(10)])
        assert {s.id for s in states} == {"once"}
        await sched.wait("once", timeout=5)
        again = await sched.submit(same)
        assert again.status is TaskStatus.COMPLETED
        assert (await sched.submit_many([same, same]))[0].status is TaskStatus.COMPLETED
        assert runs["once"] == 1
        with pytest.raises(AlreadyExists) as info:
            await sched.submit(spec("once", "count", priority=5))
        assert info.value.field == "id"
        with pytest.raises(AlreadyExists):
            await sched.submit_many([spec("b", priority=1), spec("b", priority=2)])
        with pytest.raises(NotFound):
            await sched.get("b")  # the refused batch left nothing behind


# -- dispatch order -----------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prios=st.lists(priorities, min_size=1, max_size=25))
def test_dispatch_order_is_priority_then_fifo(tmp_path: Path, prios: list[int]) -> None:
    async def scenario() -> list[str]:
        order: list[str] = []
        gate = anyio.Event()

        async def record(ctx: TaskContext) -> dict[str, str]:
            if ctx.spec.id == "blocker":
                await gate.wait()
            order.append(ctx.spec.id)
            return {}

        async with running(tmp_path, task_classes=SERIAL) as sched:
            sched.register_handler("record", record)
            await sched.submit(spec("blocker", "record", task_class="serial", priority=100))
            # Submitted one by one and in batches, while the single slot is held.
            half = len(prios) // 2
            for i, p in enumerate(prios[:half]):
                await sched.submit(spec(f"t{i}", "record", task_class="serial", priority=p))
            await sched.submit_many(
                [spec(f"t{i}", "record", task_class="serial", priority=p) for i, p in enumerate(prios)][half:]
            )
            gate.set()
            async for _ in sched.stream_results([f"t{i}" for i in range(len(prios))]):
                pass
        return order

    order = asyncio.run(scenario())
    expected = [f"t{i}" for i, _ in sorted(enumerate(prios), key=lambda ip: (-ip[1], ip[0]))]
    assert order == ["blocker", *expected]


# -- retries and terminal states ------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plans=st.lists(st.tuples(task_outcomes, st.integers(min_value=1, max_value=4)), min_size=1, max_size=12),
    width=st.integers(min_value=1, max_value=4),
)
def test_every_task_ends_exactly_once_and_retries_stay_within_max_attempts(
    tmp_path: Path, plans: list[tuple[list[str], int]], width: int
) -> None:
    async def scenario() -> tuple[dict[str, list[TaskStatus]], dict[str, int], dict[str, TaskState]]:
        calls = Counter[str]()

        async def scripted(ctx: TaskContext) -> dict[str, str]:
            calls[ctx.spec.id] += 1
            assert ctx.attempt == calls[ctx.spec.id]
            script = ctx.payload["script"].split(",")
            await anyio.lowlevel.checkpoint()
            if ctx.attempt <= len(script) and script[ctx.attempt - 1] == "ok":
                return {"attempt": str(ctx.attempt)}
            raise RuntimeError(f"planned failure {ctx.attempt}")

        async with running(tmp_path, task_classes=fixed_width(width)) as sched:
            sched.register_handler("scripted", scripted)
            terminal = record_terminal(sched)
            await sched.submit_many(
                [
                    spec(f"t{i}", "scripted", task_class="w", max_attempts=m, payload={"script": ",".join(o)})
                    for i, (o, m) in enumerate(plans)
                ]
            )
            results = {r.task_id: r async for r in sched.stream_results([f"t{i}" for i in range(len(plans))])}
            assert len(results) == len(plans)
            states = {f"t{i}": await sched.get(f"t{i}") for i in range(len(plans))}
        return terminal, dict(calls), states

    with fast_retries():
        terminal, calls, states = asyncio.run(scenario())
    for i, (outcomes, max_attempts) in enumerate(plans):
        tid = f"t{i}"
        assert len(terminal[tid]) == 1, f"{tid} reached {terminal[tid]}"
        first_ok = next((n + 1 for n, o in enumerate(outcomes) if o == "ok"), None)
        if first_ok is not None and first_ok <= max_attempts:
            assert states[tid].status is TaskStatus.COMPLETED and calls[tid] == first_ok
        else:
            assert states[tid].status is TaskStatus.FAILED and calls[tid] == max_attempts
        assert states[tid].attempts == calls[tid] <= max_attempts


async def test_retry_backoff_events_and_success_on_retry(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    bus = EventBus()
    async with running(tmp_path, bus=bus) as sched:
        # Fails the first time (creating the marker), succeeds the second.
        cmd = f"if [ -e {marker} ]; then echo second; else touch {marker}; echo first >&2; exit 1; fi"
        await sched.submit(spec("flaky", "exec", payload={"cmd": cmd}, max_attempts=3))
        result = await sched.wait("flaky", timeout=10)
    assert result.status is TaskStatus.COMPLETED and result.result["stdout"] == "second\n"
    types = [e.type for e in bus.history() if e.resource_id == "flaky"]
    assert types == ["task_submitted", "task_started", "task_retried", "task_started", "task_completed"]
    retried = next(e for e in bus.history(["task_retried"]))
    assert retried.data["delay"] == "0.1" and "first" in retried.data["error"]
    assert all(e.timestamp > 0 for e in bus.history())
    assert [retry_delay(n) for n in (1, 2, 3)] == [0.1, 0.2, 0.4] and retry_delay(100) == 30.0


async def test_timeout_fails_the_attempt_and_kills_the_command(tmp_path: Path) -> None:
    async with running(tmp_path) as sched:
        await sched.submit(spec("slow", "exec", payload={"cmd": "sleep 30"}, timeout=0.2, max_attempts=2))
        with anyio.fail_after(10):
            result = await sched.wait("slow")
        assert result.status is TaskStatus.FAILED and "timed out after 0.2s" in result.error
        assert (await sched.get("slow")).attempts == 2


# -- cancel ---------------------------------------------------------------------------------


async def test_cancel_queued_and_running_tasks(tmp_path: Path) -> None:
    ran: list[str] = []
    bus = EventBus()

    async def hold(ctx: TaskContext) -> dict[str, str]:
        ran.append(ctx.spec.id)
        await anyio.sleep(30)
        return {}

    async with running(tmp_path, task_classes=SERIAL, bus=bus) as sched:
        sched.register_handler("hold", hold)
        await sched.submit_many(
            [spec("running", "hold", task_class="serial"), spec("queued", "hold", task_class="serial")]
        )
        await anyio.sleep(0.05)
        assert sched.queue_status()["serial"].depth == 1
        queued = await sched.cancel("queued")
        assert queued.status is TaskStatus.CANCELLED
        assert sched.queue_status()["serial"].depth == 0
        with anyio.fail_after(5):
            cancelled = await sched.cancel("running")
        assert cancelled.status is TaskStatus.CANCELLED and cancelled.attempts == 1
        assert (await sched.cancel("running")).status is TaskStatus.CANCELLED  # idempotent
        assert sched.queue_status()["serial"].inflight == 0
        # The slot came back: the class runs the next task.
        await sched.submit(spec("after", task_class="serial"))
        assert (await sched.wait("after", timeout=5)).status is TaskStatus.COMPLETED
    assert ran == ["running"]
    assert [e.resource_id for e in bus.history(["task_cancelled"])] == ["queued", "running"]


async def test_cancel_running_exec_kills_its_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    async with running(tmp_path) as sched:
        await sched.submit(spec("sleeper", "exec", payload={"cmd": f"echo $$ > {pidfile}; exec sleep 30"}))
        for _ in range(250):  # up to 5 s for the shell to start
            if pidfile.exists() and pidfile.read_text().strip():
                break
            await anyio.sleep(0.02)
        pid = int(pidfile.read_text())
        await sched.cancel("sleeper")
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(pid, 0)


async def test_cancel_during_retry_backoff(tmp_path: Path) -> None:
    async with running(tmp_path) as sched:
        backing_off = anyio.Event()
        sched.add_listener(
            lambda st: backing_off.set() if st.status is TaskStatus.PENDING and st.attempts else None
        )
        await sched.submit(spec("f", "fail", max_attempts=5))
        with anyio.fail_after(5):
            await backing_off.wait()
        state = await sched.cancel("f")
        assert state.status is TaskStatus.CANCELLED
        await anyio.sleep(0.3)
        assert (await sched.get("f")).attempts == 1, "a cancelled retry never starts"


# -- classes ----------------------------------------------------------------------------------


async def test_gpu_class_is_refused_without_gpu_unless_configured(tmp_path: Path) -> None:
    async with running(tmp_path, hardware=NO_GPU) as sched:
        with pytest.raises(ResourceUnavailable) as info:
            await sched.submit(spec("g", task_class="gpu"))
        assert info.value.field == "task_class" and "GPU" in str(info.value) and info.value.fix
    async with running(tmp_path, hardware=NO_GPU, task_classes={"gpu": {"max_concurrency": 2}}) as sched:
        await sched.submit(spec("g", task_class="gpu"))
        assert (await sched.wait("g", timeout=5)).status is TaskStatus.COMPLETED
    async with running(tmp_path, hardware=TWO_GPUS) as sched:
        assert sched.classes["gpu"].max_concurrency == 2
        await sched.submit(spec("g", task_class="gpu"))
        assert (await sched.wait("g", timeout=5)).status is TaskStatus.COMPLETED


class FakeSlurmExecutor:
    """Test double for a Slurm executor (no cluster here): runs the task in-process."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    async def run(self, ctx: TaskContext) -> dict[str, str]:
        return {"ran_on": "fake-slurm", "task": ctx.spec.id}


class FakeSlurmPlugin:
    @hookimpl
    def dspy_infra_executors(self) -> Mapping[str, Any]:
        return {"slurm": FakeSlurmExecutor}


async def test_gpu_slurm_needs_a_slurm_executor(tmp_path: Path) -> None:
    async with running(tmp_path) as sched:
        with pytest.raises(ResourceUnavailable, match="no Slurm executor configured"):
            await sched.submit(spec("s", task_class="gpu_slurm"))
    async with running(tmp_path, plugins=(FakeSlurmPlugin(),)) as sched:
        await sched.submit(spec("s", task_class="gpu_slurm"))
        result = await sched.wait("s", timeout=5)
        assert result.result == {"ran_on": "fake-slurm", "task": "s"}


async def test_bad_class_tables_name_the_field(tmp_path: Path) -> None:
    cases = {
        "task_classes.cpu_short.max_concurency": {"cpu_short": {"max_concurency": 3}},
        "task_classes.fresh.max_concurrency": {"fresh": {"min_concurrency": 1}},
        "task_classes.cpu_long.base_concurrency": {"cpu_long": {"base_concurrency": "two"}},
        "task_classes.cpu_long": {"cpu_long": {"min_concurrency": 5, "max_concurrency": 2}},
        "task_classes.Bad Name": {"Bad Name": {"max_concurrency": 1}},
    }
    for field, tables in cases.items():
        with pytest.raises(ConfigError) as info:
            async with running(tmp_path, task_classes=tables):
                pass
        assert info.value.field == field, (field, info.value)
    async with running(
        tmp_path, task_classes={"cpu_short": {"max_concurrency": 32}, "embed": {"max_concurrency": 3}}
    ) as sched:
        assert sched.classes["cpu_short"].max_concurrency == 32
        assert sched.classes["cpu_short"].base_concurrency == 2, "other fields keep their defaults"
        assert sched.classes["embed"].min_concurrency == 1 and sched.classes["embed"].max_concurrency == 3


# -- results, listeners, queries ----------------------------------------------------------


async def test_stream_results_live_completed_and_bounded(tmp_path: Path) -> None:
    async with running(tmp_path) as sched:
        await sched.submit(spec("done"))
        await sched.wait("done", timeout=5)
        await sched.submit_many([spec("a", "sleep", payload={"seconds": "0.05"}), spec("b", "fail")])
        got = [r async for r in sched.stream_results(["done", "a", "b"], include_completed=True)]
        assert got[0].task_id == "done"
        assert {r.task_id: r.status for r in got} == {
            "done": TaskStatus.COMPLETED,
            "a": TaskStatus.COMPLETED,
            "b": TaskStatus.FAILED,
        }
        # Without include_completed, finished ones are not repeated and the stream still ends.
        assert [r async for r in sched.stream_results(["done"])] == []
        with pytest.raises(NotFound):
            async for _ in sched.stream_results(["nope"]):
                pass

        live: list[str] = []

        async def follow() -> None:
            async for r in sched.stream_results():
                live.append(r.task_id)
                if len(live) == 2:
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await anyio.sleep(0.01)
            await sched.submit_many([spec("x"), spec("y")])
        assert sorted(live) == ["x", "y"]


async def test_wait_timeout_and_not_found(tmp_path: Path) -> None:
    async with running(tmp_path) as sched:
        await sched.submit(spec("slow", "sleep", payload={"seconds": "5"}))
        with pytest.raises(DeadlineExceeded) as info:
            await sched.wait("slow", timeout=0.05)
        assert isinstance(info.value, TimeoutError) and "slow" in str(info.value)
        with pytest.raises(NotFound) as nf:
            await sched.wait("ghost")
        assert nf.value.field == "task_id"
        await sched.cancel("slow")


async def test_list_tasks_filters_and_validates(tmp_path: Path) -> None:
    async with running(tmp_path) as sched:
        await sched.submit_many(
            [spec("w1", workflow_id="wf"), spec("w2", "fail", workflow_id="wf"), spec("solo")]
        )
        async for _ in sched.stream_results(["w1", "w2", "solo"]):
            pass
        assert [s.id for s in await sched.list_tasks()] == ["solo", "w2", "w1"]
        assert [s.id for s in await sched.list_tasks(workflow_id="wf")] == ["w2", "w1"]
        assert [s.id for s in await sched.list_tasks(status="failed")] == ["w2"]
        assert len(await sched.list_tasks(limit=1)) == 1
        with pytest.raises(SpecError) as info:
            await sched.list_tasks(status="done")
        assert info.value.field == "status" and "completed" in str(info.value)


async def test_listener_sees_every_state_change_and_can_be_removed(tmp_path: Path) -> None:
    seen: list[tuple[str, TaskStatus]] = []
    async with running(tmp_path) as sched:
        remove = sched.add_listener(lambda s: seen.append((s.id, s.status)))
        await sched.submit(spec("l"))
        await sched.wait("l", timeout=5)
        remove()
        await sched.submit(spec("m"))
        await sched.wait("m", timeout=5)
    assert seen == [("l", TaskStatus.PENDING), ("l", TaskStatus.RUNNING), ("l", TaskStatus.COMPLETED)]


async def test_retention_keeps_the_newest_finished_tasks(tmp_path: Path) -> None:
    async with running(tmp_path, retention=3) as sched:
        for i in range(6):
            await sched.submit(spec(f"r{i}"))
            await sched.wait(f"r{i}", timeout=5)
        assert [s.id for s in await sched.list_tasks()] == ["r5", "r4", "r3"]
        with pytest.raises(NotFound):
            await sched.get("r0")


# -- limits, metrics, drain ---------------------------------------------------------------


async def test_limit_rises_under_backlog_and_falls_on_errors(tmp_path: Path) -> None:
    metrics = InfraMetrics()
    classes = {"elastic": {"min_concurrency": 1, "base_concurrency": 1, "max_concurrency": 4}}

    async def slow_fail(ctx: TaskContext) -> dict[str, str]:
        await anyio.sleep(0.02)
        raise RuntimeError("overloaded")

    async with running(tmp_path, task_classes=classes, limiter_interval=0.05, metrics=metrics) as sched:
        sched.register_handler("slow_fail", slow_fail)
        await sched.submit_many(
            [spec(f"s{i}", "sleep", task_class="elastic", payload={"seconds": "0.05"}) for i in range(40)]
        )
        peak = 1
        with anyio.fail_after(10):
            while peak < 4:
                peak = max(peak, sched.queue_status()["elastic"].limit)
                await anyio.sleep(0.01)
        snap = metrics.snapshot(["orchestrator_concurrency_limit"])
        assert snap['orchestrator_concurrency_limit{task_class="elastic"}'] >= 2
        for i in range(40):
            await sched.cancel(f"s{i}")
        await sched.submit_many([spec(f"f{i}", "slow_fail", task_class="elastic") for i in range(200)])
        error_rate = 0.0
        with anyio.fail_after(10):
            while sched.queue_status()["elastic"].limit > 1:
                error_rate = max(error_rate, metrics.snapshot()['env_error_rate{task_class="elastic"}'])
                await anyio.sleep(0.01)
        assert error_rate == 1.0
        for i in range(200):
            await sched.cancel(f"f{i}")


async def test_metrics_count_outcomes_per_class(tmp_path: Path) -> None:
    metrics = InfraMetrics()
    async with running(tmp_path, metrics=metrics, task_classes=SERIAL) as sched:
        await sched.submit_many(
            [spec("ok1", task_class="serial"), spec("bad", "fail", task_class="serial", max_attempts=2)]
        )
        await sched.wait("bad", timeout=5)
        blocked_runs = anyio.Event()
        sched.add_listener(
            lambda st: blocked_runs.set() if st.id == "blocked" and st.status is TaskStatus.RUNNING else None
        )
        await sched.submit(spec("blocked", "sleep", task_class="serial", payload={"seconds": "5"}))
        await sched.submit(spec("waiting", task_class="serial"))
        with anyio.fail_after(5):
            await blocked_runs.wait()
        snap = metrics.snapshot()
        assert snap['orchestrator_tasks_total{status="completed",task_class="serial"}'] == 1
        assert snap['orchestrator_tasks_total{status="failed",task_class="serial"}'] == 1
        assert snap['orchestrator_task_errors_total{task_class="serial"}'] == 2
        assert snap['orchestrator_inflight_tasks{task_class="serial"}'] == 1
        assert snap['env_queue_depth{task_class="serial"}'] == 1
        assert snap['orchestrator_concurrency_limit{task_class="serial"}'] == 1
        assert snap['orchestrator_task_duration_seconds_count{status="completed",task_class="serial"}'] == 1
        assert snap['orchestrator_task_wait_seconds_count{task_class="serial"}'] == 4
        await sched.cancel("blocked")
        await sched.cancel("waiting")


async def test_gpu_wait_is_observed_for_gpu_classes(tmp_path: Path) -> None:
    metrics = InfraMetrics()
    async with running(tmp_path, hardware=TWO_GPUS, metrics=metrics) as sched:
        await sched.submit(spec("g", task_class="gpu"))
        await sched.wait("g", timeout=5)
    assert metrics.snapshot()['gpu_wait_seconds_count{task_class="gpu"}'] == 1


async def test_drain_stops_starting_and_waits_for_running(tmp_path: Path) -> None:
    async with running(tmp_path, task_classes=SERIAL) as sched:
        await sched.submit_many(
            [
                spec("first", "sleep", task_class="serial", payload={"seconds": "0.2"}),
                spec("second", task_class="serial"),
            ]
        )
        await anyio.sleep(0.02)
        await sched.drain(timeout=5)
        assert (await sched.get("first")).status is TaskStatus.COMPLETED
        assert (await sched.get("second")).status is TaskStatus.PENDING
        # Accepted after a drain: kept (it would run on the next start), not lost.
        await sched.submit(spec("third", task_class="serial"))
        assert (await sched.get("third")).status is TaskStatus.PENDING
        waiter_error: list[BaseException] = []

        async def waiter() -> None:
            try:
                await sched.wait("second")
            except Unavailable as exc:
                waiter_error.append(exc)

        # (aclose must run in the task and scope that entered the scheduler, so the waiter is a
        # plain task here rather than a child of a nested task group.)
        pending = asyncio.ensure_future(waiter())
        await anyio.sleep(0.01)
        await sched.aclose()
        await pending
        assert waiter_error and "runs again on the next start" in str(waiter_error[0])


async def test_cancel_right_after_submit_before_the_worker_runs(tmp_path: Path) -> None:
    ran: list[str] = []

    async def hold(ctx: TaskContext) -> dict[str, str]:
        ran.append(ctx.spec.id)
        await anyio.sleep(30)
        return {}

    async with running(tmp_path) as sched:
        sched.register_handler("hold", hold)
        await sched.submit(spec("quick", "hold"))
        # submit started it (a slot was free) but its worker has not been scheduled yet
        assert (await sched.get("quick")).status is TaskStatus.RUNNING
        with anyio.fail_after(5):
            state = await sched.cancel("quick")
        assert state.status is TaskStatus.CANCELLED
        assert ran == [], "the handler never started"
        assert sched.queue_status()["cpu_short"].inflight == 0


# -- end to end through Infra: the demo's task section and the quickstart -------------------


async def test_demo_tasks_section_shows_every_outcome() -> None:
    import io

    from rich.console import Console

    from dspy_infra.demo import run_demo, tasks_section

    out = io.StringIO()
    await run_demo(Console(file=out, width=200), [tasks_section])
    text = out.getvalue()
    for expected in (
        "gpu_slurm refused",
        "no Slurm executor configured",
        "worked on the retry",
        "this task fails on purpose",
        "timed out after 0.5s",
        "cancelled",
        "adaptive limits per class",
        "cpu_long",
    ):
        assert expected in text, expected


def test_quickstart_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "completed hi" in proc.stdout and "{'text': 'HELLO'}" in proc.stdout
    assert "result: id-3 cancelled" in proc.stdout and "already exists" in proc.stdout


@settings(max_examples=100)
@given(values=st.lists(st.floats(min_value=-1, max_value=5000, allow_nan=False), max_size=50))
def test_batched_histogram_folds_to_exactly_what_direct_observes_give(values: list[float]) -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from dspy_infra.scheduler.queue import BatchedHistogram

    direct = Histogram("d", "direct", registry=CollectorRegistry(), buckets=(0.001, 0.1, 1, 60, 900))
    batched_metric = Histogram("b", "batched", registry=CollectorRegistry(), buckets=(0.001, 0.1, 1, 60, 900))
    batched = BatchedHistogram(batched_metric)
    assert not batched.direct, "prometheus_client internals changed: the fast path is off"
    for v in values:
        direct.observe(v)
        batched.observe(v)
    batched.flush()
    batched.flush()  # idempotent

    def samples(h: Histogram) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name[1:], s.labels, round(s.value, 6))
            for m in h.collect()
            for s in m.samples
            if not s.name.endswith("_created")
        ]

    assert samples(direct) == samples(batched_metric)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    submissions=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 1), st.booleans()), min_size=1, max_size=20
    )
)
def test_idempotent_submit_property(tmp_path: Path, submissions: list[tuple[str, int, bool]]) -> None:
    """Random resubmissions (same or other content, before or after completion, single or
    batched): each id runs at most once, and only content differing from the first accepted
    submission is refused."""

    async def scenario() -> tuple[Counter[str], list[tuple[str, int, bool]]]:
        runs = Counter[str]()

        async def count(ctx: TaskContext) -> dict[str, str]:
            runs[ctx.spec.id] += 1
            await anyio.lowlevel.checkpoint()
            return {}

        outcomes: list[tuple[str, int, bool]] = []  # (id, variant, accepted)
        async with running(tmp_path) as sched:
            sched.register_handler("count", count)
            for task_id, variant, then_wait in submissions:
                s = spec(task_id, "count", payload={"variant": str(variant)})
                try:
                    if then_wait:
                        await sched.submit_many([s, s])
                    else:
                        await sched.submit(s)
                    outcomes.append((task_id, variant, True))
                except AlreadyExists:
                    outcomes.append((task_id, variant, False))
                if then_wait:
                    await sched.wait(task_id, timeout=5)
            async for _ in sched.stream_results(sorted({t for t, _, _ in submissions})):
                pass
        return runs, outcomes

    runs, outcomes = asyncio.run(scenario())
    first: dict[str, int] = {}
    for task_id, variant, accepted in outcomes:
        first.setdefault(task_id, variant)
        assert accepted == (variant == first[task_id])
    assert runs == Counter(first.keys()), "every id ran exactly once"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tasks=st.lists(
        st.tuples(
            st.sampled_from(["ok", "fail", "slow"]),
            st.one_of(st.none(), st.integers(min_value=0, max_value=6)),  # cancel after n yields
            priorities,
        ),
        min_size=1,
        max_size=15,
    ),
    width=st.integers(min_value=1, max_value=3),
)
def test_exactly_one_terminal_state_with_random_cancels(
    tmp_path: Path, tasks: list[tuple[str, int | None, int]], width: int
) -> None:
    async def scenario() -> tuple[dict[str, list[TaskStatus]], dict[str, TaskStatus], bool]:

        async def work(ctx: TaskContext) -> dict[str, str]:
            kind = ctx.payload["kind"]
            for _ in range(5 if kind == "slow" else 1):
                await anyio.lowlevel.checkpoint()
            if kind == "fail":
                raise RuntimeError("planned")
            return {}

        async with running(tmp_path, task_classes=fixed_width(width)) as sched:
            sched.register_handler("work", work)
            terminal = record_terminal(sched)
            ids = [f"t{i}" for i in range(len(tasks))]
            await sched.submit_many(
                [
                    spec(tid, "work", task_class="w", priority=p, max_attempts=2, payload={"kind": kind})
                    for tid, (kind, _, p) in zip(ids, tasks, strict=True)
                ]
            )

            async def cancel_later(tid: str, after: int) -> None:
                for _ in range(after):
                    await anyio.lowlevel.checkpoint()
                await sched.cancel(tid)

            async with anyio.create_task_group() as tg:
                for tid, (_, after, _) in zip(ids, tasks, strict=True):
                    if after is not None:
                        tg.start_soon(cancel_later, tid, after)
                async for _ in sched.stream_results(ids):
                    pass
            final = {tid: (await sched.get(tid)).status for tid in ids}
            q = sched.queue_status()["w"]
            drained = q.depth == 0 and q.inflight == 0
        return terminal, final, drained

    with fast_retries():
        terminal, final, drained = asyncio.run(scenario())
    assert drained, "every slot came back"
    for i, (kind, after, _) in enumerate(tasks):
        tid = f"t{i}"
        assert terminal[tid] == [final[tid]], f"{tid}: {terminal[tid]}"
        if after is None:
            assert final[tid] is (TaskStatus.FAILED if kind == "fail" else TaskStatus.COMPLETED)


async def test_a_handler_that_turns_cancel_into_an_error_is_still_cancelled(tmp_path: Path) -> None:
    async def stubborn(ctx: TaskContext) -> dict[str, str]:
        try:
            await anyio.sleep(30)
        except BaseException:  # a careless handler: cancellation becomes an ordinary error
            raise RuntimeError("interrupted") from None
        return {}

    async with running(tmp_path) as sched:
        sched.register_handler("stubborn", stubborn)
        await sched.submit(spec("s", "stubborn", max_attempts=5))
        await anyio.sleep(0.05)
        with anyio.fail_after(5):
            state = await sched.cancel("s")
        assert state.status is TaskStatus.CANCELLED and state.attempts == 1, "not retried"
