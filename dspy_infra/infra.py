"""Infra: owns the scheduler, the service manager, workflows and (optionally) the servers.

``ensure_infra()`` returns the process-wide shared instance: an embedded ``Infra`` or a
``RemoteInfra`` with the same methods over gRPC (a named server, or this app's own; see its
docstring).

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
import functools
import logging
import os
import signal
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import anyio.to_thread
from anyio.abc import AsyncResource

from . import __version__
from .config import Settings, load_settings
from .errors import FailedPrecondition, NotFound, SpecError, Unauthenticated, Unavailable
from .events import EventBus
from .metrics import InfraMetrics
from .models import Event, QueueStatus, ServiceSpec, TaskResult, TaskSpec, TaskState
from .plugins import build_plugin_manager

if TYPE_CHECKING:
    from .backends.base import Backend
    from .scheduler.scheduler import Scheduler
    from .services.manager import ServiceManager
    from .workflows import WorkflowEngine

__all__ = [
    "Infra",
    "SyncInfra",
    "ensure_infra",
    "ensure_infra_sync",
    "shutdown_infra",
    "use_infra",
]

F = TypeVar("F", bound=Callable[..., Awaitable[dict[str, str]]])

_log = logging.getLogger("dspy_infra")


class Infra(AsyncResource):
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
        self.servers: list[Any] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, services: Sequence[str] = (), *, serve: bool = False, keep: bool = False) -> Self:
        """Start the components (and the named services, with their dependencies; ``keep``:
        see ``ensure_services``)."""
        if self._owner is None:
            if self._closed:
                raise Unavailable("this Infra was closed", fix="create a new Infra")
            loop = asyncio.get_running_loop()
            self._loop = loop
            self._owner_pid = os.getpid()
            self._ready = loop.create_future()
            self._owner = asyncio.create_task(self._own(serve), name="dspy_infra-owner")
            await asyncio.shield(self._ready)
            _watch_at_exit(self)
        if services:
            await self.ensure_services(services, keep=keep)
        return self

    async def _own(self, serve: bool) -> None:
        assert self._ready is not None
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
                        queue_status=self.queue_status,
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
                if serve:
                    from .rpc.server import InfraServer

                    self.servers.append(await stack.enter_async_context(InfraServer(self, self.settings)))
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
        return await self.scheduler.submit(spec)

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult:
        return await self.scheduler.wait(task_id, timeout=timeout)

    async def get_task(self, task_id: str) -> TaskState:
        return await self.scheduler.get(task_id)

    async def cancel(self, task_id: str) -> TaskState:
        return await self.scheduler.cancel(task_id)

    async def list_tasks(self, *, status: str | None = None, limit: int = 100) -> list[TaskState]:
        return await self.scheduler.list_tasks(status=status, limit=limit)

    async def task_log(self, task_id: str, attempt: int | None = None) -> str:
        """The output the task's commands wrote (``exec`` handler): every kept attempt, each
        under an ``=== attempt N ===`` line, or only ``attempt``. ``""`` when the task wrote
        none (another handler, or not started yet). Bounded: see docs/tasks.md.

        Raises ``NotFound`` for an unknown task, or an attempt whose log is not kept.
        """
        from .handlers.task_logs import log_root, read_task_log
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

    def queue_status(self) -> dict[str, QueueStatus]:
        return self.scheduler.queue_status() if self._scheduler is not None else {}

    def handler(self, name: str) -> Callable[[F], F]:
        """Decorator: ``@infra.handler("embed") async def embed(ctx) -> dict[str, str]``."""

        def register(fn: F) -> F:
            self.scheduler.register_handler(name, fn)
            return fn

        return register

    # -- workflows -------------------------------------------------------------------------

    async def create_workflow(self, id: str, name: str = "", description: str = "", spec: Any = None) -> Any:
        return await self.workflows.create_workflow(id, name, description, spec)

    async def start_run(
        self, workflow_id: str, *, input: Mapping[str, Any] | None = None, idempotency_key: str = ""
    ) -> str:
        return await self.workflows.start_run(workflow_id, input=input, idempotency_key=idempotency_key)

    async def get_run(self, run_id: str) -> Any:
        return await self.workflows.get_run(run_id)

    async def list_workflows(self) -> list[Any]:
        return await self.workflows.list_workflows()

    async def list_runs(self, workflow_id: str | None = None, *, limit: int = 100) -> list[Any]:
        """Runs with their steps, newest first."""
        return await self.workflows.list_runs(workflow_id, limit=limit)

    def run_status(self, run_id: str) -> AsyncIterator[Any]:
        return self.workflows.run_status(run_id)

    async def cancel_run(self, run_id: str) -> Any:
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


def _exit_on_sigterm() -> None:
    """Make SIGTERM end the program like Ctrl-C (so ``atexit`` runs and the services stop),
    only where SIGTERM still has its default action (which ends the process without any
    cleanup) and only from the main thread; an app's own handler is never replaced."""
    if threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, OSError):
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# -- the process-wide shared instance ---------------------------------------------------------

_shared: Any = None
_shared_lock: asyncio.Lock | None = None
_shared_loop: asyncio.AbstractEventLoop | None = None


def _lock() -> asyncio.Lock:
    global _shared_lock, _shared_loop
    loop = asyncio.get_running_loop()
    if _shared_lock is None or _shared_loop is not loop:
        _shared_lock, _shared_loop = asyncio.Lock(), loop
    return _shared_lock


async def ensure_infra(
    *,
    services: Sequence[str] = (),
    backend: Backend | str | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    mode: str | None = None,
    addr: str | None = None,
    serve: bool = False,
    config_file: str | os.PathLike[str] | None = None,
    plugins: Iterable[Any] = (),
    keep: bool = False,
    **settings: Any,
) -> Any:
    """Return the process's shared infra, creating it on first call (concurrent callers get
    the same one); its ``mode`` says which kind it is, and the choice is logged once.

    - ``addr=`` / ``DSPY_INFRA_ADDR`` (or ``mode="remote"``): a ``RemoteInfra`` on that
      server, which must answer.
    - ``mode="auto"`` (the default): a ``RemoteInfra`` only when the server answering at
      ``127.0.0.1:grpc_port`` is the one this app would have started (it advertises the
      same state directory and owner); any other server is left alone and this process
      runs an embedded ``Infra``.
    - otherwise (or ``serve=True``): an embedded ``Infra`` (``serve=True`` also serves
      gRPC/HTTP for other processes).

    When attached, ``services`` are started on the server, and an option the server cannot
    honour (another ``backend``, a ``Backend`` object, ``plugins``) raises
    ``FailedPrecondition`` naming it instead of being ignored.

    The services an embedded infra starts stop with ``shutdown_infra()``, or at the latest when
    the process exits (``atexit``; SIGTERM is made to exit like Ctrl-C while it has its default
    action); ``keep=True`` leaves them running for the next run to adopt."""
    global _shared
    async with _lock():
        if _shared is not None and getattr(_shared, "running", True):
            if services:
                await _shared.ensure_services(services, keep=keep)
            return _shared
        backend_name = backend if isinstance(backend, str) else None
        cfg = load_settings(
            config_file, home=state_dir, mode=mode, addr=addr, backend=backend_name, **settings
        )
        # What only an embedded infra can honour: objects of this process.
        local_only = [
            name
            for name, given in (
                ("backend", backend is not None and not isinstance(backend, str)),
                ("plugins", bool(plugins)),
            )
            if given
        ]
        remote = await _maybe_remote(cfg, serve=serve, local_only=local_only)
        if remote is not None:
            if services:
                await remote.ensure_services(services)
            _shared = remote
            return remote
        infra = Infra(cfg, backend=backend if not isinstance(backend, str) else None, plugins=plugins)
        await infra.start(services, serve=serve, keep=keep)
        _exit_on_sigterm()
        _log.info("dspy_infra: embedded infra on %s%s", infra.home, " (serving gRPC/HTTP)" if serve else "")
        _shared = infra
        return infra


async def _maybe_remote(cfg: Settings, *, serve: bool, local_only: Sequence[str] = ()) -> Any:
    """A connected RemoteInfra when the settings say to use a server, or (auto mode) when the
    server answering at the default address is this app's own; else None (embed)."""
    if cfg.mode == "embedded" or serve:
        return None
    from .rpc.client import RemoteInfra

    # A server configured with TLS is reached with its certificate as the trusted CA.
    tls = cfg.tls_cert or None
    named = bool(cfg.addr) or cfg.mode == "remote"
    target = cfg.addr or f"127.0.0.1:{cfg.grpc_port}"
    try:
        remote = await RemoteInfra.connect(target, token=cfg.token, required=named, tls=tls)
    except Unauthenticated:
        if named:
            raise
        # Auto mode: a server that refuses our token cannot be identified, so it is not ours.
        _log.info("dspy_infra: the server at %s refused this app's token; running embedded", target)
        return None
    if remote is None:
        return None
    try:
        identity = await remote.health()
        if not named and not _same_app(identity, cfg):
            _log.info(
                "dspy_infra: the server at %s belongs to another app (home %s); running embedded",
                target,
                identity.get("home") or "unknown",
            )
            await remote.aclose()
            return None
        _check_can_honour(cfg, identity, target, local_only)
    except BaseException:
        await remote.aclose()
        raise
    how = "named by addr/DSPY_INFRA_ADDR" if cfg.addr else ("mode=remote" if named else "same home")
    _log.info("dspy_infra: attached to the server at %s (%s, home %s)", target, how, identity.get("home"))
    return remote


def _same_app(identity: Mapping[str, Any], cfg: Settings) -> bool:
    """Whether a server's advertised identity is the one this app's settings would start:
    the same state directory and owner. A server too old to say is not ours."""
    home, owner = identity.get("home") or "", identity.get("owner") or ""
    if not home or not owner:
        return False
    return owner == cfg.resolved_owner() and Path(home) == cfg.resolved_home().resolve()


def _check_can_honour(
    cfg: Settings, identity: Mapping[str, Any], target: str, local_only: Sequence[str]
) -> None:
    if local_only:
        name = local_only[0]
        raise FailedPrecondition(
            f"{name} objects live in this process, and the infra is the server at {target}",
            field=name,
            fix=f"drop {name}= (register it in the server's plugins), or run embedded (mode='embedded')",
        )
    served = identity.get("backend") or ""
    if cfg.backend != "auto" and served and served != cfg.backend:
        raise FailedPrecondition(
            f"backend {cfg.backend!r} was asked for, but the server at {target} runs the {served!r} backend",
            field="backend",
            fix=f"drop backend= (use the server's), restart the server with `dspy-infra serve --backend"
            f" {cfg.backend}`, or run embedded (mode='embedded')",
        )


async def shutdown_infra() -> None:
    """Close the shared infra (stopping the services it started). Safe to call twice."""
    global _shared
    async with _lock():
        infra, _shared = _shared, None
    if infra is not None:
        await infra.aclose()


@contextlib.asynccontextmanager
async def use_infra(**kwargs: Any) -> AsyncIterator[Any]:
    """``async with use_infra(services=["redis"]) as infra:`` — ensure, then shut down."""
    infra = await ensure_infra(**kwargs)
    try:
        yield infra
    finally:
        await shutdown_infra()


# -- synchronous facade ---------------------------------------------------------------------


class SyncInfra:
    """Blocking proxy to an infra running on a private event loop in a daemon thread.

    Coroutine methods become blocking calls; ``close()`` shuts the infra down and the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, infra: Any) -> None:
        self._loop, self._thread, self._infra = loop, thread, infra

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._infra, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(attr(*args, **kwargs), self._loop).result()

        return call

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(shutdown_infra(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ensure_infra_sync(**kwargs: Any) -> SyncInfra:
    """``ensure_infra`` for code without an event loop. Inside a running loop, use
    ``await ensure_infra()`` instead (this raises ``SpecError`` there)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise SpecError(
            "ensure_infra_sync() was called inside a running event loop",
            fix="use `await ensure_infra(...)` in async code",
        )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="dspy_infra-loop", daemon=True)
    thread.start()
    try:
        infra = asyncio.run_coroutine_threadsafe(ensure_infra(**kwargs), loop).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        raise
    return SyncInfra(loop, thread, infra)
