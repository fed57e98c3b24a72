"""``InfraAPI``: the one interface an application, the CLI, the pytest plugin and the HTTP
app program against, whichever infra ``ensure_infra()`` returned.

Two classes satisfy it: ``infra.Infra`` (embedded: the components run in this process) and
``rpc.remote.RemoteInfra`` (the same calls over gRPC to a ``dspy-infra serve``). The same
names, the same sync/async-ness and the same return types on both are proven by mypy (see
the assignments at the end of ``ensure.py``), so code written against one runs against the
other. Anything only an embedded infra has (its scheduler, its event bus, its metrics
registry) is not part of this interface; the servers that need it take an ``Infra``.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from .config import Settings
from .models import (
    Event,
    LogEntry,
    QueueStatus,
    ResourceAvailability,
    ServiceState,
    ServiceStatusUpdate,
    TaskResult,
    TaskSpec,
    TaskState,
)
from .services.handles import ServiceHandle
from .workflows.spec import RunState, RunUpdate, Workflow

__all__ = ["HandlerFn", "InfraAPI", "ServicesAPI", "TaskSubmitter"]

#: A function ``@infra.handler(name)`` registers: ``async def handler(ctx) -> dict``.
HandlerFn = TypeVar("HandlerFn", bound=Callable[..., Awaitable[Mapping[str, Any]]])


class TaskSubmitter(abc.ABC):
    """``submit_task(id, class, payload, ...)``, written once for every side that can
    ``submit(spec)`` (the embedded infra, the remote infra, the orchestrator client): the
    fields become a ``TaskSpec`` here, which checks them before anything is queued or sent."""

    @abc.abstractmethod
    async def submit(self, spec: TaskSpec) -> TaskState:
        """Submit one task (idempotent by id: the same content returns the existing task)."""

    async def submit_task(
        self,
        id: str,
        task_class: str = "cpu_short",
        payload: Mapping[str, Any] | None = None,
        *,
        priority: int = 0,
        timeout: float | None = None,
        max_attempts: int = 1,
        workflow_id: str = "",
    ) -> TaskState:
        spec = TaskSpec(
            id=id,
            task_class=task_class,
            payload=dict(payload or {}),
            priority=priority,
            timeout=timeout,
            max_attempts=max_attempts,
            workflow_id=workflow_id,
        )
        return await self.submit(spec)


class ServicesAPI(Protocol):
    """``infra.services``: the service manager (embedded) or its gRPC face (remote)."""

    def start(
        self,
        names: Sequence[str] | None = None,
        *,
        parallel: bool = True,
        overrides: Mapping[str, str] | None = None,
        keep: bool | None = None,
    ) -> AsyncIterator[ServiceStatusUpdate]: ...

    async def ensure(self, names: Sequence[str]) -> list[str]: ...

    async def stop(self, names: Sequence[str] | None = None, *, timeout: float = 10.0) -> dict[str, str]: ...

    async def restart(self, name: str, *, timeout: float = 10.0) -> ServiceState: ...

    async def status(self, names: Sequence[str] | None = None) -> dict[str, ServiceState]: ...

    def logs(
        self, name: str, *, follow: bool = False, tail: int | None = None, since: float | None = None
    ) -> AsyncIterator[LogEntry]: ...

    async def get(self, name: str) -> ServiceHandle: ...

    def __getitem__(self, name: str) -> ServiceHandle: ...

    def __contains__(self, name: object) -> bool: ...

    def endpoint(self, name: str, container_port: int | None = None) -> tuple[str, int]: ...

    async def resources(self, workload_class: str) -> ResourceAvailability: ...


class InfraAPI(Protocol):
    """What ``ensure_infra()`` returns. Every call that does I/O is a coroutine (or an async
    iterator for streams) on both kinds; ``handler`` is the one plain call."""

    @property
    def mode(self) -> str:
        """ "embedded" (components in this process) or "remote" (a server elsewhere)."""
        ...

    @property
    def location(self) -> str:
        """Where the state lives, for messages: the state directory, or the server's address."""
        ...

    @property
    def settings(self) -> Settings:
        """The settings this side was built from (a remote infra: the client's own)."""
        ...

    @property
    def services(self) -> ServicesAPI: ...

    @property
    def running(self) -> bool: ...

    async def aclose(self) -> None: ...

    # -- services -------------------------------------------------------------------------

    async def ensure_services(self, names: Sequence[str], *, keep: bool = False) -> None: ...

    # -- tasks ----------------------------------------------------------------------------

    async def submit(self, spec: TaskSpec) -> TaskState: ...

    async def submit_task(
        self,
        id: str,
        task_class: str = "cpu_short",
        payload: Mapping[str, Any] | None = None,
        *,
        priority: int = 0,
        timeout: float | None = None,
        max_attempts: int = 1,
        workflow_id: str = "",
    ) -> TaskState: ...

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult: ...

    async def get_task(self, task_id: str) -> TaskState: ...

    async def cancel(self, task_id: str) -> TaskState: ...

    async def list_tasks(
        self, *, status: str | None = None, limit: int = 100, workflow_id: str | None = None
    ) -> list[TaskState]: ...

    async def task_log(self, task_id: str, attempt: int | None = None) -> str: ...

    def stream_results(
        self, task_ids: Sequence[str] | None = None, *, include_completed: bool = False
    ) -> AsyncIterator[TaskResult]: ...

    def events(
        self, types: Iterable[str] | None = None, since: float | None = None
    ) -> AsyncIterator[Event]: ...

    async def queue_status(self) -> dict[str, QueueStatus]: ...

    async def drain(self, grace: float | None = None) -> None:
        """Let running tasks finish (up to ``grace`` seconds; default ``shutdown_grace``) and
        start nothing new. A remote infra's server keeps running tasks: nothing to wait for."""
        ...

    def handler(self, name: str) -> Callable[[HandlerFn], HandlerFn]: ...

    # -- workflows ------------------------------------------------------------------------

    async def create_workflow(
        self, id: str, name: str = "", description: str = "", spec: Any = None
    ) -> Workflow: ...

    async def start_run(
        self, workflow_id: str, *, input: Mapping[str, Any] | None = None, idempotency_key: str = ""
    ) -> str: ...

    async def get_run(self, run_id: str) -> RunState: ...

    async def list_workflows(self) -> list[Workflow]: ...

    async def list_runs(self, workflow_id: str | None = None, *, limit: int = 100) -> list[RunState]: ...

    def run_status(self, run_id: str) -> AsyncIterator[RunUpdate]: ...

    async def cancel_run(self, run_id: str) -> RunState: ...

    # -- health ---------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]: ...
