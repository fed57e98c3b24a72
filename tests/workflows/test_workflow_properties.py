"""Hypothesis: random DAGs (up to 30 steps, random dependencies, random failures, random
attempt budgets, either failure policy) run on the real scheduler.

Invariants checked for every run:
- every step runs at most ``max_attempts`` times (each attempt number at most once);
- no attempt of a step starts before all its dependencies completed;
- a step downstream of a failed step never runs (both policies); under the default policy
  nothing starts after the first failure was recorded;
- with ``continue_on_failure`` every step with no failing ancestor completes;
- step statuses agree with what ran, and the run's final status agrees with its steps.

One scheduler + engine (memory-only) serves every example through a blocking portal, so an
example costs one workflow run, not a start-up.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.lowlevel
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import Dag, workflow_properties_dags

from dspy_infra.config import Settings
from dspy_infra.errors import PermanentFailure
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.context import TaskContext
from dspy_infra.scheduler.scheduler import Scheduler
from dspy_infra.workflows import RunState, RunStatus, RunUpdate, StepStatus, WorkflowEngine


@attrs.define
class Harness:
    portal: anyio.from_thread.BlockingPortal
    engine: WorkflowEngine
    #: ("start" | "end", task id, attempt) in the order the handler saw them.
    log: list[tuple[str, str, int]]


@contextlib.asynccontextmanager
async def _running(
    home: Path, log: list[tuple[str, str, int]], *, durable: bool = False
) -> AsyncIterator[WorkflowEngine]:
    # A short grace: a shutdown interrupts running steps instead of waiting for them.
    settings = Settings(home=home, durable=durable, shutdown_grace=0.01)
    bus = EventBus()
    plugins = build_plugin_manager(load_entry_points=False)

    async def record(ctx: TaskContext) -> dict[str, str]:
        """Logs ("start" | "end" | "fail", task id, attempt); "end" only for a success."""
        log.append(("start", ctx.spec.id, ctx.attempt))
        await anyio.sleep(int(ctx.payload.get("ms", "0")) / 1000)  # let parallel steps interleave
        fail = ctx.payload["fail"] == "true"
        log.append(("fail" if fail else "end", ctx.spec.id, ctx.attempt))
        if fail:
            if ctx.payload.get("permanent") == "true":
                raise PermanentFailure("planned permanent failure")
            raise RuntimeError("planned failure")
        return {"attempt": str(ctx.attempt)}

    async with Scheduler(settings, bus=bus, metrics=InfraMetrics(), plugins=plugins) as scheduler:
        scheduler.register_handler("record", record)
        async with WorkflowEngine(settings, scheduler=scheduler, bus=bus) as engine:
            yield engine


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    log: list[tuple[str, str, int]] = []
    with anyio.from_thread.start_blocking_portal() as portal:
        home = tmp_path_factory.mktemp("workflow-properties")
        with portal.wrap_async_context_manager(_running(home, log)) as engine:
            yield Harness(portal, engine, log)


async def _run(engine: WorkflowEngine, dag: Dag) -> tuple[RunState, list[RunUpdate]]:
    wf_id = "p-" + uuid.uuid4().hex[:12]
    await engine.create_workflow(wf_id, spec=dag.spec())
    run_id = await engine.start_run(wf_id)
    with anyio.fail_after(60):
        updates = [u async for u in engine.run_status(run_id)]
    return await engine.get_run(run_id), updates


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dag=workflow_properties_dags())
def test_random_dags_respect_order_budgets_and_failure_policy(harness: Harness, dag: Dag) -> None:
    run, updates = harness.portal.call(_run, harness.engine, dag)
    prefix = run.run_id + "."
    events = [
        (i, kind, tid[len(prefix) :], att)
        for i, (kind, tid, att) in enumerate(harness.log)
        if tid.startswith(prefix)
    ]
    starts: dict[str, list[tuple[int, int]]] = {n: [] for n in dag.deps}
    ends: dict[str, list[int]] = {n: [] for n in dag.deps}
    for i, kind, step, attempt in events:
        (starts[step].append((i, attempt)) if kind == "start" else ends[step].append(i))
    ran = {n for n in dag.deps if starts[n]}
    status = {n: s.status for n, s in run.steps.items()}

    for name in dag.deps:
        attempts = [a for _, a in starts[name]]
        # At most once per attempt budget, each attempt number once.
        assert len(attempts) <= dag.attempts[name]
        assert len(set(attempts)) == len(attempts)
        if name not in dag.failing:
            assert len(attempts) <= 1
        elif name in dag.permanent:
            assert len(attempts) <= 1
        # Never before all dependencies completed.
        for start, _ in starts[name]:
            for dep in dag.deps[name]:
                assert status[dep] is StepStatus.COMPLETED
                assert ends[dep] and max(ends[dep]) < start
        # Downstream of a failure: never runs, under either policy.
        if dag.ancestors(name) & {n for n, s in status.items() if s is StepStatus.FAILED}:
            assert name not in ran and status[name] is StepStatus.SKIPPED

    # Statuses agree with what ran.
    for name, st_ in status.items():
        if st_ is StepStatus.COMPLETED:
            assert name in ran and name not in dag.failing
        elif st_ is StepStatus.FAILED:
            assert name in dag.failing and name in ran
            if name not in dag.permanent:
                assert len(starts[name]) == dag.attempts[name]  # the whole budget was used
        else:
            assert st_ is StepStatus.SKIPPED and name not in ran

    failed = {n for n, s in status.items() if s is StepStatus.FAILED}
    if dag.continue_on_failure:
        # Every step with no failing step upstream (or itself failing) completes.
        for name in dag.deps:
            if not (dag.ancestors(name) | {name}) & dag.failing:
                assert status[name] is StepStatus.COMPLETED
    else:
        # Default policy: no step is submitted after the first failure was recorded (steps
        # submitted before it may still run: they finish, as in Argo's fail-fast).
        if failed:
            first_failure = min(run.steps[n].completed_at for n in failed)
            for name in ran - failed:
                assert run.steps[name].started_at <= first_failure
    if not dag.failing:
        assert all(s is StepStatus.COMPLETED for s in status.values())

    # The run's status agrees with its steps.
    assert run.status is (RunStatus.FAILED if failed else RunStatus.COMPLETED)
    assert run.steps_completed == sum(1 for s in status.values() if s is StepStatus.COMPLETED)
    assert (run.error != "") == bool(failed)
    # The status stream agrees too: counts never go down, and it ends with the final state.
    counts = [u.steps_completed for u in updates]
    assert counts == sorted(counts) and all(u.total_steps == len(dag.deps) for u in updates)
    assert updates[-1].status is run.status and counts[-1] == run.steps_completed
    assert [u.status.terminal for u in updates].count(True) == 1


@settings(max_examples=10, deadline=None)
@given(dag=workflow_properties_dags(), cut_ms=st.integers(0, 200))
def test_a_run_stopped_at_a_random_moment_resumes_without_rerunning_completed_steps(
    tmp_path_factory: pytest.TempPathFactory, dag: Dag, cut_ms: int
) -> None:
    home = tmp_path_factory.mktemp("resume")
    log: list[tuple[str, str, int]] = []

    async def scenario() -> RunState:
        async with _running(home, log, durable=True) as engine:
            await engine.create_workflow("w", spec=dag.spec(ms=60))
            run_id = await engine.start_run("w", idempotency_key="k")
            await anyio.sleep(cut_ms / 1000)
        # Stopped mid-run (running steps interrupted); a new process-worth of components:
        async with _running(home, log, durable=True) as engine:
            assert await engine.start_run("w", idempotency_key="k") == run_id
            with anyio.fail_after(60):
                async for _ in engine.run_status(run_id):
                    pass
            return await engine.get_run(run_id)

    run = anyio.run(scenario)
    prefix = run.run_id + "."
    events = [(i, kind, tid[len(prefix) :]) for i, (kind, tid, _) in enumerate(log) if tid.startswith(prefix)]
    status = {n: s.status for n, s in run.steps.items()}
    for name in dag.deps:
        starts = [i for i, kind, step in events if step == name and kind == "start"]
        successes = [i for i, kind, step in events if step == name and kind == "end"]
        # A step that succeeded never runs again, in this process or the next.
        assert len(successes) <= 1
        if successes:
            assert max(starts) < successes[0]
            assert status[name] is StepStatus.COMPLETED
        # Never before its dependencies succeeded.
        for start in starts:
            for dep in dag.deps[name]:
                dep_done = [i for i, kind, step in events if step == dep and kind == "end"]
                assert dep_done and dep_done[0] < start
        if status[name] is StepStatus.COMPLETED:
            assert name not in dag.failing and successes
        elif status[name] is StepStatus.FAILED:
            assert name in dag.failing
        else:
            assert status[name] is StepStatus.SKIPPED and not starts
    failed = {n for n, s in status.items() if s is StepStatus.FAILED}
    assert run.status is (RunStatus.FAILED if failed else RunStatus.COMPLETED)
