"""``RemoteInfra``: the ``InfraAPI`` over gRPC, for a ``dspy-infra serve`` elsewhere, and
``RemoteServices``, the service manager's names over the env manager client.

Application code does not care which one ``ensure_infra()`` returned: mypy proves that
``RemoteInfra`` and the embedded ``Infra`` both satisfy ``api.InfraAPI``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Self, TypeVar

import anyio
from anyio.abc import AsyncResource
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from ..api import TaskSubmitter
from ..config import Settings
from ..errors import (
    FailedPrecondition,
    NotFound,
    ServiceError,
    Unauthenticated,
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
)
from ..services.handles import ServiceHandle
from ..wire import from_grpc_error
from ..workflows.spec import RunState, RunUpdate, Workflow
from ._gen.orchestrator import v1 as orch_pb
from .client import EnvManagerClient, OrchestratorClient, client_ssl_context, parse_addr, unreachable_error

__all__ = ["RemoteInfra", "RemoteServices"]

_F = TypeVar("_F", bound=Callable[..., Any])


class RemoteServices:
    """The ServiceManager's method names over an ``EnvManagerClient``.

    ``services["redis"]`` returns the handle of a service this client started (``ensure``) or
    looked up (``get``, ``status``) before: indexing cannot ask the server (it is not a
    coroutine); ``await services.get("redis")`` always asks."""

    def __init__(self, client: EnvManagerClient) -> None:
        self.client = client
        self._handles: dict[str, ServiceHandle] = {}

    def _remember(self, states: Mapping[str, ServiceState]) -> None:
        for name, state in states.items():
            if str(state.status) in ("stopped", "failed") or not state.instance_id:
                self._handles.pop(name, None)
            else:
                self._handles[name] = ServiceHandle.from_state(state, log_source=self.logs)

    def __getitem__(self, name: str) -> ServiceHandle:
        handle = self._handles.get(name)
        if handle is None:
            raise NotFound(
                f"service {name!r} is not known to be running on {self.client.addr}",
                field="service_name",
                fix=f"await infra.services.get({name!r}) asks the server; ensure_services starts it",
            )
        return handle

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._handles

    def endpoint(self, name: str, container_port: int | None = None) -> tuple[str, int]:
        """``(host, port)`` of a known service, as ``ServiceManager.endpoint``."""
        handle = self[name]
        if container_port is None:
            return handle.host, handle.port
        if container_port not in handle.ports:
            raise NotFound(
                f"service {name!r} does not publish port {container_port}",
                field="container_port",
                fix="use one of: " + (", ".join(str(p) for p in handle.ports) or "(none)"),
            )
        return handle.host, handle.ports[container_port]

    async def get(self, name: str) -> ServiceHandle:
        """The handle of ``name`` as it runs on the server now; ``NotFound`` when it is not."""
        states = await self.client.get_services_status([name])
        self._remember(states)
        state = states.get(name)
        if name not in self._handles:
            status = state.status if state is not None else "unknown"
            raise NotFound(
                f"service {name!r} is {status} on {self.client.addr}",
                field="service_name",
                fix=f"start it first: await infra.ensure_services([{name!r}])",
            )
        return self._handles[name]

    def start(
        self,
        names: Sequence[str] | None = None,
        *,
        parallel: bool = True,
        overrides: Mapping[str, str] | None = None,
        keep: bool | None = None,
    ) -> AsyncIterator[ServiceStatusUpdate]:
        """Start ``names`` on the server. ``keep`` is the server's to decide: ``dspy-infra
        serve`` keeps its services running across its restarts unless ``--stop-services``."""
        del keep
        return self.client.start_services(names or (), parallel=parallel, overrides=overrides)

    async def ensure(self, names: Sequence[str]) -> list[str]:
        """Start ``names`` (and dependencies) on the server; raise if one does not come up."""
        final: dict[str, ServiceStatusUpdate] = {}
        async for update in self.start(names):
            final[update.service_name] = update
        bad = {n: u for n, u in final.items() if str(u.status) in ("unhealthy", "failed", "stopped")}
        if bad:
            name, update = next(iter(bad.items()))
            raise ServiceError(f"service {name!r} is {update.status}: {update.message}", service=name)
        if final:
            self._remember(await self.client.get_services_status(list(final)))
        return list(final)

    async def stop(
        self, names: Sequence[str] | None = None, *, timeout: float | None = None
    ) -> dict[str, str]:
        """Stop ``names``; no names stops every service of the server's owner."""
        names = names or ()
        results = await self.client.stop_services(names, timeout=timeout)
        for name in list(self._handles) if not names else names:
            self._handles.pop(name, None)
        return results

    async def restart(self, name: str, *, timeout: float | None = None) -> ServiceState:
        await self.client.restart_service(name, timeout=timeout)
        return (await self.client.get_services_status([name]))[name]

    async def status(self, names: Sequence[str] | None = None) -> dict[str, ServiceState]:
        states = await self.client.get_services_status(names)
        self._remember(states)
        return states

    def logs(
        self, name: str, *, follow: bool = False, tail: int | None = None, since: float | None = None
    ) -> AsyncIterator[LogEntry]:
        return self.client.stream_logs(name, follow=follow, tail=tail, since=since)

    def health(
        self, names: Sequence[str] | None = None, *, interval: float = 5.0
    ) -> AsyncIterator[HealthUpdate]:
        return self.client.stream_health(names, interval=interval)

    def pull(self, images: Sequence[str]) -> AsyncIterator[ImagePullProgress]:
        return self.client.pull_images(images)

    async def resources(self, workload_class: str = "cpu_short") -> ResourceAvailability:
        return await self.client.get_resource_availability(workload_class)


class RemoteInfra(TaskSubmitter, AsyncResource):
    """The embedded ``Infra``'s interface, served by a ``dspy-infra serve`` elsewhere."""

    #: Which kind ``ensure_infra()`` returned: "remote" here, "embedded" for an ``Infra``.
    mode = "remote"

    def __init__(
        self,
        orchestrator: OrchestratorClient,
        env_manager: EnvManagerClient,
        settings: Settings | None = None,
    ) -> None:
        self.orchestrator = orchestrator
        self.env_manager = env_manager
        self.services = RemoteServices(env_manager)
        self.addr = orchestrator.addr
        self.location = f"the server at {self.addr}"
        #: The client's settings (what it connected with), not the server's.
        self.settings = settings if settings is not None else Settings()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        addr: str,
        *,
        token: str | None = None,
        required: bool,
        tls: bool | str | ssl.SSLContext | None = None,
        timeout: float | None = None,
        settings: Settings | None = None,
    ) -> RemoteInfra | None:
        """Connect and check the server answers within ``timeout`` (default 0.5 s when a miss
        is fine, 5 s when ``required``). When nothing answers: None if not ``required``, else
        ``Unavailable`` naming the address and the fix. A server that answers but refuses the
        token raises ``Unauthenticated`` either way."""
        host, port = parse_addr(addr)
        if timeout is None:
            timeout = 5.0 if required else 0.5
        channel = Channel(host, port, ssl=client_ssl_context(tls))
        orchestrator = OrchestratorClient(channel, addr, token=token, owns_channel=True)
        try:
            with anyio.fail_after(timeout):
                await orchestrator.stub.health(orch_pb.HealthRequest(), timeout=timeout)
        except GRPCError as exc:
            if exc.status == Status.UNAUTHENTICATED:
                channel.close()
                raise Unauthenticated(
                    f"the server at {addr} refused the token",
                    field="token",
                    fix="set DSPY_INFRA_TOKEN to the server's token",
                ) from None
            channel.close()
            if required:
                raise from_grpc_error(exc, addr) from None
            return None
        except Exception as exc:
            channel.close()
            if required:
                raise unreachable_error(addr, exc) from None
            return None
        env_manager = EnvManagerClient(channel, addr, token=token, owns_channel=False)
        return cls(orchestrator, env_manager, settings)

    @property
    def running(self) -> bool:
        return not self._closed

    async def aclose(self) -> None:
        self._closed = True
        self.env_manager.close()
        self.orchestrator.close()

    async def __aenter__(self) -> Self:
        return self

    # -- services --------------------------------------------------------------------------

    async def ensure_services(self, names: Sequence[str], *, keep: bool = False) -> None:
        """Start ``names`` on the server; ``keep`` is the server's to decide (its services
        outlive its restarts unless it runs with ``--stop-services``)."""
        await self.services.ensure(names)

    def handler(self, name: str) -> Callable[[_F], _F]:
        """Handlers run where the scheduler runs: in the server process, not here."""
        raise FailedPrecondition(
            f"cannot register handler {name!r} on a remote infra ({self.addr})",
            field="handler",
            fix="register it in the server process (a plugin's dspy_infra_handlers hook),"
            " or use an embedded infra (mode='embedded')",
        )

    # -- tasks ------------------------------------------------------------------------------

    async def submit(self, spec: TaskSpec) -> TaskState:
        return await self.orchestrator.submit(spec)

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult:
        return await self.orchestrator.wait(task_id, timeout)

    async def task_log(self, task_id: str, attempt: int | None = None) -> str:
        return await self.orchestrator.task_log(task_id, attempt)

    async def get_task(self, task_id: str) -> TaskState:
        return await self.orchestrator.get_task_status(task_id)

    async def cancel(self, task_id: str) -> TaskState:
        return await self.orchestrator.cancel_task(task_id)

    async def list_tasks(
        self, *, status: str | None = None, limit: int = 100, workflow_id: str | None = None
    ) -> list[TaskState]:
        """Newest first, optionally only one status and/or the steps of one workflow run."""
        return await self.orchestrator.list_tasks(status=status, limit=limit, workflow_id=workflow_id)

    def stream_results(
        self, task_ids: Sequence[str] | None = None, *, include_completed: bool = False
    ) -> AsyncIterator[TaskResult]:
        return self.orchestrator.stream_results(task_ids, include_completed=include_completed)

    def events(self, types: Iterable[str] | None = None, since: float | None = None) -> AsyncIterator[Event]:
        return self.orchestrator.stream_events(types, since)

    async def queue_status(self) -> dict[str, QueueStatus]:
        return await self.orchestrator.queue_status()

    async def drain(self, grace: float | None = None) -> None:
        """Nothing to wait for here: the server keeps running tasks."""
        del grace

    async def health(self) -> dict[str, Any]:
        return await self.orchestrator.health_check()

    # -- workflows ---------------------------------------------------------------------------

    async def create_workflow(
        self, id: str, name: str = "", description: str = "", spec: Any = None
    ) -> Workflow:
        created = await self.orchestrator.create_workflow(
            id, name, description, b"" if spec is None else spec
        )
        for workflow in await self.orchestrator.list_workflows():
            if workflow.id == created:
                return workflow
        raise NotFound(f"workflow {created!r} was created but is not listed", field="id")  # pragma: no cover

    async def start_run(
        self, workflow_id: str, *, input: Mapping[str, Any] | None = None, idempotency_key: str = ""
    ) -> str:
        return await self.orchestrator.start_workflow_run(
            workflow_id, input=input, idempotency_key=idempotency_key
        )

    async def get_run(self, run_id: str) -> RunState:
        return await self.orchestrator.get_workflow_run(run_id)

    async def list_workflows(self) -> list[Workflow]:
        return await self.orchestrator.list_workflows()

    async def list_runs(self, workflow_id: str | None = None, *, limit: int = 100) -> list[RunState]:
        return await self.orchestrator.list_workflow_runs(workflow_id, limit=limit)

    def run_status(self, run_id: str) -> AsyncIterator[RunUpdate]:
        return self.orchestrator.stream_workflow_status(run_id)

    async def cancel_run(self, run_id: str) -> RunState:
        return await self.orchestrator.cancel_workflow_run(run_id)

    # -- additions ---------------------------------------------------------------------------

    async def submit_and_wait(self, spec: TaskSpec, timeout: float | None = None) -> TaskResult:
        """Submit ``spec`` and wait for its result in one round trip (``SubmitAndWait``)."""
        return await self.orchestrator.submit_and_wait(spec, timeout)
