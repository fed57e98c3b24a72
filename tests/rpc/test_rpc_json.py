"""JSON objects on the wire (``*_json`` fields) and their old ``map<string,string>`` views.

The conversions in ``rpc/_convert.py`` are what the server and the clients both use, so a
round trip through encoded bytes here is the round trip any gRPC peer sees. The official
grpcio client's view of the same messages is in ``test_rpc_interop.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from strategies import wire_json_objects

from dspy_infra import models
from dspy_infra.errors import SpecError
from dspy_infra.models import TaskResult, TaskSpec, TaskState, TaskStatus
from dspy_infra.rpc import convert as cv
from dspy_infra.rpc._gen.env_manager import v1 as env_pb
from dspy_infra.rpc._gen.orchestrator import v1 as orch_pb
from dspy_infra.values import json_text
from dspy_infra.workflows import RunState, RunStatus, RunUpdate, StepState, StepStatus

NESTED: dict[str, Any] = {"nested": {"a": 1}, "ok": True, "n": 3, "x": 1.5, "none": None, "s": "text"}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    # json_text tells 1 from 1.0 and True from 1, which == does not.
    return json_text(a) == json_text(b)


#: (build a value holding a JSON object, to message, message class, from message, read it back)
JSON_CARRIERS = {
    "task result": (
        lambda obj: TaskResult(task_id="t", status=TaskStatus.COMPLETED, result=obj),
        cv.task_result_to_pb,
        orch_pb.TaskResult,
        cv.task_result_from_pb,
        lambda got: got.result,
    ),
    "run output": (
        lambda obj: RunUpdate(run_id="r", status=RunStatus.COMPLETED, output=obj),
        cv.run_update_to_pb,
        orch_pb.WorkflowStatusUpdate,
        cv.run_update_from_pb,
        lambda got: got.output,
    ),
}


@pytest.mark.parametrize("carrier", list(JSON_CARRIERS))
@settings(max_examples=60, deadline=None)
@given(obj=wire_json_objects)
def test_json_round_trip_keeps_types(carrier: str, obj: dict[str, Any]) -> None:
    build, to_pb, message, from_pb, read = JSON_CARRIERS[carrier]
    raw = bytes(to_pb(build(obj)))
    assert _same(read(from_pb(message.parse(raw))), obj)


#: One value per converter pair with every field away from its default, so a field that one
#: direction carries and the other drops fails the round trip.
ROUND_TRIPS: list[tuple[Any, Any, Any, Any]] = [
    (
        models.QueueStatus(task_class="c", depth=3, inflight=2, limit=4, min_limit=1, max_limit=9),
        cv.queue_status_to_pb,
        orch_pb.QueueStatus,
        cv.queue_status_from_pb,
    ),
    (
        models.ServiceState(
            name="redis",
            status=models.ServiceStatus.HEALTHY,
            instance_id="abc",
            ports={6379: 32768},
            health_checks={"tcp": "ok"},
            started_at=1700000000.0,
            resource_usage=models.ResourceUsage(
                cpu_percent=1.5, memory_bytes=2, network_rx_bytes=3, network_tx_bytes=4
            ),
            restarts=2,
            backend="docker",
            host="10.0.0.1",
            url="redis://10.0.0.1:32768/0",
            port=32768,
        ),
        cv.service_state_to_pb,
        env_pb.ServiceStatus,
        cv.service_state_from_pb,
    ),
    (
        models.ServiceStatusUpdate(
            service_name="s", status=models.ServiceStatus.STARTING, message="m", progress=50
        ),
        cv.status_update_to_pb,
        env_pb.ServiceStatusUpdate,
        cv.status_update_from_pb,
    ),
    (
        models.HealthUpdate(service_name="s", healthy=True, message="m", timestamp=17.0, details={"a": "b"}),
        cv.health_update_to_pb,
        env_pb.HealthUpdate,
        cv.health_update_from_pb,
    ),
    (
        models.ResourceAvailability(
            available=True,
            capacity=5,
            in_use=2,
            hardware=models.HardwareInfo(
                cpu_cores=8,
                memory_bytes=1 << 30,
                gpus=(models.GPUInfo(index=1, name="g", memory_bytes=7, utilization_percent=12.5),),
            ),
        ),
        cv.resources_to_pb,
        env_pb.ResourceAvailabilityResponse,
        cv.resources_from_pb,
    ),
    (
        models.ImagePullProgress(
            image_name="i", status="downloading", current=1, total=2, progress_percent=50, message="m"
        ),
        cv.pull_progress_to_pb,
        env_pb.ImagePullProgress,
        cv.pull_progress_from_pb,
    ),
    (
        models.LogEntry(service_name="s", instance_id="i", stream="stderr", message="m", timestamp=3.0),
        cv.log_entry_to_pb,
        env_pb.LogEntry,
        cv.log_entry_from_pb,
    ),
    (
        TaskState(
            spec=TaskSpec("t", "gpu", payload={"a": 1}, priority=3, timeout=5.0, max_attempts=2),
            status=TaskStatus.FAILED,
            attempts=2,
            result={"r": [1]},
            error="e",
            submitted_at=1.0,
            started_at=2.0,
            completed_at=3.0,
            duration_ms=4.0,
        ),
        cv.task_state_to_pb,
        orch_pb.GetTaskStatusResponse,
        cv.task_state_from_pb,
    ),
    (
        RunState(
            run_id="r",
            workflow_id="w",
            status=RunStatus.RUNNING,
            steps={
                "a": StepState(
                    name="a",
                    status=StepStatus.COMPLETED,
                    task_id="r.a",
                    attempts=1,
                    result={"x": 1},
                    error="",
                    started_at=1.0,
                    completed_at=2.0,
                ),
                "b": StepState(name="b", status=StepStatus.FAILED, attempts=3, error="boom"),
            },
            input={"i": {"n": 1}},
            output={"o": True},
            error="e",
            idempotency_key="k",
            created_at=1.0,
            updated_at=2.0,
        ),
        cv.run_update_to_pb,
        orch_pb.WorkflowStatusUpdate,
        cv.run_state_from_pb,
    ),
]


@pytest.mark.parametrize(
    ("value", "to_pb", "message", "from_pb"), ROUND_TRIPS, ids=lambda v: type(v).__name__
)
def test_every_field_survives_the_round_trip(value: Any, to_pb: Any, message: Any, from_pb: Any) -> None:
    assert from_pb(message.parse(bytes(to_pb(value)))) == value


def test_old_map_view_is_strings_as_is_and_json_text_for_the_rest() -> None:
    msg = cv.task_result_to_pb(TaskResult(task_id="t", status=TaskStatus.COMPLETED, result=NESTED))
    assert msg.result == {
        "nested": '{"a":1}',
        "ok": "true",
        "n": "3",
        "x": "1.5",
        "none": "null",
        "s": "text",
    }
    assert json.loads(msg.result_json) == NESTED


def test_an_old_server_without_json_fields_still_reads() -> None:
    # An old server fills only the map: the client reads the strings it has.
    old = orch_pb.TaskResult(task_id="t", status="completed", result={"stdout": "hi\n"})
    assert cv.task_result_from_pb(old).result == {"stdout": "hi\n"}
    old_state = orch_pb.GetTaskStatusResponse(task_id="t", status="pending", payload={"handler": "noop"})
    assert cv.task_state_from_pb(old_state).spec.payload == {"handler": "noop"}


def test_new_client_sends_the_payload_as_json_only() -> None:
    from dspy_infra.models import TaskSpec

    req = cv.submit_request_upb(TaskSpec(id="t", payload={"handler": "noop", "k": "v"}))
    assert not req.payload
    assert json.loads(req.payload_json) == {"handler": "noop", "k": "v"}
    assert cv.submit_request_payload(orch_pb.SubmitTaskRequest.parse(req.SerializeToString())) == {
        "handler": "noop",
        "k": "v",
    }


def test_old_client_payload_map_is_read_as_is() -> None:
    req = orch_pb.SubmitTaskRequest(id="t", payload={"handler": "exec", "cmd": "echo 1"})
    assert cv.submit_request_payload(req) == {"handler": "exec", "cmd": "echo 1"}


def test_a_request_with_both_the_map_and_the_json_field_is_refused_naming_both() -> None:
    req = orch_pb.SubmitTaskRequest(id="t", payload={"a": "1"}, payload_json='{"b": 2}')
    with pytest.raises(SpecError) as info:
        cv.submit_request_payload(req)
    assert info.value.field == "payload_json"
    assert "payload" in str(info.value) and "payload_json" in str(info.value)
    run = orch_pb.StartWorkflowRunRequest(workflow_id="w", input={"a": "1"}, input_json='{"a": 1}')
    with pytest.raises(SpecError, match="input_json"):
        cv.run_input_from_pb(run)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[1, 2]", "object"),
        ('{"a": ', "not valid JSON"),
        ('{"a": NaN}', ""),
        ("[" * 5000 + "]" * 5000, ""),
        ('{"a": ' + "[" * 40 + "]" * 40 + "}", "nested"),
        ('{"big": "' + "x" * 80_000 + '"}', "bytes"),
    ],
)
def test_bad_json_fields_are_refused_with_the_field_named(text: str, why: str) -> None:
    req = orch_pb.SubmitTaskRequest(id="t", payload_json=text)
    with pytest.raises(SpecError) as info:
        cv.submit_request_payload(req, max_payload_bytes=1000)
    assert info.value.field is not None and info.value.field.startswith("payload_json")
    assert why in str(info.value)
    # A huge bad value is echoed in at most a bounded preview.
    assert len(str(info.value)) < 600


async def test_execute_task_sends_json_values_as_json_text_not_python_repr(tmp_path: Path) -> None:
    # ExecuteTaskRequest has only the old map: a nested value must arrive as JSON, never as
    # Python's repr ("{'a': 1}", "True"). A real in-process server records what arrived.
    from _rpc_support import in_process_server

    from dspy_infra.rpc.client import EnvManagerClient, OrchestratorClient

    async with in_process_server(tmp_path) as (_, server):
        addr = f"127.0.0.1:{server.grpc_port}"
        async with EnvManagerClient.connect(addr) as env, OrchestratorClient.connect(addr) as orch:
            await env.execute_task("xt", payload={"handler": "noop", "o": {"a": 1}, "b": True})
            arrived = (await orch.get_task_status("xt")).spec.payload
    assert arrived == {"handler": "noop", "o": '{"a":1}', "b": "true"}


@settings(max_examples=60, deadline=None)
@given(wire_json_objects)
def test_payload_json_request_round_trip_and_old_map_view(payload: dict[str, Any]) -> None:
    raw = bytes(orch_pb.SubmitTaskRequest(id="t", payload_json=json_text(payload)))
    assert _same(cv.submit_request_payload(orch_pb.SubmitTaskRequest.parse(raw)), payload)
    # The old map view loses no information: strings as is, everything else decodes back.
    view = cv.json_map(payload)
    assert view.keys() == payload.keys()
    for key, value in payload.items():
        assert view[key] == value if isinstance(value, str) else json.loads(view[key]) == value


async def test_remote_infra_returns_a_handlers_json_result_exactly(tmp_path: Path) -> None:
    # The example: a handler returning {"nested": {"a": 1}} gave back "{'a': 1}".
    from _rpc_support import in_process_server

    from dspy_infra.rpc.remote import RemoteInfra

    async with in_process_server(tmp_path) as (infra, server):

        @infra.handler("structured")
        async def structured(ctx: Any) -> dict[str, Any]:
            return {"nested": {"a": 1}, "ok": True, "echo": ctx.payload["data"]}

        remote = await RemoteInfra.connect(f"127.0.0.1:{server.grpc_port}", required=True)
        async with remote:
            data = {"n": 3, "x": 1.5, "list": [1, "two", None], "deep": {"k": {"v": False}}}
            await remote.submit_task("j1", payload={"handler": "structured", "data": data})
            result = await remote.wait("j1", timeout=30)
            assert result.result == {"nested": {"a": 1}, "ok": True, "echo": data}
            assert _same(result.result, {"nested": {"a": 1}, "ok": True, "echo": data})
            state = await remote.get_task("j1")
            assert _same(state.spec.payload, {"handler": "structured", "data": data})
            assert _same(state.result, result.result)


async def test_execute_task_answers_json_results_on_its_string_map(tmp_path: Path) -> None:
    # ExecuteTaskResponse has only the old map: a JSON result must become JSON text there,
    # not an encoding error (INTERNAL).
    from _rpc_support import in_process_server

    from dspy_infra.rpc.client import EnvManagerClient

    async with in_process_server(tmp_path) as (infra, server):

        @infra.handler("structured")
        async def structured(ctx: Any) -> dict[str, Any]:
            return {"n": 1, "o": {"a": [1, None]}, "s": "text", "b": False}

        async with EnvManagerClient.connect(f"127.0.0.1:{server.grpc_port}") as env:
            resp = await env.execute_task("xs", payload={"handler": "structured"}, timeout=30)
    assert resp.success
    assert dict(resp.result) == {"n": "1", "o": '{"a":[1,null]}', "s": "text", "b": "false"}


def test_event_data_travels_on_its_string_map() -> None:
    from dspy_infra.models import Event

    msg = cv.event_to_pb(Event(type="t", resource_id="r", data={"s": "x", "n": 2}, timestamp=1.0))
    assert orch_pb.SystemEvent.parse(bytes(msg)).data == {"s": "x", "n": "2"}


async def test_remote_list_tasks_filters_by_workflow_run_like_the_embedded_one(tmp_path: Path) -> None:
    from _rpc_support import in_process_server

    from dspy_infra.rpc.remote import RemoteInfra

    async with in_process_server(tmp_path) as (infra, server):
        await infra.submit_task("w-1", payload={"handler": "noop"}, workflow_id="run-a")
        await infra.submit_task("w-2", payload={"handler": "noop"}, workflow_id="run-a")
        await infra.submit_task("other", payload={"handler": "noop"}, workflow_id="run-b")
        await infra.submit_task("loose", payload={"handler": "noop"})
        remote = await RemoteInfra.connect(f"127.0.0.1:{server.grpc_port}", required=True)
        async with remote:
            embedded = {t.id for t in await infra.list_tasks(workflow_id="run-a")}
            over_grpc = {t.id for t in await remote.list_tasks(workflow_id="run-a")}
            assert embedded == over_grpc == {"w-1", "w-2"}
            assert len(await remote.list_tasks()) == 4
