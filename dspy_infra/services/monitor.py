"""The service monitor and its restart policy: what happens to a service after it is up.

The manager brings services up (``manager.py``); from then on each is a ``ManagedService``
record that the monitor watches. Every ``_MONITOR_TICK`` the monitor looks for services whose
next probe is due (healthy or unhealthy ones, never one being started or stopped) and probes
each in its own task:

- an instance that exited, or that fails ``health.retries`` probes in a row, is marked
  unhealthy and handed to the restart policy;
- the policy (``RestartPolicy``): a clean exit (code 0) under ``on-failure`` or ``no`` is a
  stop, not a failure; ``no`` gives up at once; otherwise the service is recreated after an
  exponential backoff (``backoff * 2**restarts``, at most ``max_backoff``), until
  ``max_restarts`` restarts, then it is marked failed.

The seam: the monitor reads and updates the manager's records (``records``), takes the
manager's per-service lock before replacing an instance, and replaces it through the
manager's ``recreate`` (the same path as a manual ``restart``). It owns no task group: the
manager starts ``run`` in its own and stops it in ``aclose``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

import anyio
import attrs
from anyio.abc import TaskGroup

from ..backends.base import Backend
from ..errors import BackendError, HealthCheckFailed, MissingBinary, NotFound, SpecError
from ..events import EventBus
from ..metrics import InfraMetrics
from ..models import Instance, RestartPolicy, ServiceSpec, ServiceStatus
from .health import probe_for, run_probe

__all__ = ["ManagedService", "ServiceMonitor", "failure_reason", "restart_delay"]

#: How often the monitor looks for services whose probe is due (seconds).
_MONITOR_TICK = 0.2


@attrs.define
class ManagedService:
    """What the manager knows of one service it runs. Mutable: starts, stops and restarts
    replace it under the service's lock; the monitor updates its status between awaits."""

    spec: ServiceSpec
    instance: Instance
    status: ServiceStatus
    message: str = ""
    restarts: int = 0
    failures: int = 0
    next_probe: float = 0.0
    adopted: bool = False


def restart_delay(policy: RestartPolicy, restarts: int) -> float:
    """Seconds to wait before restart number ``restarts + 1``: exponential, capped."""
    return min(policy.max_backoff, policy.backoff * math.pow(2, restarts))


def failure_reason(exc: BaseException) -> str:
    """Low-cardinality label for env_manager_failed_service_starts_total."""
    if isinstance(exc, HealthCheckFailed):
        return "exited" if "exited" in exc.last_failure else "health_check"
    if isinstance(exc, MissingBinary):
        return "missing_binary"
    if isinstance(exc, BackendError):
        return "backend_error"
    if isinstance(exc, SpecError):
        return "invalid_spec"
    return type(exc).__name__


class ServiceMonitor:
    """Probes the services in ``records`` and applies their restart policy (module docstring)."""

    def __init__(
        self,
        records: dict[str, ManagedService],
        *,
        backend: Callable[[], Backend],
        bus: EventBus,
        metrics: InfraMetrics,
        lock: Callable[[str], anyio.Lock],
        recreate: Callable[[ServiceSpec], Awaitable[None]],
        on_change: Callable[[], None],
    ) -> None:
        self._records = records
        self._backend = backend
        self._bus = bus
        self._metrics = metrics
        self._lock = lock
        self._recreate = recreate
        #: Called after a status change (the manager keeps its active-services gauge).
        self._on_change = on_change
        #: Services with a probe (or a restart) under way: never probed twice at once.
        self._busy: set[str] = set()

    async def run(self, task_group: TaskGroup) -> None:
        """Watch until cancelled; each due probe runs as its own task in ``task_group``."""
        while True:
            await anyio.sleep(_MONITOR_TICK)
            now = time.monotonic()
            for name, managed in list(self._records.items()):
                if name in self._busy or now < managed.next_probe:
                    continue
                if managed.status not in (ServiceStatus.HEALTHY, ServiceStatus.UNHEALTHY):
                    continue
                managed.next_probe = now + max(_MONITOR_TICK, managed.spec.health.interval)
                self._busy.add(name)
                task_group.start_soon(self._watch_once, name, name=f"watch-{name}")

    async def _inspect_or_none(self, instance_id: str) -> Instance | None:
        try:
            return await self._backend().inspect(instance_id)
        except NotFound:
            return None

    async def _watch_once(self, name: str) -> None:
        try:
            managed = self._records.get(name)
            if managed is None:
                return
            spec, instance = managed.spec, managed.instance
            current = await self._inspect_or_none(instance.id)
            exited = current is None or current.state == "exited"
            if exited:
                code = None if current is None else current.exit_code
                ok, message = False, f"exited with code {code}" if current is not None else "instance is gone"
            else:
                result = await run_probe(
                    probe_for(spec.health), self._backend(), spec, instance, metrics=self._metrics
                )
                ok, message = result.ok, result.message
            if self._records.get(name) is not managed:
                return  # stopped or replaced while we probed
            if ok:
                if managed.status != ServiceStatus.HEALTHY:
                    self._bus.publish("service_healthy", name, {"instance_id": instance.id, "probe": message})
                managed.status, managed.message, managed.failures = ServiceStatus.HEALTHY, message, 0
                self._on_change()
                return
            managed.failures += 1
            managed.message = message
            if not exited and managed.failures < max(1, spec.health.retries):
                return
            if managed.status != ServiceStatus.UNHEALTHY:
                managed.status = ServiceStatus.UNHEALTHY
                self._bus.publish("service_unhealthy", name, {"reason": message})
                self._on_change()
            await self._apply_restart_policy(
                name, managed, exited_code=current.exit_code if current else None
            )
        finally:
            self._busy.discard(name)

    async def _apply_restart_policy(
        self, name: str, managed: ManagedService, *, exited_code: int | None
    ) -> None:
        policy = managed.spec.restart
        clean_exit = (
            exited_code == 0 and managed.status == ServiceStatus.UNHEALTHY and "exited" in managed.message
        )
        if clean_exit and policy.mode != "always":
            # It finished on its own with success: stopped, not failed.
            managed.status, managed.message = ServiceStatus.STOPPED, "exited with code 0"
            self._on_change()
            self._bus.publish("service_stopped", name, {"exit_code": 0})
            return
        if policy.mode == "no":
            self._give_up(name, managed, f"{managed.message}; restart policy 'no'")
            return
        if managed.restarts >= policy.max_restarts:
            self._give_up(name, managed, f"{managed.message}; gave up after {managed.restarts} restarts")
            return
        await anyio.sleep(restart_delay(policy, managed.restarts))
        async with self._lock(name):
            if self._records.get(name) is not managed:
                return  # stopped while we backed off
            try:
                await self._recreate(managed.spec)
            except Exception as exc:
                self._metrics.failed_service_starts_total.labels(
                    service_name=name, reason=failure_reason(exc)
                ).inc()
                self._metrics.service_start_total.labels(service_name=name, status="failure").inc()
                again = self._records.get(name)
                if again is None:
                    self._records[name] = attrs.evolve(
                        managed,
                        status=ServiceStatus.UNHEALTHY,
                        restarts=managed.restarts + 1,
                        message=str(exc),
                    )
                    again = self._records[name]
                again.next_probe = time.monotonic()  # let the monitor decide again soon

    def _give_up(self, name: str, managed: ManagedService, why: str) -> None:
        managed.status, managed.message = ServiceStatus.FAILED, why
        self._on_change()
        self._bus.publish("service_failed", name, {"error": why, "restarts": managed.restarts})
