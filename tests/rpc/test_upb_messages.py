"""``SubmitTask`` and ``SubmitAndWait`` are served with the official protobuf runtime's classes
(``rpc/upb.py``) while every other call and every client use betterproto2's: both must read
and write the same bytes, field for field (the contract is the one ``.proto``)."""

from __future__ import annotations

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


def test_the_server_serves_the_two_hot_calls_with_upb_and_the_rest_with_betterproto2() -> None:
    mapping = OrchestratorService.__mapping__(OrchestratorService(infra=None))  # type: ignore[arg-type]
    route = "/orchestrator.v1.OrchestratorService/"
    assert mapping[route + "SubmitAndWait"].request_type is upb.SubmitAndWaitRequest
    assert mapping[route + "SubmitAndWait"].reply_type is upb.TaskResult
    assert mapping[route + "SubmitTask"].request_type is upb.SubmitTaskRequest
    assert mapping[route + "SubmitTasks"].request_type is upb.SubmitTasksRequest
    assert mapping[route + "WaitTask"].request_type is orch_pb.WaitTaskRequest
