"""``SubmitTask`` and ``SubmitAndWait`` are served with the official protobuf runtime's classes
(``rpc/upb.py``) while every other call and every client use betterproto2's: both must read
and write the same bytes, field for field (the contract is the one ``.proto``)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import submit_task_request_fields, text_values, wire_json_objects

from dspy_infra.models import TaskResult, TaskStatus
from dspy_infra.rpc import convert as cv
from dspy_infra.rpc import upb
from dspy_infra.rpc._gen.orchestrator import v1 as orch_pb
from dspy_infra.rpc.server import OrchestratorService

_REQUEST_FIELDS = ("id", "priority", "timeout_seconds", "max_attempts", "workflow_id", "payload_json")


@settings(max_examples=200, deadline=None)
@given(fields=submit_task_request_fields, wait=st.floats(allow_nan=False), with_task=st.booleans())
def test_upb_reads_the_requests_a_betterproto2_client_writes(
    fields: dict[str, Any], wait: float, with_task: bool
) -> None:
    task = orch_pb.SubmitTaskRequest(**fields)
    read = upb.SubmitTaskRequest.FromString(bytes(task))
    assert getattr(read, "class") == task.class_
    assert dict(read.payload) == task.payload
    for name in _REQUEST_FIELDS:
        assert getattr(read, name) == getattr(task, name), name
    both = orch_pb.SubmitAndWaitRequest(task=task if with_task else None, timeout_seconds=wait)
    read_both = upb.SubmitAndWaitRequest.FromString(bytes(both))
    assert read_both.HasField("task") is with_task
    assert read_both.timeout_seconds == wait
    if with_task:
        assert read_both.task.SerializeToString() == read.SerializeToString()


@settings(max_examples=200, deadline=None)
@given(
    result=wire_json_objects,
    error=text_values,
    status=st.sampled_from(list(TaskStatus)),
    duration=st.floats(min_value=0, max_value=1e9),
    completed=st.floats(min_value=0, max_value=4e9),
)
def test_a_result_sent_by_upb_reads_back_as_betterproto2_sent_it(
    result: dict[str, Any], error: str, status: TaskStatus, duration: float, completed: float
) -> None:
    value = TaskResult(
        task_id="t-1", status=status, result=result, error=error, duration_ms=duration, completed_at=completed
    )
    sent = cv.task_result_to_upb(value).SerializeToString()
    assert orch_pb.TaskResult.parse(sent) == cv.task_result_to_pb(value)
    assert cv.task_result_from_pb(orch_pb.TaskResult.parse(sent)) == cv.task_result_from_pb(
        cv.task_result_to_pb(value)
    )


def test_the_server_serves_the_hot_calls_with_upb_and_the_rest_with_betterproto2() -> None:
    mapping = OrchestratorService.__mapping__(OrchestratorService(infra=None))
    route = "/orchestrator.v1.OrchestratorService/"
    data = bytes(orch_pb.SubmitAndWaitRequest(task=orch_pb.SubmitTaskRequest(id="t")))
    for method, request, reply in (
        ("SubmitAndWait", upb.SubmitAndWaitRequest, upb.TaskResult),
        ("SubmitTask", upb.SubmitTaskRequest, upb.SubmitTaskResponse),
        ("SubmitTasks", upb.SubmitTasksRequest, upb.SubmitTasksResponse),
    ):
        handler = mapping[route + method]
        # grpclib's codec calls FromString on the request type and isinstance on the reply's
        assert type(handler.request_type.FromString(b"")) is request
        assert isinstance(reply(), handler.reply_type)
        assert not isinstance(orch_pb.TaskResult(), handler.reply_type)
    assert mapping[route + "SubmitAndWait"].request_type.FromString(data).task.id == "t"
    assert mapping[route + "WaitTask"].request_type is orch_pb.WaitTaskRequest


def test_importing_the_server_and_the_client_leaves_upb_unloaded() -> None:
    """upb's classes (which load google.protobuf) come with the first hot call, not with the
    modules: serving and CLI commands start without them."""
    code = "import sys; import dspy_infra.rpc.server, dspy_infra.rpc.client; print('dspy_infra.rpc.upb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
