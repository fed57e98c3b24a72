"""Value classes validate at construction and name the field that is wrong."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspy_infra.errors import CycleError, HealthCheckFailed, SpecError
from dspy_infra.models import (
    DependsOn,
    HealthCheck,
    PortMapping,
    ServiceSpec,
    TaskClass,
    TaskSpec,
    TaskStatus,
    VolumeMount,
    coerce_str_map,
)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"id": ""}, "id"),
        ({"id": "x" * 300}, "id"),
        ({"id": "a", "max_attempts": 0}, "max_attempts"),
        ({"id": "a", "timeout": -1}, "timeout"),
        ({"id": "a", "priority": "high"}, "priority"),
        ({"id": "a", "payload": {"k": {1, 2}}}, "payload.k"),
        ({"id": "a", "payload": "cmd"}, "payload"),
        # What the store or the wire cannot hold is refused at construction (issue 8 item 1).
        ({"id": "a", "priority": 10**30}, "priority"),
        ({"id": "a", "priority": 2**31}, "priority"),
        ({"id": "a", "priority": True}, "priority"),
        ({"id": "a", "timeout": 10**400}, "timeout"),
        ({"id": "a", "timeout": float("inf")}, "timeout"),
        ({"id": "a", "timeout": float("nan")}, "timeout"),
        ({"id": "a", "timeout": 10.0**9}, "timeout"),
        ({"id": "a", "max_attempts": 1.0}, "max_attempts"),
        ({"id": "a", "payload": {"k": "\ud800"}}, "payload.k"),
        ({"id": "a", "payload": {"k": 2**70}}, "payload.k"),
        ({"id": "a", "payload": {"k": float("nan")}}, "payload.k"),
        ({"id": "\ud800"}, "id"),
        ({"id": "a\x00b"}, "id"),
        ({"id": "a", "task_class": "\ud800"}, "task_class"),
        ({"id": "a", "workflow_id": "x" * 300}, "workflow_id"),
        ({"id": "a", "workflow_id": 5}, "workflow_id"),
    ],
)
def test_bad_task_specs_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as err:
        TaskSpec(**kwargs)
    assert err.value.field == field


def test_payload_values_stay_json_values() -> None:
    spec = TaskSpec("a", payload={"n": 3, "ok": True, "x": 1.5, "nested": {"a": [1, None, "s"]}})
    assert spec.payload == {"n": 3, "ok": True, "x": 1.5, "nested": {"a": [1, None, "s"]}}


def test_an_integer_timeout_is_stored_as_a_float() -> None:
    assert TaskSpec("a", timeout=3).timeout == 3.0
    assert isinstance(TaskSpec("a", timeout=3).timeout, float)


def test_content_hash_tracks_content_not_identity() -> None:
    a = TaskSpec("a", payload={"cmd": "echo"})
    assert a.content_hash == TaskSpec("a", payload={"cmd": "echo"}).content_hash
    assert a.content_hash != TaskSpec("a", payload={"cmd": "echo 2"}).content_hash
    assert a.content_hash != TaskSpec("a", payload={"cmd": "echo"}, priority=1).content_hash


def test_terminal_statuses() -> None:
    assert {s for s in TaskStatus if s.terminal} == {
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.CANCELLED,
    }


def test_task_class_bounds() -> None:
    TaskClass("x", 1, 2, 3)
    with pytest.raises(SpecError, match="task_classes.x"):
        TaskClass("x", 2, 1, 3)


@pytest.mark.parametrize("name", ["", "Redis", "-x", "a b", "x" * 64])
def test_bad_service_names(name: str) -> None:
    with pytest.raises(SpecError) as err:
        ServiceSpec(name)
    assert err.value.field == "name"


def test_service_spec_checks() -> None:
    with pytest.raises(SpecError, match="published twice"):
        ServiceSpec("a", ports=[PortMapping(1, 8080), PortMapping(2, 8080)])
    with pytest.raises(SpecError, match="itself"):
        ServiceSpec("a", depends_on=[DependsOn("a")])
    with pytest.raises(SpecError, match="condition"):
        DependsOn("b", condition="service_ready")
    with pytest.raises(SpecError, match="0-65535"):
        PortMapping(70000)
    with pytest.raises(SpecError, match="health.kind"):
        HealthCheck(kind="grpc")
    with pytest.raises(SpecError, match="health.command"):
        HealthCheck(kind="exec")
    with pytest.raises(SpecError, match="volumes"):
        VolumeMount("data", "relative/path")
    with pytest.raises(SpecError, match="command"):
        ServiceSpec("a", command="redis-server --port 1")


def test_spec_hash_ignores_restart_policy_but_not_image() -> None:
    from dspy_infra.models import RestartPolicy

    base = ServiceSpec("a", image="x:1")
    assert base.spec_hash == ServiceSpec("a", image="x:1", restart=RestartPolicy(mode="no")).spec_hash
    assert base.spec_hash != ServiceSpec("a", image="x:2").spec_hash


def test_spec_fields_added_later_leave_existing_hashes_alone() -> None:
    """An owner adopts a running instance only if its spec hash still matches: a new field at
    its default must not change the hash, or an upgrade would replace every running service.
    The figure is what the version before ``entrypoint``/``network_mode``/``user`` computed."""
    spec = ServiceSpec("a", image="x:1", command=["a", "b"], ports=[PortMapping(80, 0)])
    assert spec.spec_hash == "56f8f16a2534620a"
    hashes = {
        attrs.evolve(spec, entrypoint=()).spec_hash,
        attrs.evolve(spec, network_mode="host").spec_hash,
        attrs.evolve(spec, user="0").spec_hash,
    }
    assert spec.spec_hash not in hashes and len(hashes) == 3


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"network_mode": "overlay"}, "services.a.network_mode"),
        ({"user": 1000}, "services.a.user"),
        ({"entrypoint": "sh -c"}, "entrypoint"),
    ],
)
def test_container_fields_are_checked_naming_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as info:
        ServiceSpec("a", **fields)
    assert info.value.field == field


def test_errors_render_field_and_fix() -> None:
    err = SpecError("bad", field="payload.cmd", fix="quote it")
    assert str(err) == "payload.cmd: bad (fix: quote it)"
    assert "a -> b -> a" in str(CycleError(["a", "b", "a"]))
    hc = HealthCheckFailed("redis", last_failure="connection refused", last_logs=["boom"], timeout=5)
    assert "redis" in str(hc) and "connection refused" in str(hc) and "boom" in str(hc)


@given(st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), st.integers(), st.booleans())))
def test_coerce_str_map_always_yields_strings(value: dict[str, object]) -> None:
    out = coerce_str_map(value, "payload")
    assert set(out) == set(value)
    assert all(isinstance(v, str) for v in out.values())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_concurrency": 1.5}, "task_classes.x.max_concurrency"),
        ({"base_concurrency": True}, "task_classes.x.base_concurrency"),
        ({"max_concurrency": 10**9}, "task_classes.x.max_concurrency"),
        ({"adaptive": "no"}, "task_classes.x.adaptive"),
        ({"needs_gpu": 1}, "task_classes.x.needs_gpu"),
        ({"executor": ""}, "task_classes.x.executor"),
    ],
)
def test_task_class_fields_are_type_checked(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as err:
        TaskClass("x", **kwargs)
    assert err.value.field == field
