"""gRPC servers (grpclib + betterproto2) over an ``Infra``, and ``dspy-infra serve``.

``InfraServer(infra, settings)`` is an async context manager: on entry it serves
``orchestrator.v1.OrchestratorService``, ``env_manager.v1.EnvManagerService`` and the
standard ``grpc.health.v1.Health`` on ``settings.grpc_port``, the env manager again on
``settings.env_manager_port`` (the old stack's separate port), and the HTTP app on
``settings.http_port``; on exit it stops them all. Port 0 binds a free port; the bound
ports are the attributes ``grpc_port``, ``env_manager_port`` and ``http_port``.

Every gRPC call passes through one grpclib ``RecvRequest`` hook (``_guard``) which checks
the bearer token and wraps the handler so that any dspy_infra error becomes a gRPC status
decided by ``grpc_status_for`` -- the one place errors map to status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import signal
import socket
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar

import anyio
import grpclib.const
import grpclib.events
import grpclib.server
from anyio.abc import AsyncResource
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.service import Health

from ..config import Settings
from ..errors import (
    AlreadyExists,
    BackendUnavailable,
    DeadlineExceeded,
    FailedPrecondition,
    InfraError,
    NotFound,
    PermissionDenied,
    SpecError,
    Unauthenticated,
    Unavailable,
)
from ..models import TaskSpec, TaskStatus, validate_name
from . import _convert as cv
from ._gen.env_manager import v1 as env_pb
from ._gen.orchestrator import v1 as orch_pb

if TYPE_CHECKING:
    from aiohttp import web

    from ..infra import Infra

__all__ = [
    "TASK_JSON_KEYS",
    "EnvManagerService",
    "InfraServer",
    "OrchestratorService",
    "check_bind",
    "grpc_status_for",
    "run_server",
    "server_ssl_context",
    "spec_from_doc",
    "to_grpc_error",
]

log = logging.getLogger("dspy_infra.rpc")
_In = TypeVar("_In")
#: Seconds InfraServer.aclose waits for connections to close after cancelling the calls.
_CLOSE_TIMEOUT = 5.0
_Out = TypeVar("_Out")

# -- the one error -> status table ----------------------------------------------------------

#: First match wins, so subclasses come before their bases.
_STATUS_BY_ERROR: tuple[tuple[type[BaseException], Status], ...] = (
    (SpecError, Status.INVALID_ARGUMENT),  # also ConfigError, CycleError
    (NotFound, Status.NOT_FOUND),
    (AlreadyExists, Status.ALREADY_EXISTS),
    (FailedPrecondition, Status.FAILED_PRECONDITION),  # also ResourceUnavailable
    (Unavailable, Status.UNAVAILABLE),
    (BackendUnavailable, Status.UNAVAILABLE),
    (DeadlineExceeded, Status.DEADLINE_EXCEEDED),
    (Unauthenticated, Status.UNAUTHENTICATED),
    (PermissionDenied, Status.PERMISSION_DENIED),
)


def grpc_status_for(exc: BaseException) -> Status:
    """The gRPC status for an exception (INTERNAL for anything not in the table)."""
    for cls, status in _STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return Status.INTERNAL


def to_grpc_error(exc: BaseException) -> GRPCError:
    """A ``GRPCError`` whose message is ``str(exc)``: it names the field and the fix."""
    if isinstance(exc, GRPCError):
        return exc
    status = grpc_status_for(exc)
    message = str(exc) if isinstance(exc, InfraError) else f"{type(exc).__name__}: {exc}"
    return GRPCError(status, message)


def _rejected(index: int, task_id: str, exc: InfraError) -> orch_pb.RejectedTask:
    return orch_pb.RejectedTask(index=index, task_id=task_id, error=str(exc), code=grpc_status_for(exc).value)


# -- checks at the edge ----------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or "" (all interfaces)


def check_bind(settings: Settings) -> None:
    """Refuse to serve on a non-loopback address without a token."""
    if not _is_loopback(settings.host) and not settings.token:
        raise SpecError(
            f"refusing to bind {settings.host!r} (not loopback) without a token",
            field="host",
            fix="set token (DSPY_INFRA_TOKEN) or bind 127.0.0.1",
        )
    if bool(settings.tls_cert) != bool(settings.tls_key):
        missing = "tls_key" if settings.tls_cert else "tls_cert"
        raise SpecError("TLS needs both a certificate and a key", field=missing, fix=f"set {missing}")


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS context for both servers when ``tls_cert``/``tls_key`` are set (HTTP/2 via ALPN)."""
    if not settings.tls_cert or not settings.tls_key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SpecError(
            f"cannot load certificate/key: {exc}", field="tls_cert", fix="point tls_cert/tls_key at PEM files"
        ) from None
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def _names(values: list[str], field: str) -> list[str]:
    for i, name in enumerate(values):
        validate_name(name, f"{field}[{i}]")
    return list(values)


def _non_negative(value: float, field: str) -> float | None:
    if value < 0:
        raise SpecError(f"must be >= 0, got {value!r}", field=field, fix="use 0 for no limit")
    return value or None


#: Keys of a task written as JSON (POST /queue/submit, SubmitTasks.tasks_json).
TASK_JSON_KEYS = ("id", "class", "payload", "priority", "timeout", "max_attempts", "workflow_id")
_TASK_JSON_KEY_SET = frozenset(TASK_JSON_KEYS)


def _json_array(raw: bytes, field: str) -> list[Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"invalid JSON: {exc}", field=field) from None
    if not isinstance(doc, list):
        raise SpecError(f"expected a JSON array of tasks, got {type(doc).__name__}", field=field)
    return doc


def _typed(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = doc.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise SpecError(f"must be a {names}, got {type(value).__name__}", field=key)
    return value


def spec_from_doc(doc: Any, *, generate_id: bool) -> TaskSpec:
    """A ``TaskSpec`` from a task written as JSON: ``{"id"?, "class"?, "payload", ...}``.
    A missing class means ``cpu_short``; a missing id is generated only if ``generate_id``."""
    if not isinstance(doc, dict):
        raise SpecError(f"expected a JSON object, got {type(doc).__name__}", field="body")
    unknown = sorted(doc.keys() - _TASK_JSON_KEY_SET)
    if unknown:
        raise SpecError(
            f"unknown key {unknown[0]!r}", field=unknown[0], fix="use " + ", ".join(TASK_JSON_KEYS)
        )
    task_id = _typed(doc, "id", str, "")
    if not task_id and generate_id:
        task_id = uuid.uuid4().hex
    payload = doc.get("payload")
    if payload is not None and not isinstance(payload, dict):
        raise SpecError(f"must be an object of strings, got {type(payload).__name__}", field="payload")
    return TaskSpec(
        id=task_id,
        task_class=_typed(doc, "class", str, "") or "cpu_short",
        payload=payload or {},
        priority=_typed(doc, "priority", int, 0),
        timeout=_typed(doc, "timeout", (int, float), None),
        max_attempts=_typed(doc, "max_attempts", int, 1),
        workflow_id=_typed(doc, "workflow_id", str, ""),
    )


async def _relay(stream: AsyncIterator[_In], convert: Callable[[_In], _Out]) -> AsyncIterator[_Out]:
    """Convert a stream's items; close the source when the call ends (client gone, cancel)."""
    try:
        async for item in stream:
            yield convert(item)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


# -- services ----------------------------------------------------------------------------


class OrchestratorService(orch_pb.OrchestratorServiceBase):
    """``orchestrator.v1.OrchestratorService`` over an Infra."""

    def __init__(self, infra: Infra) -> None:
        self.infra = infra

    async def submit_task(self, message: orch_pb.SubmitTaskRequest) -> orch_pb.SubmitTaskResponse:
        state = await self.infra.scheduler.submit(self._spec(message))
        return orch_pb.SubmitTaskResponse(success=True, task_id=state.id, status=str(state.status))

    def _spec(self, req: orch_pb.SubmitTaskRequest) -> TaskSpec:
        # TaskSpec checks the id; the scheduler checks class, payload size and GPU needs
        # before anything changes (one place for each rule).
        return TaskSpec(
            id=req.id,
            task_class=req.class_ or "cpu_short",
            payload=cv.submit_request_payload(req, max_payload_bytes=self.infra.settings.max_payload_bytes),
            priority=req.priority,
            timeout=_non_negative(req.timeout_seconds, "timeout_seconds"),
            max_attempts=req.max_attempts or 1,
            workflow_id=req.workflow_id,
        )

    async def submit_tasks(self, message: orch_pb.SubmitTasksRequest) -> orch_pb.SubmitTasksResponse:
        # A bad task fails alone (its error names the field); the others go in. All valid
        # specs go to the scheduler as one batch (one group commit); if the scheduler refuses
        # the batch, each goes alone so that only the bad ones fail.
        rejected: list[orch_pb.RejectedTask] = []
        good: list[tuple[int, TaskSpec]] = []
        index = 0
        for req in message.tasks:
            try:
                good.append((index, self._spec(req)))
            except InfraError as exc:
                rejected.append(_rejected(index, req.id, exc))
            index += 1
        if message.tasks_json:
            for doc in _json_array(message.tasks_json, "tasks_json"):
                try:
                    good.append((index, spec_from_doc(doc, generate_id=False)))
                except InfraError as exc:
                    task_id = doc.get("id") if isinstance(doc, dict) else None
                    rejected.append(_rejected(index, str(task_id or ""), exc))
                index += 1
        scheduler = self.infra.scheduler
        try:
            await scheduler.submit_many([spec for _, spec in good])
        except InfraError:
            for i, spec in good:
                try:
                    await scheduler.submit(spec)
                except InfraError as exc:
                    rejected.append(_rejected(i, spec.id, exc))
            rejected.sort(key=lambda r: r.index)
        return orch_pb.SubmitTasksResponse(accepted=index - len(rejected), rejected=rejected)

    async def stream_task_results(
        self, message: orch_pb.StreamTaskResultsRequest
    ) -> AsyncIterator[orch_pb.TaskResult]:
        stream = self.infra.stream_results(
            list(message.task_ids) or None, include_completed=message.include_completed
        )
        async for item in _relay(stream, cv.task_result_to_pb):
            yield item

    async def get_task_status(self, message: orch_pb.GetTaskStatusRequest) -> orch_pb.GetTaskStatusResponse:
        if not message.task_id:
            raise SpecError("is required", field="task_id")
        return cv.task_state_to_pb(await self.infra.get_task(message.task_id))

    async def cancel_task(self, message: orch_pb.CancelTaskRequest) -> orch_pb.GetTaskStatusResponse:
        if not message.task_id:
            raise SpecError("is required", field="task_id")
        return cv.task_state_to_pb(await self.infra.cancel(message.task_id))

    async def list_tasks(self, message: orch_pb.ListTasksRequest) -> orch_pb.ListTasksResponse:
        status = message.status or None
        if status is not None and status not in {s.value for s in TaskStatus}:
            raise SpecError(
                f"unknown status {status!r}",
                field="status",
                fix="use one of " + ", ".join(s.value for s in TaskStatus),
            )
        if message.limit < 0:
            raise SpecError(f"must be >= 0, got {message.limit}", field="limit")
        states = await self.infra.list_tasks(status=status, limit=message.limit or 100)
        return orch_pb.ListTasksResponse(tasks=[cv.task_state_to_pb(s) for s in states])

    async def wait_task(self, message: orch_pb.WaitTaskRequest) -> orch_pb.TaskResult:
        if not message.task_id:
            raise SpecError("is required", field="task_id")
        timeout = _non_negative(message.timeout_seconds, "timeout_seconds")
        return cv.task_result_to_pb(await self.infra.wait(message.task_id, timeout))

    async def get_queue_status(self, message: orch_pb.GetQueueStatusRequest) -> orch_pb.QueueStatusResponse:
        queues = self.infra.queue_status()
        return orch_pb.QueueStatusResponse(queues={k: cv.queue_status_to_pb(q) for k, q in queues.items()})

    async def create_workflow(self, message: orch_pb.CreateWorkflowRequest) -> orch_pb.CreateWorkflowResponse:
        if not message.id:
            raise SpecError("is required", field="id", fix="give the workflow a unique, non-empty id")
        try:
            spec = message.spec.decode()
        except UnicodeDecodeError:
            raise SpecError("is not UTF-8 JSON", field="spec") from None
        await self.infra.create_workflow(message.id, message.name, message.description, spec)
        return orch_pb.CreateWorkflowResponse(success=True, workflow_id=message.id)

    async def start_workflow_run(
        self, message: orch_pb.StartWorkflowRunRequest
    ) -> orch_pb.StartWorkflowRunResponse:
        if not message.workflow_id:
            raise SpecError("is required", field="workflow_id")
        run_id = await self.infra.start_run(
            message.workflow_id,
            input=cv.run_input_from_pb(message, max_payload_bytes=self.infra.settings.max_payload_bytes),
            idempotency_key=message.idempotency_key,
        )
        return orch_pb.StartWorkflowRunResponse(success=True, run_id=run_id)

    async def get_workflow_run(self, message: orch_pb.GetWorkflowRunRequest) -> orch_pb.WorkflowStatusUpdate:
        if not message.run_id:
            raise SpecError("is required", field="run_id")
        return cv.run_update_to_pb(await self.infra.get_run(message.run_id))

    async def cancel_workflow_run(
        self, message: orch_pb.GetWorkflowRunRequest
    ) -> orch_pb.WorkflowStatusUpdate:
        if not message.run_id:
            raise SpecError("is required", field="run_id")
        return cv.run_update_to_pb(await self.infra.cancel_run(message.run_id))

    async def stream_workflow_status(
        self, message: orch_pb.StreamWorkflowStatusRequest
    ) -> AsyncIterator[orch_pb.WorkflowStatusUpdate]:
        if not message.run_id:
            raise SpecError("is required", field="run_id")
        stream = self.infra.run_status(message.run_id)
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
                f"unknown workload class {workload_class!r}",
                field="workload_class",
                fix="use one of " + ", ".join(sorted(classes)),
            )
        return cv.resources_to_pb(await self.infra.services.resources(workload_class))

    async def execute_task(self, message: env_pb.ExecuteTaskRequest) -> env_pb.ExecuteTaskResponse:
        # The old env manager ran tasks itself; here they go through the one scheduler.
        task_id = message.task_id or uuid.uuid4().hex
        timeout = _non_negative(message.timeout_seconds, "timeout_seconds")
        began = time.perf_counter()
        await self.infra.submit_task(
            task_id, message.workload_class or "cpu_short", message.payload, timeout=timeout
        )
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


def _guard(
    token: str | None, closing: asyncio.Event
) -> Callable[[grpclib.events.RecvRequest], Coroutine[Any, Any, None]]:
    expected = f"Bearer {token}".encode() if token else None

    async def on_request(event: grpclib.events.RecvRequest) -> None:
        inner: _Handler = event.method_func
        authorized = True
        if expected is not None:
            given = event.metadata.get("authorization", "")
            given_bytes = given.encode() if isinstance(given, str) else bytes(given)
            authorized = hmac.compare_digest(given_bytes, expected)

        async def guarded(stream: grpclib.server.Stream[Any, Any]) -> None:
            if not authorized:
                raise GRPCError(
                    Status.UNAUTHENTICATED,
                    "authorization: missing or wrong bearer token"
                    " (fix: send metadata 'authorization: Bearer <token>')",
                )
            try:
                await inner(stream)
            except GRPCError:
                raise
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
                log.exception("unexpected error in %s", event.method_name)
                raise to_grpc_error(exc) from None

        event.method_func = guarded

    return on_request


# -- InfraServer ---------------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Created with proto=IPPROTO_TCP on purpose: asyncio only sets
    TCP_NODELAY on accepted sockets whose proto says TCP, and without it every response
    waits ~40 ms for Nagle + delayed ACK (``socket.create_server`` leaves proto 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise Unavailable(
            f"cannot listen on {host}:{port}: {exc.strerror}",
            field="port",
            fix="choose a free port (0 = any) or stop what uses it",
        ) from None
    return sock


class InfraServer(AsyncResource):
    """gRPC (both services + health) and HTTP servers for one Infra, as an async context manager."""

    def __init__(self, infra: Infra, settings: Settings | None = None) -> None:
        self.infra = infra
        self.settings = settings if settings is not None else infra.settings
        self.grpc_port = 0
        self.env_manager_port = 0
        self.http_port = 0
        self._grpc: list[grpclib.server.Server] = []
        self._http: web.AppRunner | None = None
        self._closing = asyncio.Event()

    @property
    def host(self) -> str:
        return self.settings.host

    async def __aenter__(self) -> Self:
        from aiohttp import web

        from ..http import build_app

        check_bind(self.settings)
        tls = server_ssl_context(self.settings)
        try:
            env_manager = EnvManagerService(self.infra)
            self.grpc_port = await self._serve_grpc(
                [OrchestratorService(self.infra), env_manager], self.settings.grpc_port, tls
            )
            # The env manager also answers on its own port, as the old stack's did (unless
            # configured onto the same port, where it is already served).
            if self.settings.env_manager_port and self.settings.env_manager_port == self.settings.grpc_port:
                self.env_manager_port = self.grpc_port
            else:
                self.env_manager_port = await self._serve_grpc(
                    [env_manager], self.settings.env_manager_port, tls
                )

            self._http = web.AppRunner(build_app(self.infra, self.settings), access_log=None)
            await self._http.setup()
            sock = _listen(self.host, self.settings.http_port)
            self.http_port = sock.getsockname()[1]
            await web.SockSite(self._http, sock, ssl_context=tls).start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _serve_grpc(self, services: list[Any], port: int, tls: ssl.SSLContext | None) -> int:
        """Serve ``services`` + grpc.health.v1 behind the guard on ``port``; the bound port."""
        server = grpclib.server.Server([*services, Health()])
        grpclib.events.listen(server, grpclib.events.RecvRequest, _guard(self.settings.token, self._closing))
        sock = _listen(self.host, port)
        self._grpc.append(server)
        await server.start(sock=sock, ssl=tls)
        return int(sock.getsockname()[1])

    async def aclose(self) -> None:
        """Stop accepting and end the calls in progress (streams end; clients see UNAVAILABLE)."""
        http, self._http = self._http, None
        if http is not None:
            await http.cleanup()
        servers, self._grpc = self._grpc, []
        self._closing.set()
        for server in servers:
            server.close()
        # Handlers were cancelled; on Python >= 3.12 wait_closed also waits for idle client
        # connections to go away, which a connected client need never do: bound the wait.
        with anyio.move_on_after(_CLOSE_TIMEOUT):
            for server in servers:
                with contextlib.suppress(Exception):
                    await server.wait_closed()


# -- dspy-infra serve ------------------------------------------------------------------------


async def run_server(
    settings: Settings,
    *,
    stop_services: bool = False,
    on_ready: Callable[[InfraServer], None] | None = None,
) -> int:
    """Run an embedded Infra with its servers until SIGTERM/SIGINT, then shut down gracefully:
    stop accepting, give running tasks ``settings.shutdown_grace`` seconds to finish (the rest
    stay durable for the next start), and stop the services only when ``stop_services``.
    Prints one ``dspy-infra serving ...`` line with the bound addresses when ready."""
    from ..infra import Infra

    check_bind(settings)  # refuse before starting anything
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Infra(settings) as infra:
            async with InfraServer(infra, settings) as server:
                scheme = "https" if settings.tls_cert else "http"
                print(
                    f"dspy-infra serving grpc={server.host}:{server.grpc_port}"
                    f" env_manager={server.host}:{server.env_manager_port}"
                    f" http={scheme}://{server.host}:{server.http_port}",
                    flush=True,
                )
                if on_ready is not None:
                    on_ready(server)
                await stop.wait()
                print(
                    f"dspy-infra: stopping: no new requests; running tasks get up to"
                    f" {settings.shutdown_grace:g} s to finish (the rest stay stored for the next start)"
                    + (", then services stop" if stop_services else "; services keep running"),
                    file=sys.stderr,
                    flush=True,
                )
            # Servers are closed: nothing new comes in. Let running tasks finish.
            drain = getattr(infra.scheduler, "drain", None)
            if drain is not None:
                await drain(settings.shutdown_grace)
            if stop_services:
                running = await infra.services.status()
                names = [n for n, st in running.items() if str(st.status) not in ("stopped", "failed")]
                if names:
                    await infra.services.stop(names)
    except InfraError as exc:
        print(f"dspy-infra: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0
