"""Connect-or-embed without surprises: ``ensure_infra()`` in auto mode attaches only to the
server its own settings would have started (the server advertises its home and owner), or
to one named by ``addr=``; when attached, an option the server cannot honour is a named
error. A real ``dspy-infra serve`` subprocess plays the server; its gRPC port is given to
the client as its default port (``grpc_port``), so no fixed port must be free."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from _rpc_support import ServeProcess, serve_process

from dspy_infra import errors
from dspy_infra.ensure import ensure_infra, shutdown_infra
from dspy_infra.infra import Infra
from dspy_infra.rpc.remote import RemoteInfra


@pytest.fixture(scope="module")
def server_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server_home")


@pytest.fixture(scope="module")
def server(server_home: Path) -> Iterator[ServeProcess]:
    with serve_process(server_home) as proc:
        # One answered call first: a server's first answer can miss auto mode's quick 0.5 s
        # on a loaded machine, and the tests here are about which server, not how fast.
        anyio.run(_answered, proc.addr)
        yield proc


async def _answered(addr: str) -> None:
    async with await RemoteInfra.connect(addr, required=True, timeout=30) as remote:
        await remote.health()


@pytest.fixture
async def clean_shared(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    for var in ("DSPY_INFRA_MODE", "DSPY_INFRA_GRPC_PORT", "DSPY_INFRA_BACKEND", "DSPY_INFRA_OWNER"):
        monkeypatch.delenv(var, raising=False)
    await shutdown_infra()
    yield
    await shutdown_infra()


async def test_auto_mode_embeds_instead_of_attaching_to_another_apps_server(
    server: ServeProcess, tmp_path: Path, clean_shared: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dspy_infra")
    mine = tmp_path / "my_app"
    infra = await ensure_infra(state_dir=mine, grpc_port=server.grpc_port, backend="process")
    assert isinstance(infra, Infra) and infra.mode == "embedded"
    assert infra.home == mine
    assert any("belongs to another app" in r.getMessage() for r in caplog.records)
    # The embedded one really is separate: a task here is unknown to the server.
    await infra.submit_task("mine-only", payload={"handler": "noop"})
    async with await RemoteInfra.connect(server.addr, required=True) as other:
        with pytest.raises(errors.NotFound):
            await other.get_task("mine-only")


async def test_auto_mode_attaches_to_the_server_of_the_same_home(
    server: ServeProcess, server_home: Path, clean_shared: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dspy_infra")
    infra = await ensure_infra(state_dir=server_home, grpc_port=server.grpc_port)
    assert isinstance(infra, RemoteInfra) and infra.mode == "remote"
    assert [r.getMessage() for r in caplog.records if "attached" in r.getMessage()]
    health = await infra.health()
    assert Path(health["home"]) == Path(await anyio.Path(server_home).resolve())
    assert health["backend"] == "process"


async def test_auto_mode_waits_for_its_own_busy_server_instead_of_failing(
    tmp_path: Path, clean_shared: None, caplog: pytest.LogCaptureFixture
) -> None:
    # A server of this app's home that misses the quick first answer (here: stopped with
    # SIGSTOP, as a loaded machine can stall it for a second) is still this app's own:
    # embedding beside it would be refused by its store lock. The app waits and attaches.
    caplog.set_level(logging.INFO, logger="dspy_infra")
    home = tmp_path / "busy_home"
    with serve_process(home) as server:
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            async with anyio.create_task_group() as tg:
                attached: list[object] = []

                async def attach() -> None:
                    attached.append(await ensure_infra(state_dir=home, grpc_port=server.grpc_port))

                tg.start_soon(attach)
                await anyio.sleep(1.5)  # past the quick miss (0.5 s)
                os.kill(server.proc.pid, signal.SIGCONT)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        infra = attached[0]
        assert isinstance(infra, RemoteInfra) and infra.mode == "remote"
        assert any("slow to answer" in r.getMessage() for r in caplog.records)
        await shutdown_infra()


async def test_an_addr_names_the_server_whatever_its_home(
    server: ServeProcess, tmp_path: Path, clean_shared: None
) -> None:
    infra = await ensure_infra(addr=server.addr, state_dir=tmp_path / "elsewhere")
    assert infra.mode == "remote"


async def test_another_backend_than_the_servers_is_a_named_error(
    server: ServeProcess, server_home: Path, clean_shared: None
) -> None:
    with pytest.raises(errors.FailedPrecondition) as info:
        await ensure_infra(state_dir=server_home, grpc_port=server.grpc_port, backend="docker")
    assert info.value.field == "backend"
    assert "'docker'" in str(info.value) and "'process'" in str(info.value)
    with pytest.raises(errors.FailedPrecondition) as named:
        await ensure_infra(addr=server.addr, backend="docker")
    assert named.value.field == "backend"


async def test_plugins_cannot_ride_along_to_a_server(server: ServeProcess, clean_shared: None) -> None:
    class Plugin:
        pass

    with pytest.raises(errors.FailedPrecondition) as info:
        await ensure_infra(addr=server.addr, plugins=[Plugin()])
    assert info.value.field == "plugins"


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, Path, int]]:
    """A server whose catalog has a service the client's settings do not know."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    home = tmp_path_factory.mktemp("web_home")
    web = {
        "command": [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        "ports": [{"container_port": port}],
        "health": {"kind": "http", "path": "/", "startup_timeout": 20},
    }
    with serve_process(home, services={"web": web}) as proc:
        yield proc, home, port


async def test_attached_the_services_asked_for_start_on_the_server(
    web_server: tuple[ServeProcess, Path, int], clean_shared: None
) -> None:
    server, home, port = web_server
    infra = await ensure_infra(state_dir=home, grpc_port=server.grpc_port, services=["web"])
    try:
        assert infra.mode == "remote"
        states = await infra.services.status(["web"])
        assert str(states["web"].status) in ("healthy", "running")
        stream = await anyio.connect_tcp("127.0.0.1", port)  # the server started it: it listens
        await stream.aclose()
    finally:
        await infra.services.stop(["web"])


async def test_auto_mode_embeds_beside_another_apps_server_that_wants_a_token(
    tmp_path: Path, clean_shared: None
) -> None:
    with serve_process(tmp_path / "their_home", token="their-secret") as theirs:
        infra = await ensure_infra(state_dir=tmp_path / "mine", grpc_port=theirs.grpc_port)
        assert infra.mode == "embedded"
        await shutdown_infra()
        # Named, the same server is a clear error instead.
        with pytest.raises(errors.Unauthenticated):
            await ensure_infra(addr=theirs.addr, state_dir=tmp_path / "mine")
