"""Workflows: spec parsing and validation, templating, failure policy, cancel, idempotent runs.

Engine tests run the real Scheduler (real subprocesses for ``exec`` steps, SQLite on disk).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from strategies import graphs, result_keys, step_names

from dspy_infra.config import Settings, load_settings
from dspy_infra.demo.workflows import DEMO_WORKFLOW_ID, workflow_section
from dspy_infra.errors import AlreadyExists, CycleError, NotFound, SpecError, Unavailable
from dspy_infra.events import EventBus
from dspy_infra.infra import Infra
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskClass, TaskStatus
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.scheduler import Scheduler
from dspy_infra.workflows import (
    RunStatus,
    StepSpec,
    StepStatus,
    WorkflowEngine,
    WorkflowSpec,
    parse_workflow_spec,
    validate_workflow,
)
from dspy_infra.workflows.template import render

CLASSES = ["cpu_short", "cpu_long", "gpu"]


def spec_of(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"steps": list(steps), **extra}


def noop(name: str, *deps: str, **payload: str) -> dict[str, Any]:
    return {"name": name, "depends_on": list(deps), "payload": {"handler": "noop", **payload}}


# -- parsing ------------------------------------------------------------------------------


def test_json_bytes_str_dict_and_objects_parse_to_the_same_spec() -> None:
    doc = spec_of(noop("a"), noop("b", "a", x="{{ steps.a.result.k }}"), continue_on_failure=True)
    objects = WorkflowSpec(
        steps=[
            StepSpec("a", payload={"handler": "noop"}),
            StepSpec("b", payload={"handler": "noop", "x": "{{ steps.a.result.k }}"}, depends_on=["a"]),
        ],
        continue_on_failure=True,
    )
    text = json.dumps(doc)
    for source in (text, text.encode(), doc, objects):
        assert parse_workflow_spec(source) == objects


def test_steps_may_be_a_mapping_keyed_by_name_and_class_is_an_alias() -> None:
    spec = parse_workflow_spec({"steps": {"a": {"class": "gpu"}, "b": {"depends_on": "a"}}})
    assert [(s.name, s.task_class, s.depends_on) for s in spec.steps] == [
        ("a", "gpu", ()),
        ("b", "cpu_short", ("a",)),
    ]


def test_malformed_json_names_line_and_column() -> None:
    with pytest.raises(SpecError) as info:
        parse_workflow_spec('{\n  "steps": [\n    {"name": "a",,}\n  ]\n}')
    assert info.value.field == "spec"
    assert "line 3, column 18" in str(info.value)


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ({"stepz": []}, "stepz", "did you mean 'steps'"),
        ({"steps": []}, "steps", "non-empty"),
        ({"steps": [{"payload": {}}]}, "steps[0].name", "needs a name"),
        ({"steps": [{"name": "A b"}]}, "steps[].name", "invalid name"),
        ({"steps": [{"name": "a", "dependson": []}]}, "steps.a.dependson", "did you mean 'depends_on'"),
        # Payloads are JSON objects (lists are fine); what a task cannot hold is refused by path.
        (
            {"steps": [{"name": "a", "payload": {"x": 2**64}}]},
            "workflow.spec.steps[0].payload.x",
            "out of range",
        ),
        ({"steps": [{"name": "a", "max_attempts": 0}]}, "steps.a.max_attempts", "1 to 100"),
        ({"steps": [{"name": "a", "timeout": -1}]}, "steps.a.timeout", "> 0"),
        ({"steps": [{"name": "a", "priority": "high"}]}, "steps.a.priority", "integer"),
        ({"steps": [{"name": "a", "depends_on": ["b", "b"]}]}, "steps.a.depends_on", "twice"),
        ({"steps": [{"name": "a"}], "continue_on_failure": "yes"}, "continue_on_failure", "true or false"),
        ('"just a string"', "spec", "JSON object"),
        (b"\xff\xfe", "spec", "UTF-8"),
        (None, "spec", "needs a spec"),
    ],
)
def test_shape_errors_name_the_field(doc: Any, field: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_workflow_spec(doc if isinstance(doc, (str, bytes)) or doc is None else json.dumps(doc))
    assert info.value.field == field
    assert words in str(info.value)


# -- graph validation ---------------------------------------------------------------------


def check(doc: Any) -> None:
    validate_workflow(parse_workflow_spec(doc), CLASSES)


def test_duplicate_step_names_are_refused() -> None:
    with pytest.raises(SpecError) as info:
        check(spec_of(noop("a"), noop("a")))
    assert info.value.field == "steps.a" and "duplicate" in str(info.value)


def test_unknown_dependency_is_refused_with_a_suggestion() -> None:
    with pytest.raises(SpecError) as info:
        check(spec_of(noop("fetch"), noop("train", "fetc")))
    assert info.value.field == "steps.train.depends_on"
    assert "unknown step 'fetc'" in str(info.value) and "did you mean 'fetch'" in str(info.value)


def test_cycle_is_refused_naming_the_cycle() -> None:
    with pytest.raises(CycleError) as info:
        check(spec_of(noop("a", "c"), noop("b", "a"), noop("c", "b"), noop("d")))
    assert info.value.cycle == ["a", "c", "b", "a"]
    assert "a -> c -> b -> a" in str(info.value)


def test_self_dependency_is_a_cycle() -> None:
    with pytest.raises(CycleError) as info:
        check(spec_of(noop("a", "a")))
    assert info.value.cycle == ["a", "a"]


def test_unknown_class_is_refused_with_the_known_ones() -> None:
    with pytest.raises(SpecError) as info:
        check(spec_of({"name": "a", "task_class": "gpux"}))
    assert info.value.field == "steps.a.task_class"
    assert "did you mean 'gpu'" in str(info.value) and "cpu_short" in str(info.value)


def test_template_of_unknown_step_is_refused() -> None:
    with pytest.raises(SpecError) as info:
        check(spec_of(noop("a", x="{{ steps.nope.result.k }}")))
    assert info.value.field == "steps.a.payload.x" and "unknown step 'nope'" in str(info.value)


def test_template_of_step_that_is_not_upstream_is_refused() -> None:
    # b is a sibling of c, not an ancestor: its result may not exist yet when c starts.
    with pytest.raises(SpecError) as info:
        check(spec_of(noop("a"), noop("b", "a"), noop("c", "a", x="{{ steps.b.result.k }}")))
    assert info.value.field == "steps.c.payload.x"
    assert "add 'b' to the depends_on of 'c'" in str(info.value)


def test_transitive_upstream_reference_is_accepted() -> None:
    check(spec_of(noop("a"), noop("b", "a"), noop("c", "b", x="{{ steps.a.result.k }}")))


@pytest.mark.parametrize("template", ["{{ nope }}", "{{ input }}", "{{ steps.a.k }}", "{{ input.a b }}"])
def test_malformed_template_is_refused(template: str) -> None:
    with pytest.raises(SpecError) as info:
        check(spec_of(noop("a"), noop("b", "a", x=template)))
    assert info.value.field == "steps.b.payload.x" and "unknown template" in str(info.value)


def test_handlers_are_checked_for_local_classes_only() -> None:
    classes = {"cpu_short": TaskClass("cpu_short"), "gpu_slurm": TaskClass("gpu_slurm", executor="slurm")}
    handlers = ["exec", "noop"]
    with pytest.raises(SpecError) as info:
        validate_workflow(
            parse_workflow_spec(spec_of({"name": "a", "payload": {"handler": "exce"}})), classes, handlers
        )
    assert info.value.field == "steps.a.payload.handler" and "did you mean 'exec'" in str(info.value)
    with pytest.raises(SpecError) as info:
        validate_workflow(parse_workflow_spec(spec_of({"name": "a", "payload": {}})), classes, handlers)
    assert info.value.field == "steps.a.payload.handler" and "missing" in str(info.value)
    # The slurm executor runs the payload itself; a handler chosen by the input is checked at run time.
    ok = spec_of(
        {"name": "a", "task_class": "gpu_slurm", "payload": {"script": "x"}},
        {"name": "b", "payload": {"handler": "{{ input.h }}"}},
    )
    validate_workflow(parse_workflow_spec(ok), classes, handlers)


def test_input_keys_collects_every_input_reference() -> None:
    spec = parse_workflow_spec(
        spec_of(noop("a", x="{{input.m}}-{{ input.n }}"), noop("b", "a"), output={"o": "{{ input.p }}"})
    )
    assert spec.input_keys() == {"m", "n", "p"}


def test_sinks_are_steps_nothing_depends_on() -> None:
    spec = parse_workflow_spec(spec_of(noop("a"), noop("b", "a"), noop("c", "a"), noop("d")))
    assert spec.sinks() == ["b", "c", "d"]


def _acyclic(graph: dict[str, list[str]]) -> bool:
    remaining = {n: set(d) for n, d in graph.items()}
    while remaining:
        ready = [n for n, d in remaining.items() if not d]
        if not ready:
            return False
        for n in ready:
            del remaining[n]
        for d in remaining.values():
            d.difference_update(ready)
    return True


@given(graphs())
def test_cycles_are_refused_exactly_when_one_exists_naming_a_real_one(graph: dict[str, list[str]]) -> None:
    spec = WorkflowSpec(steps=[StepSpec(n, depends_on=d) for n, d in graph.items()])
    try:
        validate_workflow(spec, CLASSES)
    except CycleError as exc:
        cycle = exc.cycle
        assert not _acyclic(graph)
        assert cycle[0] == cycle[-1]
        assert len(set(cycle[:-1])) == len(cycle) - 1
        for node, dep in itertools.pairwise(cycle):
            assert dep in graph[node]
        assert exc.field == f"steps.{cycle[0]}.depends_on"
    else:
        assert _acyclic(graph)


@given(graphs(), st.booleans())
def test_spec_round_trips_through_its_json(graph: dict[str, list[str]], cof: bool) -> None:
    spec = WorkflowSpec(
        steps=[StepSpec(n, payload={"handler": "noop"}, depends_on=d) for n, d in graph.items()],
        continue_on_failure=cof,
    )
    again = parse_workflow_spec(spec.to_json())
    assert again == spec and again.spec_hash == spec.spec_hash


# -- the engine, on the real scheduler -------------------------------------------------------


@contextlib.asynccontextmanager
async def running(
    home: Path, *, durable: bool = True
) -> AsyncIterator[tuple[Scheduler, WorkflowEngine, EventBus]]:
    settings = Settings(home=home, durable=durable, shutdown_grace=0.2)
    bus = EventBus()
    plugins = build_plugin_manager(load_entry_points=False)
    async with Scheduler(settings, bus=bus, metrics=InfraMetrics(), plugins=plugins) as scheduler:
        async with WorkflowEngine(settings, scheduler=scheduler, bus=bus) as engine:
            yield scheduler, engine, bus


def sh(name: str, cmd: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "depends_on": list(deps), "payload": {"handler": "exec", "cmd": cmd}, **extra}


def wf_types(bus: EventBus) -> list[str]:
    return [e.type for e in bus.history() if e.type.startswith("workflow_")]


async def final(engine: WorkflowEngine, run_id: str) -> Any:
    with anyio.fail_after(30):
        async for _ in engine.run_status(run_id):
            pass
    return await engine.get_run(run_id)


async def test_templates_carry_input_and_upstream_results_into_payloads(tmp_path: Path) -> None:
    async with running(tmp_path) as (scheduler, engine, _bus):
        await engine.create_workflow(
            "tpl",
            spec=spec_of(
                sh("fetch", "printf %s '{{ input.model }}.bin'"),
                sh("train", "printf 'trained %s' '{{ steps.fetch.result.stdout }}'", "fetch"),
                output={"artifact": "{{ steps.train.result.stdout }}", "model": "{{ input.model }}"},
            ),
        )
        run_id = await engine.start_run("tpl", input={"model": "llama"})
        run = await final(engine, run_id)
        assert run.status is RunStatus.COMPLETED, run.error
        assert run.output == {"artifact": "trained llama.bin", "model": "llama"}
        train = await scheduler.get(f"{run_id}.train")
        assert train.spec.payload["cmd"] == "printf 'trained %s' 'llama.bin'"
        assert train.spec.workflow_id == "tpl"


async def test_default_output_is_the_sink_results(tmp_path: Path) -> None:
    async with running(tmp_path) as (_s, engine, _bus):
        await engine.create_workflow(
            "sinks", spec=spec_of(sh("a", "printf A"), sh("b", "printf B", "a"), sh("c", "printf C"))
        )
        run = await final(engine, await engine.start_run("sinks"))
        assert run.output["b.stdout"] == "B" and run.output["c.stdout"] == "C"
        assert not any(k.startswith("a.") for k in run.output)


async def test_missing_input_is_refused_at_start_and_starts_nothing(tmp_path: Path) -> None:
    async with running(tmp_path) as (scheduler, engine, bus):
        await engine.create_workflow(
            "needs-input", spec=spec_of(sh("a", "echo {{ input.model }} {{ input.size }}"))
        )
        with pytest.raises(SpecError) as info:
            await engine.start_run("needs-input", input={"size": "7b"})
        assert info.value.field == "input.model"
        assert await engine.list_runs() == []
        assert await scheduler.list_tasks() == []
        assert "workflow_started" not in wf_types(bus)


async def test_missing_result_key_fails_the_step_before_its_task_exists(tmp_path: Path) -> None:
    async with running(tmp_path) as (scheduler, engine, _bus):
        await engine.create_workflow(
            "badkey",
            spec=spec_of(
                sh("a", "printf x"), sh("b", "echo {{ steps.a.result.path }}", "a"), sh("c", "true", "b")
            ),
        )
        run_id = await engine.start_run("badkey")
        run = await final(engine, run_id)
        assert run.status is RunStatus.FAILED
        b = run.steps["b"]
        assert b.status is StepStatus.FAILED
        assert "step 'a' has no result key 'path'" in b.error and "stdout" in b.error
        assert run.steps["c"].status is StepStatus.SKIPPED
        with pytest.raises(NotFound):
            await scheduler.get(f"{run_id}.b")
        with pytest.raises(NotFound):
            await scheduler.get(f"{run_id}.c")


def fan(go: Path) -> tuple[dict[str, Any], ...]:
    """``bad`` fails while ``slow`` runs: ``slow`` ends only once ``go`` exists."""
    return (
        sh("root", "true"),
        sh("bad", "echo broken >&2; exit 3", "root"),
        sh("after-bad", "true", "bad"),
        sh("slow", f"while [ ! -e {go} ]; do sleep 0.02; done", "root"),
        sh("after-slow", "true", "slow"),
    )


async def test_default_policy_fails_the_run_and_starts_nothing_new(tmp_path: Path) -> None:
    go = tmp_path / "go"
    async with running(tmp_path) as (scheduler, engine, bus):
        await engine.create_workflow("fan", spec=spec_of(*fan(go)))
        run_id = await engine.start_run("fan")
        with anyio.fail_after(30):  # `slow` is held until `bad` has failed, however slow the machine
            while True:
                steps = (await engine.get_run(run_id)).steps
                if steps["bad"].status is StepStatus.FAILED:
                    break
                await anyio.sleep(0.02)
        assert steps["slow"].status is StepStatus.RUNNING
        go.touch()
        run = await final(engine, run_id)
        status = {n: s.status for n, s in run.steps.items()}
        assert status == {
            "root": StepStatus.COMPLETED,
            "bad": StepStatus.FAILED,
            "after-bad": StepStatus.SKIPPED,
            "slow": StepStatus.COMPLETED,  # already running when `bad` failed: it finishes
            "after-slow": StepStatus.SKIPPED,  # not started: the run had failed
        }
        assert run.status is RunStatus.FAILED
        assert "step 'bad' failed" in run.error and "broken" in run.error
        for never in ("after-bad", "after-slow"):
            with pytest.raises(NotFound):
                await scheduler.get(f"{run_id}.{never}")
        assert wf_types(bus)[-1] == "workflow_failed"


async def test_continue_on_failure_lets_independent_branches_finish(tmp_path: Path) -> None:
    async with running(tmp_path) as (scheduler, engine, _bus):
        go = tmp_path / "go"
        go.touch()  # the order of `bad` and `slow` does not matter here
        await engine.create_workflow("fan-cof", spec=spec_of(*fan(go), continue_on_failure=True))
        run_id = await engine.start_run("fan-cof")
        run = await final(engine, run_id)
        assert run.steps["after-slow"].status is StepStatus.COMPLETED
        assert run.steps["after-bad"].status is StepStatus.SKIPPED
        assert "'bad'" in run.steps["after-bad"].error
        assert run.status is RunStatus.FAILED
        with pytest.raises(NotFound):
            await scheduler.get(f"{run_id}.after-bad")


async def test_cancel_run_cancels_running_tasks_and_skips_the_rest(tmp_path: Path) -> None:
    async with running(tmp_path) as (scheduler, engine, bus):
        marker = tmp_path / "a-started"
        await engine.create_workflow(
            "long", spec=spec_of(sh("a", f"touch {marker}; sleep 30"), sh("b", "true", "a"))
        )
        run_id = await engine.start_run("long")
        with anyio.fail_after(10):
            while not marker.exists():  # noqa: ASYNC110 - a file a subprocess writes; no event to await
                await anyio.sleep(0.02)
        with anyio.fail_after(10):
            run = await engine.cancel_run(run_id)
        assert run.status is RunStatus.CANCELLED
        assert run.steps["a"].status is StepStatus.CANCELLED
        assert run.steps["b"].status is StepStatus.CANCELLED
        assert (await scheduler.get(f"{run_id}.a")).status is TaskStatus.CANCELLED
        with pytest.raises(NotFound):
            await scheduler.get(f"{run_id}.b")
        assert wf_types(bus)[-1] == "workflow_cancelled"
        # Cancelling a finished run changes nothing.
        assert (await engine.cancel_run(run_id)).status is RunStatus.CANCELLED


async def test_create_workflow_is_idempotent_per_spec(tmp_path: Path) -> None:
    async with running(tmp_path) as (_s, engine, bus):
        doc = spec_of(noop("a"))
        first = await engine.create_workflow("w", "W", "d", doc)
        again = await engine.create_workflow("w", "W", "d", json.dumps(doc))
        assert again == first
        with pytest.raises(AlreadyExists) as info:
            await engine.create_workflow("w", spec=spec_of(noop("a"), noop("b")))
        assert info.value.field == "id"
        assert wf_types(bus) == ["workflow_created"]
        assert [w.id for w in await engine.list_workflows()] == ["w"]


BAD_SPECS = [
    ('{"steps": [', SpecError),
    (spec_of(noop("a"), noop("a")), SpecError),
    (spec_of(noop("a", "ghost")), SpecError),
    (spec_of(noop("a", "b"), noop("b", "a")), CycleError),
    (spec_of({"name": "a", "task_class": "no-such-class"}), SpecError),
    (spec_of(noop("a", x="{{ steps.b.result.k }}"), noop("b")), SpecError),
    (spec_of({"name": "a", "payload": {"handler": "exce"}}), SpecError),
    (spec_of({"name": "a", "payload": {"cmd": "true"}}), SpecError),
]


@pytest.mark.anyio  # explicit: the collection-time marker comes too late for parametrize
@pytest.mark.parametrize(("doc", "error"), BAD_SPECS)
async def test_bad_spec_is_refused_and_leaves_no_trace(
    tmp_path: Path, doc: Any, error: type[Exception]
) -> None:
    async with running(tmp_path) as (_s, engine, bus):
        with pytest.raises(error):
            await engine.create_workflow("bad", spec=doc)
        assert await engine.list_workflows() == []
        assert wf_types(bus) == []
        with pytest.raises(NotFound):
            await engine.start_run("bad")
    # Nothing on disk either, and a fresh engine knows nothing of it.
    with sqlite3.connect(tmp_path / "workflows.db") as db:
        assert db.execute("SELECT count(*) FROM workflows").fetchone() == (0,)
    async with running(tmp_path) as (_s, engine, _bus):
        assert await engine.list_workflows() == []


async def test_bad_workflow_id_is_refused(tmp_path: Path) -> None:
    async with running(tmp_path, durable=False) as (_s, engine, _bus):
        with pytest.raises(SpecError) as info:
            await engine.create_workflow("has space", spec=spec_of(noop("a")))
        assert info.value.field == "id"


async def test_concurrent_start_run_with_one_key_starts_one_run(tmp_path: Path) -> None:
    async with running(tmp_path) as (scheduler, engine, bus):
        await engine.create_workflow("idem", spec=spec_of(noop("a"), noop("b", "a")))
        ids: list[str] = []

        async def start() -> None:
            ids.append(await engine.start_run("idem", input={"x": 1}, idempotency_key="k1"))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(start)
        assert len(ids) == 20 and len(set(ids)) == 1
        await final(engine, ids[0])
        assert await engine.start_run("idem", input={"x": 1}, idempotency_key="k1") == ids[0]
        assert len(await engine.list_runs("idem")) == 1
        assert wf_types(bus).count("workflow_started") == 1
        assert len(await scheduler.list_tasks(workflow_id="idem")) == 2
        # Inputs are JSON: the string "1" is another input than the number 1.
        for other_input in ({"x": 2}, {"x": "1"}):
            with pytest.raises(AlreadyExists) as info:
                await engine.start_run("idem", input=other_input, idempotency_key="k1")
            assert info.value.field == "idempotency_key"
        other = await engine.start_run("idem", input={"x": 1}, idempotency_key="k2")
        assert other != ids[0]


async def test_run_status_streams_every_change_and_ends_after_the_terminal_one(tmp_path: Path) -> None:
    async with running(tmp_path) as (_s, engine, bus):
        await engine.create_workflow(
            "stream", spec=spec_of(sh("a", "sleep 0.2"), sh("b", "printf done", "a"))
        )
        run_id = await engine.start_run("stream")
        updates = []
        with anyio.fail_after(20):
            async for update in engine.run_status(run_id):
                updates.append(update)
        assert updates[0].total_steps == 2
        assert updates[-1].status is RunStatus.COMPLETED
        assert updates[-1].steps_completed == 2 and updates[-1].output["b.stdout"] == "done"
        assert [u.steps_completed for u in updates] == sorted(u.steps_completed for u in updates)
        assert sum(1 for u in updates if u.status.terminal) == 1
        changed = [u.current_step for u in updates[1:] if u.current_step]
        assert changed[-2:] == ["b", "b"]  # running, then completed
        # A finished run streams just its final state.
        assert [u.status for u in [u async for u in engine.run_status(run_id)]] == [RunStatus.COMPLETED]
        types = wf_types(bus)
        assert types[:2] == ["workflow_created", "workflow_started"]
        assert types.count("workflow_step_completed") == 2 and types[-1] == "workflow_completed"


async def test_unknown_ids_raise_not_found(tmp_path: Path) -> None:
    async with running(tmp_path, durable=False) as (_s, engine, _bus):
        with pytest.raises(NotFound):
            await engine.start_run("nope")
        with pytest.raises(NotFound):
            await engine.get_run("run-nope")
        with pytest.raises(NotFound):
            await engine.cancel_run("run-nope")
        with pytest.raises(NotFound):
            async for _ in engine.run_status("run-nope"):
                pass


async def test_memory_only_engine_writes_no_file(tmp_path: Path) -> None:
    async with running(tmp_path, durable=False) as (_s, engine, _bus):
        await engine.create_workflow("m", spec=spec_of(noop("a")))
        run = await final(engine, await engine.start_run("m"))
        assert run.status is RunStatus.COMPLETED
    assert not (tmp_path / "workflows.db").exists()


async def test_workflows_and_finished_runs_survive_a_restart(tmp_path: Path) -> None:
    async with running(tmp_path) as (_s, engine, _bus):
        await engine.create_workflow("keep", "Keep", "kept", spec_of(sh("a", "printf kept")))
        run_id = await engine.start_run("keep", idempotency_key="once")
        before = await final(engine, run_id)
    async with running(tmp_path) as (_s, engine, _bus):
        (wf,) = await engine.list_workflows()
        assert (wf.id, wf.name, wf.description) == ("keep", "Keep", "kept")
        after = await engine.get_run(run_id)
        assert after == before
        assert await engine.start_run("keep", idempotency_key="once") == run_id


async def test_closing_the_engine_ends_status_streams_and_the_run_resumes(tmp_path: Path) -> None:
    marker = tmp_path / "go"
    spec = spec_of(sh("wait", f"while [ ! -f {marker} ]; do sleep 0.02; done; printf ok"))
    seen: list[Any] = []

    async def follow(engine: WorkflowEngine, run_id: str) -> None:
        with pytest.raises(Unavailable):
            async for update in engine.run_status(run_id):
                seen.append(update)

    async with anyio.create_task_group() as tg:
        async with running(tmp_path) as (_s, engine, _bus):
            await engine.create_workflow("paused", spec=spec)
            run_id = await engine.start_run("paused")
            tg.start_soon(follow, engine, run_id)
            await anyio.sleep(0.2)
        # Leaving the engine ends the reader instead of leaving it hanging.
    assert seen and not seen[-1].status.terminal
    marker.touch()
    async with running(tmp_path) as (_s, engine, _bus):
        run = await final(engine, run_id)
        assert run.status is RunStatus.COMPLETED and run.output == {
            "wait.exit_code": 0,
            "wait.stdout": "ok",
            "wait.stderr": "",
        }


# -- through the public Infra, and the demo section -------------------------------------------


async def test_infra_delegates_workflows_and_the_demo_section_runs(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path, backend="process", mode="embedded", shutdown_grace=0.2)
    async with Infra(settings, load_entry_points=False) as infra:
        console = Console(file=io.StringIO(), width=120, force_terminal=False)
        await workflow_section(infra, console)
        text = console.file.getvalue()  # type: ignore[attr-defined]
        assert "run completed" in text and "dspy-1,dspy-2,dspy-3" in text, text
        (wf,) = await infra.workflows.list_workflows()
        assert wf.id == DEMO_WORKFLOW_ID
        runs = await infra.workflows.list_runs(DEMO_WORKFLOW_ID)
        assert len(runs) == 1  # the demo's second start_run with its key started nothing
        assert runs[0].output == {"merged": "dspy-1,dspy-2,dspy-3"}
        tasks = await infra.list_tasks(limit=100)
        assert {t.spec.workflow_id for t in tasks} == {DEMO_WORKFLOW_ID} and len(tasks) == 5
        types = [e.type for e in infra.bus.history() if e.type.startswith("workflow_")]
        assert types.count("workflow_step_completed") == 5 and types[-1] == "workflow_completed"


@given(step_names, result_keys, st.text(alphabet="ab -'/", max_size=8))
def test_any_step_name_and_key_round_trip_through_a_template(name: str, key: str, around: str) -> None:
    upstream = StepSpec(name, payload={"handler": "noop"})
    reader = StepSpec(
        "reader-x" if name != "reader-x" else "reader-y",
        payload={"handler": "noop", "v": f"{around}{{{{ steps.{name}.result.{key} }}}}{around}"},
        depends_on=[name],
    )
    spec = WorkflowSpec(steps=[upstream, reader])
    validate_workflow(spec, CLASSES)
    assert render(reader.payload["v"], "v", {}, {name: {key: "VALUE"}}) == f"{around}VALUE{around}"


def test_a_step_name_with_a_result_segment_is_refused() -> None:
    with pytest.raises(SpecError) as info:
        StepSpec("fetch.result")
    assert info.value.field == "steps.fetch.result.name"
    StepSpec("result.cache")  # a leading "result" segment is readable, so allowed


@pytest.mark.anyio
@pytest.mark.parametrize("delay", [0.0, 0.001, 0.005, 0.02])
async def test_cancel_at_any_moment_after_start_ends_the_run_promptly(tmp_path: Path, delay: float) -> None:
    # Races: before the first step is submitted, while it is being accepted, while it runs.
    async with running(tmp_path) as (scheduler, engine, _bus):
        # The `sleep` handler, not `exec`: this is about the engine's races; cancelling `exec`
        # while its subprocess is being created is the handler's own case.
        slow = {"name": "a", "payload": {"handler": "sleep", "seconds": "30"}}
        await engine.create_workflow("racy", spec=spec_of(slow, noop("b", "a")))
        run_id = await engine.start_run("racy")
        await anyio.sleep(delay)
        with anyio.fail_after(10):
            run = await engine.cancel_run(run_id)
        assert run.status is RunStatus.CANCELLED
        assert {s.status for s in run.steps.values()} <= {StepStatus.CANCELLED}
        for task in await scheduler.list_tasks(workflow_id="racy"):
            assert task.status is TaskStatus.CANCELLED


async def test_a_stored_run_lists_its_steps_in_declaration_order(tmp_path: Path) -> None:
    names = ["zeta", "alpha", "mid", "beta"]
    async with running(tmp_path) as (_s, engine, _bus):
        await engine.create_workflow("order", spec=spec_of(*(noop(n) for n in names)))
        run_id = await engine.start_run("order")
        assert list((await engine.get_run(run_id)).steps) == names
        await final(engine, run_id)
        assert list((await engine.get_run(run_id)).steps) == names
    async with running(tmp_path) as (_s, engine, _bus):
        assert list((await engine.get_run(run_id)).steps) == names


async def test_declared_output_with_a_missing_key_fails_the_run_naming_it(tmp_path: Path) -> None:
    async with running(tmp_path, durable=False) as (_s, engine, bus):
        await engine.create_workflow(
            "out",
            spec=spec_of(
                sh("a", "printf x"),
                output={"good": "{{ steps.a.result.stdout }}", "bad": "{{ steps.a.result.nope }}"},
            ),
        )
        run = await final(engine, await engine.start_run("out"))
        assert run.steps["a"].status is StepStatus.COMPLETED
        assert run.status is RunStatus.FAILED
        assert "output.bad" in run.error and "no result key 'nope'" in run.error
        assert wf_types(bus)[-1] == "workflow_failed"


async def test_step_options_reach_the_task_and_a_step_timeout_fails_the_step(tmp_path: Path) -> None:
    async with running(tmp_path, durable=False) as (scheduler, engine, _bus):
        await engine.create_workflow(
            "opts",
            spec=spec_of(
                sh("slow", "sleep 5", timeout=0.3, priority=7, max_attempts=1, task_class="cpu_long"),
                sh("after", "true", "slow"),
            ),
        )
        run_id = await engine.start_run("opts")
        with anyio.fail_after(10):
            run = await final(engine, run_id)
        task = await scheduler.get(f"{run_id}.slow")
        assert (task.spec.task_class, task.spec.priority, task.spec.timeout, task.spec.max_attempts) == (
            "cpu_long",
            7,
            0.3,
            1,
        )
        assert run.steps["slow"].status is StepStatus.FAILED and "timed out" in run.steps["slow"].error
        assert run.steps["slow"].attempts == 1
        assert run.steps["after"].status is StepStatus.SKIPPED


async def test_a_flaky_step_is_retried_within_its_budget_and_counts_attempts(tmp_path: Path) -> None:
    counter = tmp_path / "tries"
    flaky = f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; [ $n -ge 2 ]"
    async with running(tmp_path, durable=False) as (_s, engine, _bus):
        await engine.create_workflow(
            "flaky", spec=spec_of(sh("f", flaky, max_attempts=3), sh("g", "true", "f"))
        )
        run = await final(engine, await engine.start_run("flaky"))
        assert run.status is RunStatus.COMPLETED
        assert run.steps["f"].attempts == 2 and counter.read_text().strip() == "2"


def test_the_runnable_example_completes(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "workflow.py"
    proc = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-2].startswith("completed 5/5")
    assert lines[-1] == "output: {'best': '3:HELLO'}"


async def test_a_step_task_cancelled_from_outside_fails_the_run(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    async with running(tmp_path, durable=False) as (scheduler, engine, _bus):
        await engine.create_workflow(
            "ext",
            spec=spec_of(sh("a", f"touch {marker}; sleep 30"), sh("b", "true", "a"), sh("c", "sleep 0.3")),
        )
        run_id = await engine.start_run("ext")
        with anyio.fail_after(10):
            while not marker.exists():  # noqa: ASYNC110 - a file a subprocess writes; no event to await
                await anyio.sleep(0.02)
        await scheduler.cancel(f"{run_id}.a")
        run = await final(engine, run_id)
        assert run.steps["a"].status is StepStatus.CANCELLED
        assert run.steps["b"].status is StepStatus.SKIPPED
        assert run.status is RunStatus.FAILED and "step 'a' was cancelled" in run.error


def test_python_objects_of_the_wrong_shape_are_refused_naming_the_field() -> None:
    with pytest.raises(SpecError) as info:
        StepSpec("a", depends_on=5)
    assert info.value.field == "depends_on"
    with pytest.raises(SpecError) as info:
        WorkflowSpec(steps=5)
    assert info.value.field == "steps"
    with pytest.raises(SpecError) as info:
        WorkflowSpec(steps=[{"name": "a"}])
    assert info.value.field == "steps[0]"
    # A whole-number timeout is the same spec as its float.
    assert StepSpec("a", timeout=5) == StepSpec("a", timeout=5.0)
    assert parse_workflow_spec(spec_of({"name": "a", "timeout": 5})).spec_hash == (
        parse_workflow_spec(spec_of({"name": "a", "timeout": 5.0})).spec_hash
    )
