"""ServiceManager on a real backend (the local-process backend by default): dependency order
and parallelism read from event timestamps, refused graphs, optional vs required failures,
the monitor restarting a service killed from outside, adoption after the owning process was
SIGKILLed, and a real Redis server as a local process.

The ``kit`` fixture is the only backend-specific part: it opens the backend and spells
services for it (a host command here). A container kit can be added beside it and every
test runs unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from engines import docker_engine, engine_settings, podman_engine, skip_or_fail
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import manager_dags

from dspy_infra.backends.base import LABEL_OWNER, LABEL_SERVICE, Backend
from dspy_infra.backends.docker import DockerBackend
from dspy_infra.backends.process import ProcessBackend
from dspy_infra.config import Settings
from dspy_infra.errors import (
    BackendUnavailable,
    ConfigError,
    CycleError,
    HealthCheckFailed,
    MissingBinary,
    NotFound,
    SpecError,
)
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import (
    DependsOn,
    Event,
    HealthCheck,
    Instance,
    PortMapping,
    QueueStatus,
    RestartPolicy,
    ServiceSpec,
    ServiceStatus,
    ServiceStatusUpdate,
    VolumeMount,
)
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.services import manager as manager_module
from dspy_infra.services.catalog import apply_fields
from dspy_infra.services.manager import ServiceManager, instance_name_for

__all__ = ["docker_engine", "podman_engine"]  # engine fixtures this module uses, imported on purpose

REPO = Path(__file__).resolve().parents[2]

# Requesting anyio_backend up front keeps anyio's plugin from re-creating the items at
# collection finish, which would drop the `backend` parametrization.
pytestmark = pytest.mark.usefixtures("anyio_backend")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_HTTP_HEALTH = {"kind": "http", "path": "/index.html", "interval": 0.1, "startup_timeout": 30.0}


@attrs.define
class ProcessKit:
    """Opens a process backend and spells services as host commands on free ports."""

    settings: Settings
    web_root: Path
    backend: Backend

    name = "process"

    def http_fields(self, *, delay: float = 0.0) -> dict[str, Any]:
        """TOML-shaped fields of an HTTP service (also used by the child process test)."""
        port = free_port()
        busybox = shutil.which("busybox")
        if busybox:
            serve = f"exec {busybox} httpd -f -p 127.0.0.1:{port} -h {self.web_root}"
        else:
            serve = (
                f"exec {sys.executable} -m http.server --bind 127.0.0.1 --directory {self.web_root} {port}"
            )
        script = f"sleep {delay}; {serve}" if delay else serve
        return {"command": ["sh", "-c", script], "ports": [f"{port}:{port}"], "health": _HTTP_HEALTH}

    def script_fields(self, script: str) -> dict[str, Any]:
        port = free_port()
        return {"command": ["sh", "-c", script], "ports": [f"{port}:{port}"]}

    def served_dir(self) -> str:
        """Where an HTTP service of ``http_fields`` serves its files from, as its exec sees it."""
        return str(self.web_root)

    def move_command(self, source: str, target: str) -> list[str]:
        """A command that renames a file, as an exec in the service runs it."""
        return ["mv", source, target]

    def redis(self, name: str = "redis") -> ServiceSpec:
        exe = shutil.which("redis-server")
        if exe is None:
            skip_or_fail("redis-server is not installed (apt-get install -y redis-server)")
        port = free_port()
        return ServiceSpec(
            name=name,
            command=[exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            ports=[PortMapping(port, port)],
            health=HealthCheck(kind="redis", interval=0.1),
        )

    def fixed_port(self, host_port: int) -> PortMapping:
        """The HTTP service's port published on a fixed host port."""
        return PortMapping(host_port, host_port)

    def shared_dir(self, host_dir: Path) -> tuple[tuple[VolumeMount, ...], str]:
        """Where a service writes files the test reads: here, the host directory itself."""
        return (), str(host_dir)

    async def kill_from_outside(self, instance_id: str) -> None:
        assert isinstance(self.backend, ProcessBackend)
        os.kill(self.backend.main_pid(instance_id), signal.SIGKILL)

    def child_settings(self) -> dict[str, Any]:
        return {"home": str(self.settings.resolved_home()), "backend": "process"}


@attrs.define
class ContainerKit(ProcessKit):
    """A Docker Engine or Podman backend; services are busybox / redis test images."""

    engine: Any = None

    name = "container"

    def http_fields(self, *, delay: float = 0.0) -> dict[str, Any]:
        # httpd is not PID 1 (PID 1 ignores SIGTERM): the shell forwards the stop signal.
        serve = 'httpd -f -p 8080 -h /www & child=$!; trap "kill $child; exit 0" TERM; wait'
        script = f"sleep {delay}; {serve}" if delay else serve
        return {
            "image": self.engine.images.busybox,
            "command": ["sh", "-c", script],
            "ports": [{"container_port": 8080, "host_port": 0}],
            "health": {**_HTTP_HEALTH, "port": 8080},
        }

    def served_dir(self) -> str:
        return "/www"

    def move_command(self, source: str, target: str) -> list[str]:
        return ["/bin/busybox", "mv", source, target]  # (the image links only a few applets)

    def script_fields(self, script: str) -> dict[str, Any]:
        return {
            "image": self.engine.images.busybox,
            "command": ["sh", "-c", script],
            "ports": [{"container_port": 8080, "host_port": 0}],
        }

    def redis(self, name: str = "redis") -> ServiceSpec:
        command = ["/usr/bin/redis-server", "--port", "6379", "--save", "", "--appendonly", "no"]
        # Published ports arrive from the bridge, not loopback: protected mode would refuse them.
        return apply_fields(
            name,
            {
                "image": self.engine.images.redis,
                "command": [*command, "--protected-mode", "no"],
                "ports": [{"container_port": 6379, "host_port": 0}],
                "health": {"kind": "redis", "interval": 0.1},
            },
        )

    def fixed_port(self, host_port: int) -> PortMapping:
        return PortMapping(8080, host_port)

    def shared_dir(self, host_dir: Path) -> tuple[tuple[VolumeMount, ...], str]:
        return (VolumeMount(str(host_dir), "/shared"),), "/shared"

    async def kill_from_outside(self, instance_id: str) -> None:
        assert isinstance(self.backend, DockerBackend)
        await self.backend.docker.containers.container(instance_id).kill(signal="SIGKILL")

    def child_settings(self) -> dict[str, Any]:
        return {
            "home": str(self.settings.resolved_home()),
            "backend": "docker",
            "docker_host": self.engine.host,
            "network": self.settings.network,
            "owner": self.settings.owner,
        }


Kit = ProcessKit


def _http(kit: Kit, name: str, *deps: str, delay: float = 0.0, **fields: Any) -> ServiceSpec:
    spec = apply_fields(name, kit.http_fields(delay=delay))
    return attrs.evolve(spec, depends_on=tuple(DependsOn(d) for d in deps), **fields)


def _script(kit: Kit, name: str, script: str, **fields: Any) -> ServiceSpec:
    """A service that runs ``script``, probed on a port it never opens (so it must exit)."""
    spec = apply_fields(name, {**kit.script_fields(script), "health": {"kind": "tcp", "interval": 0.1}})
    return attrs.evolve(spec, **fields)


@pytest.fixture(params=["process", "docker", "podman"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which backend the manager tests run on."""
    return str(request.param)


@pytest.fixture
def engine_for(backend: str, request: pytest.FixtureRequest) -> Any:
    # A sync fixture: engine session setup happens outside any running event loop.
    if backend == "process":
        return None
    return request.getfixturevalue(f"{backend}_engine")


@contextlib.asynccontextmanager
async def _open_kit(backend: str, engine: Any, tmp_path: Path) -> AsyncIterator[Kit]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("ok\n")
    if backend == "process":
        settings = Settings(home=tmp_path / "state", backend="process")
        be: Backend = ProcessBackend(settings)
        made: Kit = ProcessKit(settings=settings, web_root=root, backend=be)
    else:
        settings = attrs.evolve(engine_settings(tmp_path), backend="docker", docker_host=engine.host)
        be = DockerBackend(settings, host=engine.host)
        made = ContainerKit(settings=settings, web_root=root, backend=be, engine=engine)
    async with be:
        try:
            yield made
        finally:
            # Nothing of this test's owner may be left behind, whatever the test did.
            for inst in await be.list_instances({LABEL_OWNER: settings.resolved_owner()}):
                await be.remove(inst.id)
            if backend != "process":
                with contextlib.suppress(Exception):
                    await (await be.docker.networks.get(settings.network)).delete()


@pytest.fixture
async def kit(backend: str, engine_for: Any, tmp_path: Path) -> AsyncIterator[Kit]:
    async with _open_kit(backend, engine_for, tmp_path) as made:
        yield made


@pytest.fixture
async def process_kit(tmp_path: Path) -> AsyncIterator[Kit]:
    """For what only the process backend has (binaries, the auto fallback)."""
    async with _open_kit("process", None, tmp_path) as made:
        yield made


def _manager(kit: Kit, *specs: ServiceSpec, **kw: Any) -> ServiceManager:
    return ServiceManager(
        kit.settings,
        bus=kw.pop("bus", EventBus()),
        metrics=kw.pop("metrics", InfraMetrics()),
        plugins=build_plugin_manager(load_entry_points=False),
        backend=kit.backend,
        extra_services=specs,
        **kw,
    )


def _events(bus: EventBus, type_: str) -> dict[str, Event]:
    return {e.resource_id: e for e in bus.history([type_])}


async def _http_ok(host: str, port: int) -> bool:
    try:
        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send(b"GET /index.html HTTP/1.0\r\n\r\n")
            data = await stream.receive()
        return b" 200 " in data
    except OSError:
        return False


async def _owned(kit: Kit) -> list[str]:
    return sorted(
        i.name for i in await kit.backend.list_instances({LABEL_OWNER: kit.settings.resolved_owner()})
    )


async def test_three_levels_start_in_order_and_siblings_in_parallel(kit: Kit) -> None:
    bus = EventBus()
    specs = [
        _http(kit, "base-a", delay=0.6),
        _http(kit, "base-b", delay=0.6),
        _http(kit, "mid", "base-a", "base-b"),
        _http(kit, "top", "mid"),
    ]
    async with _manager(kit, *specs, bus=bus) as mgr:
        started = time.monotonic()
        updates = [u async for u in mgr.start(["top"])]
        elapsed = time.monotonic() - started
        starting, healthy = _events(bus, "service_starting"), _events(bus, "service_healthy")
        assert set(healthy) == {"base-a", "base-b", "mid", "top"}
        for spec in specs:
            for dep in spec.depends_on:
                assert starting[spec.name].timestamp >= healthy[dep.name].timestamp, (spec.name, dep.name)
        # Siblings overlapped: each started before the other was healthy.
        assert max(starting["base-a"].timestamp, starting["base-b"].timestamp) < min(
            healthy["base-a"].timestamp, healthy["base-b"].timestamp
        )
        assert elapsed < 1.2 + 5  # two 0.6 s siblings in parallel, not in series (plus slack)
        progress = [u.progress for u in updates]
        assert progress == sorted(progress) and progress[-1] == 100
        assert [u.service_name for u in updates if u.status == ServiceStatus.HEALTHY][-1] == "top"
        for name in ("base-a", "mid", "top"):
            assert await _http_ok(*mgr.endpoint(name))
        result = await mgr.stop()
        assert result == {n: "stopped" for n in ("top", "mid", "base-a", "base-b")}
        order = list(result)  # dependents first
        assert order.index("top") < order.index("mid") < min(order.index("base-a"), order.index("base-b"))
        assert await _owned(kit) == []


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HypothesisHealthCheck.function_scoped_fixture, HypothesisHealthCheck.too_slow],
)
@given(edges=manager_dags(), parallel=st.booleans())
async def test_property_no_service_starts_before_its_dependencies_are_ready(
    process_kit: Kit, edges: dict[str, list[str]], parallel: bool
) -> None:
    kit = process_kit
    bus = EventBus()
    specs = [
        ServiceSpec(
            name=name,
            command=["sleep", "30"],
            depends_on=[DependsOn(d) for d in deps],
            health=HealthCheck(kind="none"),
        )
        for name, deps in edges.items()
    ]
    async with _manager(kit, *specs, bus=bus) as mgr:
        started = await mgr.ensure(sorted(edges)) if parallel else None
        if not parallel:
            started = [
                u.service_name
                async for u in mgr.start(sorted(edges), parallel=False)
                if u.progress and u.status == ServiceStatus.HEALTHY
            ]
        assert started is not None and sorted(started) == sorted(edges)
        starting, healthy = _events(bus, "service_starting"), _events(bus, "service_healthy")
        for name, deps in edges.items():
            for dep in deps:
                assert starting[name].timestamp >= healthy[dep].timestamp
        result = await mgr.stop(timeout=2)
        assert set(result.values()) == {"stopped"}
        stopped = [e.resource_id for e in bus.history(["service_stopped"])]
        for name, deps in edges.items():
            for dep in deps:
                assert stopped.index(name) < stopped.index(dep)  # dependents stop first
    assert await _owned(kit) == []


async def test_sequential_start_runs_one_at_a_time(kit: Kit) -> None:
    bus = EventBus()
    async with _manager(kit, _http(kit, "one"), _http(kit, "two"), bus=bus) as mgr:
        updates = [u async for u in mgr.start(["one", "two"], parallel=False)]
        starting, healthy = _events(bus, "service_starting"), _events(bus, "service_healthy")
        assert starting["two"].timestamp >= healthy["one"].timestamp
        assert updates[-1].progress == 100
        await mgr.stop()


async def test_cycles_and_unknown_dependencies_are_refused(kit: Kit) -> None:
    async with _manager(kit, _http(kit, "a"), _http(kit, "b", "a")) as mgr:
        with pytest.raises(CycleError, match="a -> b -> a"):
            mgr.add_service(_http(kit, "a", "b"))
        with pytest.raises(SpecError) as info:
            mgr.add_service(_http(kit, "c", "rediss"))
        assert info.value.field == "services.c.depends_on"
        with pytest.raises(NotFound, match="unknown service 'nope'"):
            await mgr.ensure(["nope"])
        with pytest.raises(CycleError):
            async for _ in mgr.start(["a"], overrides={"a.depends_on": '["b"]'}):
                pass
        taken = kit.fixed_port(free_port())
        mgr.add_service(attrs.evolve(_http(kit, "d"), ports=(taken,)))
        mgr.add_service(attrs.evolve(_http(kit, "e"), ports=(taken,)))
        with pytest.raises(SpecError, match="already published") as clash:
            await mgr.ensure(["d", "e"])
        assert clash.value.field == "services.e.ports"
        assert await _owned(kit) == []  # nothing was started for refused graphs


async def test_failing_optional_service_does_not_block_the_rest(kit: Kit) -> None:
    metrics = InfraMetrics()
    specs = [
        _http(kit, "web"),
        _script(kit, "flaky", "echo cannot start >&2; exit 1", required=False),
        _http(kit, "needs-flaky", "flaky", required=False),
    ]
    async with _manager(kit, *specs, metrics=metrics) as mgr:
        updates = [u async for u in mgr.start(["web", "needs-flaky"])]
        final = {u.service_name: u for u in updates if u.status != ServiceStatus.STARTING}
        assert final["web"].status == ServiceStatus.HEALTHY
        assert (
            final["flaky"].status == ServiceStatus.FAILED and "exited with code 1" in final["flaky"].message
        )
        assert final["needs-flaky"].status == ServiceStatus.FAILED
        assert "skipped" in final["needs-flaky"].message and "'flaky'" in final["needs-flaky"].message
        assert await mgr.ensure(["web", "needs-flaky"]) == ["web"]
        snap = metrics.snapshot()
        assert snap['env_manager_failed_service_starts_total{reason="exited",service_name="flaky"}'] >= 1
        assert snap['env_manager_service_start_total{service_name="web",status="success"}'] == 1
        assert snap["env_manager_active_services"] == 1
        await mgr.stop()


async def test_failing_required_service_stops_the_start_with_its_reason(kit: Kit) -> None:
    bus = EventBus()
    specs = [
        _http(kit, "sibling"),
        _script(kit, "broken", "echo 'config error: no such key' >&2; sleep 0.3; exit 2"),
        _http(kit, "app", "broken", "sibling"),
    ]
    async with _manager(kit, *specs, bus=bus) as mgr:
        with pytest.raises(HealthCheckFailed) as info:
            await mgr.ensure(["app"])
        err = info.value
        assert err.service == "broken" and "exited with code 2" in err.last_failure
        assert any("config error: no such key" in line for line in err.last_logs)
        assert "service_failed" in {e.type for e in bus.history()}
        assert "app" not in _events(bus, "service_starting")
        assert await _owned(kit) == []  # what this start had brought up was stopped again
        statuses = await mgr.status(["app", "sibling"])
        assert {s.status for s in statuses.values()} == {ServiceStatus.STOPPED}


# Container engines only: the process backend creates nothing ahead (a process starts in one step).
@pytest.mark.parametrize("backend", ["docker", "podman"], indirect=True)
async def test_dependents_are_created_while_their_dependencies_start(kit: Kit) -> None:
    # The create/start split: a container engine creates a dependent's instance at once (the
    # slow part on Podman's vfs storage) and only starts it once its dependencies are ready.
    bus = EventBus()
    owner = kit.settings.resolved_owner()
    seen: list[tuple[str, bool]] = []  # (state of top's instance, was base healthy by then)

    async def watch_top() -> None:
        while True:
            for inst in await kit.backend.list_instances({LABEL_OWNER: owner, LABEL_SERVICE: "top"}):
                seen.append((inst.state, "base" in _events(bus, "service_healthy")))
            await anyio.sleep(0.05)

    async with _manager(kit, _http(kit, "base", delay=1.0), _http(kit, "top", "base"), bus=bus) as mgr:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_top)
            await mgr.ensure(["top"])
            tg.cancel_scope.cancel()
        assert ("created", False) in seen  # created before base was healthy...
        starting, healthy = _events(bus, "service_starting"), _events(bus, "service_healthy")
        assert starting["top"].timestamp >= healthy["base"].timestamp  # ...started only after
        assert await _http_ok(*mgr.endpoint("top"))
        await mgr.stop()
    assert await _owned(kit) == []


async def test_a_start_lists_the_owners_instances_once_however_many_services(
    kit: Kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: every start listed the owner's instances for the orphan sweep, then again
    # for each service's adoption check and each dependent's create-ahead check (five engine
    # listings for a four-service graph, each an engine call on the start's path).
    listings: list[dict[str, str]] = []
    real_list = kit.backend.list_instances

    async def counting_list(labels: dict[str, str]) -> list[Instance]:
        listings.append(dict(labels))
        return await real_list(labels)

    specs = [
        _http(kit, "base"),
        _http(kit, "left", "base"),
        _http(kit, "right", "base"),
        _http(kit, "top", "left", "right"),
    ]
    async with _manager(kit, *specs) as mgr:
        monkeypatch.setattr(kit.backend, "list_instances", counting_list)
        assert sorted(await mgr.ensure(["top"])) == ["base", "left", "right", "top"]
        assert listings == [{LABEL_OWNER: kit.settings.resolved_owner()}]
        monkeypatch.undo()
        await mgr.stop()
    assert await _owned(kit) == []


async def test_an_engine_refusing_the_start_listing_raises_its_own_error(
    kit: Kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The listing runs beside the backend's preparation; its error comes out as it is, not
    # inside an exception group, so callers can catch it by its class.
    async def refusing_list(labels: dict[str, str]) -> list[Instance]:
        raise BackendUnavailable("list instances: the engine is gone", field="docker_host")

    async with _manager(kit, _http(kit, "web")) as mgr:
        monkeypatch.setattr(kit.backend, "list_instances", refusing_list)
        with pytest.raises(BackendUnavailable, match="the engine is gone"):
            await mgr.ensure(["web"])
        monkeypatch.undo()
    assert await _owned(kit) == []


@pytest.mark.parametrize("backend", ["docker", "podman"], indirect=True)
async def test_stopping_every_service_removes_the_network_the_start_made(kit: Kit) -> None:
    # Regression: `dspy-infra down` left the service network on the engine, for good.
    docker = kit.backend.docker
    network = kit.settings.network

    async def networks() -> list[str]:
        return [
            n["Name"] for n in await docker.networks.list(filters={"name": [network]}) if n["Name"] == network
        ]

    async with _manager(kit, _http(kit, "a"), _http(kit, "b")) as mgr:
        await mgr.ensure(["a", "b"])
        assert await networks() == [network]
        await mgr.stop(["a"])
        assert await networks() == [network]  # b still runs on it
        await mgr.stop()
        assert await networks() == []
    assert await _owned(kit) == []


async def test_one_shot_job_gates_its_dependent(kit: Kit, tmp_path: Path) -> None:
    bus = EventBus()
    volumes, inside = kit.shared_dir(tmp_path)
    marker = tmp_path / "migrated"
    init = attrs.evolve(
        apply_fields("migrate", kit.script_fields(f"sleep 0.2; echo migrated > {inside}/migrated")),
        ports=(),
        volumes=volumes,
        one_shot=True,
    )
    app = _http(kit, "app")
    app = attrs.evolve(app, depends_on=(DependsOn("migrate", "service_completed_successfully"),))
    async with _manager(kit, init, app, bus=bus) as mgr:
        assert await mgr.ensure(["app"]) == ["migrate", "app"]
        assert marker.read_text() == "migrated\n"
        assert (
            _events(bus, "service_starting")["app"].timestamp
            >= _events(bus, "service_completed")["migrate"].timestamp
        )
        await mgr.stop()


async def test_start_overrides_change_the_spec_and_recreate(kit: Kit) -> None:
    web = _http(kit, "web")
    async with _manager(kit, web) as mgr:
        await mgr.ensure(["web"])
        before = (await mgr.status(["web"]))["web"]
        updates = [u async for u in mgr.start(["web"], overrides={"web.environment": '{"FLAVOUR": "mint"}'})]
        assert updates[-1].status == ServiceStatus.HEALTHY
        after = (await mgr.status(["web"]))["web"]
        assert after.started_at > before.started_at  # another spec hash: a new instance
        result = await kit.backend.exec(after.instance_id, ["sh", "-c", "echo $FLAVOUR"])
        assert (result.exit_code, result.output.strip()) == (0, "mint")
        assert mgr.catalog["web"].environment == {}  # overrides apply to that start only
        with pytest.raises(ConfigError) as info:
            async for _ in mgr.start(["web"], overrides={"web.colour": "x"}):
                pass
        assert info.value.field == "services.web.colour"
        await mgr.stop()


async def test_monitor_restarts_a_service_killed_from_outside(kit: Kit) -> None:
    bus = EventBus()
    web = _http(kit, "web", restart=RestartPolicy(backoff=0.05, max_restarts=3))
    async with _manager(kit, web, bus=bus) as mgr:
        await mgr.ensure(["web"])
        first = (await mgr.status(["web"]))["web"]
        await kit.kill_from_outside(first.instance_id)
        with anyio.fail_after(20):
            async for event in bus.subscribe(["service_restarted"], since=0):
                if event.resource_id == "web":
                    break
        types = [e.type for e in bus.history() if e.resource_id == "web"]
        assert types.index("service_unhealthy") < types.index("service_restarted")
        after = (await mgr.status(["web"]))["web"]
        assert after.status == ServiceStatus.HEALTHY and after.restarts == 1
        assert after.started_at > first.started_at
        assert await _http_ok(*mgr.endpoint("web"))
        await mgr.stop(["web"])


async def test_restart_policy_no_marks_the_service_failed(kit: Kit) -> None:
    bus = EventBus()
    web = _http(kit, "web", restart=RestartPolicy(mode="no"))
    async with _manager(kit, web, bus=bus) as mgr:
        await mgr.ensure(["web"])
        await kit.kill_from_outside((await mgr.status(["web"]))["web"].instance_id)
        with anyio.fail_after(10):
            async for event in bus.subscribe(["service_failed"], since=0):
                if event.resource_id == "web":
                    break
        assert (await mgr.status(["web"]))["web"].status in (ServiceStatus.FAILED, ServiceStatus.STOPPED)
        assert "service_restarted" not in {e.type for e in bus.history()}
        await mgr.stop()


@pytest.mark.parametrize("mode", ["on-failure", "always"])
async def test_a_clean_exit_stops_unless_the_policy_is_always(kit: Kit, mode: str) -> None:
    bus = EventBus()
    job = attrs.evolve(
        apply_fields("worker", kit.script_fields("sleep 0.4; exit 0")),
        ports=(),
        health=HealthCheck(kind="none", interval=0.1),
        restart=RestartPolicy(mode=mode, backoff=0.05, max_restarts=1),
    )
    async with _manager(kit, job, bus=bus) as mgr:
        await mgr.ensure(["worker"])
        wanted = "service_restarted" if mode == "always" else "service_stopped"
        with anyio.fail_after(20):
            async for event in bus.subscribe([wanted], since=0):
                if event.resource_id == "worker":
                    break
        types = {e.type for e in bus.history() if e.resource_id == "worker"}
        if mode == "on-failure":
            assert "service_restarted" not in types and "service_failed" not in types
            assert (await mgr.status(["worker"]))["worker"].status == ServiceStatus.STOPPED
        await mgr.stop()


async def test_adoption_across_managers_and_recreate_on_spec_change(kit: Kit) -> None:
    web = _http(kit, "web")
    async with _manager(kit, web) as first:
        await first.ensure(["web"])
        before = (await first.status(["web"]))["web"]
    bus = EventBus()
    async with _manager(kit, web, bus=bus) as second:  # same spec: adopted, not recreated
        assert await second.ensure(["web"]) == ["web"]
        again = (await second.status(["web"]))["web"]
        assert (again.instance_id, again.started_at) == (before.instance_id, before.started_at)
        assert _events(bus, "service_healthy")["web"].data["adopted"] == "True"
        assert "web" not in _events(bus, "service_starting")
    changed = attrs.evolve(web, environment={"VERSION": "2"})
    async with _manager(kit, changed) as third:  # spec hash differs: recreated
        await third.ensure(["web"])
        fresh = (await third.status(["web"]))["web"]
        assert fresh.started_at > before.started_at
        assert len(await _owned(kit)) == 1
        await third.stop()
    assert await _owned(kit) == []


async def test_two_owners_starting_one_service_at_once_share_it(kit: Kit) -> None:
    # What pytest-xdist workers sharing a state directory do: both ask for the same service.
    web = _http(kit, "web", delay=0.3)
    buses = [EventBus(), EventBus()]
    results: list[list[str]] = []
    # The shared network exists before the race (DockerBackend.prepare is not yet safe against
    # two concurrent first calls: Docker then creates two networks of one name).
    await kit.backend.prepare([web])
    async with _manager(kit, web, bus=buses[0]) as one, _manager(kit, web, bus=buses[1]) as two:

        async def ensure(mgr: ServiceManager) -> None:
            results.append(await mgr.ensure(["web"]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(ensure, one)
            tg.start_soon(ensure, two)
        assert results == [["web"], ["web"]]
        assert len(await _owned(kit)) == 1  # one instance, not two fighting over a name
        adopted = [b for b in buses if _events(b, "service_healthy")["web"].data.get("adopted") == "True"]
        assert len(adopted) == 1
        ids = {(await m.status(["web"]))["web"].instance_id for m in (one, two)}
        assert len(ids) == 1
    # Both monitors are gone now (either would restart a service the other stopped).
    async with _manager(kit, web) as last:
        assert await last.stop() == {"web": "stopped"}
    assert await _owned(kit) == []


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
        await mgr.ensure([name for name in sorted(fields) if name != "keep"])
        await mgr.ensure(["keep"], keep=True)  # only what is kept outlives its owner
        print("ready", flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


async def _owner_killed_after_starting(kit: Kit, fields: dict[str, dict[str, Any]]) -> dict[str, Instance]:
    """Run ``_CHILD`` (which keeps "keep" and starts the rest), SIGKILL it once its services
    are up; this owner's instances by service."""
    child = await anyio.open_process(
        [sys.executable, "-c", _CHILD, json.dumps(kit.child_settings()), json.dumps(fields)],
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
    owner = {LABEL_OWNER: kit.settings.resolved_owner()}
    return {i.labels["dspy_infra.service"]: i for i in await kit.backend.list_instances(owner)}


async def test_sigkilled_owner_then_start_again_adopts_and_reaps(kit: Kit) -> None:
    """A new manager on the home adopts the dead owner's kept service when it opens (and
    monitors it from then on) and reaps the rest, whatever it is asked to start."""
    fields = {"keep": kit.http_fields(), "orphan": kit.http_fields()}
    listed = await _owner_killed_after_starting(kit, fields)
    web_port = apply_fields("orphan", fields["orphan"]).ports[0].container_port
    orphan_address = kit.backend.probe_address(listed["orphan"], web_port)
    assert await _http_ok(*orphan_address)  # its services outlived it

    bus = EventBus()
    keep = apply_fields("keep", fields["keep"])
    async with _manager(kit, keep, apply_fields("orphan", fields["orphan"]), bus=bus) as mgr:
        assert _events(bus, "service_healthy")["keep"].data["adopted"] == "True"  # on open
        keep_port = keep.ports[0].container_port
        assert mgr["keep"].port == kit.backend.probe_address(listed["keep"], keep_port)[1]
        assert await mgr.ensure(["keep"]) == ["keep"]
        assert (await mgr.status(["keep"]))["keep"].started_at == listed["keep"].started_at
        assert "orphan" in _events(bus, "service_orphan_removed")
        assert not await _http_ok(*orphan_address)
        assert await _owned(kit) == [listed["keep"].name]
        await mgr.stop()
    assert await _owned(kit) == []


async def test_a_kept_service_slow_to_answer_is_adopted_not_removed(
    kit: Kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept instance (it may hold data) gets its whole startup time to answer when the next
    owner opens, not the few seconds a dead owner's leftover gets: on a loaded machine the
    short wait removed a Redis the user had kept (`dspy-infra up --keep`, then `services`)."""
    monkeypatch.setattr(manager_module, "_ADOPT_WAIT", 0.3)  # the leftover's wait, made short
    fields = {"keep": kit.http_fields(), "orphan": kit.http_fields()}
    listed = await _owner_killed_after_starting(kit, fields)
    served = kit.served_dir()
    page, hidden = f"{served}/index.html", f"{served}/index.hidden"
    # The kept service stops answering its probe (404) for longer than the leftover's wait.
    assert (await kit.backend.exec(listed["keep"].id, kit.move_command(page, hidden))).exit_code == 0

    async def answer_again() -> None:
        await anyio.sleep(1.5)
        assert (await kit.backend.exec(listed["keep"].id, kit.move_command(hidden, page))).exit_code == 0

    bus = EventBus()
    keep, orphan = apply_fields("keep", fields["keep"]), apply_fields("orphan", fields["orphan"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(answer_again)
        began = time.monotonic()
        async with _manager(kit, keep, orphan, bus=bus) as mgr:
            waited = time.monotonic() - began
            assert _events(bus, "service_healthy")["keep"].data["adopted"] == "True"
            assert (await mgr.status(["keep"]))["keep"].instance_id == listed["keep"].id
            assert "keep" not in _events(bus, "service_orphan_removed")
            assert "orphan" in _events(bus, "service_orphan_removed")
            await mgr.stop()
    assert waited >= 1.0  # it was adopted after the page came back, not before
    assert await _owned(kit) == []


async def test_real_redis(kit: Kit) -> None:
    redis = kit.redis()
    container_port = redis.ports[0].container_port
    async with _manager(kit, redis) as mgr:
        updates: list[ServiceStatusUpdate] = [u async for u in mgr.start(["redis"])]
        assert updates[-1].status == ServiceStatus.HEALTHY and "+PONG" in updates[-1].message
        host, port = mgr.endpoint("redis")
        assert host == "127.0.0.1" and port > 0
        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
            data = b""
            with anyio.fail_after(5):
                while b"hello" not in data:
                    data += await stream.receive()
        assert data.startswith(b"+OK\r\n$5\r\nhello")

        state = (await mgr.status(["redis"]))["redis"]
        assert state.status == ServiceStatus.HEALTHY and state.ports == {container_port: port}
        assert state.resource_usage.memory_bytes > 1_000_000  # a real redis-server's RSS
        assert state.health_checks == {"redis": "redis PING answered +PONG"}
        assert state.backend == kit.backend.name and state.instance_id

        lines = [e.message async for e in mgr.logs("redis")]
        assert any("Ready to accept connections" in ln for ln in lines)
        assert len([e async for e in mgr.logs("redis", tail=2)]) == 2

        restarted = await mgr.restart("redis", timeout=5)
        assert restarted.status == ServiceStatus.HEALTHY and restarted.restarts == 1
        assert restarted.started_at > state.started_at

        health = mgr.health(["redis"], interval=0.05)
        first = await health.__anext__()
        await health.aclose()
        assert first.healthy and first.details["kind"] == "redis"

        assert await mgr.stop(["redis"], timeout=5) == {"redis": "stopped"}
        assert await mgr.stop(["redis"]) == {"redis": "not running"}
        assert (await mgr.status(["redis"]))["redis"].status == ServiceStatus.STOPPED
        with pytest.raises(NotFound, match="not running"):
            [e async for e in mgr.logs("redis")]


async def test_follow_logs_until_the_service_exits(kit: Kit) -> None:
    fields = kit.script_fields("for i in 1 2 3; do echo line $i; sleep 0.1; done")
    job = attrs.evolve(apply_fields("talker", fields), ports=(), one_shot=True)
    async with _manager(kit, job) as mgr:
        async with anyio.create_task_group() as tg:
            tg.start_soon(mgr.ensure, ["talker"])
            owner = {LABEL_OWNER: kit.settings.resolved_owner()}
            with anyio.fail_after(20):
                while True:  # follow from the moment the job runs
                    if any(i.state == "running" for i in await kit.backend.list_instances(owner)):
                        break
                    await anyio.sleep(0.005)
                lines = [e.message async for e in mgr.logs("talker", follow=True)]
        assert lines[-1] == "line 3"
        await mgr.stop()


async def test_resources_pull_and_missing_binary(process_kit: Kit) -> None:
    kit = process_kit
    queues = {"cpu_short": QueueStatus("cpu_short", depth=3, inflight=2, limit=4, min_limit=1, max_limit=8)}
    ghost = ServiceSpec(name="ghost", command=["no-such-binary-xyz"], required=True)
    async with _manager(kit, ghost, queue_status=lambda: queues) as mgr:
        avail = await mgr.resources("cpu_short")
        assert (avail.available, avail.capacity, avail.in_use) == (True, 4, 2)
        assert avail.hardware.cpu_cores >= 1 and avail.hardware.memory_bytes > 0
        with pytest.raises(NotFound) as info:
            await mgr.resources("gpu_huge")
        assert info.value.field == "workload_class" and "cpu_short" in str(info.value)
        pulled = [p async for p in mgr.pull(["redis:7-alpine"])]
        assert [(p.image_name, p.status) for p in pulled] == [("redis:7-alpine", "complete")]
        with pytest.raises(MissingBinary) as missing:
            await mgr.ensure(["ghost"])
        assert "no-such-binary-xyz" in str(missing.value) and 'backend="docker"' in str(missing.value)
        assert missing.value.field == "services.ghost.command"
        mgr.add_service(ServiceSpec(name="known", command=["/nonexistent/redis-server"]))
        with pytest.raises(MissingBinary, match="apt-get install -y redis-server"):
            await mgr.ensure(["known"])
        assert await _owned(kit) == []


async def test_auto_backend_falls_back_to_process_without_an_engine(process_kit: Kit) -> None:
    kit = process_kit
    settings = Settings(home=kit.settings.home, backend="auto", docker_host="unix:///nonexistent/docker.sock")
    mgr = ServiceManager(
        settings,
        bus=EventBus(),
        metrics=InfraMetrics(),
        plugins=build_plugin_manager(load_entry_points=False),
    )
    async with mgr:
        assert mgr.backend.name == "process"
    bad = Settings(home=kit.settings.home)
    with pytest.raises(SpecError) as info:
        async with ServiceManager(
            bad,
            bus=EventBus(),
            metrics=InfraMetrics(),
            plugins=build_plugin_manager(load_entry_points=False),
            backend="kubernetes",
        ):
            pass
    assert info.value.field == "backend"


async def test_demo_section_runs_and_leaves_nothing_behind(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from dspy_infra.demo.services import services_section
    from dspy_infra.infra import Infra

    settings = Settings(home=tmp_path / "demo-home", backend="process", durable=False, mode="embedded")
    out = io.StringIO()
    with anyio.fail_after(120):  # a hang here fails with its place, not the whole run
        async with Infra(settings, load_entry_points=False) as infra:
            await services_section(infra, Console(file=out, width=120))
            owner = {LABEL_OWNER: settings.resolved_owner()}
            assert await infra.services.backend.list_instances(owner) == []
    text = out.getvalue()
    assert "demo-gateway started" in text and "-> 200" in text
    assert "demo-gateway=stopped" in text and "demo-api=stopped" in text


async def test_an_owner_pid_reused_by_another_process_does_not_keep_an_orphan(process_kit: Kit) -> None:
    kit = process_kit
    from dspy_infra.backends.base import LABEL_OWNER_STARTED

    owner = kit.settings.resolved_owner()
    # Our own pid, but another start time: the process that made it is gone, the pid reused.
    stale = {
        LABEL_OWNER: owner,
        "dspy_infra.service": "leftover",
        "dspy_infra.owner_pid": str(os.getpid()),
        LABEL_OWNER_STARTED: "1",
    }
    live = {**stale, "dspy_infra.service": "neighbour", LABEL_OWNER_STARTED: ""}  # pid only: alive
    await kit.backend.run(
        ServiceSpec(name="leftover", command=["sleep", "30"]), instance_name="leftover", labels=stale
    )
    await kit.backend.run(
        ServiceSpec(name="neighbour", command=["sleep", "30"]), instance_name="neighbour", labels=live
    )
    bus = EventBus()
    async with _manager(kit, _http(kit, "web"), bus=bus) as mgr:
        await mgr.ensure(["web"])
        assert set(_events(bus, "service_orphan_removed")) == {"leftover"}
        assert sorted(await _owned(kit)) == sorted([instance_name_for(owner, "web"), "neighbour"])
        await mgr.stop()
