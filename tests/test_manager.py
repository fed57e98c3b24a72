"""ServiceManager on a real backend (the local-process backend by default): dependency order
and parallelism read from event timestamps, refused graphs, optional vs required failures,
the monitor restarting a service killed from outside, adoption after the owning process was
SIGKILLed, and a real Redis server as a local process.

The ``kit`` fixture is the only backend-specific part: it opens the backend and spells
services for it (a host command here). A container kit can be added beside it and every
test runs unchanged.
"""

from __future__ import annotations

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

from dspy_infra.backends.base import LABEL_OWNER, Backend
from dspy_infra.backends.process import ProcessBackend
from dspy_infra.config import Settings
from dspy_infra.errors import CycleError, HealthCheckFailed, MissingBinary, NotFound, SpecError
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import (
    DependsOn,
    Event,
    HealthCheck,
    PortMapping,
    QueueStatus,
    RestartPolicy,
    ServiceSpec,
    ServiceStatus,
    ServiceStatusUpdate,
)
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.services.catalog import apply_fields
from dspy_infra.services.manager import ServiceManager

try:
    from tests.conftest import skip_or_fail
except ImportError:
    from conftest import skip_or_fail

REPO = Path(__file__).resolve().parent.parent

# Requesting anyio_backend up front keeps anyio's plugin from re-creating the items at
# collection finish, which would drop the `backend` parametrization.
pytestmark = pytest.mark.usefixtures("anyio_backend")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.define
class ProcessKit:
    """Opens a process backend and spells services as host commands on free ports."""

    settings: Settings
    web_root: Path
    backend: Backend

    name = "process"

    def http_fields(self, port: int, *, delay: float = 0.0) -> dict[str, Any]:
        """TOML-shaped fields of an HTTP service (also used by the child process test)."""
        busybox = shutil.which("busybox")
        if busybox:
            serve = f"exec {busybox} httpd -f -p 127.0.0.1:{port} -h {self.web_root}"
        else:
            serve = (
                f"exec {sys.executable} -m http.server --bind 127.0.0.1 --directory {self.web_root} {port}"
            )
        script = f"sleep {delay}; {serve}" if delay else serve
        return {
            "command": ["sh", "-c", script],
            "ports": [f"{port}:{port}"],
            "health": {"kind": "http", "path": "/index.html", "interval": 0.1, "startup_timeout": 15.0},
        }

    def http(self, name: str, *deps: str, delay: float = 0.0, **fields: Any) -> ServiceSpec:
        spec = apply_fields(name, self.http_fields(free_port(), delay=delay))
        return attrs.evolve(spec, depends_on=tuple(DependsOn(d) for d in deps), **fields)

    def script(self, name: str, script: str, **fields: Any) -> ServiceSpec:
        """A service that runs ``script`` (a failing one, or a one-shot job)."""
        return ServiceSpec(
            name=name,
            command=["sh", "-c", script],
            ports=[PortMapping(p := free_port(), p)],
            health=HealthCheck(kind="tcp", interval=0.1, startup_timeout=10.0),
            **fields,
        )

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

    def kill_from_outside(self, instance_id: str) -> None:
        assert isinstance(self.backend, ProcessBackend)
        os.kill(self.backend.main_pid(instance_id), signal.SIGKILL)


@pytest.fixture(params=["process"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which backend the manager tests run on (a container kit can add "docker"/"podman")."""
    return str(request.param)


@pytest.fixture
async def kit(backend: str, tmp_path: Path) -> AsyncIterator[ProcessKit]:
    settings = Settings(home=tmp_path / "state", backend="process")
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("ok\n")
    async with ProcessBackend(settings) as be:
        yield ProcessKit(settings=settings, web_root=root, backend=be)
        # Nothing of this test's owner may be left behind, whatever the test did.
        for inst in await be.list_instances({LABEL_OWNER: settings.resolved_owner()}):
            await be.remove(inst.id)


def _manager(kit: ProcessKit, *specs: ServiceSpec, **kw: Any) -> ServiceManager:
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


async def _owned(kit: ProcessKit) -> list[str]:
    return sorted(
        i.name for i in await kit.backend.list_instances({LABEL_OWNER: kit.settings.resolved_owner()})
    )


async def test_three_levels_start_in_order_and_siblings_in_parallel(kit: ProcessKit) -> None:
    bus = EventBus()
    specs = [
        kit.http("base-a", delay=0.6),
        kit.http("base-b", delay=0.6),
        kit.http("mid", "base-a", "base-b"),
        kit.http("top", "mid"),
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


async def test_sequential_start_runs_one_at_a_time(kit: ProcessKit) -> None:
    bus = EventBus()
    async with _manager(kit, kit.http("one"), kit.http("two"), bus=bus) as mgr:
        updates = [u async for u in mgr.start(["one", "two"], parallel=False)]
        starting, healthy = _events(bus, "service_starting"), _events(bus, "service_healthy")
        assert starting["two"].timestamp >= healthy["one"].timestamp
        assert updates[-1].progress == 100
        await mgr.stop()


async def test_cycles_and_unknown_dependencies_are_refused(kit: ProcessKit) -> None:
    async with _manager(kit, kit.http("a"), kit.http("b", "a")) as mgr:
        with pytest.raises(CycleError, match="a -> b -> a"):
            mgr.add_service(kit.http("a", "b"))
        with pytest.raises(SpecError) as info:
            mgr.add_service(kit.http("c", "rediss"))
        assert info.value.field == "services.c.depends_on"
        with pytest.raises(NotFound, match="unknown service 'nope'"):
            await mgr.ensure(["nope"])
        with pytest.raises(CycleError):
            async for _ in mgr.start(["a"], overrides={"a.depends_on": '["b"]'}):
                pass
        clash = kit.http("d")
        mgr.add_service(attrs.evolve(clash, ports=mgr.catalog["a"].ports))
        with pytest.raises(SpecError, match="already published"):
            await mgr.ensure(["a", "d"])
        assert await _owned(kit) == []  # nothing was started for refused graphs


async def test_failing_optional_service_does_not_block_the_rest(kit: ProcessKit) -> None:
    metrics = InfraMetrics()
    specs = [
        kit.http("web"),
        kit.script("flaky", "echo cannot start >&2; exit 1", required=False),
        kit.http("needs-flaky", "flaky", required=False),
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


async def test_failing_required_service_stops_the_start_with_its_reason(kit: ProcessKit) -> None:
    bus = EventBus()
    specs = [
        kit.http("sibling"),
        kit.script("broken", "echo 'config error: no such key' >&2; sleep 0.3; exit 2"),
        kit.http("app", "broken", "sibling"),
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


async def test_one_shot_job_gates_its_dependent(kit: ProcessKit, tmp_path: Path) -> None:
    bus = EventBus()
    marker = tmp_path / "migrated"
    init = ServiceSpec(
        name="migrate",
        command=["sh", "-c", f"sleep 0.2; echo migrated > {marker}"],
        one_shot=True,
    )
    app = kit.http("app")
    app = attrs.evolve(app, depends_on=(DependsOn("migrate", "service_completed_successfully"),))
    async with _manager(kit, init, app, bus=bus) as mgr:
        assert await mgr.ensure(["app"]) == ["migrate", "app"]
        assert marker.read_text() == "migrated\n"
        assert (
            _events(bus, "service_starting")["app"].timestamp
            >= _events(bus, "service_completed")["migrate"].timestamp
        )
        await mgr.stop()


async def test_monitor_restarts_a_service_killed_from_outside(kit: ProcessKit) -> None:
    bus = EventBus()
    web = kit.http("web", restart=RestartPolicy(backoff=0.05, max_restarts=3))
    async with _manager(kit, web, bus=bus) as mgr:
        await mgr.ensure(["web"])
        first = (await mgr.status(["web"]))["web"]
        kit.kill_from_outside(first.instance_id)
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


async def test_restart_policy_no_marks_the_service_failed(kit: ProcessKit) -> None:
    bus = EventBus()
    web = kit.http("web", restart=RestartPolicy(mode="no"))
    async with _manager(kit, web, bus=bus) as mgr:
        await mgr.ensure(["web"])
        kit.kill_from_outside((await mgr.status(["web"]))["web"].instance_id)
        with anyio.fail_after(10):
            async for event in bus.subscribe(["service_failed"], since=0):
                if event.resource_id == "web":
                    break
        assert (await mgr.status(["web"]))["web"].status in (ServiceStatus.FAILED, ServiceStatus.STOPPED)
        assert "service_restarted" not in {e.type for e in bus.history()}
        await mgr.stop()


async def test_adoption_across_managers_and_recreate_on_spec_change(kit: ProcessKit) -> None:
    web = kit.http("web")
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


_CHILD = r"""
import anyio, json, sys
from dspy_infra.config import Settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.services.catalog import apply_fields
from dspy_infra.services.manager import ServiceManager

async def main():
    home, fields = sys.argv[1], json.loads(sys.argv[2])
    specs = [apply_fields(name, f) for name, f in fields.items()]
    mgr = ServiceManager(Settings(home=home, backend="process"), bus=EventBus(), metrics=InfraMetrics(),
                         plugins=build_plugin_manager(load_entry_points=False), extra_services=specs)
    async with mgr:
        await mgr.ensure(sorted(fields))
        print("ready", flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


async def test_sigkilled_owner_then_start_again_adopts_and_reaps(kit: ProcessKit) -> None:
    fields = {"keep": kit.http_fields(free_port()), "orphan": kit.http_fields(free_port())}
    child = await anyio.open_process(
        [sys.executable, "-c", _CHILD, str(kit.settings.resolved_home()), json.dumps(fields)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        with anyio.fail_after(30):
            line = await child.stdout.receive()
        assert line.startswith(b"ready"), line
    finally:
        child.kill()  # SIGKILL: the owner gets no chance to clean up
        await child.wait()
        await child.aclose()
    orphan_port = int(fields["orphan"]["ports"][0].split(":")[0])
    assert await _http_ok("127.0.0.1", orphan_port)  # its services outlived it

    bus = EventBus()
    keep = apply_fields("keep", fields["keep"])
    async with _manager(kit, keep, apply_fields("orphan", fields["orphan"]), bus=bus) as mgr:
        listed = {i.labels["dspy_infra.service"]: i for i in await kit.backend.list_instances({})}
        assert await mgr.ensure(["keep"]) == ["keep"]
        assert _events(bus, "service_healthy")["keep"].data["adopted"] == "True"
        assert (await mgr.status(["keep"]))["keep"].started_at == listed["keep"].started_at
        assert "orphan" in _events(bus, "service_orphan_removed")
        assert not await _http_ok("127.0.0.1", orphan_port)
        assert await _owned(kit) == [listed["keep"].name]
        await mgr.stop()
    assert await _owned(kit) == []


async def test_real_redis_as_a_local_process(kit: ProcessKit) -> None:
    redis = kit.redis()
    port = redis.ports[0].container_port
    async with _manager(kit, redis) as mgr:
        updates: list[ServiceStatusUpdate] = [u async for u in mgr.start(["redis"])]
        assert updates[-1].status == ServiceStatus.HEALTHY and "+PONG" in updates[-1].message
        host, got_port = mgr.endpoint("redis")
        assert (host, got_port) == ("127.0.0.1", port)
        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
            data = b""
            with anyio.fail_after(5):
                while b"hello" not in data:
                    data += await stream.receive()
        assert data.startswith(b"+OK\r\n$5\r\nhello")

        state = (await mgr.status(["redis"]))["redis"]
        assert state.status == ServiceStatus.HEALTHY and state.ports == {port: port}
        assert state.resource_usage.memory_bytes > 1_000_000  # a real redis-server's RSS
        assert state.health_checks == {"redis": "redis PING answered +PONG"}
        assert state.backend == "process" and state.instance_id

        lines = [e.message async for e in mgr.logs("redis")]
        assert any("Ready to accept connections" in ln for ln in lines)
        assert len([e async for e in mgr.logs("redis", tail=2)]) == 2

        restarted = await mgr.restart("redis", timeout=5)
        assert restarted.status == ServiceStatus.HEALTHY and restarted.restarts == 1
        assert restarted.started_at > state.started_at

        health = mgr.health(["redis"], interval=0.05)
        first = await health.__anext__()
        await health.aclose()  # type: ignore[attr-defined]
        assert first.healthy and first.details["kind"] == "redis"

        assert await mgr.stop(["redis"], timeout=5) == {"redis": "stopped"}
        assert await mgr.stop(["redis"]) == {"redis": "not running"}
        assert (await mgr.status(["redis"]))["redis"].status == ServiceStatus.STOPPED
        with pytest.raises(NotFound, match="not running"):
            [e async for e in mgr.logs("redis")]


async def test_follow_logs_until_the_service_exits(kit: ProcessKit) -> None:
    job = ServiceSpec(
        name="talker",
        command=["sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.1; done"],
        one_shot=True,
    )
    async with _manager(kit, job) as mgr:
        async with anyio.create_task_group() as tg:
            tg.start_soon(mgr.ensure, ["talker"])
            with anyio.fail_after(10):
                while True:
                    try:
                        lines = [e.message async for e in mgr.logs("talker", follow=True)]
                        break
                    except NotFound:
                        await anyio.sleep(0.01)
        assert lines[-1] == "line 3"
        await mgr.stop()


async def test_resources_pull_and_missing_binary(kit: ProcessKit) -> None:
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


async def test_auto_backend_falls_back_to_process_without_an_engine(kit: ProcessKit) -> None:
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
