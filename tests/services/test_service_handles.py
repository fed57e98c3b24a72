"""Issue 9 items 3 and 4: services get free host ports (never a fixed well-known one unless
pinned) and an app reaches them through handles, the same on an embedded and a remote infra.
Issue 8 items 9 and 10: a missing binary over gRPC, ``StopServices([])``.

Every test here runs with another Redis on 127.0.0.1:6379 (``redis_on_6379``), as on most
developers' machines: the one the suite's CI starts, or one started here when the port is free.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis
from _rpc_support import base_settings, in_process_server, stop_process
from engines import Engine, docker_engine, engine, engine_kind, podman_engine, which_or_skip
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import service_handles_port_numbers

from dspy_infra import errors
from dspy_infra.backends.base import fill_port_placeholders, free_port
from dspy_infra.config import Settings, load_settings
from dspy_infra.infra import Infra
from dspy_infra.models import HealthCheck, PortMapping, ServiceSpec
from dspy_infra.rpc.remote import RemoteInfra
from dspy_infra.services.handles import ServiceHandle, service_url

__all__ = ["docker_engine", "engine", "engine_kind", "podman_engine"]

pytestmark = pytest.mark.usefixtures("anyio_backend")


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


@pytest.fixture(scope="module")
def redis_on_6379() -> Iterator[redis.Redis]:
    """A client of whatever Redis holds 127.0.0.1:6379; one is started when the port is free."""
    proc: subprocess.Popen[bytes] | None = None
    if not _listening(6379):
        exe = which_or_skip("redis-server")
        proc = subprocess.Popen(
            [exe, "--port", "6379", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=6379)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            subprocess.run(["sleep", "0.05"], check=False)
    try:
        yield redis.Redis(host="127.0.0.1", port=6379, socket_timeout=5)
    finally:
        if proc is not None:
            stop_process(proc)


def _infra(tmp_path: Path, **settings: object) -> Infra:
    cfg = load_settings(**base_settings(tmp_path / "state", **settings))
    return Infra(cfg, load_entry_points=False)


def _check_is_ours(handle: ServiceHandle, squatter: redis.Redis) -> None:
    """The handle's URL reaches our Redis, not the one on 6379."""
    key = f"dspy-infra-test-{uuid.uuid4().hex}"
    ours = redis.Redis.from_url(handle.url, socket_timeout=5)
    try:
        assert ours.set(key, "ours") is True
        assert ours.get(key) == b"ours"
        assert squatter.get(key) is None
    finally:
        ours.close()


async def test_builtin_redis_gets_a_free_port_beside_another_redis(
    tmp_path: Path, redis_on_6379: redis.Redis
) -> None:
    which_or_skip("redis-server")
    async with _infra(tmp_path) as infra:
        await infra.ensure_services(["redis"])
        handle = infra.services["redis"]
        assert handle == await infra.services.get("redis")
        assert handle.host == "127.0.0.1" and handle.port not in (0, 6379)
        assert handle.ports == {6379: handle.port}
        assert handle.url == f"redis://127.0.0.1:{handle.port}/0" == handle.get_connection_url()
        assert str(handle.status) == "healthy" and handle.backend == "process"
        _check_is_ours(handle, redis_on_6379)
        assert any("Ready to accept connections" in line for line in await handle.logs(tail=50))
        state = (await infra.services.status(["redis"]))["redis"]
        assert (state.url, state.port) == (handle.url, handle.port)
    assert not _listening(handle.port)  # stopped with the infra that started it


async def test_pinned_ports_and_placeholders_in_command_and_env(
    tmp_path: Path, redis_on_6379: redis.Redis
) -> None:
    which_or_skip("redis-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        pinned = sock.getsockname()[1]
    services = {
        "redis": {"ports": [f"{pinned}:6379"]},  # what `config init` writes, with a free host port
        "web": {
            # The port reaches the command through the environment: "{port.8000}" there.
            "command": [
                sys.executable,
                "-c",
                "import os, runpy, sys; sys.argv = ['x', os.environ['LISTEN']]; "
                "runpy.run_module('http.server', run_name='__main__')",
            ],
            "environment": {"LISTEN": "{port.8000}"},
            "ports": [8000],
            "health": {"kind": "http", "path": "/"},
        },
    }
    async with _infra(tmp_path, services=services) as infra:
        await infra.ensure_services(["redis", "web"])
        cache, web = infra.services["redis"], infra.services["web"]
        assert cache.port == pinned and cache.url == f"redis://127.0.0.1:{pinned}/0"
        _check_is_ours(cache, redis_on_6379)
        assert web.port != 0 and web.ports == {8000: web.port}
        assert web.url == f"http://127.0.0.1:{web.port}"

        def fetch() -> int:
            with urllib.request.urlopen(web.url + "/", timeout=5) as reply:
                return int(reply.status)

        assert await anyio.to_thread.run_sync(fetch) == 200


async def test_a_placeholder_naming_no_published_port_is_refused(tmp_path: Path) -> None:
    bad = ServiceSpec(name="web", command=["sleep", "{port.81}"], ports=[PortMapping(80, 0)])
    cfg = Settings(**base_settings(tmp_path / "state"))
    async with Infra(cfg, services=[bad], load_entry_points=False) as infra:
        with pytest.raises(errors.SpecError) as info:
            await infra.ensure_services(["web"])
        assert info.value.field == "services.web.ports" and "{port.81}" in str(info.value)
        assert "80" in (info.value.fix or "")
        with pytest.raises(errors.NotFound) as missing:
            infra.services["web"]
        assert "ensure_services" in (missing.value.fix or "")


async def test_remote_handles_are_the_embedded_handles(tmp_path: Path, redis_on_6379: redis.Redis) -> None:
    which_or_skip("redis-server")
    async with in_process_server(tmp_path / "state") as (infra, server):
        remote = await RemoteInfra.connect(f"127.0.0.1:{server.grpc_port}", required=True)
        assert remote is not None
        async with remote:
            with pytest.raises(errors.NotFound):
                remote.services["redis"]  # not started yet: indexing does not guess
            await remote.ensure_services(["redis"])
            handle = remote.services["redis"]
            assert handle == infra.services["redis"] == await remote.services.get("redis")
            assert remote.services.endpoint("redis") == infra.services.endpoint("redis")
            assert remote.services.endpoint("redis", 6379) == (handle.host, handle.port)
            assert handle.port != 6379 and handle.url == f"redis://127.0.0.1:{handle.port}/0"
            _check_is_ours(handle, redis_on_6379)
            assert any("Ready to accept" in line for line in await handle.logs(tail=50))
    # Started over gRPC without keep: the infra that served it stops it when it closes.
    assert not _listening(handle.port)


async def test_docker_publishes_on_a_free_host_port(
    tmp_path: Path, engine: Engine, redis_on_6379: redis.Redis
) -> None:
    from engines import unique_name

    spec = ServiceSpec(
        name="cache",
        image=engine.images.redis,
        command=[
            "/usr/bin/redis-server",
            "--port",
            "{port}",
            "--bind",
            "{listen_host}",
            "--protected-mode",
            "no",
        ],
        environment={"ADVERTISED": "127.0.0.1:{host_port}"},
        ports=[PortMapping(6379, 0)],
        health=HealthCheck(kind="redis", startup_timeout=30),
    )
    cfg = Settings(
        home=tmp_path / "state",
        backend="docker",
        docker_host=engine.host,
        network=unique_name("net"),
        owner=unique_name("owner"),
    )
    async with Infra(cfg, services=[spec], load_entry_points=False) as infra:
        await infra.ensure_services(["cache"])
        handle = infra.services["cache"]
        assert handle.port not in (0, 6379) and handle.url == f"redis://127.0.0.1:{handle.port}/0"
        _check_is_ours(handle, redis_on_6379)
        backend = infra.services.backend
        listed = await backend.list_instances({"dspy_infra.service": "cache"})
        raw = await backend.docker.containers.container(listed[0].id).show()
        assert f"ADVERTISED={handle.address}" in raw["Config"]["Env"]
        assert raw["Config"]["Cmd"][:3] == ["/usr/bin/redis-server", "--port", "6379"]


async def test_missing_binary_over_grpc_is_failed_precondition(tmp_path: Path) -> None:
    ghost = {"command": ["dspy-infra-no-such-binary"], "ports": [7000]}
    async with in_process_server(tmp_path / "state", services={"ghost": ghost}) as (_infra, server):
        remote = await RemoteInfra.connect(f"127.0.0.1:{server.grpc_port}", required=True)
        assert remote is not None
        async with remote:
            with pytest.raises(errors.FailedPrecondition) as info:
                await remote.ensure_services(["ghost"])
            assert "dspy-infra-no-such-binary" in str(info.value)
            assert "INTERNAL" not in str(info.value) and "Traceback" not in str(info.value)


async def test_stop_services_without_names_stops_every_service_like_down(tmp_path: Path) -> None:
    """Issue 8 item 10: ``StopServices([])`` stopped nothing while ``down`` stopped all."""
    sleeper = {"command": ["sleep", "300"], "health": {"kind": "engine"}}
    services = {"a": sleeper, "b": sleeper}
    async with in_process_server(tmp_path / "state", services=services) as (infra, server):
        remote = await RemoteInfra.connect(f"127.0.0.1:{server.grpc_port}", required=True)
        assert remote is not None
        async with remote:
            await remote.ensure_services(["a", "b"])
            assert "a" in remote.services
            results = await remote.services.stop([])
            assert results == {"a": "stopped", "b": "stopped"}, json.dumps(results)
            states = await infra.services.status(["a", "b"])
            assert {str(s.status) for s in states.values()} == {"stopped"}
            assert "a" not in remote.services


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(max_size=40),
    listen=st.dictionaries(service_handles_port_numbers, service_handles_port_numbers, max_size=3),
    container=service_handles_port_numbers,
)
def test_placeholders_fill_only_what_they_name(text: str, listen: dict[int, int], container: int) -> None:
    """Text without a placeholder is left exactly as it is (JSON, shell braces, ``{home}``);
    each ``{port.N}`` / ``{host_port.N}`` becomes its port, an unknown N stays as written."""
    published = {c: p + 1 for c, p in listen.items()}
    filled = fill_port_placeholders(text, first=None, listen=listen, published=published, listen_host="H")
    if "{port" not in text and "{host_port" not in text and "{listen_host}" not in text:
        assert filled == text
    template = f"a{{port.{container}}}b{{host_port.{container}}}c{{listen_host}}{{x}}"
    out = fill_port_placeholders(template, first=None, listen=listen, published=published, listen_host="H")
    if container in listen:
        assert out == f"a{listen[container]}b{published[container]}cH{{x}}"
    else:
        assert out == f"a{{port.{container}}}b{{host_port.{container}}}cH{{x}}"


def test_service_url_needs_every_port_it_names() -> None:
    assert service_url("redis://{host}:{port}/0", "127.0.0.1", 5, {6379: 5}) == "redis://127.0.0.1:5/0"
    assert service_url("http://{host}:{port.81}", "h", 5, {80: 5}) == ""  # never a half URL
    assert service_url("{host}:{port.80},{host}:{port.81}", "h", 5, {80: 5, 81: 6}) == "h:5,h:6"


async def test_exec_health_command_as_a_string_probes_the_assigned_port(
    tmp_path: Path, redis_on_6379: redis.Redis
) -> None:
    """Issue 8 item 9: ``health.command = "..."`` is split with shell rules (it was split into
    characters), and its ``{port}`` is the port the service was given (never the squatter's)."""
    which_or_skip("redis-server")
    which_or_skip("redis-cli")
    probe = "sh -c '[ {port} != 6379 ] && redis-cli -p {port} ping | grep -q PONG'"
    services = {"redis": {"health": {"kind": "exec", "command": probe, "startup_timeout": 10}}}
    async with _infra(tmp_path, services=services) as infra:
        spec = infra.services.catalog["redis"]
        assert spec.health.command == (
            "sh",
            "-c",
            "[ {port} != 6379 ] && redis-cli -p {port} ping | grep -q PONG",
        )
        await infra.ensure_services(["redis"])  # healthy only through the filled-in probe
        async with contextlib.aclosing(infra.services.health(["redis"], interval=0.1)) as stream:
            health = await anext(stream)
        assert health.healthy and health.details["kind"] == "exec", health.message
        _check_is_ours(infra.services["redis"], redis_on_6379)


async def test_a_port_on_all_interfaces_is_not_narrowed_to_loopback(tmp_path: Path) -> None:
    """``"0.0.0.0:0:8000"`` on the process backend: ``{listen_host}`` is 0.0.0.0 (what was asked),
    the probe and the handle still use loopback."""
    web = {
        "command": [sys.executable, "-m", "http.server", "{port}", "--bind", "{listen_host}"],
        "ports": ["0.0.0.0:0:8000"],
        "health": {"kind": "http", "path": "/"},
    }
    async with _infra(tmp_path, services={"web": web}) as infra:
        await infra.ensure_services(["web"])
        handle = infra.services["web"]
        assert handle.host == "127.0.0.1" and handle.url == f"http://127.0.0.1:{handle.port}"
        state = (await infra.services.status(["web"]))["web"]
        backend = infra.services.backend
        record = json.loads((backend.root / state.instance_id / "record.json").read_text())
        assert record["command"][-3:] == [str(handle.port), "--bind", "0.0.0.0"]


def test_a_free_port_is_never_one_a_sibling_is_pinned_to() -> None:
    """Siblings start in parallel: the kernel may offer the port a pinned sibling has not bound
    yet; the backend skips the pinned ones."""
    pinned = {free_port() for _ in range(8)}
    for _ in range(200):
        assert free_port(avoid=pinned) not in pinned


async def test_an_assigned_port_taken_before_the_start_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port picked as free can be taken by someone else before the service binds it (seen
    under load: 'port ... of service 'web' is already in use'). An assigned port is picked
    again; only a pinned port that is taken is an error."""
    import dspy_infra.backends.process as process_backend

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([taken])  # the first pick is already taken, later picks are really free
        monkeypatch.setattr(
            process_backend,
            "free_port",
            lambda host="127.0.0.1", avoid=(): next(picks, None) or free_port(host),
        )
        services = {
            "web": {
                "command": [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"],
                "ports": [8000],
                "health": {"kind": "http", "path": "/"},
            },
            "pinned": {
                "command": [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"],
                "ports": [f"{taken}:8000"],
                "health": {"kind": "http", "path": "/"},
            },
        }
        async with _infra(tmp_path, services=services) as infra:
            await infra.ensure_services(["web"])
            web = infra.services["web"]
            assert web.port not in (0, taken)
            with pytest.raises(errors.InfraError, match="already in use"):
                await infra.ensure_services(["pinned"])
