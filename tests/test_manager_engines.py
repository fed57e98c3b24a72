"""ServiceManager on real container engines (Docker Engine and Podman, parametrized): a real
Redis in a container gated on PING, status with resource usage, logs, restart and stop; a
container killed from outside restarted by the monitor; the owning process SIGKILLed, then a
new manager adopts the healthy service and reaps the orphan, checked through the engine API
by label; and a three-level graph started in dependency order.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import anyio
import attrs
import pytest
from engines import Engine, docker_engine, engine, engine_kind, podman_engine, unique_name

from dspy_infra.backends.base import LABEL_OWNER, LABEL_SERVICE
from dspy_infra.backends.docker import DockerBackend
from dspy_infra.config import Settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import (
    DependsOn,
    Event,
    HealthCheck,
    PortMapping,
    RestartPolicy,
    ServiceSpec,
    ServiceStatus,
    ServiceStatusUpdate,
)
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.services.manager import ServiceManager

# Fixtures from engines.py, imported so pytest sees them in this module.
__all__ = ["docker_engine", "engine", "engine_kind", "podman_engine"]

REPO = Path(__file__).resolve().parent.parent

# Requesting anyio_backend up front keeps anyio's plugin from re-creating these items at
# collection finish, which would drop the engine parametrization.
pytestmark = pytest.mark.usefixtures("anyio_backend")


@attrs.frozen
class ContainerKit:
    """A DockerBackend on one engine, and services spelled as images of that engine."""

    engine: Engine
    settings: Settings
    backend: DockerBackend

    @property
    def owner(self) -> str:
        return self.settings.resolved_owner()

    def redis(self, name: str = "redis", **fields: Any) -> ServiceSpec:
        return ServiceSpec(
            name=name,
            image=self.engine.images.redis,
            ports=[PortMapping(6379, 0)],
            health=HealthCheck(kind="redis", interval=0.1, startup_timeout=30),
            **fields,
        )

    def http_fields(self) -> dict[str, Any]:
        """TOML-shaped fields of a busybox HTTP service (also used by the child process)."""
        return {
            "image": self.engine.images.busybox,
            # httpd as PID 1 would ignore SIGTERM (no handler): a shell that traps it stops fast.
            "command": ["sh", "-c", 'httpd -f -p 8080 -h /www & trap "exit 0" TERM; wait'],
            "ports": ["0:8080"],
            "health": {"kind": "http", "path": "/index.html", "interval": 0.1, "startup_timeout": 30.0},
        }

    def http(self, name: str, *deps: str, **fields: Any) -> ServiceSpec:
        from dspy_infra.services.catalog import apply_fields

        spec = apply_fields(name, self.http_fields())
        return attrs.evolve(spec, depends_on=tuple(DependsOn(d) for d in deps), **fields)

    async def owned(self) -> list[dict[str, Any]]:
        """Containers carrying this test's owner label, straight from the engine API."""
        filters = json.dumps({"label": [f"{LABEL_OWNER}={self.owner}"]})
        found = await self.backend.docker.containers.list(all=True, filters=filters)
        return [c._container for c in found]


@pytest.fixture
async def kit(engine: Engine, tmp_path: Path) -> AsyncIterator[ContainerKit]:
    settings = Settings(
        home=tmp_path / "state", backend="docker", docker_host=engine.host, network=unique_name("net")
    )
    async with DockerBackend(settings, host=engine.host) as backend:
        kit = ContainerKit(engine=engine, settings=settings, backend=backend)
        try:
            yield kit
        finally:
            for container in await kit.owned():
                await backend.remove(container["Id"])
            try:
                await (await backend.docker.networks.get(settings.network)).delete()
            except aiodocker.DockerError:
                pass


def _manager(kit: ContainerKit, *specs: ServiceSpec, bus: EventBus | None = None) -> ServiceManager:
    return ServiceManager(
        kit.settings,
        bus=bus or EventBus(),
        metrics=InfraMetrics(),
        plugins=build_plugin_manager(load_entry_points=False),
        backend=kit.backend,
        extra_services=specs,
    )


def _events(bus: EventBus, type_: str) -> dict[str, Event]:
    return {e.resource_id: e for e in bus.history([type_])}


async def _resp(host: str, port: int, request: bytes, until: bytes) -> bytes:
    async with await anyio.connect_tcp(host, port) as stream:
        await stream.send(request)
        data = b""
        with anyio.fail_after(5):
            while until not in data:
                data += await stream.receive()
    return data


async def test_redis_in_a_container_through_the_manager(kit: ContainerKit) -> None:
    async with _manager(kit, kit.redis()) as mgr:
        updates: list[ServiceStatusUpdate] = [u async for u in mgr.start(["redis"])]
        assert updates[-1].status == ServiceStatus.HEALTHY and "+PONG" in updates[-1].message
        host, port = mgr.endpoint("redis")
        reply = await _resp(
            host,
            port,
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
            b"hello",
        )
        assert reply.startswith(b"+OK\r\n$5\r\nhello")

        state = (await mgr.status(["redis"]))["redis"]
        assert state.status == ServiceStatus.HEALTHY and state.backend == "docker"
        assert state.ports == {6379: port}
        assert state.resource_usage.memory_bytes > 1_000_000  # a real redis-server in there
        assert state.instance_id in {c["Id"] for c in await kit.owned()}

        lines = [e.message async for e in mgr.logs("redis")]
        assert any("Ready to accept connections" in line for line in lines)
        assert len([e async for e in mgr.logs("redis", tail=2)]) == 2

        restarted = await mgr.restart("redis", timeout=5)
        assert restarted.status == ServiceStatus.HEALTHY and restarted.restarts == 1
        assert restarted.started_at > state.started_at
        host, port = mgr.endpoint("redis")
        assert b"+PONG" in await _resp(host, port, b"*1\r\n$4\r\nPING\r\n", b"PONG")

        assert await mgr.stop(["redis"], timeout=5) == {"redis": "stopped"}
        assert (await mgr.status(["redis"]))["redis"].status == ServiceStatus.STOPPED
    assert await kit.owned() == []


async def test_monitor_restarts_a_container_killed_from_outside(kit: ContainerKit) -> None:
    bus = EventBus()
    redis = kit.redis(restart=RestartPolicy(backoff=0.05, max_restarts=3))
    async with _manager(kit, redis, bus=bus) as mgr:
        await mgr.ensure(["redis"])
        first = (await mgr.status(["redis"]))["redis"]
        await kit.backend.docker.containers.container(first.instance_id).kill(signal="SIGKILL")
        with anyio.fail_after(30):
            async for event in bus.subscribe(["service_restarted"], since=0):
                if event.resource_id == "redis":
                    break
        types = [e.type for e in bus.history() if e.resource_id == "redis"]
        assert types.index("service_unhealthy") < types.index("service_restarted")
        after = (await mgr.status(["redis"]))["redis"]
        assert after.status == ServiceStatus.HEALTHY and after.restarts == 1
        assert after.started_at > first.started_at
        host, port = mgr.endpoint("redis")
        assert b"+PONG" in await _resp(host, port, b"*1\r\n$4\r\nPING\r\n", b"PONG")
        await mgr.stop()
    assert await kit.owned() == []


_CHILD = r"""
import anyio, json, sys
from dspy_infra.config import Settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.services.catalog import apply_fields
from dspy_infra.services.manager import ServiceManager

async def main():
    settings, fields = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    specs = [apply_fields(name, f) for name, f in fields.items()]
    mgr = ServiceManager(Settings(**settings), bus=EventBus(), metrics=InfraMetrics(),
                         plugins=build_plugin_manager(load_entry_points=False), extra_services=specs)
    async with mgr:
        await mgr.ensure(sorted(fields))
        print("ready", flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


async def test_sigkilled_owner_then_adopt_and_reap_leaves_nothing(kit: ContainerKit) -> None:
    fields = {"keep": kit.http_fields(), "orphan": kit.http_fields()}
    settings = {
        "home": str(kit.settings.resolved_home()),
        "backend": "docker",
        "docker_host": kit.engine.host,
        "network": kit.settings.network,
    }
    child = await anyio.open_process(
        [sys.executable, "-c", _CHILD, json.dumps(settings), json.dumps(fields)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        with anyio.fail_after(60):
            line = await child.stdout.receive()
        assert line.startswith(b"ready"), line
    finally:
        child.kill()  # SIGKILL: the owner gets no chance to clean up
        await child.wait()
        await child.aclose()
    survivors = {c["Labels"][LABEL_SERVICE]: c for c in await kit.owned()}
    assert set(survivors) == {"keep", "orphan"}  # its containers outlived it

    from dspy_infra.services.catalog import apply_fields

    bus = EventBus()
    keep, orphan = apply_fields("keep", fields["keep"]), apply_fields("orphan", fields["orphan"])
    async with _manager(kit, keep, orphan, bus=bus) as mgr:
        assert await mgr.ensure(["keep"]) == ["keep"]
        assert _events(bus, "service_healthy")["keep"].data["adopted"] == "True"
        assert "keep" not in _events(bus, "service_starting")
        assert (await mgr.status(["keep"]))["keep"].instance_id == survivors["keep"]["Id"]
        assert "orphan" in _events(bus, "service_orphan_removed")
        assert [c["Id"] for c in await kit.owned()] == [survivors["keep"]["Id"]]
        await mgr.stop()
    assert await kit.owned() == []  # nothing left behind, by the engine's own account


async def test_three_levels_start_in_dependency_order(kit: ContainerKit) -> None:
    bus = EventBus()
    specs = [
        kit.http("base"),
        kit.http("left", "base"),
        kit.http("right", "base"),
        kit.http("top", "left", "right"),
    ]
    async with _manager(kit, *specs, bus=bus) as mgr:
        assert sorted(await mgr.ensure(["top"])) == ["base", "left", "right", "top"]
        starting, healthy = _events(bus, "service_starting"), _events(bus, "service_healthy")
        for spec in specs:
            for dep in spec.depends_on:
                assert healthy[dep.name].timestamp <= starting[spec.name].timestamp
        # Siblings start together: each began before the other became healthy.
        assert starting["left"].timestamp < healthy["right"].timestamp
        assert starting["right"].timestamp < healthy["left"].timestamp
        await mgr.stop()
    assert await kit.owned() == []
