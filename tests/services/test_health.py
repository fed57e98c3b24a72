"""Health probes against real servers: a real ``redis-server`` process, real HTTP and TCP
servers on ephemeral ports, real processes for exec/engine probes and the startup wait."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import attrs
import pytest
from aiohttp import web
from engines import skip_or_fail
from hypothesis import given
from hypothesis import strategies as st

from dspy_infra.backends.process import ProcessBackend
from dspy_infra.errors import HealthCheckFailed
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import HealthCheck, Instance, PortMapping, ServiceSpec
from dspy_infra.services import health as health_mod
from dspy_infra.services.health import (
    ProbeResult,
    probe_for,
    run_probe,
    wait_until_healthy,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spec(kind: str, port: int | None, **check: object) -> ServiceSpec:
    ports = [PortMapping(port, port)] if port else []
    return ServiceSpec(name="svc", ports=ports, health=HealthCheck(kind=kind, **check))


def _instance(port: int | None) -> Instance:
    ports = {port: ("127.0.0.1", port)} if port else {}
    return Instance(id="external", name="external", ports=ports)


@pytest.fixture
def backend(process_backend: ProcessBackend) -> ProcessBackend:
    return process_backend


def _start_redis(port: int, *extra: str) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    if exe is None:
        skip_or_fail("redis-server is not installed (apt-get install -y redis-server)")
    assert exe is not None
    return subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def redis_port() -> Iterator[int]:
    port = free_port()
    proc = _start_redis(port)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def redis_auth_port() -> Iterator[int]:
    port = free_port()
    proc = _start_redis(port, "--requirepass", "sekret")
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def _holder(backend: ProcessBackend, port: int) -> Instance:
    """A real (idle) process instance that "publishes" ``port``, standing for a service whose
    server runs elsewhere in the test, so the startup wait has something to inspect."""
    spec = ServiceSpec(name="holder", command=["sleep", "60"])  # the port is someone else's
    inst = await backend.run(spec, instance_name=f"holder-{port}", labels={})
    return attrs.evolve(inst, ports={port: ("127.0.0.1", port)})


async def _until_ok(probe_kind: str, port: int, backend: ProcessBackend, within: float = 10.0) -> ProbeResult:
    spec = _spec(probe_kind, port, startup_timeout=within)
    return await wait_until_healthy(backend, spec, await _holder(backend, port))


async def test_redis_probe_pings_a_real_redis(redis_port: int, backend: ProcessBackend) -> None:
    result = await _until_ok("redis", redis_port, backend)
    assert result.ok and "+PONG" in result.message
    again = await probe_for(HealthCheck(kind="redis")).check(
        backend, _spec("redis", redis_port), _instance(redis_port)
    )
    assert again.ok and again.duration > 0


async def test_redis_probe_reports_noauth(redis_auth_port: int, backend: ProcessBackend) -> None:
    await _until_ok("tcp", redis_auth_port, backend)
    result = await probe_for(HealthCheck(kind="redis")).check(
        backend, _spec("redis", redis_auth_port), _instance(redis_auth_port)
    )
    assert not result.ok and "NOAUTH" in result.message


async def test_redis_probe_against_a_non_redis_server(backend: ProcessBackend) -> None:
    async def say_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(say_hello, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await probe_for(HealthCheck(kind="redis")).check(
            backend, _spec("redis", port), _instance(port)
        )
    assert not result.ok and "HTTP/1.0 400" in result.message


@pytest.fixture
async def http_port() -> AsyncIterator[int]:
    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def created(_request: web.Request) -> web.Response:
        return web.Response(status=201)

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/created", created)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_http_probe_checks_path_and_status(http_port: int, backend: ProcessBackend) -> None:
    inst = _instance(http_port)

    async def check(**kw: object) -> ProbeResult:
        return await probe_for(HealthCheck(kind="http", **kw)).check(
            backend, _spec("http", http_port, **kw), inst
        )

    assert (await check(path="/ok")).ok
    missing = await check(path="/nope")
    assert not missing.ok and "404" in missing.message and "expected 200" in missing.message
    assert (await check(path="/created", expected_status=201)).ok
    assert not (await check(path="/ok", expected_status=201)).ok


async def test_probe_times_out_on_a_silent_server(backend: ProcessBackend) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        started = time.monotonic()
        result = await probe_for(HealthCheck(kind="http", timeout=0.3)).check(
            backend, _spec("http", port, timeout=0.3), _instance(port)
        )
    assert not result.ok and "timed out after 0.3s" in result.message
    assert 0.25 <= time.monotonic() - started < 3


async def _hold_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # A real server: keeps the connection until the client goes.
    await reader.read()
    writer.close()


async def test_tcp_probe_does_not_trust_an_accept_that_closes_at_once(backend: ProcessBackend) -> None:
    # What a container engine's port proxy does when nothing listens inside the container.
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await probe_for(HealthCheck(kind="tcp")).check(backend, _spec("tcp", port), _instance(port))
    assert not result.ok and "closed at once" in result.message


async def test_tcp_probe_open_and_closed_ports(backend: ProcessBackend) -> None:
    server = await asyncio.start_server(_hold_open, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        assert (
            await probe_for(HealthCheck(kind="tcp")).check(backend, _spec("tcp", port), _instance(port))
        ).ok
    closed = free_port()
    result = await probe_for(HealthCheck(kind="tcp")).check(backend, _spec("tcp", closed), _instance(closed))
    assert not result.ok and "tcp probe" in result.message


async def test_a_probe_without_a_port_says_which_field(backend: ProcessBackend) -> None:
    result = await probe_for(HealthCheck(kind="tcp")).check(backend, _spec("tcp", None), _instance(None))
    assert not result.ok and "services.svc.health.port" in result.message


async def test_exec_and_engine_probes_on_a_real_process(backend: ProcessBackend, tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    spec = ServiceSpec(
        name="sleeper",
        command=["sleep", "30"],
        environment={"READY_FILE": str(marker)},
        health=HealthCheck(kind="exec", command=("sh", "-c", 'test -e "$READY_FILE"')),
    )
    inst = await backend.run(spec, instance_name="sleeper", labels={})
    exec_probe = probe_for(spec.health)
    not_yet = await exec_probe.check(backend, spec, inst)
    assert not not_yet.ok and "exited 1" in not_yet.message
    marker.write_text("")  # the probe runs with the service's environment, so it sees READY_FILE
    assert (await exec_probe.check(backend, spec, inst)).ok
    engine = probe_for(HealthCheck(kind="engine"))
    assert (await engine.check(backend, spec, inst)).ok
    await backend.stop(inst.id, timeout=2)
    gone = await engine.check(backend, spec, inst)
    assert not gone.ok and "exited" in gone.message


async def test_wait_retries_until_a_late_server_listens_and_records_metrics(backend: ProcessBackend) -> None:
    port = free_port()
    metrics = InfraMetrics()
    servers: list[asyncio.Server] = []

    async def listen_later() -> None:
        await anyio.sleep(0.4)
        servers.append(await asyncio.start_server(_hold_open, "127.0.0.1", port))

    # The holder first: starting a process can take longer than listen_later's pause on a
    # loaded machine, and then the very first probe would already succeed.
    holder = await _holder(backend, port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listen_later)
        started = time.monotonic()
        result = await wait_until_healthy(backend, _spec("tcp", port, interval=0.1), holder, metrics=metrics)
        waited = time.monotonic() - started
    for server in servers:
        server.close()
    assert result.ok and 0.35 <= waited < 5
    snap = metrics.snapshot(["env_manager_service_health_check_duration_seconds"])
    fails = snap[
        'env_manager_service_health_check_duration_seconds_count{service_name="svc",status="unhealthy"}'
    ]
    oks = snap['env_manager_service_health_check_duration_seconds_count{service_name="svc",status="healthy"}']
    assert oks == 1 and fails >= 3  # retried with backoff, not once per interval only


async def test_wait_gives_up_with_last_failure_and_log_lines(backend: ProcessBackend) -> None:
    port = free_port()
    spec = ServiceSpec(
        name="mute",
        command=[sys.executable, "-u", "-c", "print('booting the thing'); import time; time.sleep(30)"],
        ports=[PortMapping(port, port)],
        health=HealthCheck(kind="tcp", startup_timeout=0.6, interval=0.1),
    )
    inst = await backend.run(spec, instance_name="mute", labels={})
    # The interpreter's start is not what is tested (it can take longer than the 0.6 s timeout
    # on a loaded machine): wait for its line, then for the startup wait to give up.
    with anyio.fail_after(10):
        while True:
            if [e async for e in backend.logs(inst.id, service_name="mute") if "booting" in e.message]:
                break
            await anyio.sleep(0.05)
    with pytest.raises(HealthCheckFailed) as info:
        await wait_until_healthy(backend, spec, inst)
    err = info.value
    assert err.service == "mute" and "within 0.6s" in str(err)
    assert "tcp probe" in err.last_failure
    assert any("booting the thing" in line for line in err.last_logs)


async def test_wait_stops_early_when_the_process_exits(backend: ProcessBackend) -> None:
    port = free_port()
    spec = ServiceSpec(
        name="crasher",
        command=["sh", "-c", "echo fatal: bad config >&2; exit 3"],
        ports=[PortMapping(port, port)],
        health=HealthCheck(kind="tcp", startup_timeout=30),
    )
    inst = await backend.run(spec, instance_name="crasher", labels={})
    started = time.monotonic()
    with pytest.raises(HealthCheckFailed) as info:
        await wait_until_healthy(backend, spec, inst)
    assert time.monotonic() - started < 10  # not the 30 s startup timeout
    assert "exited with code 3" in info.value.last_failure
    assert any("fatal: bad config" in line for line in info.value.last_logs)


async def test_run_probe_labels_outcomes(redis_port: int, backend: ProcessBackend) -> None:
    metrics = InfraMetrics()
    spec = _spec("redis", redis_port)
    await _until_ok("redis", redis_port, backend)
    await run_probe(probe_for(spec.health), backend, spec, _instance(redis_port), metrics=metrics)
    closed = free_port()
    await run_probe(
        probe_for(spec.health), backend, _spec("redis", closed), _instance(closed), metrics=metrics
    )
    snap = metrics.snapshot()
    assert (
        snap['env_manager_service_health_check_duration_seconds_count{service_name="svc",status="healthy"}']
        == 1
    )
    assert (
        snap['env_manager_service_health_check_duration_seconds_count{service_name="svc",status="unhealthy"}']
        == 1
    )


@given(st.floats(0, 1e6), st.floats(0.01, 30))
def test_startup_probe_delay_grows_with_the_wait_and_is_capped(waited: float, ceiling: float) -> None:
    delay = health_mod.probe_delay(waited, ceiling)
    full = min(ceiling, max(health_mod.MIN_PROBE_DELAY, health_mod.PROBE_DELAY_FRACTION * waited))
    assert 0.8 * full <= delay <= full <= ceiling


class _CountingInspects(ProcessBackend):
    """The real process backend, counting the engine checks the startup wait makes."""

    inspects = 0

    async def inspect(self, instance_id: str) -> Instance:
        self.inspects += 1
        return await super().inspect(instance_id)


async def test_startup_wait_probes_often_but_asks_the_backend_rarely(tmp_path: Path) -> None:
    # Regression: the wait asked the backend "exited yet?" after every failed probe (an
    # engine call each, ~8 ms on Podman, delaying the next probe by as much).
    port = free_port()  # nothing listens: every probe fails until the timeout
    spec = _spec("tcp", port, startup_timeout=0.8)
    async with _CountingInspects(home=tmp_path) as backend:
        holder = await _holder(backend, port)
        metrics = InfraMetrics()
        with pytest.raises(HealthCheckFailed):
            await wait_until_healthy(backend, spec, holder, metrics=metrics)
        await backend.remove(holder.id)
    snap = metrics.snapshot(["env_manager_service_health_check_duration_seconds"])
    probes = snap[
        'env_manager_service_health_check_duration_seconds_count{service_name="svc",status="unhealthy"}'
    ]
    # A quick schedule (a service ready early is seen early): at the default 0.5 s interval a
    # once-per-interval schedule makes about 2 probes in 0.8 s; how many more depends on how
    # often a loaded loop wakes, so only a bound well above 2 is asserted.
    assert probes >= 10
    # About one engine check per quarter second, not one per failed probe (the regression).
    assert 1 <= backend.inspects <= 6
    assert probes >= 2 * backend.inspects


async def test_redis_service_is_not_healthy_while_its_port_only_accepts(backend: ProcessBackend) -> None:
    # What an engine's port proxy (or a server still loading) looks like: the port accepts,
    # but PING gets no +PONG. The wait must go on until Redis itself answers.
    answering = anyio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if answering.is_set():
            await reader.readline()
            writer.write(b"+PONG\r\n")
            await writer.drain()
        writer.close()  # accepted, then closed without an answer

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        holder = await _holder(backend, port)
        with pytest.raises(HealthCheckFailed) as info:
            await wait_until_healthy(backend, _spec("redis", port, startup_timeout=0.5), holder)
        assert "redis" in info.value.last_failure and "PONG" not in info.value.last_failure
        answering.set()
        result = await wait_until_healthy(backend, _spec("redis", port), holder)
    assert result.ok and "+PONG" in result.message
