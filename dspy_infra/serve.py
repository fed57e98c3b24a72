"""Serving one embedded ``Infra`` to other processes: gRPC and HTTP together, and
``dspy-infra serve``.

``InfraServer(infra, settings)`` is an async context manager: on entry it serves
``orchestrator.v1.OrchestratorService``, ``env_manager.v1.EnvManagerService`` and the
standard ``grpc.health.v1.Health`` on ``settings.grpc_port`` (``rpc/server.py``), the env
manager again on ``settings.env_manager_port`` (the old stack's separate port), and the HTTP
app (``http.py``) on ``settings.http_port``; on exit it stops them all. Port 0 binds a free
port; the bound ports are the attributes ``grpc_port``, ``env_manager_port`` and
``http_port``. ``ensure_infra(serve=True)`` hands ``InfraServer`` to ``Infra.start`` as the
server to own; ``run_server`` is ``dspy-infra serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from typing import Any, Self

import anyio
import grpclib.server
from aiohttp import web
from anyio.abc import AsyncResource

from .config import Settings
from .errors import InfraError, SpecError, Unavailable
from .http import build_app
from .infra import Infra
from .rpc.server import EnvManagerService, OrchestratorService, build_grpc_server
from .services.prometheus import scrape_address, write_scrape_target
from .values import preview

log = logging.getLogger(__name__)

__all__ = [
    "SERVER_GC_THRESHOLD",
    "InfraServer",
    "check_bind",
    "run_server",
    "server_ssl_context",
    "tune_gc_for_a_server",
]

#: Seconds InfraServer.aclose waits for connections to close after cancelling the calls.
_CLOSE_TIMEOUT = 5.0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or "" (all interfaces)


def check_bind(settings: Settings) -> None:
    """Refuse to serve on a non-loopback address without a token."""
    if not _is_loopback(settings.host) and not settings.token:
        raise SpecError(
            f"refusing to bind {preview(settings.host)} (not loopback) without a token",
            field="host",
            fix="set token (DSPY_INFRA_TOKEN) or bind 127.0.0.1",
        )
    if bool(settings.tls_cert) != bool(settings.tls_key):
        missing = "tls_key" if settings.tls_cert else "tls_cert"
        raise SpecError("TLS needs both a certificate and a key", field=missing, fix=f"set {missing}")


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS context for both servers when ``tls_cert``/``tls_key`` are set (HTTP/2 via ALPN)."""
    if not settings.tls_cert or not settings.tls_key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SpecError(
            f"cannot load certificate/key: {exc}", field="tls_cert", fix="point tls_cert/tls_key at PEM files"
        ) from None
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def _listen(host: str, port: int, field: str = "port") -> socket.socket:
    """A listening TCP socket. Created with proto=IPPROTO_TCP on purpose: asyncio only sets
    TCP_NODELAY on accepted sockets whose proto says TCP, and without it every response
    waits ~40 ms for Nagle + delayed ACK (``socket.create_server`` leaves proto 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise Unavailable(
            f"cannot listen on {host}:{port}: {exc.strerror}",
            field=field,
            fix=f"set {field} to a free port (0 = any free port) or stop what uses {port}",
        ) from None
    return sock


class InfraServer(AsyncResource):
    """gRPC (both services + health) and HTTP servers for one Infra, as an async context manager."""

    def __init__(self, infra: Infra, settings: Settings | None = None) -> None:
        self.infra = infra
        self.settings = settings if settings is not None else infra.settings
        self.grpc_port = 0
        self.env_manager_port = 0
        self.http_port = 0
        self._grpc: list[grpclib.server.Server] = []
        self._http: web.AppRunner | None = None
        self._closing = asyncio.Event()

    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def http_app(self) -> web.Application | None:
        """The HTTP application while serving (None before and after), for in-process checks."""
        return self._http.app if self._http is not None else None

    async def __aenter__(self) -> Self:
        check_bind(self.settings)
        tls = server_ssl_context(self.settings)
        try:
            env_manager = EnvManagerService(self.infra)
            self.grpc_port = await self._serve_grpc(
                [OrchestratorService(self.infra), env_manager], self.settings.grpc_port, tls, "grpc_port"
            )
            # The env manager also answers on its own port, as the old stack's did (unless
            # configured onto the same port, where it is already served).
            if self.settings.env_manager_port and self.settings.env_manager_port == self.settings.grpc_port:
                self.env_manager_port = self.grpc_port
            else:
                self.env_manager_port = await self._serve_grpc(
                    [env_manager], self.settings.env_manager_port, tls, "env_manager_port"
                )

            app = build_app(self.infra, self.settings, metrics=self.infra.metrics.exposition)
            self._http = web.AppRunner(app, access_log=None)
            await self._http.setup()
            sock = _listen(self.host, self.settings.http_port, "http_port")
            self.http_port = sock.getsockname()[1]
            await web.SockSite(self._http, sock, ssl_context=tls).start()
            await self._publish_scrape_target(tls is not None)
        except BaseException:  # (a cancelled start too: nothing is left listening)
            await self.aclose()
            raise
        return self

    async def _publish_scrape_target(self, https: bool) -> None:
        """Tell the built-in Prometheus where this server's ``/metrics`` is now (its port
        may be new at every start); a state directory that cannot take it costs a warning."""
        address = scrape_address(self.host, self.http_port)
        try:
            await anyio.to_thread.run_sync(
                lambda: write_scrape_target(
                    self.settings, "dspy_infra", address, scheme="https" if https else "http"
                )
            )
        except OSError as exc:
            log.warning("could not write the Prometheus scrape target %s: %s", address, exc)

    async def _serve_grpc(
        self, services: list[Any], port: int, tls: ssl.SSLContext | None, field: str
    ) -> int:
        """Serve ``services`` + grpc.health.v1 behind the guard on ``port``; the bound port."""
        server = build_grpc_server(services, self.settings.token, self._closing)
        sock = _listen(self.host, port, field)
        self._grpc.append(server)
        await server.start(sock=sock, ssl=tls)
        return int(sock.getsockname()[1])

    async def aclose(self) -> None:
        """Stop accepting and end the calls in progress (streams end; clients see UNAVAILABLE)."""
        http, self._http = self._http, None
        if http is not None:
            await http.cleanup()
        servers, self._grpc = self._grpc, []
        self._closing.set()
        for server in servers:
            server.close()
        # Handlers were cancelled; on Python >= 3.12 wait_closed also waits for idle client
        # connections to go away, which a connected client need never do: bound the wait.
        with anyio.move_on_after(_CLOSE_TIMEOUT):
            for server in servers:
                with contextlib.suppress(Exception):
                    await server.wait_closed()


# -- dspy-infra serve ------------------------------------------------------------------------


#: Allocations between two young collections in a process that only serves (the default,
#: 700, suits a program of short-lived objects; a server keeps thousands of tasks and their
#: events alive, and each collection that comes sooner also walks them sooner).
SERVER_GC_THRESHOLD = 20_000


def tune_gc_for_a_server() -> None:
    """Set this process's garbage collector for a long-running server: what exists once it
    serves (modules, classes, the stores' state) moves out of the collector's sight
    (``gc.freeze``), and young collections come every ``SERVER_GC_THRESHOLD`` allocations.
    Process-wide, so only for a process that is the server (``dspy-infra serve``). Measured
    (docs/performance.md): batch submit +6.5 %, 32 clients +13 %, and the server's RSS stays
    flat over the 10-minute soak."""
    gc.collect()  # garbage of the start is freed, not frozen
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, SERVER_GC_THRESHOLD), middle, old)


async def run_server(
    settings: Settings,
    *,
    stop_services: bool = False,
    on_ready: Callable[[InfraServer], None] | None = None,
    own_process: bool = False,
) -> int:
    """Run an embedded Infra with its servers until SIGTERM/SIGINT, then shut down gracefully:
    stop accepting, give running tasks ``settings.shutdown_grace`` seconds to finish (the rest
    stay durable for the next start), and stop the services only when ``stop_services``.
    Prints one ``dspy-infra serving ...`` line with the bound addresses when ready.
    ``own_process``: this process is only the server (``dspy-infra serve``), so its garbage
    collector is set for one once it serves (``tune_gc_for_a_server``); an application that
    runs a server among other work keeps its own settings (the default)."""
    check_bind(settings)  # refuse before starting anything
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Infra(settings) as infra:
            # A server's services outlive it unless --stop-services: its next start adopts them.
            infra.services.keep_by_default = not stop_services
            async with InfraServer(infra, settings) as server:
                scheme = "https" if settings.tls_cert else "http"
                print(
                    f"dspy-infra serving grpc={server.host}:{server.grpc_port}"
                    f" env_manager={server.host}:{server.env_manager_port}"
                    f" http={scheme}://{server.host}:{server.http_port}",
                    flush=True,
                )
                if own_process:
                    tune_gc_for_a_server()
                if on_ready is not None:
                    on_ready(server)
                await stop.wait()
                print(
                    f"dspy-infra: stopping: no new requests; running tasks get up to"
                    f" {settings.shutdown_grace:g} s to finish (the rest stay stored for the next start)"
                    + (", then services stop" if stop_services else "; services keep running"),
                    file=sys.stderr,
                    flush=True,
                )
            # Servers are closed: nothing new comes in. Let running tasks finish.
            await infra.drain(settings.shutdown_grace)
            if stop_services:
                running = await infra.services.status()
                names = [n for n, st in running.items() if str(st.status) not in ("stopped", "failed")]
                if names:
                    await infra.services.stop(names)
    except InfraError as exc:
        print(f"dspy-infra: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0
