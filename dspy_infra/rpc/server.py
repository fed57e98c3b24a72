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
import contextvars
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
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.health.service import Health

from ..config import Settings
from ..errors import (
    AlreadyExists,
    BackendUnavailable,
    DeadlineExceeded,
    FailedPrecondition,
    InfraError,
    MissingBinary,
    NotFound,
    PermissionDenied,
    ServiceError,
    SpecError,
    Unauthenticated,
    Unavailable,
)
from ..models import TaskSpec, TaskStatus, validate_name
from ..values import (
    INT32_MAX,
    INT32_MIN,
    MAX_ID_LENGTH,
    MAX_JSON_DEPTH,
    check_finite,
    check_int,
    check_json_object,
    check_text,
    preview,
)
from . import convert as cv
from ._gen.env_manager import v1 as env_pb
from ._gen.orchestrator import v1 as orch_pb

if TYPE_CHECKING:
    from aiohttp import web

    from ..infra import Infra

__all__ = [
    "COMMAND_HANDLERS",
    "MAX_ERROR_MESSAGE",
    "TASK_JSON_KEYS",
    "EnvManagerService",
    "InfraServer",
    "OrchestratorService",
    "check_bind",
    "check_remote_payload",
    "error_message",
    "grpc_status_for",
    "json_task_list",
    "refuse_remote_command",
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
    # The request was fine; this machine cannot honour it (binary not installed, a service's
    # port taken, a service that never became healthy): the client must change something.
    (MissingBinary, Status.FAILED_PRECONDITION),
    (ServiceError, Status.FAILED_PRECONDITION),  # also HealthCheckFailed
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


#: Longest error text a response carries (gRPC trailer, HTTP error body, rejected task).
#: Errors echo only a ``preview`` of bad input, so this is a last line of defence: grpclib
#: percent-encodes the trailer on the event loop, and a 400k-character message held the loop
#: for 20 s (and broke the client's header limit, which then saw RESOURCE_EXHAUSTED).
MAX_ERROR_MESSAGE = 1024
#: What a client sees for an error that is not a dspy_infra error (the log has the details).
INTERNAL_MESSAGE = "internal error (fix: see the server log; this is a bug, please report it)"


def error_message(exc: BaseException) -> str:
    """The text a client sees for ``exc``: ``str(exc)`` of our errors, cut to
    ``MAX_ERROR_MESSAGE``; never the text or class of an unexpected exception."""
    if not isinstance(exc, InfraError):
        return INTERNAL_MESSAGE
    text = str(exc)
    if len(text) > MAX_ERROR_MESSAGE:
        text = text[: MAX_ERROR_MESSAGE - 40] + f"... ({len(text)} characters)"
    return text


def to_grpc_error(exc: BaseException) -> GRPCError:
    """A ``GRPCError`` whose message names the field and the fix (bounded, no internals)."""
    if isinstance(exc, GRPCError):
        if exc.message is not None and len(exc.message) > MAX_ERROR_MESSAGE:
            return GRPCError(exc.status, exc.message[:MAX_ERROR_MESSAGE])
        return exc
    return GRPCError(grpc_status_for(exc), error_message(exc))


def _rejected(index: int, task_id: str, exc: InfraError) -> orch_pb.RejectedTask:
    return orch_pb.RejectedTask(
        index=index,
        task_id=task_id if len(task_id) <= MAX_ID_LENGTH else task_id[:MAX_ID_LENGTH],
        error=error_message(exc),
        code=grpc_status_for(exc).value,
    )


# -- who may run commands (Settings.exec_policy) ----------------------------------------------

#: Handlers whose payload names something to run: ``exec`` runs a command, ``container`` runs
#: any image with any command. Under exec_policy "embedded" or "deny" remote clients may not
#: submit them.
COMMAND_HANDLERS = frozenset({"exec", "container"})


def refuse_remote_command(settings: Settings, what: str, field: str) -> None:
    """Raise ``PermissionDenied`` when a remote client (gRPC, HTTP) asks to run a command
    and ``settings.exec_policy`` allows that only to the owning process (or nobody)."""
    if settings.exec_policy == "allow":
        return
    raise PermissionDenied(
        f"{what} is refused for remote clients under exec_policy = {settings.exec_policy!r}",
        field=field,
        fix="run commands from the Python API of the process that owns the infra,"
        ' or set exec_policy = "allow" if every client that can reach the server may run commands',
    )


def _runs_command(payload: Mapping[str, Any]) -> bool:
    handler = payload.get("handler")
    return isinstance(handler, str) and (handler in COMMAND_HANDLERS or "{{" in handler)


def check_remote_payload(settings: Settings, payload: Mapping[str, Any], field: str) -> None:
    """Refuse a remote task whose handler runs commands (see ``refuse_remote_command``)."""
    if _runs_command(payload):
        handler = payload.get("handler")
        refuse_remote_command(settings, f"a task with handler {preview(handler)}", f"{field}.handler")


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
            f"refusing to bind {preview(settings.host)} (not loopback) without a token",
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


#: Largest ``SubmitTasks.tasks_json`` (grpclib refuses bigger messages anyway: 4 MiB).
MAX_TASKS_JSON_BYTES = 4 << 20
#: Keys of a task written as JSON (POST /queue/submit, SubmitTasks.tasks_json).
TASK_JSON_KEYS = ("id", "class", "payload", "priority", "timeout", "max_attempts", "workflow_id")
_TASK_JSON_KEY_SET = frozenset(TASK_JSON_KEYS)


def json_task_list(raw: bytes, field: str, *, max_bytes: int) -> list[Any]:
    """A JSON array of task objects (``SubmitTasks.tasks_json``): size, UTF-8 and nesting
    are checked for the whole text; each entry's values are checked by ``spec_from_doc``, so
    one bad task is rejected alone, as in the ``tasks`` field."""
    if len(raw) > max_bytes:
        raise SpecError(
            f"is {len(raw)} bytes, the limit is {max_bytes}", field=field, fix="send fewer tasks per call"
        )
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecError(f"is not UTF-8 (byte {exc.start})", field=field, fix="send UTF-8 JSON") from None
    except RecursionError:
        raise SpecError(
            f"is nested more than {MAX_JSON_DEPTH} levels deep", field=field, fix="flatten the tasks"
        ) from None
    except ValueError as exc:
        # json.JSONDecodeError: its text names line and column only, never the input.
        raise SpecError(
            f"is not valid JSON: {str(exc)[:120]}", field=field, fix='send [{"payload": {...}}, ...]'
        ) from None
    if not isinstance(doc, list):
        raise SpecError(
            f"expected a JSON array of tasks, got {preview(doc)}",
            field=field,
            fix='send [{"payload": {...}}, ...]',
        )
    return doc


def remote_payload(value: Any, field: str = "payload") -> dict[str, Any]:
    """A payload from a client, checked for what the store and the wire hold (text, numbers,
    nesting, key length). Its size is left to the scheduler's ``max_payload_bytes`` check, so
    that rule (and its message) lives in one place; the request itself is already bounded
    (HTTP body limit, gRPC message limit)."""
    return check_json_object(value, field, max_bytes=_UNBOUNDED)


#: No size bound of our own in ``remote_payload`` (see there).
_UNBOUNDED = 1 << 62


def spec_from_doc(doc: Any, *, generate_id: bool) -> TaskSpec:
    """A ``TaskSpec`` from a task written as JSON: ``{"id"?, "class"?, "payload", ...}``.
    A missing class means ``cpu_short``; a missing id is generated only if ``generate_id``.
    Every field is checked against what the store and the wire hold, naming the field."""
    if not isinstance(doc, Mapping):
        raise SpecError(
            f"expected a JSON object, got {preview(doc)}", field="body", fix='send {"payload": {...}}'
        )
    unknown = sorted(str(k) for k in doc.keys() - _TASK_JSON_KEY_SET)
    if unknown:
        raise SpecError(
            f"unknown key {preview(unknown[0])}",
            field=unknown[0][:64],
            fix="use " + ", ".join(TASK_JSON_KEYS),
        )
    task_id = doc.get("id")
    task_id = "" if task_id is None else check_text(task_id, "id", allow_empty=True)
    if not task_id and generate_id:
        task_id = uuid.uuid4().hex
    task_class = doc.get("class")
    task_class = "cpu_short" if task_class is None else check_text(task_class, "class", allow_empty=True)
    payload = remote_payload(doc.get("payload"))
    priority = doc.get("priority")
    timeout = doc.get("timeout")
    max_attempts = doc.get("max_attempts")
    workflow_id = doc.get("workflow_id")
    return TaskSpec(
        id=task_id,
        task_class=task_class or "cpu_short",
        payload=payload,
        priority=0 if priority is None else check_int(priority, "priority", lo=INT32_MIN, hi=INT32_MAX),
        timeout=None if timeout is None else check_finite(timeout, "timeout", lo=0, lo_open=True),
        max_attempts=1 if max_attempts is None else check_int(max_attempts, "max_attempts", lo=1, hi=100),
        workflow_id="" if workflow_id is None else check_text(workflow_id, "workflow_id", allow_empty=True),
    )


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
        settings = self.infra.settings
        # Decode first (payload_json or the old map), then apply the command policy to what
        # was decoded: checking only the old map would let payload_json bypass exec_policy.
        payload = remote_payload(cv.submit_request_payload(req, max_payload_bytes=settings.max_payload_bytes))
        check_remote_payload(settings, payload, "payload")
        return TaskSpec(
            id=check_text(req.id, "id"),
            task_class=check_text(req.class_, "class", allow_empty=True) or "cpu_short",
            payload=payload,
            priority=req.priority,
            timeout=_non_negative(req.timeout_seconds, "timeout_seconds"),
            max_attempts=check_int(req.max_attempts or 1, "max_attempts", lo=1, hi=100),
            workflow_id=check_text(req.workflow_id, "workflow_id", allow_empty=True),
        )

    def _spec_from_json(self, doc: Any, index: int) -> TaskSpec:
        spec = spec_from_doc(doc, generate_id=False)
        check_remote_payload(self.infra.settings, spec.payload, f"tasks_json[{index}].payload")
        return spec

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
            tasks = json_task_list(message.tasks_json, "tasks_json", max_bytes=MAX_TASKS_JSON_BYTES)
            for i, doc in enumerate(tasks):
                if i % 256 == 255:
                    await asyncio.sleep(0)  # a long list must not hold the loop
                try:
                    good.append((index, self._spec_from_json(doc, i)))
                except InfraError as exc:
                    task_id = doc.get("id") if isinstance(doc, dict) else None
                    rejected.append(_rejected(index, task_id if isinstance(task_id, str) else "", exc))
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
        states = await self.infra.list_tasks(status=status, limit=message.limit or 100)
        return orch_pb.ListTasksResponse(tasks=[cv.task_state_to_pb(s) for s in states])

    async def wait_task(self, message: orch_pb.WaitTaskRequest) -> orch_pb.TaskResult:
        task_id = _known_id(message.task_id, "task_id", "task")
        timeout = _non_negative(message.timeout_seconds, "timeout_seconds")
        return cv.task_result_to_pb(await self.infra.wait(task_id, timeout))

    async def get_queue_status(self, message: orch_pb.GetQueueStatusRequest) -> orch_pb.QueueStatusResponse:
        queues = self.infra.queue_status()
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
                if _runs_command(step.payload) and step_input_keys(step):
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
            # Every override field can change what runs (command, image, environment, volumes,
            # health probe command), so under a restrictive policy none is taken remotely.
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
            _CALL.set(stream)
            try:
                await inner(stream)
            except _ClientGone:
                # One line per broken stream; grpclib sends nothing on a closed connection.
                log.info("%s: the client went away; stream ended", event.method_name)
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
                log.exception("unexpected error in %s", event.method_name)
                raise to_grpc_error(exc) from None

        event.method_func = guarded

    return on_request


# -- InfraServer ---------------------------------------------------------------------------


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


def _listen(host: str, port: int, field: str = "port") -> socket.socket:
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
            field=field,
            fix=f"set {field} to a free port (0 = any free port) or stop what uses {port}",
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
                [OrchestratorService(self.infra), env_manager], self.settings.grpc_port, tls, "grpc_port"
            )
            # The env manager also answers on its own port, as the old stack's did (unless
            # configured onto the same port, where it is already served).
            if self.settings.env_manager_port and self.settings.env_manager_port == self.settings.grpc_port:
                self.env_manager_port = self.grpc_port
            else:
                self.env_manager_port = await self._serve_grpc(
                    [env_manager], self.settings.env_manager_port, tls, "env_manager_port"
                )

            self._http = web.AppRunner(build_app(self.infra, self.settings), access_log=None)
            await self._http.setup()
            sock = _listen(self.host, self.settings.http_port, "http_port")
            self.http_port = sock.getsockname()[1]
            await web.SockSite(self._http, sock, ssl_context=tls).start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _serve_grpc(
        self, services: list[Any], port: int, tls: ssl.SSLContext | None, field: str
    ) -> int:
        """Serve ``services`` + grpc.health.v1 behind the guard on ``port``; the bound port."""
        server = grpclib.server.Server([*services, Health()], codec=_RequestCodec())
        grpclib.events.listen(server, grpclib.events.RecvRequest, _guard(self.settings.token, self._closing))
        sock = _listen(self.host, port, field)
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
            # A server's services outlive it unless --stop-services: its next start adopts them.
            infra.services.keep_by_default = not stop_services
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
