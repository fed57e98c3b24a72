"""Health probes: one ``Probe`` class per ``HealthCheck.kind``, and the startup wait.

A probe answers "is this instance ready right now?" with a ``ProbeResult(ok, message,
duration)`` and never raises for an unhealthy service (only for a programming error).
``wait_until_healthy`` retries a probe, pausing in proportion to the time already waited
(from 5 ms up to the check's ``interval``), under the check's overall ``startup_timeout``;
when that runs out it raises ``HealthCheckFailed`` carrying the last probe failure and the
service's last log lines. It also stops waiting (within a quarter second) once the instance
has exited, since a dead process will not turn healthy.

Of the check's fields, ``interval`` caps the pause between startup probes (and paces the
manager's monitor), ``timeout`` bounds one probe, ``startup_timeout`` the whole wait and ``retries`` is how many
failed probes in a row the monitor tolerates before calling a running service unhealthy.
``start_period`` needs no handling: during startup every failure is tolerated until
``startup_timeout`` anyway.

Every probe run through ``run_probe`` is recorded in
``env_manager_service_health_check_duration_seconds{service_name,status}``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import random
import time
from typing import ClassVar

import anyio
import attrs

from ..backends.base import Backend, fill_port_placeholders
from ..errors import HealthCheckFailed, InfraError, NotFound
from ..metrics import InfraMetrics
from ..models import HealthCheck, Instance, ServiceSpec

__all__ = [
    "EngineProbe",
    "ExecProbe",
    "HttpProbe",
    "NoProbe",
    "Probe",
    "ProbeResult",
    "RedisProbe",
    "TcpProbe",
    "last_log_lines",
    "probe_for",
    "run_probe",
    "wait_until_healthy",
]

#: Shortest pause between two probes of the startup wait.
MIN_PROBE_DELAY = 0.005
#: The pause grows with the time already waited (this fraction of it), up to the check's
#: ``interval``: a service that becomes ready after ``t`` seconds is seen at most about
#: ``PROBE_DELAY_FRACTION * t`` late, and a wait of ``t`` seconds costs about
#: ``ln(t / 0.1) / PROBE_DELAY_FRACTION`` probes after its first 0.1 s (some 50 for one second).
PROBE_DELAY_FRACTION = 0.05
#: Seconds between the engine checks of the startup wait ("has the instance exited?"): an
#: engine call per failed probe would cost more than the probes (about 8 ms per inspect on
#: Podman) and delay the next probe by as much.
_EXIT_CHECK_EVERY = 0.25


@attrs.frozen
class ProbeResult:
    ok: bool
    message: str
    #: Seconds the probe took.
    duration: float = 0.0


def _target_port(spec: ServiceSpec, check: HealthCheck) -> int | None:
    if check.port is not None:
        return check.port
    return spec.ports[0].container_port if spec.ports else None


class Probe(abc.ABC):
    """Checks one instance once. Subclasses implement ``_check``; ``check`` times it."""

    kind: ClassVar[str] = ""

    def __init__(self, check: HealthCheck) -> None:
        self.health = check

    async def check(self, backend: Backend, spec: ServiceSpec, instance: Instance) -> ProbeResult:
        started = time.perf_counter()
        try:
            with anyio.fail_after(self.health.timeout):
                ok, message = await self._check(backend, spec, instance)
        except TimeoutError:
            ok, message = False, f"{self.kind} probe timed out after {self.health.timeout:g}s"
        except OSError as exc:
            ok, message = False, f"{self.kind} probe: {exc.strerror or exc}"
        except InfraError as exc:
            ok, message = False, f"{self.kind} probe: {exc}"
        return ProbeResult(ok, message, time.perf_counter() - started)

    def _address(self, backend: Backend, spec: ServiceSpec, instance: Instance) -> tuple[str, int]:
        port = _target_port(spec, self.health)
        if port is None:
            raise NotFound(
                f"a {self.kind} health check needs a port",
                field=f"services.{spec.name}.health.port",
                fix="set health.port or publish a port",
            )
        return backend.probe_address(instance, port)

    @abc.abstractmethod
    async def _check(self, backend: Backend, spec: ServiceSpec, instance: Instance) -> tuple[bool, str]: ...


class TcpProbe(Probe):
    """Ready when the port accepts a TCP connection that stays open.

    A container engine's port proxy (docker-proxy, Podman's forwarder) accepts on the host
    port as soon as the container runs, then closes the connection at once when nothing
    listens inside. So an accept alone proves nothing: the connection must also survive a
    short grace period without being closed by the peer."""

    kind = "tcp"
    #: How long an accepted connection must stay open. A proxy with nothing behind it closes
    #: within a millisecond or two; a real server waits for the client to speak.
    grace: ClassVar[float] = 0.02

    async def _check(self, backend: Backend, spec: ServiceSpec, instance: Instance) -> tuple[bool, str]:
        host, port = self._address(backend, spec, instance)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            closed = False
            with anyio.move_on_after(min(self.grace, self.health.timeout / 2)):
                closed = await reader.read(1) == b""
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if closed:
            return False, f"tcp {host}:{port} accepted, then closed at once (nothing listening behind it)"
        return True, f"tcp {host}:{port} accepts connections"


class HttpProbe(Probe):
    """Ready when ``GET path`` answers ``expected_status`` (a raw HTTP/1.0 request: no client
    library, no connection pool, nothing to leak between probes)."""

    kind = "http"

    async def _check(self, backend: Backend, spec: ServiceSpec, instance: Instance) -> tuple[bool, str]:
        host, port = self._address(backend, spec, instance)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            request = f"GET {self.health.path} HTTP/1.0\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode("latin-1"))
            await writer.drain()
            status_line = (await reader.readline()).decode("latin-1").strip()
        finally:
            writer.close()
            await writer.wait_closed()
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return False, f"http {self.health.path}: not an HTTP answer: {status_line[:80]!r}"
        status = int(parts[1])
        if status != self.health.expected_status:
            return False, f"http {self.health.path} answered {status}, expected {self.health.expected_status}"
        return True, f"http {self.health.path} answered {status}"


class RedisProbe(Probe):
    """Ready when a RESP ``PING`` gets ``+PONG`` (servers without AUTH; a ``-NOAUTH`` or
    ``-LOADING`` answer is reported as the failure message)."""

    kind = "redis"

    async def _check(self, backend: Backend, spec: ServiceSpec, instance: Instance) -> tuple[bool, str]:
        host, port = self._address(backend, spec, instance)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"*1\r\n$4\r\nPING\r\n")
            await writer.drain()
            answer = (await reader.readline()).decode("utf-8", "replace").strip()
        finally:
            writer.close()
            await writer.wait_closed()
        if answer == "+PONG":
            return True, "redis PING answered +PONG"
        return False, f"redis PING answered {answer[:120]!r}" if answer else "redis closed without answering"


class ExecProbe(Probe):
    """Ready when ``command`` exits 0 inside the instance's environment."""

    kind = "exec"

    async def _check(self, backend: Backend, spec: ServiceSpec, instance: Instance) -> tuple[bool, str]:
        # The command may name the service's ports ({port}, {host_port.N}): fill them the way
        # the backend filled the service's own command.
        published = {c: host_port for c, (_ip, host_port) in instance.ports.items()}
        listen = published if backend.binds_host_ports else {c: c for c in instance.ports}
        first = spec.ports[0].container_port if spec.ports else None
        listen_host = "127.0.0.1" if backend.binds_host_ports else "0.0.0.0"
        command = [
            fill_port_placeholders(
                arg, first=first, listen=listen, published=published, listen_host=listen_host
            )
            for arg in self.health.command
        ]
        result = await backend.exec(instance.id, command, timeout=self.health.timeout)
        tail = result.output.strip().splitlines()[-1:] if result.output.strip() else []
        detail = f": {tail[0][:120]}" if tail else ""
        return result.exit_code == 0, f"exec {self.health.command[0]} exited {result.exit_code}{detail}"


class EngineProbe(Probe):
    """The engine's own HEALTHCHECK verdict; with none (or for processes), "still running"."""

    kind = "engine"

    async def _check(self, backend: Backend, spec: ServiceSpec, instance: Instance) -> tuple[bool, str]:
        current = await backend.inspect(instance.id)
        if current.engine_health is not None:
            return current.engine_health == "healthy", f"engine health: {current.engine_health}"
        if current.state == "running":
            return True, "running"
        return False, f"state {current.state} (exit code {current.exit_code})"


class NoProbe(EngineProbe):
    """``kind = "none"``: no readiness check beyond the instance running."""

    kind = "none"


_PROBES: dict[str, type[Probe]] = {
    cls.kind: cls for cls in (TcpProbe, HttpProbe, RedisProbe, ExecProbe, EngineProbe, NoProbe)
}


def probe_for(check: HealthCheck) -> Probe:
    """The probe implementing ``check.kind``."""
    return _PROBES[check.kind](check)


async def run_probe(
    probe: Probe,
    backend: Backend,
    spec: ServiceSpec,
    instance: Instance,
    *,
    metrics: InfraMetrics | None = None,
) -> ProbeResult:
    """One probe, recorded in the health-check duration histogram."""
    result = await probe.check(backend, spec, instance)
    if metrics is not None:
        metrics.service_health_check_duration_seconds.labels(
            service_name=spec.name, status="healthy" if result.ok else "unhealthy"
        ).observe(result.duration)
    return result


async def last_log_lines(backend: Backend, spec: ServiceSpec, instance_id: str, n: int = 20) -> list[str]:
    """The instance's last ``n`` log lines, for error messages (empty when unreadable)."""
    lines: list[str] = []
    try:
        async for entry in backend.logs(instance_id, service_name=spec.name, tail=n):
            lines.append(f"[{entry.stream}] {entry.message}")
    except InfraError:
        pass
    return lines[-n:]


def probe_delay(waited: float, ceiling: float) -> float:
    """The pause before the next startup probe after ``waited`` seconds of waiting: short at
    first (a service is usually ready within a second), growing with the wait, never above
    ``ceiling`` (the check's interval), with a little jitter so services probed together
    do not knock in step."""
    delay = min(ceiling, max(MIN_PROBE_DELAY, PROBE_DELAY_FRACTION * waited))
    return random.uniform(0.8 * delay, delay)


async def wait_until_healthy(
    backend: Backend,
    spec: ServiceSpec,
    instance: Instance,
    *,
    metrics: InfraMetrics | None = None,
    timeout: float | None = None,
) -> ProbeResult:
    """Probe until the first success; ``HealthCheckFailed`` (with last failure and log lines)
    when ``timeout`` (default: the check's ``startup_timeout``) runs out or the instance exits.

    Only the probe decides readiness (a ``redis`` check needs ``+PONG``, an ``http`` check
    its status; an engine's port proxy accepting is not enough). Between failed probes the
    pause grows with the time waited (``probe_delay``); whether the instance has exited is
    asked of the engine at most every ``_EXIT_CHECK_EVERY`` seconds, and once more before
    giving up.
    """
    check = spec.health
    probe = probe_for(check)
    budget = check.startup_timeout if timeout is None else timeout
    began = time.monotonic()
    deadline = began + budget
    next_exit_check = began + _EXIT_CHECK_EVERY
    while True:
        last = await run_probe(probe, backend, spec, instance, metrics=metrics)
        if last.ok:
            return last
        now = time.monotonic()
        if now >= next_exit_check or now >= deadline:
            instance = await _still_running(backend, spec, instance, last)
            next_exit_check = time.monotonic() + _EXIT_CHECK_EVERY
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HealthCheckFailed(
                spec.name,
                last_failure=last.message,
                last_logs=await last_log_lines(backend, spec, instance.id),
                timeout=budget,
            )
        await anyio.sleep(min(remaining, probe_delay(now - began, check.interval)))


async def _still_running(
    backend: Backend, spec: ServiceSpec, instance: Instance, last: ProbeResult
) -> Instance:
    """The instance as the engine sees it now; ``HealthCheckFailed`` if it is gone or exited."""
    try:
        current = await backend.inspect(instance.id)
    except NotFound:
        raise HealthCheckFailed(
            spec.name, last_failure=f"instance disappeared (last probe: {last.message})"
        ) from None
    if current.state == "exited":
        failure = f"exited with code {current.exit_code} before becoming healthy (last probe: {last.message})"
        raise HealthCheckFailed(
            spec.name, last_failure=failure, last_logs=await last_log_lines(backend, spec, instance.id)
        )
    return current  # a container that was only "created" gets its published ports on start
