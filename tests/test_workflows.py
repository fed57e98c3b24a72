"""Workflows: spec parsing and validation, templating, failure policy, cancel, idempotent runs.

Engine tests run the real Scheduler (real subprocesses for ``exec`` steps, SQLite on disk).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspy_infra.errors import CycleError, SpecError
from dspy_infra.scheduler.workflows import (
    StepSpec,
    WorkflowSpec,
    find_cycle,
    parse_workflow_spec,
    validate_workflow,
)

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
        ({"steps": [{"name": "a", "payload": {"x": [1]}}]}, "steps.a.payload.x", "list"),
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


def test_input_keys_collects_every_input_reference() -> None:
    spec = parse_workflow_spec(
        spec_of(noop("a", x="{{input.m}}-{{ input.n }}"), noop("b", "a"), output={"o": "{{ input.p }}"})
    )
    assert spec.input_keys() == {"m", "n", "p"}


def test_sinks_are_steps_nothing_depends_on() -> None:
    spec = parse_workflow_spec(spec_of(noop("a"), noop("b", "a"), noop("c", "a"), noop("d")))
    assert spec.sinks() == ["b", "c", "d"]


@st.composite
def graphs(draw: st.DrawFn) -> dict[str, list[str]]:
    names = [f"n{i}" for i in range(draw(st.integers(1, 12)))]
    return {n: draw(st.lists(st.sampled_from(names), unique=True, max_size=4)) for n in names}


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
def test_find_cycle_reports_a_real_cycle_exactly_when_one_exists(graph: dict[str, list[str]]) -> None:
    cycle = find_cycle(graph)
    assert (cycle is None) == _acyclic(graph)
    if cycle is not None:
        assert cycle[0] == cycle[-1]
        assert len(set(cycle[:-1])) == len(cycle) - 1
        for node, dep in itertools.pairwise(cycle):
            assert dep in graph[node]


@given(graphs(), st.booleans())
def test_spec_round_trips_through_its_json(graph: dict[str, list[str]], cof: bool) -> None:
    spec = WorkflowSpec(
        steps=[StepSpec(n, payload={"handler": "noop"}, depends_on=d) for n, d in graph.items()],
        continue_on_failure=cof,
    )
    again = parse_workflow_spec(spec.to_json())
    assert again == spec and again.spec_hash == spec.spec_hash
