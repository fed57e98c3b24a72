"""Workflow specs as an attacker writes them (issue 8 items 1, 5): too big, quadratic, or
holding values a task cannot store. Each is refused at create time with a named error, in
bounded time and memory, without holding the event loop; nothing is stored."""

from __future__ import annotations

import contextlib
import json
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from _adversarial import STALL_BOUND, loop_watchdog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import bad_workflow_specs

from dspy_infra.config import Settings
from dspy_infra.errors import NotFound, SpecError
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.scheduler import Scheduler
from dspy_infra.workflows import MAX_STEPS, WorkflowEngine, parse_workflow_spec, validate_workflow
from dspy_infra.workflows.template import render


@contextlib.asynccontextmanager
async def engine_at(home: Path) -> AsyncIterator[WorkflowEngine]:
    settings_ = Settings(home=home, shutdown_grace=0.2)
    bus = EventBus()
    plugins = build_plugin_manager(load_entry_points=False)
    async with Scheduler(settings_, bus=bus, metrics=InfraMetrics(), plugins=plugins) as scheduler:
        async with WorkflowEngine(settings_, scheduler=scheduler, bus=bus) as engine:
            yield engine


def chain(n: int) -> dict[str, Any]:
    """The issue's 8,000-step chain shape: each step depends on the one before."""
    steps = [{"name": "s0", "payload": {"handler": "noop"}}]
    steps += [
        {"name": f"s{i}", "depends_on": [f"s{i - 1}"], "payload": {"handler": "noop"}} for i in range(1, n)
    ]
    return {"steps": steps}


async def test_an_8000_step_chain_is_refused_cheaply_without_holding_the_loop(tmp_path: Path) -> None:
    spec = json.dumps(chain(8000)).encode()  # ~590 KiB, as in the issue
    async with engine_at(tmp_path) as engine:
        async with loop_watchdog() as dog:
            with pytest.raises(SpecError) as info:
                await engine.create_workflow("big", spec=spec)
        assert info.value.field == "steps" and str(MAX_STEPS) in info.value.message
        assert dog.longest < STALL_BOUND, f"loop held {dog.longest:.2f}s"
        # Memory measured on a second attempt (tracemalloc slows everything it watches).
        tracemalloc.start()
        try:
            with pytest.raises(SpecError):
                await engine.create_workflow("big", spec=spec)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # The old validation took memory from 135 MiB to 1.38 GiB on this spec.
        assert peak < 100 * 2**20, f"peak {peak / 2**20:.0f} MiB"
        with pytest.raises(NotFound):
            await engine.get_workflow("big")


async def test_the_largest_allowed_chain_validates_off_the_loop_in_bounded_memory(tmp_path: Path) -> None:
    spec = chain(MAX_STEPS)
    # Every step reads the first step's result, so the upstream check runs for all of them.
    for step in spec["steps"][1:]:
        step["payload"]["x"] = "{{ steps.s0.result.k }}"
    async with engine_at(tmp_path) as engine:
        async with loop_watchdog() as dog:
            wf = await engine.create_workflow("max", spec=json.dumps(spec))
        assert len(wf.spec.steps) == MAX_STEPS
        assert dog.longest < STALL_BOUND, f"loop held {dog.longest:.2f}s"
        tracemalloc.start()
        try:
            await engine.create_workflow("max", spec=json.dumps(spec))  # the same again: no change
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_oversized_spec_text_is_refused_before_parsing() -> None:
    text = '{"steps": [{"name": "a", "payload": {"handler": "noop", "x": "' + "x" * (1 << 20) + '"}}]}'
    with pytest.raises(SpecError) as info:
        parse_workflow_spec(text)
    assert info.value.field == "spec" and "limit" in info.value.message


def test_a_cycle_in_a_long_chain_is_found_and_named() -> None:
    spec = chain(MAX_STEPS)
    spec["steps"][0]["depends_on"] = [f"s{MAX_STEPS - 1}"]
    with pytest.raises(SpecError) as info:
        validate_workflow(parse_workflow_spec(spec))
    assert "cycle" in info.value.message and info.value.field is not None
    assert info.value.field.endswith("depends_on")


@pytest.mark.parametrize(
    ("step_extra", "field_end"),
    [
        ({"priority": 10**30}, "priority"),
        ({"priority": 1e30}, "priority"),
        ({"priority": 2**31}, "priority"),
        ({"payload": {"handler": "noop", "n": 10**30}}, "payload.n"),
        ({"timeout": 10**400}, "timeout"),
    ],
)
async def test_unstorable_step_values_are_refused_at_create_time(
    tmp_path: Path, step_extra: dict[str, Any], field_end: str
) -> None:
    step = {"name": "a", "payload": {"handler": "noop"}, **step_extra}
    async with engine_at(tmp_path) as engine:
        with pytest.raises(SpecError) as info:
            await engine.create_workflow("bad", spec={"steps": [step]})
        assert (info.value.field or "").endswith(field_end), info.value
        assert await engine.list_workflows() == []


async def test_a_lone_surrogate_in_a_step_payload_is_refused_at_create_time(tmp_path: Path) -> None:
    text = '{"steps": [{"name": "a", "payload": {"handler": "noop", "s": "\\ud800"}}]}'
    async with engine_at(tmp_path) as engine:
        with pytest.raises(SpecError) as info:
            await engine.create_workflow("bad", spec=text)
        assert "payload.s" in (info.value.field or "") and "UTF-8" in info.value.message
        assert await engine.list_workflows() == []


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(case=bad_workflow_specs())
def test_bad_workflow_specs_are_refused_naming_the_field(case: tuple[Any, str]) -> None:
    spec, word = case
    with pytest.raises(SpecError) as info:
        validate_workflow(parse_workflow_spec(spec), ["cpu_short"], ["noop"])
    assert word in (info.value.field or ""), info.value
    # Errors echo at most a prefix of what was sent.
    assert len(str(info.value)) < 2000


# -- templates keep JSON types -------------------------------------------------------------


@given(
    value=st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.booleans(),
        st.none(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    )
)
def test_a_whole_value_template_keeps_the_json_type_and_text_templates_substitute_json(value: Any) -> None:
    filled = render(
        {"whole": "{{ input.v }}", "inside": "v={{ input.v }}", "nested": ["{{ steps.a.result.k }}"]},
        "payload",
        {"v": value},
        {"a": {"k": value}},
    )
    assert filled["whole"] == value and type(filled["whole"]) is type(value)
    assert filled["nested"] == [value]
    expected_text = (
        value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    )
    assert filled["inside"] == f"v={expected_text}"


async def test_run_inputs_are_json_and_output_templates_keep_their_type(tmp_path: Path) -> None:
    spec = {
        "steps": [{"name": "a", "payload": {"handler": "noop"}}],
        "output": {"n": "{{ input.n }}", "cfg": "{{ input.cfg }}", "label": "n={{ input.n }}"},
    }
    async with engine_at(tmp_path) as engine:
        await engine.create_workflow("typed", spec=spec)
        run_id = await engine.start_run("typed", input={"n": 5, "cfg": {"lr": 0.1, "layers": [1, 2]}})
        async for _ in engine.run_status(run_id):
            pass
        run = await engine.get_run(run_id)
    assert run.status == "completed", run.error
    assert run.input == {"n": 5, "cfg": {"lr": 0.1, "layers": [1, 2]}}
    assert run.output == {"n": 5, "cfg": {"lr": 0.1, "layers": [1, 2]}, "label": "n=5"}


async def test_an_unstorable_run_input_is_refused_naming_the_key(tmp_path: Path) -> None:
    async with engine_at(tmp_path) as engine:
        await engine.create_workflow("w", spec={"steps": [{"name": "a", "payload": {"handler": "noop"}}]})
        for bad, field in (
            ({"n": 10**30}, "input.n"),
            ({"s": "\ud800"}, "input.s"),
            ({"f": float("nan")}, "input.f"),
        ):
            with pytest.raises(SpecError) as info:
                await engine.start_run("w", input=bad)
            assert info.value.field == field
        assert await engine.list_runs("w") == []


async def test_stored_workflows_from_older_versions_never_stop_the_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Specs stored before the limits existed: an oversized one still loads (it was accepted),
    one with a value no task can hold is left out with one error line."""
    import sqlite3

    async with engine_at(tmp_path) as engine:
        await engine.create_workflow("ok", spec={"steps": [{"name": "a", "payload": {"handler": "noop"}}]})
    big = chain(MAX_STEPS + 500)
    bad = {"steps": [{"name": "a", "payload": {"handler": "noop"}, "priority": 10**30}]}
    with contextlib.closing(sqlite3.connect(tmp_path / "workflows.db")) as db, db:
        for wf_id, spec in (("big", big), ("bad", bad)):
            db.execute("INSERT INTO workflows VALUES (?, ?, '', ?, 1.0)", (wf_id, wf_id, json.dumps(spec)))
    async with engine_at(tmp_path) as engine:
        assert {w.id for w in await engine.list_workflows()} == {"ok", "big"}
        assert len((await engine.get_workflow("big")).spec.steps) == MAX_STEPS + 500
    assert [r for r in caplog.records if "'bad'" in r.getMessage() and "not loaded" in r.getMessage()]
