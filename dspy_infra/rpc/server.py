"""The gRPC services (grpclib + betterproto2) over an embedded ``Infra``:
``orchestrator.v1.OrchestratorService`` and ``env_manager.v1.EnvManagerService``, and
``build_grpc_server``, which serves them with ``grpc.health.v1`` behind one guard.

Every gRPC method is wrapped once, when the server is built, by one guard (``_guard``) which
checks the bearer token and turns any dspy_infra error into a gRPC status decided by
``wire.grpc_status_for`` -- the one place errors map to status codes. Listening,
TLS and the HTTP app next to it are ``serve.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import grpclib.const
import grpclib.server
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from ..errors import (
    FailedPrecondition,
    InfraError,
    NotFound,
    SpecError,
)
from ..models import TaskSpec, TaskStatus, validate_name
from ..values import (
    MAX_ID_LENGTH,
    check_finite,
    check_int,
    check_text,
    preview,
)
from ..wire import (
    MAX_TASKS_JSON_BYTES,
    bearer_matches,
    check_remote_payload,
    error_message,
    grpc_status_for,
    json_task_list,
    refuse_remote_command,
    remote_payload,
    runs_command,
    spec_from_doc,
    to_grpc_error,
)
from . import convert as cv
from ._gen.env_manager import v1 as env_pb
from ._gen.orchestrator import v1 as orch_pb
from .health import Health

if TYPE_CHECKING:
    from ..infra import Infra

__all__ = ["EnvManagerService", "OrchestratorService", "build_grpc_server"]

log = logging.getLogger("dspy_infra.rpc")
_In = TypeVar("_In")
_Out = TypeVar("_Out")


def _rejected(index: int, task_id: str, exc: InfraError) -> dict[str, Any]:
    """A ``RejectedTask``'s fields, for upb's ``SubmitTasksResponse``."""
    return {
        "index": index,
        "task_id": task_id if len(task_id) <= MAX_ID_LENGTH else task_id[:MAX_ID_LENGTH],
        "error": error_message(exc),
        "code": grpc_status_for(exc).value,
    }


# -- checks at the edge ----------------------------------------------------------------------


def _names(values: list[str], field: str) -> list[str]:
    for i, name in enumerate(values):
        validate_name(name, f"{field}[{i}]")
    return list(values)


def _non_negative(value: float, field: str) -> float | None:
    """A wire duration: finite and >= 0 (NaN and infinities refused); 0 means no limit."""
    number = check_finite(value, field, lo=0)
    return number or None


def _known_id(value: str, field: str, kind: str) -> str:
    """A required id of something to look up. One longer than any stored id cannot exist:
    NOT_FOUND at once, echoing only a prefix (the lookup and the message stay small)."""
    if not value:
        raise SpecError("is required", field=field)
    if len(value) > MAX_ID_LENGTH:
        raise NotFound(
            f"no {kind} {preview(value)}", field=field, fix=f"ids are at most {MAX_ID_LENGTH} characters"
        )
    return value


#: The grpclib stream of the call being handled (set by ``_guard``), so a server stream can
#: tell that its client left.
_CALL: contextvars.ContextVar[grpclib.server.Stream[Any, Any] | None] = contextvars.ContextVar(
    "dspy_infra_grpc_call", default=None
)


#: Messages a server stream sends before it gives the loop a turn.
_YIELD_EVERY = 8


class _ClientGone(Exception):
    """The connection of a server-streaming call closed; the call ends quietly."""


def _client_gone() -> bool:
    call = _CALL.get()
    if call is None:
        return False
    # grpclib exposes no public "connection closed" flag; its own Stream.__aexit__ reads this.
    h2_stream = getattr(call, "_stream", None)
    transport = getattr(h2_stream, "_transport", None)
    return transport is not None and bool(transport.is_closing())


async def _relay(stream: AsyncIterator[_In], convert: Callable[[_In], _Out]) -> AsyncIterator[_Out]:
    """Convert a stream's items; close the source when the call ends (client gone, cancel).

    Checks before each item that the client is still connected: grpclib's writes do not
    yield while the flow-control window allows, so a replay could otherwise write thousands
    of messages into a closed socket (one asyncio warning each) before noticing."""
    sent = 0
    try:
        async for item in stream:
            if _client_gone():
                raise _ClientGone
            yield convert(item)
            sent += 1
            if sent % _YIELD_EVERY == 0:
                # Sending does not yield while the HTTP/2 window allows (~150 events): with
                # many replaying streams one loop turn would run all of them for that long.
                await asyncio.sleep(0)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


class _HeldOutput:
    """One stream's view of its HTTP/2 connection while it writes a unary answer
    (``_send_unary``): ``data_to_send`` leaves the frames in the connection's buffer, so the
    answer's headers, message and trailers leave in one write instead of three. The buffer
    is the connection's, in frame order: a frame of another stream written meanwhile (if a
    send waits for the socket or the flow-control window) takes ours with it, in order."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def data_to_send(self, amount: int | None = None) -> bytes:
        return b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def _send_unary(stream: grpclib.server.Stream[Any, Any], message: Any) -> None:
    """Send a unary call's answer and its OK trailers with one socket write (grpclib writes
    each frame as it builds it: three ``send`` calls, three segments for the client to read)."""
    h2_stream: Any = getattr(stream, "_stream", None)  # grpclib has no public seam for this
    conn = getattr(h2_stream, "_h2_connection", None)
    if conn is None or not hasattr(h2_stream, "_transport"):
        # Another grpclib than the one this was written against: its plain three writes.
        await stream.send_message(message)
        await stream.send_trailing_metadata()
        return
    h2_stream._h2_connection = _HeldOutput(conn)
    try:
        await stream.send_message(message)
        await stream.send_trailing_metadata()
    finally:
        h2_stream._h2_connection = conn
        data = conn.data_to_send()
        if data:
            h2_stream._transport.write(data)


class _UpbType(type):
    """A stand-in for one of ``rpc/upb.py``'s classes in a handler's request or reply type:
    grpclib's codec only calls ``FromString`` on it and ``isinstance`` against it, and both
    reach the real class, imported by the first hot call. So a server starts without loading
    google.protobuf (what starting to serve avoids), and pays for it when a task comes."""

    upb_name: str

    def FromString(cls, data: bytes) -> Any:
        return getattr(cv.upb_messages(), cls.upb_name).FromString(data)

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, getattr(cv.upb_messages(), cls.upb_name))


def _upb_type(name: str) -> type:
    return _UpbType(name, (), {"upb_name": name})


# -- services ----------------------------------------------------------------------------


class OrchestratorService(orch_pb.OrchestratorServiceBase):
    """``orchestrator.v1.OrchestratorService`` over an Infra."""

    def __init__(self, infra: Infra) -> None:
        self.infra = infra

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        """The generated handlers, but ``SubmitTask``, ``SubmitAndWait`` and ``SubmitTasks``
        (the calls every task pays) decode and encode with the official protobuf runtime (``upb``: C) instead
        of betterproto2 (Python, tens of microseconds a message on the loop). Same bytes."""
        mapping = super().__mapping__()
        for name, func, request, reply in (
            ("SubmitTask", self._submit_task_upb, "SubmitTaskRequest", "SubmitTaskResponse"),
            ("SubmitAndWait", self._submit_and_wait_upb, "SubmitAndWaitRequest", "TaskResult"),
            ("SubmitTasks", self._submit_tasks_upb, "SubmitTasksRequest", "SubmitTasksResponse"),
        ):
            path = f"/orchestrator.v1.OrchestratorService/{name}"
            mapping[path] = grpclib.const.Handler(
                func, mapping[path].cardinality, _upb_type(request), _upb_type(reply)
            )
        return mapping

    async def _submit_task_upb(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        message = await stream.recv_message()
        assert message is not None
        state = await self.infra.scheduler.submit(self._spec(message))
        await _send_unary(
            stream,
            cv.upb_messages().SubmitTaskResponse(success=True, task_id=state.id, status=str(state.status)),
        )

    def _spec(self, req: Any) -> TaskSpec:
        """The spec of an upb ``SubmitTaskRequest``."""
        # TaskSpec checks the id; the scheduler checks class, payload size and GPU needs
        # before anything changes (one place for each rule).
        settings = self.infra.settings
        # Decode first (payload_json or the old map), then apply the command policy to what
        # was decoded: checking only the old map would let payload_json bypass exec_policy.
        # The decoder checks the payload for what the store holds, once: TaskSpec takes it
        # as checked (with_checked_payload) instead of walking it again.
        payload = cv.submit_request_payload(req, max_payload_bytes=settings.max_payload_bytes)
        check_remote_payload(settings, payload, "payload")
        return TaskSpec.with_checked_payload(
            payload,
            id=check_text(req.id, "id"),
            # (``class`` is a Python keyword: upb's field is reached by getattr)
            task_class=check_text(getattr(req, "class"), "class", allow_empty=True) or "cpu_short",
            priority=req.priority,
            timeout=_non_negative(req.timeout_seconds, "timeout_seconds"),
            max_attempts=check_int(req.max_attempts or 1, "max_attempts", lo=1, hi=100),
            workflow_id=check_text(req.workflow_id, "workflow_id", allow_empty=True),
        )

    async def _submit_tasks_upb(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        message = await stream.recv_message()
        assert message is not None
        accepted, rejected = await self._submit_tasks(message.tasks, message.tasks_json)
        await _send_unary(stream, cv.upb_messages().SubmitTasksResponse(accepted=accepted, rejected=rejected))

    async def _submit_tasks(
        self, typed: Iterable[Any], tasks_json: bytes
    ) -> tuple[int, list[dict[str, Any]]]:
        """How many tasks of a ``SubmitTasks`` were accepted, and the ``RejectedTask`` fields
        of the others. A bad task fails alone (its error names the field); the others go
        in, all with one group commit (``submit_batch`` names the ones it refused)."""
        rejected: list[dict[str, Any]] = []
        good: list[tuple[int, TaskSpec]] = []
        index = 0
        for req in typed:
            try:
                good.append((index, self._spec(req)))
            except InfraError as exc:
                rejected.append(_rejected(index, req.id, exc))
            index += 1
        if tasks_json:
            tasks = json_task_list(tasks_json, "tasks_json", max_bytes=MAX_TASKS_JSON_BYTES)
            settings = self.infra.settings
            for i, doc in enumerate(tasks):
                if i & 255 == 255:
                    await asyncio.sleep(0)  # a long list must not hold the loop
                try:
                    spec = spec_from_doc(doc, generate_id=False)
                    if runs_command(spec.payload):  # (the field's name only built when needed)
                        check_remote_payload(settings, spec.payload, f"tasks_json[{i}].payload")
                    good.append((index, spec))
                except InfraError as exc:
                    task_id = doc.get("id") if isinstance(doc, dict) else None
                    rejected.append(_rejected(index, task_id if isinstance(task_id, str) else "", exc))
                index += 1
        refusals = await self.infra.scheduler.submit_batch([spec for _, spec in good])
        for at, error in refusals:
            i, spec = good[at]
            rejected.append(_rejected(i, spec.id, error))
        if refusals:
            rejected.sort(key=lambda r: int(r["index"]))
        return index - len(rejected), rejected

    async def stream_task_results(
        self, message: orch_pb.StreamTaskResultsRequest
    ) -> AsyncIterator[orch_pb.TaskResult]:
        stream = self.infra.stream_results(
            list(message.task_ids) or None, include_completed=message.include_completed
        )
        async for item in _relay(stream, cv.task_result_to_pb):
            yield item

    async def get_task_status(self, message: orch_pb.GetTaskStatusRequest) -> orch_pb.GetTaskStatusResponse:
        task_id = _known_id(message.task_id, "task_id", "task")
        return cv.task_state_to_pb(await self.infra.get_task(task_id))

    async def cancel_task(self, message: orch_pb.CancelTaskRequest) -> orch_pb.GetTaskStatusResponse:
        task_id = _known_id(message.task_id, "task_id", "task")
        return cv.task_state_to_pb(await self.infra.cancel(task_id))

    async def list_tasks(self, message: orch_pb.ListTasksRequest) -> orch_pb.ListTasksResponse:
        status = message.status or None
        if status is not None and status not in {s.value for s in TaskStatus}:
            raise SpecError(
                f"unknown status {preview(status)}",
                field="status",
                fix="use one of " + ", ".join(s.value for s in TaskStatus),
            )
        if message.limit < 0:
            raise SpecError(f"must be >= 0, got {message.limit}", field="limit")
        workflow_id = check_text(message.workflow_id, "workflow_id", allow_empty=True) or None
        states = await self.infra.list_tasks(
            status=status, limit=message.limit or 100, workflow_id=workflow_id
        )
        return orch_pb.ListTasksResponse(tasks=[cv.task_state_to_pb(s) for s in states])

    async def wait_task(self, message: orch_pb.WaitTaskRequest) -> orch_pb.TaskResult:
        task_id = _known_id(message.task_id, "task_id", "task")
        timeout = _non_negative(message.timeout_seconds, "timeout_seconds")
        return cv.task_result_to_pb(await self.infra.wait(task_id, timeout))

    async def _submit_and_wait_upb(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        """One round trip for "submit, then wait": the acknowledgement and the result share
        the call (one HTTP/2 stream, one request decode, one response encode)."""
        message = await stream.recv_message()
        assert message is not None  # (grpclib's unary calls always carry one)
        if not message.HasField("task"):
            raise _no_task()
        spec = self._spec(message.task)
        timeout = _non_negative(message.timeout_seconds, "timeout_seconds")
        result = await self.infra.scheduler.submit_and_wait(spec, timeout)
        await _send_unary(stream, cv.task_result_to_upb(result))

    async def get_queue_status(self, message: orch_pb.GetQueueStatusRequest) -> orch_pb.QueueStatusResponse:
        queues = await self.infra.queue_status()
        return orch_pb.QueueStatusResponse(queues={k: cv.queue_status_to_pb(q) for k, q in queues.items()})

    async def create_workflow(self, message: orch_pb.CreateWorkflowRequest) -> orch_pb.CreateWorkflowResponse:
        from ..workflows.validate import parse_workflow_spec

        if not message.id:
            raise SpecError("is required", field="id", fix="give the workflow a unique, non-empty id")
        name = check_text(message.name, "name", allow_empty=True)
        description = check_text(message.description, "description", max_length=4096, allow_empty=True)
        # Parsed off the loop (a spec may be up to MAX_SPEC_BYTES), then checked for steps
        # that run commands before the engine sees it.
        spec = await anyio.to_thread.run_sync(parse_workflow_spec, bytes(message.spec))
        for step in spec.steps:
            check_remote_payload(self.infra.settings, step.payload, f"steps.{step.name}.payload")
        await self.infra.create_workflow(message.id, name, description, spec)
        return orch_pb.CreateWorkflowResponse(success=True, workflow_id=message.id)

    async def start_workflow_run(
        self, message: orch_pb.StartWorkflowRunRequest
    ) -> orch_pb.StartWorkflowRunResponse:
        workflow_id = _known_id(message.workflow_id, "workflow_id", "workflow")
        if self.infra.settings.exec_policy != "allow":
            # A remote input that is templated into a command step would let the client
            # choose (part of) a command; the owning process may still start such runs.
            from ..workflows.spec import step_input_keys

            wf = await self.infra.workflows.get_workflow(workflow_id)
            for step in wf.spec.steps:
                if runs_command(step.payload) and step_input_keys(step):
                    refuse_remote_command(
                        self.infra.settings,
                        f"starting a run whose input reaches the command of step {step.name!r}",
                        "input",
                    )
        run_id = await self.infra.start_run(
            workflow_id,
            input=cv.run_input_from_pb(message, max_payload_bytes=self.infra.settings.max_payload_bytes),
            idempotency_key=check_text(message.idempotency_key, "idempotency_key", allow_empty=True),
        )
        return orch_pb.StartWorkflowRunResponse(success=True, run_id=run_id)

    async def get_workflow_run(self, message: orch_pb.GetWorkflowRunRequest) -> orch_pb.WorkflowStatusUpdate:
        run_id = _known_id(message.run_id, "run_id", "run")
        return cv.run_update_to_pb(await self.infra.get_run(run_id))

    async def cancel_workflow_run(
        self, message: orch_pb.GetWorkflowRunRequest
    ) -> orch_pb.WorkflowStatusUpdate:
        run_id = _known_id(message.run_id, "run_id", "run")
        return cv.run_update_to_pb(await self.infra.cancel_run(run_id))

    async def stream_workflow_status(
        self, message: orch_pb.StreamWorkflowStatusRequest
    ) -> AsyncIterator[orch_pb.WorkflowStatusUpdate]:
        run_id = _known_id(message.run_id, "run_id", "run")
        stream = self.infra.run_status(run_id)
        async for item in _relay(stream, cv.run_update_to_pb):
            yield item

    async def get_metrics(self, message: orch_pb.GetMetricsRequest) -> orch_pb.MetricsResponse:
        snapshot = self.infra.metrics.snapshot(list(message.metric_names) or None)
        return orch_pb.MetricsResponse(metrics=snapshot, timestamp=int(time.time()))

    async def stream_events(self, message: orch_pb.StreamEventsRequest) -> AsyncIterator[orch_pb.SystemEvent]:
        since = float(message.since_timestamp) if message.since_timestamp > 0 else None
        stream = self.infra.events(list(message.event_types) or None, since)
        async for item in _relay(stream, cv.event_to_pb):
            yield item

    async def health(self, message: orch_pb.HealthRequest) -> orch_pb.HealthResponse:
        doc = await self.infra.health()
        return orch_pb.HealthResponse(
            healthy=bool(doc["healthy"]),
            version=str(doc["version"]),
            services={str(k): str(v) for k, v in doc["services"].items()},
            # Who this server is: auto-mode clients attach only to their own (ensure_infra).
            owner=self.infra.settings.resolved_owner(),
            home=str(self.infra.home.resolve()),
            backend=_backend_name(self.infra),
        )

    async def list_workflows(self, message: orch_pb.ListWorkflowsRequest) -> orch_pb.ListWorkflowsResponse:
        return orch_pb.ListWorkflowsResponse(
            workflows=[cv.workflow_to_pb(wf) for wf in await self.infra.list_workflows()]
        )

    async def list_workflow_runs(
        self, message: orch_pb.ListWorkflowRunsRequest
    ) -> orch_pb.ListWorkflowRunsResponse:
        if message.limit < 0:
            raise SpecError(f"must be >= 0 (0 = 100), got {message.limit}", field="limit")
        runs = await self.infra.list_runs(message.workflow_id or None, limit=message.limit or 100)
        return orch_pb.ListWorkflowRunsResponse(runs=[cv.run_update_to_pb(r) for r in runs])

    async def get_task_log(self, message: orch_pb.GetTaskLogRequest) -> orch_pb.GetTaskLogResponse:
        if not message.task_id:
            raise SpecError("is required", field="task_id")
        if message.attempt < 0:
            raise SpecError(f"must be >= 0 (0 = the latest), got {message.attempt}", field="attempt")
        # Infra.task_log comes with the per-task log store; a build without it says so.
        task_log = getattr(self.infra, "task_log", None)
        if task_log is None:
            raise FailedPrecondition("this server keeps no per-task logs", field="task_id")
        log = await task_log(message.task_id, attempt=message.attempt or None)
        return orch_pb.GetTaskLogResponse(task_id=message.task_id, log=log)


def _no_task() -> SpecError:
    return SpecError("is required", field="task", fix="send the task as in SubmitTask")


def _backend_name(infra: Infra) -> str:
    try:
        return infra.services.backend.name
    except InfraError:  # not running (shutting down): no backend to name
        return ""


class EnvManagerService(env_pb.EnvManagerServiceBase):
    """``env_manager.v1.EnvManagerService`` over an Infra's ServiceManager."""

    def __init__(self, infra: Infra) -> None:
        self.infra = infra

    async def start_services(
        self, message: env_pb.StartServicesRequest
    ) -> AsyncIterator[env_pb.ServiceStatusUpdate]:
        names = _names(list(message.service_names), "service_names")
        if message.overrides:
            # Every override field can change what runs or with what reach (command,
            # entrypoint, image, environment, volumes, user, network_mode, health probe
            # command), so under a restrictive policy none is taken remotely.
            refuse_remote_command(self.infra.settings, "overriding a service's fields", "overrides")
        stream = self.infra.services.start(
            names, parallel=message.parallel, overrides=dict(message.overrides)
        )
        async for item in _relay(stream, cv.status_update_to_pb):
            yield item

    async def stop_services(self, message: env_pb.StopServicesRequest) -> env_pb.StopServicesResponse:
        names = _names(list(message.service_names), "service_names")
        timeout = _non_negative(message.timeout_seconds, "timeout_seconds")
        services = self.infra.services
        results = await (services.stop(names, timeout=timeout) if timeout else services.stop(names))
        ok = all(v in ("stopped", "not running", "ok") for v in results.values())
        return env_pb.StopServicesResponse(success=ok, service_results=dict(results))

    async def restart_service(self, message: env_pb.RestartServiceRequest) -> env_pb.RestartServiceResponse:
        if not message.service_name:
            raise SpecError("is required", field="service_name")
        validate_name(message.service_name, "service_name")
        timeout = _non_negative(message.timeout_seconds, "timeout_seconds")
        services, name = self.infra.services, message.service_name
        state = await (services.restart(name, timeout=timeout) if timeout else services.restart(name))
        return env_pb.RestartServiceResponse(
            success=str(state.status) in ("running", "healthy"),
            message=f"{state.name} is {state.status}",
        )

    async def get_services_status(
        self, message: env_pb.GetServicesStatusRequest
    ) -> env_pb.ServicesStatusResponse:
        names = _names(list(message.service_names), "service_names")
        states = await self.infra.services.status(names or None)
        return env_pb.ServicesStatusResponse(
            services={name: cv.service_state_to_pb(state) for name, state in states.items()}
        )

    async def stream_health(self, message: env_pb.StreamHealthRequest) -> AsyncIterator[env_pb.HealthUpdate]:
        names = _names(list(message.service_names), "service_names")
        if message.interval_seconds < 0:
            raise SpecError(f"must be >= 0, got {message.interval_seconds}", field="interval_seconds")
        stream = self.infra.services.health(names or None, interval=float(message.interval_seconds or 5))
        async for item in _relay(stream, cv.health_update_to_pb):
            yield item

    async def get_resource_availability(
        self, message: env_pb.GetResourceAvailabilityRequest
    ) -> env_pb.ResourceAvailabilityResponse:
        workload_class = message.workload_class or "cpu_short"
        classes = self.infra.scheduler.classes
        if workload_class not in classes:
            raise SpecError(
                f"unknown workload class {preview(workload_class)}",
                field="workload_class",
                fix="use one of " + ", ".join(sorted(classes)),
            )
        return cv.resources_to_pb(await self.infra.services.resources(workload_class))

    async def execute_task(self, message: env_pb.ExecuteTaskRequest) -> env_pb.ExecuteTaskResponse:
        # The old env manager ran tasks itself; here they go through the one scheduler.
        task_id = check_text(message.task_id, "task_id", allow_empty=True) or uuid.uuid4().hex
        workload_class = check_text(message.workload_class, "workload_class", allow_empty=True)
        timeout = _non_negative(message.timeout_seconds, "timeout_seconds")
        settings = self.infra.settings
        check_remote_payload(settings, message.payload, "payload")
        payload = remote_payload(message.payload)
        began = time.perf_counter()
        await self.infra.submit_task(task_id, workload_class or "cpu_short", payload, timeout=timeout)
        result = await self.infra.wait(task_id)
        latency_ms = (time.perf_counter() - began) * 1000.0
        return env_pb.ExecuteTaskResponse(
            success=result.status == TaskStatus.COMPLETED,
            result=cv.json_map(result.result),  # the old map only: JSON text for non-strings
            error=result.error,
            latency_ms=latency_ms,
        )

    async def pull_images(self, message: env_pb.PullImagesRequest) -> AsyncIterator[env_pb.ImagePullProgress]:
        images = list(message.image_names)
        for i, name in enumerate(images):
            if not name.strip():
                raise SpecError(
                    "is empty", field=f"image_names[{i}]", fix="name an image, e.g. redis:7-alpine"
                )
        # No names: every image of the service catalog (the manager's default).
        stream = self.infra.services.pull(images or None)
        async for item in _relay(stream, cv.pull_progress_to_pb):
            yield item

    async def stream_logs(self, message: env_pb.StreamLogsRequest) -> AsyncIterator[env_pb.LogEntry]:
        if not message.service_name:
            raise SpecError("is required", field="service_name")
        validate_name(message.service_name, "service_name")
        if message.tail < 0:
            raise SpecError(f"must be >= 0, got {message.tail}", field="tail", fix="use 0 for all lines")
        stream = self.infra.services.logs(
            message.service_name,
            follow=message.follow,
            tail=message.tail or None,
            since=float(message.since_timestamp) if message.since_timestamp > 0 else None,
        )
        async for item in _relay(stream, cv.log_entry_to_pb):
            yield item


# -- the guard: auth + error mapping for every call -------------------------------------------

_Handler = Callable[[grpclib.server.Stream[Any, Any]], Awaitable[None]]


def _guard(inner: _Handler, method_name: str, token: str | None, closing: asyncio.Event) -> _Handler:
    """``inner`` behind the bearer check, with every error mapped to a gRPC status.

    Wrapped once per method when the server is built (not per call through grpclib's
    ``RecvRequest`` event, which built an event object and a closure for every request)."""

    async def guarded(stream: grpclib.server.Stream[Any, Any]) -> None:
        if not bearer_matches(stream.metadata.get("authorization", "") if stream.metadata else "", token):
            raise GRPCError(
                Status.UNAUTHENTICATED,
                "authorization: missing or wrong bearer token"
                " (fix: send metadata 'authorization: Bearer <token>')",
            )
        _CALL.set(stream)
        try:
            await inner(stream)
        except _ClientGone:
            # One line per broken stream; grpclib sends nothing on a closed connection.
            log.info("%s: the client went away; stream ended", method_name)
            raise GRPCError(Status.CANCELLED, "client went away") from None
        except GRPCError as exc:
            raise to_grpc_error(exc) from None
        except asyncio.CancelledError:
            if not closing.is_set():
                raise  # the client went away or its deadline passed
            # The server is shutting down: end the call with a status the client can act
            # on (grpclib's cancellation alone leaves open streams hanging on the client).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            with contextlib.suppress(Exception):
                await stream.send_trailing_metadata(
                    status=Status.UNAVAILABLE,
                    status_message="server shutting down (fix: reconnect when it is back)",
                )
        except InfraError as exc:
            raise to_grpc_error(exc) from None
        except Exception as exc:
            log.exception("unexpected error in %s", method_name)
            raise to_grpc_error(exc) from None

    return guarded


class _Guarded:
    """A grpclib service whose every method is behind ``_guard``."""

    def __init__(self, service: Any, token: str | None, closing: asyncio.Event) -> None:
        self._mapping = {
            path: grpclib.const.Handler(
                _guard(h.func, path, token, closing), h.cardinality, h.request_type, h.reply_type
            )
            for path, h in service.__mapping__().items()
        }

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return self._mapping


# -- the server ----------------------------------------------------------------------------


class _RequestCodec(ProtoCodec):
    """grpclib's protobuf codec, but a request that does not decode is INVALID_ARGUMENT
    naming the message type, not INTERNAL with the parser's exception text."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            return super().decode(data, message_type)
        except Exception:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"request: not a valid {getattr(message_type, '__name__', 'protobuf')} message"
                f" ({len(data)} bytes) (fix: send a message built from the service's .proto)",
            ) from None


def build_grpc_server(
    services: list[Any], token: str | None, closing: asyncio.Event
) -> grpclib.server.Server:
    """A grpclib server for ``services`` plus ``grpc.health.v1``, every call behind the guard
    (token check, error mapping); ``closing`` is set when the owner shuts it down."""
    guarded = [_Guarded(service, token, closing) for service in [*services, Health()]]
    return grpclib.server.Server(guarded, codec=_RequestCodec())
