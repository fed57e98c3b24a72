"""gRPC clients: ``OrchestratorClient`` and ``EnvManagerClient`` (``RemoteInfra`` over them
is ``rpc/remote.py``).

The clients speak the wire contract and hand back dspy_infra's value classes; every grpclib
error is turned back into a dspy_infra error by ``from_grpc_error`` (the mirror of the
server's one status table), and a server that does not answer becomes ``Unavailable``
naming the address. ``RemoteInfra`` offers the embedded ``Infra``'s methods over those
clients, so application code does not care which one ``ensure_infra()`` returned.
"""

from __future__ import annotations

import json
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from ..api import TaskSubmitter
from ..errors import (
    InfraError,
    SpecError,
    Unavailable,
)
from ..models import (
    Event,
    HealthUpdate,
    ImagePullProgress,
    LogEntry,
    QueueStatus,
    ResourceAvailability,
    ServiceState,
    ServiceStatusUpdate,
    TaskResult,
    TaskSpec,
    TaskState,
    TaskStatus,
)
from ..values import check_json_object, json_text
from ..wire import from_grpc_error
from ..workflows.spec import RunState, RunUpdate, Workflow
from . import convert as cv
from ._gen.env_manager import v1 as env_pb
from ._gen.orchestrator import v1 as orch_pb

__all__ = [
    "EnvManagerClient",
    "OrchestratorClient",
    "from_grpc_error",
    "parse_addr",
]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])
_M = TypeVar("_M")

# -- errors ---------------------------------------------------------------------------------


def unreachable_error(addr: str, exc: BaseException) -> Unavailable:
    return Unavailable(
        f"no dspy-infra server answers at {addr} ({type(exc).__name__}: {exc})",
        field="addr",
        fix="start one with `dspy-infra serve`, or fix DSPY_INFRA_ADDR / the address",
    )


# -- connection ------------------------------------------------------------------------------


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (an optional ``grpc://`` prefix is allowed)."""
    text = addr.strip().removeprefix("grpc://")
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpecError(
            f"invalid server address {addr!r}",
            field="addr",
            fix="write it as host:port, e.g. 127.0.0.1:50052",
        )
    return host, int(port)


def client_ssl_context(tls: bool | str | ssl.SSLContext | None) -> ssl.SSLContext | None:
    if tls is None or tls is False:
        return None
    if isinstance(tls, ssl.SSLContext):
        ctx = tls
    else:
        ctx = ssl.create_default_context(cafile=tls if isinstance(tls, str) else None)
    ctx.set_alpn_protocols(["h2"])
    return ctx


class _Client:
    """A grpclib channel with the bearer token attached to every call."""

    def __init__(self, channel: Channel, addr: str, *, token: str | None, owns_channel: bool = True) -> None:
        self.channel = channel
        self.addr = addr
        self.metadata = {"authorization": f"Bearer {token}"} if token else {}
        self._owns_channel = owns_channel

    @classmethod
    def connect(
        cls, addr: str, *, token: str | None = None, tls: bool | str | ssl.SSLContext | None = None
    ) -> Self:
        """A client for ``addr`` (``host:port``). Connecting is lazy: the first call connects.
        ``tls``: True (system CAs), a CA file path, or an ``SSLContext``."""
        host, port = parse_addr(addr)
        return cls(Channel(host, port, ssl=client_ssl_context(tls)), addr, token=token)

    async def _unary(self, call: Awaitable[_T]) -> _T:
        try:
            return await call
        except GRPCError as exc:
            raise from_grpc_error(exc, self.addr) from None
        except (OSError, StreamTerminatedError, ProtocolError) as exc:
            raise unreachable_error(self.addr, exc) from None

    async def _stream(self, stream: AsyncIterator[_M], convert: Callable[[_M], _T]) -> AsyncIterator[_T]:
        try:
            async for message in stream:
                yield convert(message)
        except GRPCError as exc:
            raise from_grpc_error(exc, self.addr) from None
        except (OSError, StreamTerminatedError, ProtocolError) as exc:
            raise unreachable_error(self.addr, exc) from None
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _spec_bytes(spec: bytes | str | Mapping[str, Any]) -> bytes:
    if isinstance(spec, bytes):
        return spec
    if isinstance(spec, str):
        return spec.encode()
    return json.dumps(spec).encode()


# -- orchestrator ----------------------------------------------------------------------------


class OrchestratorClient(TaskSubmitter, _Client):
    """``orchestrator.v1.OrchestratorService`` client."""

    def __init__(self, channel: Channel, addr: str, *, token: str | None, owns_channel: bool = True) -> None:
        super().__init__(channel, addr, token=token, owns_channel=owns_channel)
        self.stub = orch_pb.OrchestratorServiceStub(channel, metadata=self.metadata)
        # The calls every task pays, with upb's messages (encoded and decoded in C), as the
        # server serves them (rpc/upb.py); the bytes are the same as betterproto2's. Made on
        # first use: upb loads google.protobuf, which most CLI commands never need.
        self._upb_calls: dict[str, UnaryUnaryMethod[Any, Any]] = {}

    def _upb_call(self, method: str, request: str, reply: str) -> UnaryUnaryMethod[Any, Any]:
        call = self._upb_calls.get(method)
        if call is None:
            upb = cv.upb_messages()
            route = f"/orchestrator.v1.OrchestratorService/{method}"
            call = UnaryUnaryMethod(self.channel, route, getattr(upb, request), getattr(upb, reply))
            self._upb_calls[method] = call
        return call

    async def health_check(self, *, timeout: float | None = None) -> dict[str, Any]:
        resp = await self._unary(self.stub.health(orch_pb.HealthRequest(), timeout=timeout))
        return health_doc(resp)

    async def get_metrics(self, names: Iterable[str] = ()) -> dict[str, float]:
        resp = await self._unary(self.stub.get_metrics(orch_pb.GetMetricsRequest(metric_names=list(names))))
        return dict(resp.metrics)

    async def submit(self, spec: TaskSpec) -> TaskState:
        submit_task = self._upb_call("SubmitTask", "SubmitTaskRequest", "SubmitTaskResponse")
        resp = await self._unary(submit_task(cv.submit_request_upb(spec), metadata=self.metadata))
        return TaskState(spec=spec, status=TaskStatus(resp.status or "pending"))

    async def submit_tasks(self, specs: Sequence[TaskSpec]) -> list[InfraError | None]:
        """Many tasks in one call (``SubmitTasks`` over its JSON bulk encoding). One entry per
        spec, in order: None if accepted, else the error that refused it (the others are
        accepted regardless)."""
        docs = [
            {
                "id": s.id,
                "class": s.task_class,
                "payload": s.payload,
                "priority": s.priority,
                "timeout": s.timeout,
                "max_attempts": s.max_attempts,
                "workflow_id": s.workflow_id,
            }
            for s in specs
        ]
        req = orch_pb.SubmitTasksRequest(tasks_json=json.dumps(docs).encode())
        resp = await self._unary(self.stub.submit_tasks(req))
        out: list[InfraError | None] = [None] * len(specs)
        for rejected in resp.rejected:
            status = Status(rejected.code) if rejected.code else Status.INVALID_ARGUMENT
            out[rejected.index] = from_grpc_error(GRPCError(status, rejected.error))
        return out

    async def get_task_status(self, task_id: str) -> TaskState:
        resp = await self._unary(self.stub.get_task_status(orch_pb.GetTaskStatusRequest(task_id=task_id)))
        return cv.task_state_from_pb(resp)

    async def cancel_task(self, task_id: str) -> TaskState:
        resp = await self._unary(self.stub.cancel_task(orch_pb.CancelTaskRequest(task_id=task_id)))
        return cv.task_state_from_pb(resp)

    async def list_tasks(
        self, *, status: str | None = None, limit: int = 100, workflow_id: str | None = None
    ) -> list[TaskState]:
        req = orch_pb.ListTasksRequest(status=status or "", limit=limit, workflow_id=workflow_id or "")
        resp = await self._unary(self.stub.list_tasks(req))
        return [cv.task_state_from_pb(t) for t in resp.tasks]

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult:
        req = orch_pb.WaitTaskRequest(task_id=task_id, timeout_seconds=timeout or 0.0)
        # The server enforces `timeout`; the call's own deadline only adds slack for the trip.
        resp = await self._unary(self.stub.wait_task(req, timeout=None if timeout is None else timeout + 5))
        return cv.task_result_from_pb(resp)

    async def task_log(self, task_id: str, attempt: int | None = None) -> str:
        """The task's log (its handler's output), of ``attempt`` or of the latest one."""
        req = orch_pb.GetTaskLogRequest(task_id=task_id, attempt=attempt or 0)
        resp = await self._unary(self.stub.get_task_log(req))
        return resp.log

    async def queue_status(self) -> dict[str, QueueStatus]:
        resp = await self._unary(self.stub.get_queue_status(orch_pb.GetQueueStatusRequest()))
        return {name: cv.queue_status_from_pb(q) for name, q in resp.queues.items()}

    def stream_results(
        self, task_ids: Sequence[str] | None = None, *, include_completed: bool = False
    ) -> AsyncIterator[TaskResult]:
        req = orch_pb.StreamTaskResultsRequest(
            task_ids=list(task_ids or ()), include_completed=include_completed
        )
        return self._stream(self.stub.stream_task_results(req), cv.task_result_from_pb)

    async def create_workflow(
        self, id: str, name: str = "", description: str = "", spec: bytes | str | Mapping[str, Any] = b""
    ) -> str:
        req = orch_pb.CreateWorkflowRequest(id=id, name=name, description=description, spec=_spec_bytes(spec))
        resp = await self._unary(self.stub.create_workflow(req))
        return resp.workflow_id

    async def start_workflow_run(
        self, workflow_id: str, *, input: Mapping[str, Any] | None = None, idempotency_key: str = ""
    ) -> str:
        req = orch_pb.StartWorkflowRunRequest(
            workflow_id=workflow_id,
            idempotency_key=idempotency_key,
            input_json=json_text(check_json_object(input, "input")),
        )
        resp = await self._unary(self.stub.start_workflow_run(req))
        return resp.run_id

    async def get_workflow_run(self, run_id: str) -> RunState:
        resp = await self._unary(self.stub.get_workflow_run(orch_pb.GetWorkflowRunRequest(run_id=run_id)))
        return cv.run_state_from_pb(resp)

    async def cancel_workflow_run(self, run_id: str) -> RunState:
        resp = await self._unary(self.stub.cancel_workflow_run(orch_pb.GetWorkflowRunRequest(run_id=run_id)))
        return cv.run_state_from_pb(resp)

    async def list_workflows(self) -> list[Workflow]:
        resp = await self._unary(self.stub.list_workflows(orch_pb.ListWorkflowsRequest()))
        return [cv.workflow_from_pb(w) for w in resp.workflows]

    async def list_workflow_runs(self, workflow_id: str | None = None, *, limit: int = 100) -> list[RunState]:
        req = orch_pb.ListWorkflowRunsRequest(workflow_id=workflow_id or "", limit=limit)
        resp = await self._unary(self.stub.list_workflow_runs(req))
        return [cv.run_state_from_pb(r) for r in resp.runs]

    def stream_workflow_status(self, run_id: str) -> AsyncIterator[RunUpdate]:
        req = orch_pb.StreamWorkflowStatusRequest(run_id=run_id)
        return self._stream(self.stub.stream_workflow_status(req), cv.run_update_from_pb)

    def stream_events(
        self, types: Iterable[str] | None = None, since: float | None = None
    ) -> AsyncIterator[Event]:
        # The wire carries whole seconds and 0 means "live only": ask from the second that
        # contains `since` (at least 1), then drop the events of that second before it.
        since_seconds = 0 if since is None else max(1, math.floor(since))
        req = orch_pb.StreamEventsRequest(event_types=list(types or ()), since_timestamp=since_seconds)
        events = self._stream(self.stub.stream_events(req), cv.event_from_pb)
        return events if since is None else _events_since(events, since)

    async def submit_and_wait(self, spec: TaskSpec, timeout: float | None = None) -> TaskResult:
        """Submit ``spec`` and wait for its result in one call (``SubmitAndWait``): one round
        trip instead of ``submit`` then ``wait``. Idempotent by id like ``submit``."""
        submit_and_wait = self._upb_call("SubmitAndWait", "SubmitAndWaitRequest", "TaskResult")
        req = cv.upb_messages().SubmitAndWaitRequest(
            task=cv.submit_request_upb(spec), timeout_seconds=timeout or 0.0
        )
        # The server enforces `timeout`; the call's own deadline only adds slack for the trip.
        call = submit_and_wait(req, timeout=None if timeout is None else timeout + 5, metadata=self.metadata)
        # (task_result_from_pb reads upb's message as betterproto2's: the same field names)
        return cv.task_result_from_pb(await self._unary(call))


def health_doc(resp: orch_pb.HealthResponse) -> dict[str, Any]:
    """``Infra.health()``'s dict from a ``HealthResponse``, plus the server's identity
    (``owner``, ``home``, ``backend``; empty from a server older than those fields)."""
    return {
        "healthy": resp.healthy,
        "version": resp.version,
        "services": dict(resp.services),
        "owner": resp.owner,
        "home": resp.home,
        "backend": resp.backend,
    }


async def _events_since(events: AsyncIterator[Event], since: float) -> AsyncIterator[Event]:
    try:
        async for event in events:
            if event.timestamp >= since or event.type == "events_dropped":
                yield event
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


# -- env manager ------------------------------------------------------------------------------


class EnvManagerClient(_Client):
    """``env_manager.v1.EnvManagerService`` client."""

    def __init__(self, channel: Channel, addr: str, *, token: str | None, owns_channel: bool = True) -> None:
        super().__init__(channel, addr, token=token, owns_channel=owns_channel)
        self.stub = env_pb.EnvManagerServiceStub(channel, metadata=self.metadata)

    def start_services(
        self, names: Sequence[str], *, parallel: bool = True, overrides: Mapping[str, str] | None = None
    ) -> AsyncIterator[ServiceStatusUpdate]:
        req = env_pb.StartServicesRequest(
            service_names=list(names), parallel=parallel, overrides=dict(overrides or {})
        )
        return self._stream(self.stub.start_services(req), cv.status_update_from_pb)

    async def stop_services(
        self, names: Sequence[str] = (), *, timeout: float | None = None
    ) -> dict[str, str]:
        req = env_pb.StopServicesRequest(service_names=list(names), timeout_seconds=round(timeout or 0))
        resp = await self._unary(self.stub.stop_services(req))
        return dict(resp.service_results)

    async def restart_service(self, name: str, *, timeout: float | None = None) -> tuple[bool, str]:
        req = env_pb.RestartServiceRequest(service_name=name, timeout_seconds=round(timeout or 0))
        resp = await self._unary(self.stub.restart_service(req))
        return resp.success, resp.message

    async def get_services_status(self, names: Sequence[str] | None = None) -> dict[str, ServiceState]:
        req = env_pb.GetServicesStatusRequest(service_names=list(names or ()))
        resp = await self._unary(self.stub.get_services_status(req))
        return {name: cv.service_state_from_pb(s) for name, s in resp.services.items()}

    def stream_health(
        self, names: Sequence[str] | None = None, *, interval: float = 5.0
    ) -> AsyncIterator[HealthUpdate]:
        req = env_pb.StreamHealthRequest(
            service_names=list(names or ()), interval_seconds=max(1, round(interval))
        )
        return self._stream(self.stub.stream_health(req), cv.health_update_from_pb)

    async def get_resource_availability(self, workload_class: str = "cpu_short") -> ResourceAvailability:
        req = env_pb.GetResourceAvailabilityRequest(workload_class=workload_class)
        return cv.resources_from_pb(await self._unary(self.stub.get_resource_availability(req)))

    async def execute_task(
        self,
        task_id: str,
        workload_class: str = "cpu_short",
        payload: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> env_pb.ExecuteTaskResponse:
        req = env_pb.ExecuteTaskRequest(
            task_id=task_id,
            workload_class=workload_class,
            # The old string map only: a string as is, any other JSON value as its JSON text.
            payload=cv.json_map(check_json_object(payload, "payload")),
            timeout_seconds=round(timeout or 0),
        )
        return await self._unary(self.stub.execute_task(req))

    def pull_images(self, images: Sequence[str]) -> AsyncIterator[ImagePullProgress]:
        req = env_pb.PullImagesRequest(image_names=list(images))
        return self._stream(self.stub.pull_images(req), cv.pull_progress_from_pb)

    def stream_logs(
        self, name: str, *, follow: bool = False, tail: int | None = None, since: float | None = None
    ) -> AsyncIterator[LogEntry]:
        req = env_pb.StreamLogsRequest(
            service_name=name, follow=follow, tail=tail or 0, since_timestamp=int(since or 0)
        )
        return self._stream(self.stub.stream_logs(req), cv.log_entry_from_pb)


# -- RemoteInfra -------------------------------------------------------------------------------
