"""ServiceManager: bring services up in dependency order, watch them, restart, stop.

One manager per ``Infra``. It owns an anyio task group (entered in ``__aenter__``) in which
the *monitor* and every ``start()`` stream run, so nothing outlives ``aclose()``.

Starting (``start`` / ``ensure``): the requested services plus their dependencies are
validated (unknown names, cycles, host-port clashes), then each service waits for its
dependencies' Compose conditions (``service_started``, ``service_healthy``,
``service_completed_successfully``) and starts as soon as they hold, at most
``max_parallel_starts`` at once: siblings start in parallel and a service never starts
before its dependencies are ready. Each start is gated on its health probe.
A required service that fails aborts the start: what this call had started is stopped again
and the error names the service and why (``HealthCheckFailed`` carries the last probe
failure and log lines). An optional service that fails is reported; its dependents are
skipped with a message naming it, and the rest go on.

Ownership (the labels, leases, keep markers and orphan rules are ``ownership.py``'s; the
manager applies them through its ``ServiceOwnership``): every instance carries the owner's
labels and a stable name ``dspy_infra-<owner>-<service>``. A start adopts a healthy running
instance with the same spec hash instead of recreating it (and writes a lease naming the
adopting process, because a container's labels cannot change), recreates one whose hash
differs, and removes this owner's orphans (owner process and lease holder dead) that were not
kept. Nothing without our owner label is ever touched. Opening a manager sweeps at once: a
kept orphan still running the catalog's spec is adopted and monitored from that moment; every
other orphan is removed, whatever this infra goes on to ask for. ``stop`` drops the marker.

Once up, a service is watched by the ``ServiceMonitor`` (``monitor.py``: probes and the
restart policy), which the manager runs in its task group; the monitor replaces an instance
through the manager's ``_recreate`` under the service's lock, the path a manual ``restart``
takes.

Size: over 600 lines on purpose: one class whose backend choice, start, adopt, stop and
restart paths and status answers share the per-service locks and ``ManagedService`` records.
What needs none of that state lives next to it: the monitor (``monitor.py``), graph order
(``graph.py``), probes (``health.py``), the catalog (``catalog.py``), URLs (``handles.py``) and
the ownership rules (``ownership.py``). Splitting the methods into mixins would spread the
shared state over several files.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Self

import anyio
import attrs
import pluggy
from anyio.abc import AsyncResource, TaskGroup

from ..backends.base import Backend
from ..config import Settings
from ..errors import (
    AlreadyExists,
    BackendError,
    BackendUnavailable,
    HealthCheckFailed,
    InfraError,
    NotFound,
    ServiceError,
    SpecError,
)
from ..events import EventBus
from ..hardware import detect_hardware
from ..metrics import InfraMetrics
from ..models import (
    HardwareInfo,
    HealthUpdate,
    ImagePullProgress,
    Instance,
    LogEntry,
    QueueStatus,
    ResourceAvailability,
    ResourceUsage,
    ServiceSpec,
    ServiceState,
    ServiceStatus,
    ServiceStatusUpdate,
)
from ..ownership import (
    LABEL_OWNER,
    LABEL_SERVICE,
    LABEL_SPEC_HASH,
    ServiceOwnership,
    instance_name_for,
    reap_before_start,
    sweep_action,
)
from ..plugins import collect_mapping
from .catalog import build_catalog, parse_overrides
from .graph import (
    check_host_ports,
    dependency_closure,
    startup_levels,
    stop_order,
    unknown_service,
    validate_graph,
)
from .handles import ServiceHandle, default_url_template, main_container_port, service_url
from .health import last_log_lines, probe_for, run_probe, wait_until_healthy
from .monitor import ManagedService as _Managed
from .monitor import ServiceMonitor
from .monitor import failure_reason as _reason
from .prometheus import write_config as write_prometheus_config

__all__ = ["ServiceManager", "instance_name_for"]

#: Outcomes of one service within one start.
_HEALTHY, _STARTED, _COMPLETED, _FAILED, _SKIPPED = "healthy", "started", "completed", "failed", "skipped"
_SATISFIES = {
    "service_started": {_HEALTHY, _STARTED, _COMPLETED},
    "service_healthy": {_HEALTHY, _COMPLETED},
    "service_completed_successfully": {_COMPLETED},
}
#: Longest wait for an existing (adoptable) instance to answer its probe before recreating it.
_ADOPT_WAIT = 5.0
#: The owner process's start time (clock ticks since boot): with the pid, it tells a live
#: owner from an unrelated process that was given the same pid later.


@attrs.define
class _StartRun:
    """Book-keeping of one start call."""

    specs: dict[str, ServiceSpec]
    emit: Callable[[ServiceStatusUpdate], Awaitable[None]] | None
    done: dict[str, anyio.Event] = attrs.field(factory=dict)
    outcome: dict[str, str] = attrs.field(factory=dict)
    reason: dict[str, str] = attrs.field(factory=dict)
    errors: dict[str, BaseException] = attrs.field(factory=dict)
    created: list[str] = attrs.field(factory=list)
    #: Instances created ahead of their start (``_create_ahead``), not started yet.
    ahead: dict[str, Instance] = attrs.field(factory=dict)
    #: Services whose own start has begun: nothing is created ahead for them any more.
    begun: set[str] = attrs.field(factory=set)
    #: Services without dependencies whose create has not finished yet; creating ahead waits
    #: until none is left, because creates running at once slow each other down.
    roots_pending: set[str] = attrs.field(factory=set)
    roots_created: anyio.Event = attrs.field(factory=anyio.Event)
    unprepared: dict[str, InfraError] = attrs.field(factory=dict)
    #: This owner's instances of each service as listed once when the start began (one
    #: engine listing serves the orphan sweep and each service's first adoption check);
    #: a service's entry is taken by its first check. A later check lists again.
    listed: dict[str, list[Instance]] = attrs.field(factory=dict)
    finished: int = 0

    def take_listed(self, name: str) -> list[Instance] | None:
        """The instances listed for ``name`` at the start, once; ``None`` when already taken."""
        return self.listed.pop(name, None)

    @property
    def progress(self) -> int:
        return int(100 * self.finished / max(1, len(self.specs)))

    def root_created(self, name: str) -> None:
        self.roots_pending.discard(name)
        if not self.roots_pending:
            self.roots_created.set()


class ServiceManager(AsyncResource):
    """Starts, watches, restarts and stops services on one backend (see module docstring)."""

    #: At most this many services are being created/probed at once during a start.
    max_parallel_starts: int = 8

    def __init__(
        self,
        settings: Settings,
        *,
        bus: EventBus,
        metrics: InfraMetrics,
        plugins: pluggy.PluginManager,
        backend: Backend | str | None = None,
        extra_services: Iterable[ServiceSpec] = (),
        queue_status: Callable[[], Mapping[str, QueueStatus]] | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        self.plugins = plugins
        self.owner = settings.resolved_owner()
        self.catalog: dict[str, ServiceSpec] = build_catalog(settings, plugins, extra_services)
        validate_graph(self.catalog)
        self._backend_arg: Backend | str = backend if backend is not None else settings.backend
        self._owns_backend = False
        self._backend: Backend | None = None
        #: The class of the backend once resolved (``stop_blocking`` makes a fresh one).
        self._backend_type: type[Backend] | None = None
        self._queue_status = queue_status
        self._managed: dict[str, _Managed] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._tg: TaskGroup | None = None
        self._start_slots = anyio.Semaphore(self.max_parallel_starts)
        #: Labels, leases and keep markers of this owner (the rules are ownership.py's).
        self.ownership = ServiceOwnership(self.owner, settings.resolved_home())
        #: Services started without an explicit ``keep`` are kept when this is True (a server
        #: that leaves its services running on shutdown sets it).
        self.keep_by_default = False
        #: Services a start brought up without ``keep`` (started or adopted), in start order:
        #: the ones ``Infra`` stops when it closes, whoever asked (Python, gRPC, the CLI).
        self.owned: list[str] = []
        self._monitor = ServiceMonitor(
            self._managed,
            backend=lambda: self.backend,
            bus=bus,
            metrics=metrics,
            lock=self._lock,
            recreate=lambda spec: self._recreate(spec, timeout=10.0, manual=False),
            on_change=self._set_active_gauge,
        )

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise BackendUnavailable(
                "the service manager is not open", fix="use `async with ServiceManager(...)`"
            )
        return self._backend

    async def __aenter__(self) -> Self:
        self._backend = await self._resolve_backend()
        self._backend_type = type(self._backend)
        try:
            await anyio.to_thread.run_sync(write_prometheus_config, self.settings)
            await self._sweep_on_open()
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            await self._close_backend()
            raise
        self._tg.start_soon(self._monitor.run, self._tg, name="dspy_infra-service-monitor")
        return self

    async def _sweep_on_open(self) -> None:
        """Services of this owner whose owner process (and lease holder) is dead: a kept one
        that still runs the catalog's spec is adopted now, so the monitor watches it from
        this moment; every other one is reaped, whatever this infra goes on to ask for."""
        for inst in await self.backend.list_instances(self.ownership.filter()):
            try:
                await self._sweep_one(inst)
            except InfraError as exc:  # one stuck leftover must not keep the infra from starting
                self.bus.publish(
                    "service_orphan_removed",
                    inst.labels.get(LABEL_SERVICE, ""),
                    {"instance": inst.name, "error": str(exc)},
                )

    async def _sweep_one(self, inst: Instance) -> None:
        service = inst.labels.get(LABEL_SERVICE, "")
        if not service:
            return
        owner_alive = await anyio.to_thread.run_sync(self._owner_alive, inst)
        kept = not owner_alive and await anyio.to_thread.run_sync(self.ownership.is_kept, inst.name)
        spec = self.catalog.get(service)
        adoptable = (
            spec is not None
            and not spec.one_shot
            and inst.state == "running"
            and inst.labels.get(LABEL_SPEC_HASH) == spec.spec_hash
            and service not in self._managed
        )
        action = sweep_action(owner_alive=owner_alive, kept=kept, adoptable=adoptable)
        if action == "leave":
            return
        if action == "adopt" and spec is not None:
            async with self._lock(service):
                if await self._try_adopt(spec) is not None:
                    return
        await self._discard(inst)
        await anyio.to_thread.run_sync(self.ownership.set_kept, service, False)
        self.bus.publish("service_orphan_removed", service, {"instance": inst.name, "kept": kept})

    async def aclose(self) -> None:
        """Stop the monitor and close the backend (if this manager created it). Services keep
        running: ``Infra`` stops the ones it started."""
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            await self._close_backend()

    def stop_blocking(self, names: Sequence[str], *, timeout: float = 5.0) -> None:
        """Stop and remove the instances of ``names`` this manager runs, from code that has no
        event loop (an ``atexit`` hook after the app's loop ended): a fresh backend of the same
        kind does it in a private loop. Errors are swallowed: the next start reaps leftovers."""
        instances = [m.instance for n, m in self._managed.items() if n in set(names)]
        if not instances or self._backend_type is None:
            return
        backend = self._construct(self._backend_type)

        async def run() -> None:
            async with backend:
                for instance in instances:
                    with contextlib.suppress(InfraError, OSError):
                        await backend.stop(instance.id, timeout=timeout)
                        await backend.remove(instance.id)

        with contextlib.suppress(Exception):
            anyio.run(run)

    async def _close_backend(self) -> None:
        if self._backend is not None and self._owns_backend:
            await self._backend.aclose()
        self._backend = None

    def _backend_classes(self) -> dict[str, type[Backend]]:
        return collect_mapping(self.plugins.hook.dspy_infra_backends())

    async def _resolve_backend(self) -> Backend:
        arg = self._backend_arg
        if isinstance(arg, Backend):
            await arg.open()  # idempotent; the caller keeps ownership (we do not close it)
            return arg
        classes = self._backend_classes()
        if arg == "auto":
            docker_cls = classes.get("docker")
            if docker_cls is not None:
                candidate = self._construct(docker_cls)
                try:
                    await candidate.open()
                except BackendError:
                    await candidate.aclose()
                else:
                    self._owns_backend = True
                    return candidate
            arg = "process"
        cls = classes.get(arg)
        if cls is None:
            raise SpecError(
                f"unknown backend {arg!r}",
                field="backend",
                fix="use one of: auto, " + ", ".join(sorted(classes)),
            )
        backend = self._construct(cls)
        await backend.open()
        self._owns_backend = True
        return backend

    def _construct(self, cls: type[Backend]) -> Backend:
        # Backend classes from the hook take (settings, *, metrics=...): see backends/base.py.
        factory: Callable[..., Backend] = cls
        return factory(self.settings, metrics=self.metrics)

    def _task_group(self) -> TaskGroup:
        if self._tg is None:
            raise BackendUnavailable(
                "the service manager is not open", fix="use `async with ServiceManager(...)`"
            )
        return self._tg

    # -- catalog ---------------------------------------------------------------------------

    def add_service(self, spec: ServiceSpec) -> None:
        """Declare or replace a service (validated against the rest of the catalog)."""
        candidate = {**self.catalog, spec.name: spec}
        validate_graph(candidate)
        self.catalog = candidate

    def _lock(self, name: str) -> anyio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = anyio.Lock()
        return lock

    def _labels(self, spec: ServiceSpec) -> dict[str, str]:
        return self.ownership.labels(spec.name, spec.spec_hash, spec.labels)

    def _set_active_gauge(self) -> None:
        up = (ServiceStatus.HEALTHY, ServiceStatus.RUNNING, ServiceStatus.UNHEALTHY)
        self.metrics.active_services.set(sum(1 for m in self._managed.values() if m.status in up))

    # -- start -----------------------------------------------------------------------------

    def start(
        self,
        names: Sequence[str] | None = None,
        *,
        parallel: bool = True,
        overrides: Mapping[str, str] | None = None,
        keep: bool | None = None,
    ) -> AsyncIterator[ServiceStatusUpdate]:
        """Start ``names`` (default: the whole catalog) and their dependencies, yielding status
        updates with progress; raises at the end if a required service failed. ``keep``
        (default ``keep_by_default``) leaves them running after this process exits: the next
        infra on this state directory adopts them instead of reaping them."""
        return self._start_stream(
            list(names) if names is not None else None, parallel, dict(overrides or {}), keep
        )

    async def _start_stream(
        self, names: list[str] | None, parallel: bool, overrides: dict[str, str], keep: bool | None = None
    ) -> AsyncIterator[ServiceStatusUpdate]:
        # The start runs in the manager's task group (its owner); this generator only reads.
        # Abandoning the iterator does not abandon the start half-way.
        # Unbounded: a start emits a few updates per service, and a reader that stops reading
        # must never stall the start itself.
        send, receive = anyio.create_memory_object_stream[ServiceStatusUpdate | BaseException](math.inf)

        async def emit(update: ServiceStatusUpdate) -> None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await send.send(update)

        async def run() -> None:
            async with send:
                try:
                    await self._start_graph(
                        names, parallel=parallel, overrides=overrides, emit=emit, keep=keep
                    )
                except Exception as exc:
                    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                        await send.send(exc)

        self._task_group().start_soon(run, name="dspy_infra-service-start")
        async with receive:
            async for item in receive:
                if isinstance(item, BaseException):
                    raise item
                yield item

    async def ensure(self, names: Sequence[str], *, keep: bool | None = None) -> list[str]:
        """Start ``names`` and their dependencies; raise if a required one fails. Returns the
        services now up (started, adopted or already running), in start order. ``keep``: as
        for ``start``."""
        return await self._start_graph(list(names), parallel=True, overrides={}, emit=None, keep=keep)

    async def _start_graph(
        self,
        names: list[str] | None,
        *,
        parallel: bool,
        overrides: Mapping[str, str],
        emit: Callable[[ServiceStatusUpdate], Awaitable[None]] | None,
        keep: bool | None = None,
    ) -> list[str]:
        keep = self.keep_by_default if keep is None else keep
        catalog = dict(self.catalog)
        if overrides:
            catalog.update(parse_overrides(overrides, catalog))
            validate_graph(catalog)
        wanted = names if names is not None else sorted(catalog)
        order = dependency_closure(catalog, wanted)
        specs = {n: catalog[n] for n in order}
        others = [m.spec for n, m in self._managed.items() if n not in specs]
        check_host_ports([*specs.values(), *others])
        run = _StartRun(specs=specs, emit=emit)
        for name in order:
            run.done[name] = anyio.Event()
            if not specs[name].depends_on:
                run.roots_pending.add(name)
        listed = await self._prepare_and_list(run)
        for name in specs:
            run.listed[name] = [i for i in listed if i.labels.get(LABEL_SERVICE) == name]
        await self._remove_orphans(keep=set(specs), listed=listed)
        try:
            if parallel:
                async with anyio.create_task_group() as tg:
                    for name in order:
                        tg.start_soon(self._start_one, run, name, tg.cancel_scope, name=f"start-{name}")
                    tg.start_soon(self._create_dependents_ahead, run, name="create-ahead")
            else:
                with anyio.CancelScope() as scope:
                    for name in order:
                        await self._start_one(run, name, scope)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._rollback(run)
            raise
        failed_required = [
            n for n in order if run.outcome.get(n) in (_FAILED, _SKIPPED, None) and specs[n].required
        ]
        # Report the service that actually failed, not one cancelled because of it.
        failed_required.sort(key=lambda n: n not in run.errors)
        if failed_required:
            with anyio.CancelScope(shield=True):
                await self._rollback(run)
            first = failed_required[0]
            error = run.errors.get(first)
            if isinstance(error, InfraError):
                raise error
            raise ServiceError(
                f"required service {first!r} did not start: {run.reason.get(first, 'start aborted')}",
                service=first,
            )
        up = [n for n in order if run.outcome.get(n) in (_HEALTHY, _STARTED, _COMPLETED)]
        for name in up:
            if keep:
                await anyio.to_thread.run_sync(self.ownership.set_kept, name, True)
                with contextlib.suppress(ValueError):
                    self.owned.remove(name)
            elif name not in self.owned:
                self.owned.append(name)
        return up

    async def _prepare_and_list(self, run: _StartRun) -> list[Instance]:
        """``_prepare`` and the one listing of this owner's instances, at once (independent
        engine calls: image inspects, a container list). The first error is raised as it is
        (not in an exception group), as when they ran one after the other."""
        listed: list[Instance] = []
        errors: list[Exception] = []

        async def prepare() -> None:
            try:
                await self._prepare(run)
            except Exception as exc:
                errors.append(exc)

        async def list_owned() -> None:
            try:
                listed.extend(await self.backend.list_instances(self.ownership.filter()))
            except Exception as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(prepare)
            tg.start_soon(list_owned)
        if errors:
            raise errors[0]
        return listed

    async def _prepare(self, run: _StartRun) -> None:
        """Backend preparation once; when it refuses, find out which services it refuses (so
        an optional service without a binary or image does not block the rest)."""
        try:
            await self.backend.prepare(list(run.specs.values()))
            return
        except InfraError:
            pass
        for name, spec in run.specs.items():
            try:
                await self.backend.prepare([spec])
            except InfraError as exc:
                run.unprepared[name] = exc

    async def _notify(self, run: _StartRun, name: str, status: ServiceStatus, message: str) -> None:
        if run.emit is not None:
            await run.emit(ServiceStatusUpdate(name, status, message, run.progress))

    async def _start_one(self, run: _StartRun, name: str, abort: anyio.CancelScope) -> None:
        spec = run.specs[name]
        try:
            for dep in spec.depends_on:
                await run.done[dep.name].wait()
                got = run.outcome.get(dep.name, _FAILED)
                if got not in _SATISFIES[dep.condition]:
                    why = run.reason.get(dep.name, got)
                    await self._finish(
                        run,
                        name,
                        _SKIPPED,
                        f"skipped: dependency {dep.name!r} is {got} ({why}); needs {dep.condition}",
                    )
                    return
            if name in run.unprepared:
                raise run.unprepared[name]
            async with self._start_slots, self._lock(name):
                outcome, message = await self._bring_up(run, spec)
            await self._finish(run, name, outcome, message)
        except Exception as exc:
            self.metrics.service_start_total.labels(service_name=name, status="failure").inc()
            self.metrics.failed_service_starts_total.labels(service_name=name, reason=_reason(exc)).inc()
            self.bus.publish("service_failed", name, {"error": str(exc), "required": spec.required})
            run.errors[name] = exc
            await self._finish(run, name, _FAILED, str(exc))
            if spec.required:
                abort.cancel()  # stop the whole start: a required service is down
        finally:
            run.done[name].set()
            run.root_created(name)
            ahead = run.ahead.pop(name, None)
            if ahead is not None:  # created ahead but never started (skipped or aborted)
                with anyio.CancelScope(shield=True):
                    await self._discard(ahead)

    async def _create_dependents_ahead(self, run: _StartRun) -> None:
        """The create/start split: once the services without dependencies are created, create
        the instances of the ones that wait for dependencies, one at a time in dependency
        order, while the first level starts. When their dependencies are ready only the start
        is left (on Podman's vfs storage a create copies the image: some 300 ms)."""
        await run.roots_created.wait()
        for name, spec in run.specs.items():
            if spec.depends_on and name not in run.unprepared:
                await self._create_ahead(run, spec)

    async def _create_ahead(self, run: _StartRun, spec: ServiceSpec) -> None:
        """Create ``spec``'s instance unless its start has begun (or ended), or it has an
        instance to adopt or replace: those, and a create that fails, are ``_bring_up``'s
        (which reports what fails)."""
        name = spec.name
        instance_name = instance_name_for(self.owner, name)
        async with self._start_slots, self._lock(name):
            current = self._managed.get(name)
            if name in run.begun or run.done[name].is_set() or current is not None:
                return
            try:
                existing = run.listed.get(name)  # left for ``_bring_up``'s adoption check
                if existing is None:
                    existing = run.listed[name] = await self.backend.list_instances(
                        self.ownership.filter(name)
                    )
                if existing:
                    return
                instance = await self.backend.create(
                    spec, instance_name=instance_name, labels=self._labels(spec)
                )
            except InfraError:
                return
            except BaseException:
                # Cancelled while the engine was creating it: it may exist without our knowing
                # its id. Find it by its name and remove it.
                with anyio.CancelScope(shield=True), contextlib.suppress(InfraError):
                    for inst in await self.backend.list_instances(
                        {LABEL_OWNER: self.owner, LABEL_SERVICE: name}
                    ):
                        if inst.name == instance_name and inst.state == "created":
                            await self._discard(inst)
                raise
            if instance is None:
                return
            if run.done[name].is_set():  # skipped while it was being created
                with anyio.CancelScope(shield=True):
                    await self._discard(instance)
                return
            run.ahead[name] = instance

    async def _finish(self, run: _StartRun, name: str, outcome: str, message: str) -> None:
        run.outcome[name] = outcome
        run.reason[name] = message
        run.finished += 1
        status = {
            _HEALTHY: ServiceStatus.HEALTHY,
            _STARTED: ServiceStatus.RUNNING,
            _COMPLETED: ServiceStatus.STOPPED,
        }.get(outcome, ServiceStatus.FAILED)
        await self._notify(run, name, status, message)

    async def _bring_up(self, run: _StartRun, spec: ServiceSpec) -> tuple[str, str]:
        """Adopt or (re)create one instance and wait for it. Caller holds the service's lock."""
        name = spec.name
        run.begun.add(name)
        current = self._managed.get(name)
        if current is not None and current.spec.spec_hash == spec.spec_hash:
            inst = await self._inspect_or_none(current.instance.id)
            if inst is not None and inst.state == "running" and current.status == ServiceStatus.HEALTHY:
                return _HEALTHY, "already running"
        ahead = run.ahead.pop(name, None)
        if ahead is not None:  # created while its dependencies started: start it
            await self._notify(run, name, ServiceStatus.STARTING, "starting")
            self.bus.publish("service_starting", name, {"backend": self.backend.name})
            instance = await self.backend.start(ahead)
            self._managed[name] = _Managed(spec=spec, instance=instance, status=ServiceStatus.STARTING)
            run.created.append(name)
            return await self._await_ready(spec, instance)
        adopted = await self._try_adopt(spec, run.take_listed(name))
        if adopted is not None:
            return adopted
        await self._notify(run, name, ServiceStatus.STARTING, "starting")
        self.bus.publish("service_starting", name, {"backend": self.backend.name})
        deadline = time.monotonic() + spec.health.startup_timeout
        delay = 0.02
        while True:
            try:
                instance = await self._create(spec, run)
                break
            except AlreadyExists:
                # Another process of this owner (a pytest-xdist worker, say) is creating it
                # right now: wait for it and adopt it rather than fight over it.
                if time.monotonic() > deadline:
                    raise
            adopted = await self._try_adopt(spec)
            if adopted is not None:
                return adopted
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.5)
        run.created.append(name)
        return await self._await_ready(spec, instance)

    async def _create(self, spec: ServiceSpec, run: _StartRun | None = None) -> Instance:
        """Create and start ``spec``'s instance. Within a start (``run``), in two steps where
        the backend can: the dependents' creates wait for the first level's (``root_created``)."""
        instance_name = instance_name_for(self.owner, spec.name)
        labels = self._labels(spec)
        created = (
            None
            if run is None
            else await self.backend.create(spec, instance_name=instance_name, labels=labels)
        )
        if run is not None:
            run.root_created(spec.name)
        if created is not None:
            instance = await self.backend.start(created)
        else:
            instance = await self.backend.run(spec, instance_name=instance_name, labels=labels)
        self._managed[spec.name] = _Managed(spec=spec, instance=instance, status=ServiceStatus.STARTING)
        return instance

    async def _await_ready(self, spec: ServiceSpec, instance: Instance) -> tuple[str, str]:
        name = spec.name
        managed = self._managed[name]
        try:
            if spec.one_shot:
                code = await self._wait_exit(spec, instance)
                if code != 0:
                    raise HealthCheckFailed(
                        name,
                        last_failure=f"one-shot job exited with code {code}",
                        last_logs=await last_log_lines(self.backend, spec, instance.id),
                    )
                managed.status, managed.message = ServiceStatus.STOPPED, "completed"
                self.metrics.service_start_total.labels(service_name=name, status="success").inc()
                self.bus.publish("service_completed", name, {"exit_code": 0})
                return _COMPLETED, "completed successfully"
            result = await wait_until_healthy(self.backend, spec, instance, metrics=self.metrics)
        except BaseException:
            self._managed.pop(name, None)
            with anyio.CancelScope(shield=True):
                await self._discard(instance)
            self._set_active_gauge()
            raise
        managed.status, managed.message = ServiceStatus.HEALTHY, result.message
        managed.next_probe = time.monotonic() + spec.health.interval
        self.metrics.service_start_total.labels(service_name=name, status="success").inc()
        self._set_active_gauge()
        self.bus.publish("service_healthy", name, {"instance_id": instance.id, "probe": result.message})
        return _HEALTHY, result.message

    async def _wait_exit(self, spec: ServiceSpec, instance: Instance) -> int | None:
        deadline = time.monotonic() + spec.health.startup_timeout
        delay = 0.01
        while True:
            current = await self.backend.inspect(instance.id)
            if current.state == "exited":
                return current.exit_code
            if time.monotonic() >= deadline:
                raise HealthCheckFailed(
                    spec.name,
                    last_failure="one-shot job still running",
                    last_logs=await last_log_lines(self.backend, spec, instance.id),
                    timeout=spec.health.startup_timeout,
                )
            await anyio.sleep(delay)
            delay = min(delay * 2, spec.health.interval)

    async def _try_adopt(
        self, spec: ServiceSpec, existing: list[Instance] | None = None
    ) -> tuple[str, str] | None:
        """Adopt a matching healthy instance; remove the others of this service. ``existing``:
        its instances as just listed (else they are listed now)."""
        if existing is None:
            existing = await self.backend.list_instances(self.ownership.filter(spec.name))
        for inst in existing:
            if inst.labels.get(LABEL_SPEC_HASH) != spec.spec_hash:
                continue
            if spec.one_shot and inst.state == "exited" and inst.exit_code == 0:
                self._managed[spec.name] = _Managed(
                    spec, inst, ServiceStatus.STOPPED, "completed", adopted=True
                )
                return _COMPLETED, "completed earlier (adopted)"
            if inst.state == "exited" or spec.one_shot:
                continue
            # An instance whose owner is alive is being started by that owner, and a kept one
            # was kept on purpose (it may hold data): both get the whole startup time before
            # they are given up and removed. A leftover of a dead owner must answer quickly.
            owner_alive = await anyio.to_thread.run_sync(self._owner_alive, inst)
            kept = not owner_alive and await anyio.to_thread.run_sync(self.ownership.is_kept, inst.name)
            wait = (
                spec.health.startup_timeout
                if owner_alive or kept
                else min(_ADOPT_WAIT, spec.health.startup_timeout)
            )
            try:
                result = await wait_until_healthy(
                    self.backend, spec, inst, metrics=self.metrics, timeout=wait
                )
            except HealthCheckFailed:
                continue
            # Listed while its owner was still starting it, it had no published ports yet:
            # keep the instance as it is now, or the monitor would probe no port.
            if inst.state != "running":
                current = await self._inspect_or_none(inst.id)
                if current is None:
                    continue
                inst = current
            await anyio.to_thread.run_sync(self._write_lease, inst.name)
            self._managed[spec.name] = _Managed(
                spec,
                inst,
                ServiceStatus.HEALTHY,
                result.message,
                next_probe=time.monotonic() + spec.health.interval,
                adopted=True,
            )
            self._set_active_gauge()
            self.metrics.service_start_total.labels(service_name=spec.name, status="adopted").inc()
            self.bus.publish("service_healthy", spec.name, {"instance_id": inst.id, "adopted": True})
            return _HEALTHY, f"adopted running instance {inst.name}"
        for inst in existing:
            await self._discard(inst)
        return None

    # -- ownership (the records and rules are ownership.py's) ---------------------------------

    def _write_lease(self, instance_name: str) -> None:
        self.ownership.write_lease(instance_name)

    def _owner_alive(self, inst: Instance) -> bool:
        return self.ownership.owner_alive(inst.labels, inst.name)

    def is_kept(self, service: str) -> bool:
        """True when ``service`` was started with ``keep`` (it outlives its owner)."""
        return self.ownership.is_kept(self.ownership.instance_name(service))

    async def _remove_orphans(self, keep: set[str], listed: list[Instance]) -> list[str]:
        """Remove this owner's instances (``listed``) whose owner process is gone, except
        services in ``keep`` (the start about to run adopts or recreates those)."""
        removed: list[str] = []
        for inst in listed:
            service = inst.labels.get(LABEL_SERVICE, "")
            if service in keep or service in self._managed:
                continue
            owner_alive = await anyio.to_thread.run_sync(self._owner_alive, inst)
            # A kept one (keep=True) was left running on purpose; `down` removes it.
            kept = not owner_alive and await anyio.to_thread.run_sync(self.ownership.is_kept, inst.name)
            if not reap_before_start(owner_alive=owner_alive, kept=kept):
                continue
            await self._discard(inst)
            removed.append(inst.name)
            self.bus.publish("service_orphan_removed", service, {"instance": inst.name})
        return removed

    async def _discard(self, instance: Instance, timeout: float = 5.0) -> None:
        with contextlib.suppress(NotFound):
            await self.backend.stop(instance.id, timeout=timeout)
        with contextlib.suppress(NotFound, AlreadyExists):  # AlreadyExists: removal under way
            await self.backend.remove(instance.id)
        await anyio.to_thread.run_sync(self.ownership.drop_lease, instance.name)

    async def _remove_instances(self, service: str, timeout: float = 5.0) -> int:
        found = await self.backend.list_instances(self.ownership.filter(service))
        for inst in found:
            await self._discard(inst, timeout)
        return len(found)

    async def _inspect_or_none(self, instance_id: str) -> Instance | None:
        return await self.backend.inspect_or_none(instance_id)

    async def _rollback(self, run: _StartRun) -> None:
        """Stop what this start created (a required service failed)."""
        for name in stop_order(run.specs, run.created):
            managed = self._managed.pop(name, None)
            if managed is not None:
                await self._discard(managed.instance)
                self.metrics.service_stop_total.labels(service_name=name, status="success").inc()
                self.bus.publish("service_stopped", name, {"reason": "start aborted"})
        self._set_active_gauge()

    # -- stop / restart --------------------------------------------------------------------

    async def stop(self, names: Sequence[str] | None = None, *, timeout: float = 10.0) -> dict[str, str]:
        """Stop and remove services, dependents first. No names (None or an empty list, as
        ``StopServices([])`` and ``dspy-infra down`` send) means every service of this owner.
        Returns ``{name: "stopped" | "not running" | "error: ..."}``."""
        if not names:
            listed = await self.backend.list_instances(self.ownership.filter())
            targets = set(self._managed) | {i.labels.get(LABEL_SERVICE, "") for i in listed} - {""}
        else:
            targets = set(names)
            for name in targets:
                if name not in self.catalog and name not in self._managed:
                    raise unknown_service(name, self.catalog, field="service_names")
        results: dict[str, str] = {}
        # Reverse dependency levels: dependents stop first; a level stops in parallel.
        known = {n: self.catalog[n] for n in targets if n in self.catalog}
        waves = [list(level) for level in reversed(startup_levels(known))]
        waves.append(sorted(targets - set(known)))
        for wave in waves:
            async with anyio.create_task_group() as tg:
                for name in wave:
                    tg.start_soon(self._stop_one, name, timeout, results)
        # The shared network goes with the last container on it (anyone's), so a `down`
        # leaves nothing of ours on the engine.
        await self.backend.release()
        return {name: results[name] for name in stop_order(self.catalog, targets)}

    async def _stop_one(self, name: str, timeout: float, results: dict[str, str]) -> None:
        async with self._lock(name):
            self._managed.pop(name, None)
            with contextlib.suppress(ValueError):
                self.owned.remove(name)
            await anyio.to_thread.run_sync(self.ownership.set_kept, name, False)
            try:
                count = await self._remove_instances(name, timeout)
            except InfraError as exc:
                results[name] = f"error: {exc}"
                self.metrics.service_stop_total.labels(service_name=name, status="failure").inc()
                return
        self._set_active_gauge()
        if count:
            results[name] = "stopped"
            self.metrics.service_stop_total.labels(service_name=name, status="success").inc()
            self.bus.publish("service_stopped", name, {})
        else:
            results[name] = "not running"

    async def restart(self, name: str, *, timeout: float = 10.0) -> ServiceState:
        """Stop ``name`` and start it afresh (its dependencies are assumed up)."""
        spec = self.catalog.get(name)
        if spec is None:
            raise unknown_service(name, self.catalog, field="service_name")
        async with self._lock(name):
            await self._recreate(spec, timeout=timeout, manual=True)
        return (await self.status([name]))[name]

    async def _recreate(self, spec: ServiceSpec, *, timeout: float, manual: bool) -> None:
        """Replace the instance of ``spec`` and wait for it. Caller holds the lock."""
        previous = self._managed.pop(spec.name, None)
        restarts = previous.restarts if previous is not None else 0
        await self._remove_instances(spec.name, timeout)
        self.bus.publish("service_starting", spec.name, {"backend": self.backend.name, "restart": True})
        instance = await self._create(spec)
        try:
            await self._await_ready(spec, instance)
        except InfraError:
            if previous is not None and not manual:
                # Keep the record so the monitor can count restarts and try again.
                self._managed[spec.name] = attrs.evolve(
                    previous, instance=instance, status=ServiceStatus.UNHEALTHY, restarts=restarts + 1
                )
            raise
        managed = self._managed[spec.name]
        managed.restarts = restarts + 1
        self.bus.publish("service_restarted", spec.name, {"restarts": managed.restarts, "manual": manual})

    # -- observation -----------------------------------------------------------------------

    async def _instances_by_service(self) -> dict[str, Instance]:
        out: dict[str, Instance] = {}
        for inst in await self.backend.list_instances(self.ownership.filter()):
            service = inst.labels.get(LABEL_SERVICE, "")
            if service and (service not in out or inst.state == "running"):
                out[service] = inst
        return out

    async def status(self, names: Sequence[str] | None = None) -> dict[str, ServiceState]:
        """Status, instance id, ports, health details and resource usage of each service
        (default: the catalog plus anything this owner runs)."""
        listed = await self._instances_by_service()
        if names is None:
            targets = sorted(set(self.catalog) | set(self._managed) | set(listed))
        else:
            targets = list(names)
            for name in targets:
                if name not in self.catalog and name not in self._managed and name not in listed:
                    raise unknown_service(name, self.catalog, field="service_names")
        states: dict[str, ServiceState] = {}

        async def one(name: str) -> None:
            states[name] = await self._state(name, listed.get(name))

        async with anyio.create_task_group() as tg:
            for name in targets:
                tg.start_soon(one, name)
        return {name: states[name] for name in targets}

    async def _state(self, name: str, listed: Instance | None) -> ServiceState:
        managed = self._managed.get(name)
        instance = managed.instance if managed is not None else listed
        if instance is None:
            return ServiceState(name=name, status=ServiceStatus.STOPPED, backend=self.backend.name)
        current = await self._inspect_or_none(instance.id)
        if current is None:
            return ServiceState(name=name, status=ServiceStatus.STOPPED, backend=self.backend.name)
        usage = ResourceUsage()
        if current.state == "running":
            with contextlib.suppress(InfraError):
                usage = await self.backend.stats(current.id)
        if managed is not None:
            status = managed.status
            if current.state == "exited" and status in (ServiceStatus.HEALTHY, ServiceStatus.RUNNING):
                status = ServiceStatus.UNHEALTHY
            checks = {managed.spec.health.kind: managed.message}
            restarts = managed.restarts
        else:
            status = ServiceStatus.RUNNING if current.state == "running" else ServiceStatus.STOPPED
            checks, restarts = {}, 0
        ports = {c: self.backend.probe_address(current, c)[1] for c in current.ports}
        host, port, url = self._reach(
            managed.spec if managed is not None else self.catalog.get(name), current
        )
        return ServiceState(
            name=name,
            status=status,
            instance_id=current.id,
            ports=ports,
            health_checks=checks,
            started_at=current.started_at,
            resource_usage=usage,
            restarts=restarts,
            backend=self.backend.name,
            host=host,
            url=url,
            port=port,
        )

    def _reach(self, spec: ServiceSpec | None, instance: Instance) -> tuple[str, int, str]:
        """``(host, main host port, url)`` of ``instance`` (main port 0 and url "" when it
        publishes none)."""
        ports = {c: self.backend.probe_address(instance, c) for c in instance.ports}
        main = main_container_port(spec) if spec is not None else None
        if main not in ports:
            main = next(iter(ports), None)
        if main is None:
            return "127.0.0.1", 0, ""
        host, port = ports[main]
        template = default_url_template(spec) if spec is not None else "{host}:{port}"
        url = service_url(template, host, port, {c: p for c, (_h, p) in ports.items()})
        return host, port, url

    def _handle(self, name: str, managed: _Managed) -> ServiceHandle:
        host, port, url = self._reach(managed.spec, managed.instance)
        ports = {c: self.backend.probe_address(managed.instance, c)[1] for c in managed.instance.ports}
        return ServiceHandle(
            name=name,
            host=host,
            port=port,
            ports=ports,
            url=url,
            status=managed.status,
            backend=self.backend.name,
            log_source=self.logs,
        )

    def __getitem__(self, name: str) -> ServiceHandle:
        """The handle of a service this manager runs (started or adopted); ``NotFound`` (a
        ``KeyError``) otherwise. ``await get(name)`` also finds one started elsewhere."""
        managed = self._managed.get(name)
        if managed is None or managed.status in (ServiceStatus.STOPPED, ServiceStatus.FAILED):
            if name not in self.catalog:
                raise unknown_service(name, self.catalog, field="service_name")
            raise NotFound(
                f"service {name!r} is not running here",
                field="service_name",
                fix=f"start it first: await infra.ensure_services([{name!r}])",
            )
        return self._handle(name, managed)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._managed

    async def get(self, name: str) -> ServiceHandle:
        """The handle of ``name`` as it runs now (also one this process did not start);
        ``NotFound`` when it is not running."""
        state = (await self.status([name]))[name]
        if state.status in (ServiceStatus.STOPPED, ServiceStatus.FAILED) or not state.instance_id:
            raise NotFound(
                f"service {name!r} is {state.status}",
                field="service_name",
                fix=f"start it first: await infra.ensure_services([{name!r}])",
            )
        ports = dict(state.ports)
        return ServiceHandle(
            name=name,
            host=state.host,
            port=state.port,
            ports=ports,
            url=state.url,
            status=state.status,
            backend=state.backend,
            log_source=self.logs,
        )

    async def _find_instance(self, name: str) -> Instance:
        managed = self._managed.get(name)
        if managed is not None:
            return managed.instance
        listed = await self._instances_by_service()
        if name in listed:
            return listed[name]
        if name not in self.catalog:
            raise unknown_service(name, self.catalog, field="service_name")
        raise NotFound(
            f"service {name!r} is not running", field="service_name", fix=f"start it: ensure([{name!r}])"
        )

    async def logs(
        self, name: str, *, follow: bool = False, tail: int | None = None, since: float | None = None
    ) -> AsyncIterator[LogEntry]:
        """The service's log lines (stdout and stderr), oldest first; ``follow`` keeps going."""
        instance = await self._find_instance(name)
        async for entry in self.backend.logs(
            instance.id, service_name=name, follow=follow, tail=tail, since=since
        ):
            yield entry

    async def health(
        self, names: Sequence[str] | None = None, *, interval: float = 5.0
    ) -> AsyncIterator[HealthUpdate]:
        """Probe ``names`` (default: the services this manager runs) every ``interval``
        seconds, forever, yielding one update per service per round."""
        if interval <= 0:
            raise SpecError(f"must be > 0, got {interval!r}", field="interval_seconds")
        while True:
            targets = list(names) if names else sorted(self._managed)
            for name in targets:
                yield await self._health_once(name)
            await anyio.sleep(interval)

    async def _health_once(self, name: str) -> HealthUpdate:
        managed = self._managed.get(name)
        now = time.time()
        if managed is None:
            return HealthUpdate(name, False, "not running", now, {})
        spec, instance = managed.spec, managed.instance
        current = await self._inspect_or_none(instance.id)
        if current is None or current.state == "exited":
            return HealthUpdate(name, False, "exited", now, {"status": str(managed.status)})
        result = await run_probe(probe_for(spec.health), self.backend, spec, instance, metrics=self.metrics)
        return HealthUpdate(
            name,
            result.ok,
            result.message,
            now,
            {
                "kind": spec.health.kind,
                "duration_ms": f"{result.duration * 1000:.3f}",
                "instance_id": instance.id,
                "status": str(managed.status),
                "restarts": str(managed.restarts),
            },
        )

    async def pull(self, images: Sequence[str] | None = None) -> AsyncIterator[ImagePullProgress]:
        """Fetch ``images`` (default: every catalog image) with progress."""
        wanted = list(images) if images else sorted({s.image for s in self.catalog.values() if s.image})
        for image in wanted:
            try:
                async for progress in self.backend.pull(image):
                    yield progress
            except InfraError as exc:
                yield ImagePullProgress(image_name=image, status="error", message=str(exc))

    async def resources(self, workload_class: str) -> ResourceAvailability:
        """Hardware plus capacity / in-use of ``workload_class`` (from the scheduler)."""
        hardware: HardwareInfo = await anyio.to_thread.run_sync(detect_hardware)
        queues = dict(self._queue_status()) if self._queue_status is not None else {}
        if self._queue_status is None:
            capacity, in_use = hardware.cpu_cores, 0
        elif workload_class in queues:
            q = queues[workload_class]
            capacity, in_use = q.limit, q.inflight
        else:
            raise NotFound(
                f"unknown workload class {workload_class!r}",
                field="workload_class",
                fix="use one of: " + ", ".join(sorted(queues)),
            )
        needs_gpu = workload_class.startswith("gpu")
        available = in_use < capacity and (not needs_gpu or bool(hardware.gpus))
        return ResourceAvailability(available=available, capacity=capacity, in_use=in_use, hardware=hardware)

    def endpoint(self, name: str, container_port: int | None = None) -> tuple[str, int]:
        """``(host, port)`` at which a client on this machine reaches ``name``."""
        managed = self._managed.get(name)
        if managed is None:
            raise NotFound(
                f"service {name!r} is not running here", field="service_name", fix=f"ensure([{name!r}]) first"
            )
        port = container_port
        if port is None:
            if managed.spec.ports:
                port = managed.spec.ports[0].container_port
            elif managed.spec.health.port is not None:
                port = managed.spec.health.port
            else:
                raise NotFound(f"service {name!r} publishes no port", field="container_port")
        return self.backend.probe_address(managed.instance, port)
