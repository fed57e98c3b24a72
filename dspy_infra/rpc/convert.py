"""Conversions between dspy_infra's value classes and the wire messages, both directions.

One place for each mapping, so the server (model -> message) and the client
(message -> model) cannot drift apart. Wire timestamps are int64 unix seconds, as in the
contract; where an addition carries sub-second precision (``SystemEvent.timestamp_seconds``,
``GetTaskStatusResponse`` times) it is preferred when present.

JSON objects (payloads, results, workflow inputs and outputs) travel twice: whole in the
``*_json`` addition and, for old clients, in the contract's ``map<string,string>`` (a string
value as is, any other value as its compact JSON text). Readers prefer the ``*_json`` field
when it is set and fall back to the map (an old peer). A request that sets both is refused:
one of the two would otherwise be dropped without a word.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ..errors import SpecError
from ..models import (
    PAYLOAD_HARD_LIMIT,
    Event,
    GPUInfo,
    HardwareInfo,
    HealthUpdate,
    ImagePullProgress,
    LogEntry,
    QueueStatus,
    ResourceAvailability,
    ResourceUsage,
    ServiceState,
    ServiceStatus,
    ServiceStatusUpdate,
    TaskResult,
    TaskSpec,
    TaskState,
    TaskStatus,
)
from ..values import MAX_JSON_BYTES, JsonObject, check_json_object, decode_json_object, json_text
from ..workflows.spec import (
    RunState,
    RunStatus,
    RunUpdate,
    StepState,
    StepStatus,
    Workflow,
)
from ..workflows.validate import parse_workflow_spec
from ._gen.env_manager import v1 as env_pb
from ._gen.orchestrator import v1 as orch_pb

__all__ = [
    "RESPONSE_JSON_MAX_BYTES",
    "event_from_pb",
    "event_to_pb",
    "health_update_from_pb",
    "health_update_to_pb",
    "json_from_request",
    "json_from_wire",
    "json_map",
    "log_entry_from_pb",
    "log_entry_to_pb",
    "pull_progress_from_pb",
    "pull_progress_to_pb",
    "queue_status_from_pb",
    "queue_status_to_pb",
    "request_json_bound",
    "resources_from_pb",
    "resources_to_pb",
    "run_input_from_pb",
    "run_state_from_pb",
    "run_update_from_pb",
    "run_update_to_pb",
    "service_state_from_pb",
    "service_state_to_pb",
    "status_update_from_pb",
    "status_update_to_pb",
    "submit_request_payload",
    "submit_request_upb",
    "task_result_from_pb",
    "task_result_to_pb",
    "task_result_to_upb",
    "task_state_from_pb",
    "task_state_to_pb",
    "upb_messages",
    "workflow_from_pb",
    "workflow_to_pb",
]


_UPB: ModuleType | None = None


def upb_messages() -> ModuleType:
    """``rpc/upb.py`` (the hot calls' upb classes), imported when first needed: it loads
    ``google.protobuf``, which starting a server or a CLI command does without until a task
    is submitted."""
    global _UPB
    if _UPB is None:
        from . import upb

        _UPB = upb
    return _UPB


#: Bound of a JSON field read from a server's answer (a result can be larger than a payload:
#: exec output is kept whole up to its own limit). Requests use the server's settings.
RESPONSE_JSON_MAX_BYTES = 64 << 20


# -- JSON objects on the wire ---------------------------------------------------------------


def json_map(obj: Mapping[str, Any]) -> dict[str, str]:
    """The old ``map<string,string>`` view of a JSON object: strings as is, others as JSON."""
    return {str(k): v if isinstance(v, str) else json_text(v) for k, v in obj.items()}


def json_from_wire(
    old_map: Mapping[str, str], text: str, field: str, *, max_bytes: int = RESPONSE_JSON_MAX_BYTES
) -> JsonObject:
    """A JSON object from a message: its ``*_json`` field when set, else the old map (an old
    peer sent it; its values are strings)."""
    if text:
        return decode_json_object(text, field, max_bytes=max_bytes)
    return dict(old_map)


def json_from_request(
    old_map: Mapping[str, str],
    text: str,
    *,
    map_field: str,
    json_field: str,
    max_bytes: int = MAX_JSON_BYTES,
) -> JsonObject:
    """A JSON object from a request that may use the old map or the ``*_json`` field, not both;
    checked (``values.check_json_object``, bound ``max_bytes``) either way, so a payload read
    here goes into ``TaskSpec.with_checked_payload`` without a second walk."""
    if text and old_map:
        raise SpecError(
            f"both {map_field} (the old string map) and {json_field} are set",
            field=json_field,
            fix=f"send one of them: {json_field} (a JSON object; numbers and nesting kept)"
            f" or {map_field} (strings only)",
        )
    if text:
        return decode_json_object(text, json_field, max_bytes=max_bytes)
    # (betterproto2's maps are dicts; upb's a container the fast check does not take)
    return check_json_object(
        old_map if type(old_map) is dict else dict(old_map), map_field, max_bytes=max_bytes
    )


def _same_named(source: object, names: tuple[str, ...]) -> dict[str, Any]:
    """The fields ``names`` of ``source`` as keyword arguments: for the fields a value class
    and its message spell and type alike. One table of names per pair serves both directions,
    so a field added to one side cannot be carried one way and dropped the other."""
    return {name: getattr(source, name) for name in names}


def _status(value: str) -> TaskStatus:
    try:
        return TaskStatus(value)
    except ValueError:
        # An older server may send a status we do not know; pending is the safe reading.
        return TaskStatus.PENDING


# -- tasks --------------------------------------------------------------------------------


def _task_result_fields(result: TaskResult) -> dict[str, Any]:
    return {
        "task_id": result.task_id,
        "status": str(result.status),
        "result": json_map(result.result),
        "error": result.error,
        "duration_ms": result.duration_ms,
        "completed_at": int(result.completed_at),
        "result_json": json_text(dict(result.result)),
    }


def task_result_to_pb(result: TaskResult) -> orch_pb.TaskResult:
    return orch_pb.TaskResult(**_task_result_fields(result))


def task_result_to_upb(result: TaskResult) -> Any:
    """The same message as ``task_result_to_pb``, as the upb class the server sends (``upb``)."""
    return upb_messages().TaskResult(**_task_result_fields(result))


def task_result_from_pb(msg: orch_pb.TaskResult) -> TaskResult:
    return TaskResult(
        task_id=msg.task_id,
        status=_status(msg.status),
        result=json_from_wire(msg.result, msg.result_json, "result_json"),
        error=msg.error,
        duration_ms=msg.duration_ms,
        completed_at=float(msg.completed_at),
    )


#: ``TaskState`` fields its message spells and types alike.
_TASK_STATE_FIELDS = ("attempts", "error", "submitted_at", "started_at", "completed_at", "duration_ms")


def task_state_to_pb(state: TaskState) -> orch_pb.GetTaskStatusResponse:
    spec = state.spec
    return orch_pb.GetTaskStatusResponse(
        **_same_named(state, _TASK_STATE_FIELDS),
        task_id=spec.id,
        status=str(state.status),
        result=json_map(state.result),
        class_=spec.task_class,
        payload=json_map(spec.payload),
        priority=spec.priority,
        workflow_id=spec.workflow_id,
        timeout_seconds=spec.timeout or 0.0,
        max_attempts=spec.max_attempts,
        result_json=json_text(dict(state.result)),
        payload_json=json_text(dict(spec.payload)),
    )


def task_state_from_pb(msg: orch_pb.GetTaskStatusResponse) -> TaskState:
    spec = TaskSpec(
        id=msg.task_id,
        task_class=msg.class_ or "cpu_short",
        payload=json_from_wire(msg.payload, msg.payload_json, "payload_json"),
        priority=msg.priority,
        timeout=msg.timeout_seconds or None,
        max_attempts=msg.max_attempts or 1,
        workflow_id=msg.workflow_id,
    )
    return TaskState(
        **_same_named(msg, _TASK_STATE_FIELDS),
        spec=spec,
        status=_status(msg.status),
        result=json_from_wire(msg.result, msg.result_json, "result_json"),
    )


def _submit_request_fields(spec: TaskSpec) -> dict[str, Any]:
    return {
        "id": spec.id,
        "payload_json": json_text(dict(spec.payload)),
        "priority": spec.priority,
        "workflow_id": spec.workflow_id,
        "timeout_seconds": spec.timeout or 0.0,
        "max_attempts": spec.max_attempts,
    }


def submit_request_upb(spec: TaskSpec) -> Any:
    """What a new client sends: the payload as JSON only (the map stays empty). upb's class
    (``upb``), whose field ``class`` is spelled as in the .proto (a Python keyword, hence the
    dict)."""
    return upb_messages().SubmitTaskRequest(**{"class": spec.task_class}, **_submit_request_fields(spec))


def request_json_bound(max_payload_bytes: int) -> int:
    """How much JSON text a request field may carry before it is even parsed: a guard against
    hostile input, looser than ``max_payload_bytes`` (whitespace, quotes and escapes count in
    the text), and never above the bound every ``TaskSpec`` payload has (so the one check
    here is also that one). The exact limit stays where it is enforced for every face: the
    scheduler."""
    return min(4 * max_payload_bytes + (64 << 10), PAYLOAD_HARD_LIMIT)


def _request_object(req: Any, field: str, max_payload_bytes: int) -> JsonObject:
    """The JSON object a request carries as ``FIELD_json`` (new clients) or ``FIELD`` (the old
    string map), bounded before parsing."""
    return json_from_request(
        getattr(req, field),
        getattr(req, f"{field}_json"),
        map_field=field,
        json_field=f"{field}_json",
        max_bytes=request_json_bound(max_payload_bytes),
    )


def submit_request_payload(
    req: orch_pb.SubmitTaskRequest, *, max_payload_bytes: int = MAX_JSON_BYTES
) -> JsonObject:
    """A submitted task's payload: ``payload_json`` (new clients) or ``payload`` (old ones)."""
    return _request_object(req, "payload", max_payload_bytes)


def run_input_from_pb(
    req: orch_pb.StartWorkflowRunRequest, *, max_payload_bytes: int = MAX_JSON_BYTES
) -> JsonObject:
    """A run's input: ``input_json`` (new clients) or ``input`` (old ones)."""
    return _request_object(req, "input", max_payload_bytes)


_QUEUE_STATUS_FIELDS = ("task_class", "depth", "inflight", "limit", "min_limit", "max_limit")


def queue_status_to_pb(q: QueueStatus) -> orch_pb.QueueStatus:
    return orch_pb.QueueStatus(**_same_named(q, _QUEUE_STATUS_FIELDS))


def queue_status_from_pb(msg: orch_pb.QueueStatus) -> QueueStatus:
    return QueueStatus(**_same_named(msg, _QUEUE_STATUS_FIELDS))


# -- events -------------------------------------------------------------------------------


def event_to_pb(event: Event) -> orch_pb.SystemEvent:
    return orch_pb.SystemEvent(
        event_type=event.type,
        resource_id=event.resource_id,
        data=json_map(event.data),
        timestamp=int(event.timestamp),
        timestamp_seconds=event.timestamp,
    )


def event_from_pb(msg: orch_pb.SystemEvent) -> Event:
    return Event(
        type=msg.event_type,
        resource_id=msg.resource_id,
        data=dict(msg.data),
        timestamp=msg.timestamp_seconds or float(msg.timestamp),
    )


# -- workflows ----------------------------------------------------------------------------


def _run_status(value: str) -> RunStatus:
    try:
        return RunStatus(value)
    except ValueError:
        return RunStatus.PENDING


def run_update_to_pb(update: RunUpdate | RunState) -> orch_pb.WorkflowStatusUpdate:
    """From the workflow engine's ``RunUpdate`` (a stream item) or ``RunState`` (get, cancel,
    list: the whole run, steps included)."""
    if isinstance(update, RunState):
        state = update
        msg = run_update_to_pb(state.to_update(state.current_step))
        msg.workflow_id = state.workflow_id
        msg.steps = [_step_to_pb(step) for step in state.steps.values()]
        msg.input_json = json_text(dict(state.input))
        msg.idempotency_key = state.idempotency_key
        msg.created_at = state.created_at
        msg.updated_at = state.updated_at
        return msg
    return orch_pb.WorkflowStatusUpdate(
        **_same_named(update, _RUN_UPDATE_FIELDS),
        status=str(update.status),
        output=json_map(update.output),
        output_json=json_text(dict(update.output)),
    )


_RUN_UPDATE_FIELDS = ("run_id", "current_step", "steps_completed", "total_steps", "error")


def run_update_from_pb(msg: orch_pb.WorkflowStatusUpdate) -> RunUpdate:
    return RunUpdate(
        **_same_named(msg, _RUN_UPDATE_FIELDS),
        status=_run_status(msg.status),
        output=json_from_wire(msg.output, msg.output_json, "output_json"),
    )


_STEP_FIELDS = ("name", "task_id", "attempts", "error", "started_at", "completed_at")


def _step_to_pb(step: StepState) -> orch_pb.WorkflowStep:
    return orch_pb.WorkflowStep(
        **_same_named(step, _STEP_FIELDS),
        status=str(step.status),
        result_json=json_text(dict(step.result)),
    )


def _step_status(value: str) -> StepStatus:
    try:
        return StepStatus(value)
    except ValueError:
        return StepStatus.PENDING


def run_state_from_pb(msg: orch_pb.WorkflowStatusUpdate) -> RunState:
    """A run's whole state (from GetWorkflowRun, CancelWorkflowRun, ListWorkflowRuns). An old
    server sends no steps: the state then has the counts of the update and no step details."""
    steps = {
        s.name: StepState(
            **_same_named(s, _STEP_FIELDS),
            status=_step_status(s.status),
            result=json_from_wire({}, s.result_json, "steps.result_json"),
        )
        for s in msg.steps
    }
    return RunState(
        run_id=msg.run_id,
        workflow_id=msg.workflow_id,
        status=_run_status(msg.status),
        steps=steps,
        input=json_from_wire({}, msg.input_json, "input_json"),
        output=json_from_wire(msg.output, msg.output_json, "output_json"),
        error=msg.error,
        idempotency_key=msg.idempotency_key,
        created_at=msg.created_at,
        updated_at=msg.updated_at,
    )


def workflow_to_pb(wf: Workflow) -> orch_pb.WorkflowInfo:
    return orch_pb.WorkflowInfo(
        id=wf.id,
        name=wf.name,
        description=wf.description,
        spec_json=wf.spec.to_json(),
        created_at=wf.created_at,
    )


def workflow_from_pb(msg: orch_pb.WorkflowInfo) -> Workflow:
    spec = parse_workflow_spec(
        decode_json_object(msg.spec_json, "spec_json", max_bytes=RESPONSE_JSON_MAX_BYTES)
    )
    return Workflow(
        id=msg.id, name=msg.name, description=msg.description, spec=spec, created_at=msg.created_at
    )


# -- services -----------------------------------------------------------------------------


def _service_status(value: str) -> ServiceStatus:
    try:
        return ServiceStatus(value)
    except ValueError:
        return ServiceStatus.UNHEALTHY


_STATUS_UPDATE_FIELDS = ("service_name", "message", "progress")


def status_update_to_pb(update: ServiceStatusUpdate) -> env_pb.ServiceStatusUpdate:
    return env_pb.ServiceStatusUpdate(**_same_named(update, _STATUS_UPDATE_FIELDS), status=str(update.status))


def status_update_from_pb(msg: env_pb.ServiceStatusUpdate) -> ServiceStatusUpdate:
    return ServiceStatusUpdate(**_same_named(msg, _STATUS_UPDATE_FIELDS), status=_service_status(msg.status))


_USAGE_FIELDS = ("cpu_percent", "memory_bytes", "network_rx_bytes", "network_tx_bytes")
_SERVICE_STATE_FIELDS = ("name", "restarts", "backend", "url")


def service_state_to_pb(state: ServiceState) -> env_pb.ServiceStatus:
    return env_pb.ServiceStatus(
        **_same_named(state, _SERVICE_STATE_FIELDS),
        status=str(state.status),
        container_id=state.instance_id,
        ports=sorted(state.ports.values()),
        health_checks=dict(state.health_checks),
        started_at=int(state.started_at),
        resource_usage=env_pb.ResourceUsage(**_same_named(state.resource_usage, _USAGE_FIELDS)),
        port_map=dict(state.ports),
        host=state.host,
        main_port=state.port,
    )


def service_state_from_pb(msg: env_pb.ServiceStatus) -> ServiceState:
    usage = msg.resource_usage or env_pb.ResourceUsage()
    return ServiceState(
        **_same_named(msg, _SERVICE_STATE_FIELDS),
        status=_service_status(msg.status),
        instance_id=msg.container_id,
        ports=dict(msg.port_map),
        health_checks=dict(msg.health_checks),
        started_at=float(msg.started_at),
        resource_usage=ResourceUsage(**_same_named(usage, _USAGE_FIELDS)),
        host=msg.host or "127.0.0.1",
        port=msg.main_port,
    )


_HEALTH_UPDATE_FIELDS = ("service_name", "healthy", "message")


def health_update_to_pb(update: HealthUpdate) -> env_pb.HealthUpdate:
    return env_pb.HealthUpdate(
        **_same_named(update, _HEALTH_UPDATE_FIELDS),
        timestamp=int(update.timestamp),
        details=dict(update.details),
    )


def health_update_from_pb(msg: env_pb.HealthUpdate) -> HealthUpdate:
    return HealthUpdate(
        **_same_named(msg, _HEALTH_UPDATE_FIELDS),
        timestamp=float(msg.timestamp),
        details=dict(msg.details),
    )


_AVAILABILITY_FIELDS = ("available", "capacity", "in_use")
_GPU_FIELDS = ("index", "name", "memory_bytes", "utilization_percent")


def resources_to_pb(avail: ResourceAvailability) -> env_pb.ResourceAvailabilityResponse:
    hw = avail.hardware
    return env_pb.ResourceAvailabilityResponse(
        **_same_named(avail, _AVAILABILITY_FIELDS),
        hardware=env_pb.HardwareInfo(
            cpu_cores=hw.cpu_cores,
            memory_bytes=hw.memory_bytes,
            gpus=[env_pb.Gpu(**_same_named(g, _GPU_FIELDS)) for g in hw.gpus],
        ),
    )


def resources_from_pb(msg: env_pb.ResourceAvailabilityResponse) -> ResourceAvailability:
    hw = msg.hardware or env_pb.HardwareInfo()
    return ResourceAvailability(
        **_same_named(msg, _AVAILABILITY_FIELDS),
        hardware=HardwareInfo(
            cpu_cores=hw.cpu_cores,
            memory_bytes=hw.memory_bytes,
            gpus=tuple(GPUInfo(**_same_named(g, _GPU_FIELDS)) for g in hw.gpus),
        ),
    )


_PULL_PROGRESS_FIELDS = ("image_name", "status", "current", "total", "progress_percent", "message")


def pull_progress_to_pb(p: ImagePullProgress) -> env_pb.ImagePullProgress:
    return env_pb.ImagePullProgress(**_same_named(p, _PULL_PROGRESS_FIELDS))


def pull_progress_from_pb(msg: env_pb.ImagePullProgress) -> ImagePullProgress:
    return ImagePullProgress(**_same_named(msg, _PULL_PROGRESS_FIELDS))


_LOG_ENTRY_FIELDS = ("service_name", "stream", "message")


def log_entry_to_pb(entry: LogEntry) -> env_pb.LogEntry:
    return env_pb.LogEntry(
        **_same_named(entry, _LOG_ENTRY_FIELDS),
        container_id=entry.instance_id,
        timestamp=int(entry.timestamp),
    )


def log_entry_from_pb(msg: env_pb.LogEntry) -> LogEntry:
    return LogEntry(
        **_same_named(msg, _LOG_ENTRY_FIELDS),
        instance_id=msg.container_id,
        timestamp=float(msg.timestamp),
    )
