"""Infra: the embedded ``InfraAPI``. Owns the scheduler, the service manager, workflows and
(when given one) the server that serves them.

``ensure_infra()`` (``ensure.py``) returns the process-wide shared instance: an embedded
``Infra`` or a ``RemoteInfra`` with the same methods over gRPC.

Ownership: every component is an async context manager that owns its background tasks.
``Infra`` enters them all inside one *owner task* and leaves them in reverse order when
``aclose()`` is called, whichever task calls it. (anyio task groups must be entered and left
by the same task, and ``ensure_infra()`` / ``shutdown_infra()`` are often called from
different tasks, so the owner task is what makes structured concurrency hold here.)
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import anyio.to_thread
from anyio.abc import AsyncResource

from .api import HandlerFn, TaskSubmitter
from .config import Settings, load_settings
from .errors import NotFound, Unavailable
from .events import EventBus
from .metrics import InfraMetrics
from .models import Event, QueueStatus, ServiceSpec, TaskResult, TaskSpec, TaskState
from .plugins import build_plugin_manager
from .version import __version__
from .workflows.spec import RunState, RunUpdate, Workflow

if TYPE_CHECKING:
    from .backends.base import Backend
    from .scheduler.scheduler import Scheduler
    from .services.manager import ServiceManager
    from .workflows import WorkflowEngine

__all__ = ["Infra", "ServerFactory"]

#: What ``Infra.start(server=...)`` enters once the components run (``serve.InfraServer``):
#: called with the infra and its settings, it serves them until the infra closes.
ServerFactory = Callable[["Infra", Settings], AbstractAsyncContextManager[Any]]


_log = logging.getLogger("dspy_infra")


class Infra(TaskSubmitter, AsyncResource):
    """Embedded infrastructure. ``async with Infra(...) as infra:`` or ``await infra.start()``."""

    #: Which kind ``ensure_infra()`` returned: "embedded" here, "remote" for a RemoteInfra.
    mode = "embedded"

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        backend: Backend | str | None = None,
        plugins: Iterable[Any] = (),
        services: Iterable[ServiceSpec] = (),
        load_entry_points: bool = True,
    ) -> None:
        self.settings = settings if settings is not None else load_settings()
        self.home: Path = self.settings.resolved_home()
        self.bus = EventBus()
        self.metrics = InfraMetrics()
        self.plugins = build_plugin_manager(plugins, load_entry_points=load_entry_points)
        self._backend_arg = backend
        self._extra_services = list(services)
        self._scheduler: Scheduler | None = None
        self._services: ServiceManager | None = None
        self._workflows: WorkflowEngine | None = None
        self._owner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._ready: asyncio.Future[None] | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._owner_pid = os.getpid()
        self.location = f"the state directory {self.home}"
        self.servers: list[Any] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def start(
        self, services: Sequence[str] = (), *, server: ServerFactory | None = None, keep: bool = False
    ) -> Self:
        """Start the components (and the named services, with their dependencies; ``keep``:
        see ``ensure_services``); ``server`` (``serve.InfraServer``) serves them to other
        processes until this infra closes."""
        if self._owner is None:
            if self._closed:
                raise Unavailable("this Infra was closed", fix="create a new Infra")
            loop = asyncio.get_running_loop()
            self._loop = loop
            self._owner_pid = os.getpid()
            self._ready = loop.create_future()
            self._owner = asyncio.create_task(self._own(server), name="dspy_infra-owner")
            await asyncio.shield(self._ready)
            _watch_at_exit(self)
        if services:
            await self.ensure_services(services, keep=keep)
        return self

    async def _own(self, server: ServerFactory | None) -> None:
        assert self._ready is not None
        # Loop callbacks (retry timers, the attempt gate) start tasks through anyio outside
        # any task; with sniffio installed anyio knows the library there only from this
        # variable, which every task and callback of the components inherits from here.
        with contextlib.suppress(ImportError):
            import sniffio

            sniffio.current_async_library_cvar.set("asyncio")
        from .scheduler.scheduler import Scheduler
        from .services.manager import ServiceManager
        from .workflows import WorkflowEngine

        try:
            async with contextlib.AsyncExitStack() as stack:
                self.home.mkdir(parents=True, exist_ok=True)
                self._services = await stack.enter_async_context(
                    ServiceManager(
                        self.settings,
                        bus=self.bus,
                        metrics=self.metrics,
                        plugins=self.plugins,
                        backend=self._backend_arg,
                        extra_services=self._extra_services,
                        queue_status=self._queue_status,
                    )
                )
                # Pushed here, so it runs after the scheduler has drained (tasks still running
                # at shutdown keep their services) and before the manager closes.
                stack.push_async_callback(self._stop_services_on_exit)
                self._scheduler = await stack.enter_async_context(
                    Scheduler(self.settings, bus=self.bus, metrics=self.metrics, plugins=self.plugins)
                )
                self._workflows = await stack.enter_async_context(
                    WorkflowEngine(self.settings, scheduler=self._scheduler, bus=self.bus)
                )
                if server is not None:
                    self.servers.append(await stack.enter_async_context(server(self, self.settings)))
                self.plugins.hook.dspy_infra_started(infra=self)
                self._ready.set_result(None)
                await self._stop.wait()
                self.plugins.hook.dspy_infra_stopping(infra=self)
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
                return
            raise

    async def _stop_services_on_exit(self) -> None:
        services = self._services
        if services is not None:
            owned = [n for n in services.owned if not services.is_kept(n)]
            if owned:
                await services.stop(owned)

    def _stop_services_at_exit(self) -> None:
        """The ``atexit`` path: the app ended without ``aclose()`` (no shutdown call, an
        exception, Ctrl-C). Stops what this Infra started (not what was kept)."""
        services = self._services
        if self._owner is None or services is None or not services.owned:
            return
        if os.getpid() != self._owner_pid:
            return  # a forked child exiting: the services are its parent's
        loop = self._loop
        if loop is not None and loop.is_running() and not loop.is_closed():
            # Its loop still runs in another thread (ensure_infra_sync): close it there.
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout=30)
            return
        services.stop_blocking([n for n in services.owned if not services.is_kept(n)])
        services.owned.clear()

    async def aclose(self) -> None:
        """Stop servers, workflows, scheduler (running tasks stay durable) and owned services."""
        self._closed = True
        owner, self._owner = self._owner, None
        if owner is None:
            return
        self._stop.set()
        await owner

    async def __aenter__(self) -> Self:
        return await self.start()

    @property
    def running(self) -> bool:
        return self._owner is not None and not self._owner.done()

    def _need(self, component: Any, what: str) -> Any:
        if component is None or not self.running:
            raise Unavailable(f"infra is not running ({what} unavailable)", fix="await infra.start() first")
        return component

    @property
    def scheduler(self) -> Scheduler:
        return self._need(self._scheduler, "scheduler")

    @property
    def services(self) -> ServiceManager:
        return self._need(self._services, "service manager")

    @property
    def workflows(self) -> WorkflowEngine:
        return self._need(self._workflows, "workflows")

    # -- services --------------------------------------------------------------------------

    async def ensure_services(self, names: Sequence[str], *, keep: bool = False) -> None:
        """Start ``names`` and their dependencies. They are stopped when this Infra closes (as
        is every service started through it without ``keep``: over gRPC, by the CLI), or
        when the process exits without closing it (``atexit``); a process killed outright
        leaves them to the next infra on this state directory, which reaps them. ``keep=True``
        leaves them running for later runs, which adopt them (``dspy-infra down`` stops them)."""
        await self.services.ensure(list(names), keep=keep)

    # -- tasks -----------------------------------------------------------------------------

    async def submit(self, spec: TaskSpec) -> TaskState:
        return await self.scheduler.submit(spec)

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult:
        return await self.scheduler.wait(task_id, timeout=timeout)

    async def get_task(self, task_id: str) -> TaskState:
        return await self.scheduler.get(task_id)

    async def cancel(self, task_id: str) -> TaskState:
        return await self.scheduler.cancel(task_id)

    async def list_tasks(
        self, *, status: str | None = None, limit: int = 100, workflow_id: str | None = None
    ) -> list[TaskState]:
        """Newest first, optionally only one status and/or the steps of one workflow run."""
        return await self.scheduler.list_tasks(status=status, limit=limit, workflow_id=workflow_id)

    async def task_log(self, task_id: str, attempt: int | None = None) -> str:
        """The output the task's commands wrote (``exec`` handler): every kept attempt, each
        under an ``=== attempt N ===`` line, or only ``attempt``. ``""`` when the task wrote
        none (another handler, or not started yet). Bounded: see docs/tasks.md.

        Raises ``NotFound`` for an unknown task, or an attempt whose log is not kept.
        """
        from .scheduler.task_logs import log_root, read_task_log
        from .values import check_int, check_text, preview

        check_text(task_id, "task_id")
        if attempt is not None:
            check_int(attempt, "attempt", lo=1)
        await self.scheduler.get(task_id)  # NotFound for an unknown task
        text = await anyio.to_thread.run_sync(read_task_log, log_root(self.settings), task_id, attempt)
        if text is None:
            raise NotFound(
                f"task {preview(task_id)} has no log of attempt {attempt}",
                field="attempt",
                fix="omit it to read every kept attempt (the last few attempts of a task are kept)",
            )
        return text

    def stream_results(
        self, task_ids: Sequence[str] | None = None, *, include_completed: bool = False
    ) -> AsyncIterator[TaskResult]:
        return self.scheduler.stream_results(task_ids, include_completed=include_completed)

    def events(self, types: Iterable[str] | None = None, since: float | None = None) -> AsyncIterator[Event]:
        return self.bus.subscribe(types, since)

    async def queue_status(self) -> dict[str, QueueStatus]:
        return self._queue_status()

    def _queue_status(self) -> dict[str, QueueStatus]:
        return self.scheduler.queue_status() if self._scheduler is not None else {}

    async def drain(self, grace: float | None = None) -> None:
        """Start nothing new; give running tasks ``grace`` seconds (default
        ``shutdown_grace``) to finish. The rest stay stored for the next start."""
        await self.scheduler.drain(self.settings.shutdown_grace if grace is None else grace)

    def handler(self, name: str) -> Callable[[HandlerFn], HandlerFn]:
        """Decorator: ``@infra.handler("embed") async def embed(ctx) -> dict``."""

        def register(fn: HandlerFn) -> HandlerFn:
            self.scheduler.register_handler(name, fn)
            return fn

        return register

    # -- workflows -------------------------------------------------------------------------

    async def create_workflow(
        self, id: str, name: str = "", description: str = "", spec: Any = None
    ) -> Workflow:
        return await self.workflows.create_workflow(id, name, description, spec)

    async def start_run(
        self, workflow_id: str, *, input: Mapping[str, Any] | None = None, idempotency_key: str = ""
    ) -> str:
        return await self.workflows.start_run(workflow_id, input=input, idempotency_key=idempotency_key)

    async def get_run(self, run_id: str) -> RunState:
        return await self.workflows.get_run(run_id)

    async def list_workflows(self) -> list[Workflow]:
        return await self.workflows.list_workflows()

    async def list_runs(self, workflow_id: str | None = None, *, limit: int = 100) -> list[RunState]:
        """Runs with their steps, newest first."""
        return await self.workflows.list_runs(workflow_id, limit=limit)

    def run_status(self, run_id: str) -> AsyncIterator[RunUpdate]:
        return self.workflows.run_status(run_id)

    async def cancel_run(self, run_id: str) -> RunState:
        return await self.workflows.cancel_run(run_id)

    # -- health ----------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """``{"healthy": bool, "version": str, "services": {name: status}}``."""
        services: dict[str, str] = {}
        if self._services is not None and self.running:
            services = {name: str(st.status) for name, st in (await self._services.status()).items()}
        bad = {"unhealthy", "failed"}
        return {
            "healthy": self.running and not (set(services.values()) & bad),
            "version": __version__,
            "services": services,
        }


# -- nothing outlives its owner -----------------------------------------------------------------

_at_exit: weakref.WeakSet[Infra] = weakref.WeakSet()
_at_exit_lock = threading.Lock()
_at_exit_registered = False


def _watch_at_exit(infra: Infra) -> None:
    """Stop ``infra``'s services when the interpreter exits without ``aclose()``."""
    global _at_exit_registered
    with _at_exit_lock:
        _at_exit.add(infra)
        if not _at_exit_registered:
            atexit.register(_stop_all_at_exit)
            _at_exit_registered = True


def _stop_all_at_exit() -> None:
    for infra in list(_at_exit):
        infra._stop_services_at_exit()
