"""The services part of ``dspy-infra demo``: a small graph on the local-process backend.

Needs nothing beyond Python: two ``python -m http.server`` services on free ports and a
third that depends on both, started with live progress, inspected (status, resource use,
logs) and torn down again; plus a real Redis when ``redis-server`` is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..errors import ServiceError
from ..models import ServiceSpec, ServiceStatus, ServiceStatusUpdate
from ..services.catalog import apply_fields
from ..services.manager import ServiceManager

__all__ = ["demo_services", "services_section"]

_STYLE = {
    ServiceStatus.STARTING: "yellow",
    ServiceStatus.HEALTHY: "green",
    ServiceStatus.RUNNING: "green",
    ServiceStatus.FAILED: "red",
    ServiceStatus.UNHEALTHY: "red",
    ServiceStatus.STOPPED: "dim",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http_server(name: str, root: Path, *deps: str) -> ServiceSpec:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        "--directory",
        str(root),
        str(port),
    ]
    return apply_fields(
        name,
        {
            "command": command,
            "ports": [f"{port}:{port}"],
            "depends_on": list(deps),
            "health": {"kind": "http", "path": "/", "interval": 0.1, "startup_timeout": 20.0},
        },
    )


def demo_services(root: Path) -> list[ServiceSpec]:
    """The demo graph: ``demo-api`` and ``demo-assets`` (level 0), ``demo-gateway`` on both,
    and ``demo-redis`` when a ``redis-server`` binary is installed."""
    specs = [
        _http_server("demo-api", root),
        _http_server("demo-assets", root),
        _http_server("demo-gateway", root, "demo-api", "demo-assets"),
    ]
    redis = shutil.which("redis-server")
    if redis:
        port = _free_port()
        command = [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        specs.append(
            apply_fields(
                "demo-redis",
                {
                    "command": command,
                    "ports": [f"{port}:{port}"],
                    "health": {"kind": "redis", "interval": 0.1},
                },
            )
        )
    return specs


def _progress_table(rows: dict[str, ServiceStatusUpdate], started: float) -> Table:
    table = Table(title=f"starting services on the process backend ({time.monotonic() - started:.2f}s)")
    table.add_column("service")
    table.add_column("status")
    table.add_column("progress", justify="right")
    table.add_column("detail", overflow="fold")
    for name, update in rows.items():
        style = _STYLE.get(update.status, "")
        table.add_row(name, f"[{style}]{update.status}[/]", f"{update.progress}%", update.message[:70])
    return table


def _own_manager(
    infra: Any, specs: list[ServiceSpec]
) -> contextlib.AbstractAsyncContextManager[ServiceManager]:
    """The infra's own manager when it runs on the process backend (the demo's default),
    else a process-backend manager sharing the infra's bus and metrics."""
    services: ServiceManager = infra.services
    if services.backend.name == "process":
        for spec in specs:
            services.add_service(spec)
        return contextlib.nullcontext(services)
    return ServiceManager(
        infra.settings,
        bus=infra.bus,
        metrics=infra.metrics,
        plugins=infra.plugins,
        backend="process",
        extra_services=specs,
    )


async def _http_status(host: str, port: int) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        line = (await reader.readline()).decode("latin-1").split()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(line[1]) if len(line) > 1 and line[1].isdigit() else 0


def _check(ok: bool, service: str, what: str) -> None:
    if not ok:
        raise ServiceError(f"demo: {what}", service=service)


async def services_section(infra: Any, console: Console) -> None:
    """Bring the demo graph up with live progress, show status and logs, tear it down.
    Raises ``ServiceError`` when something is not as it should be."""
    console.rule("[bold]services: dependency order, health gates, live progress")
    with tempfile.TemporaryDirectory(prefix="dspy-infra-demo-") as tmp:
        root = Path(tmp)
        (root / "index.html").write_text("<h1>dspy_infra demo</h1>\n")
        specs = demo_services(root)
        names = [s.name for s in specs]
        async with _own_manager(infra, specs) as manager:
            rows: dict[str, ServiceStatusUpdate] = {
                n: ServiceStatusUpdate(n, ServiceStatus.STOPPED, "waiting") for n in names
            }
            since = time.time()
            started = time.monotonic()
            try:
                with Live(_progress_table(rows, started), console=console, refresh_per_second=12) as live:
                    async for update in manager.start(names):
                        rows[update.service_name] = update
                        live.update(_progress_table(rows, started))
                if not console.is_terminal:
                    console.line()
                console.print(f"all {len(names)} services healthy in {time.monotonic() - started:.2f}s")

                events = infra.bus.history(["service_starting", "service_healthy"], since=since)
                starting = {e.resource_id: e.timestamp for e in events if e.type == "service_starting"}
                healthy = {e.resource_id: e.timestamp for e in events if e.type == "service_healthy"}
                last_dep = max(healthy["demo-api"], healthy["demo-assets"])
                _check(
                    starting["demo-gateway"] >= last_dep, "demo-gateway", "started before its dependencies"
                )
                console.print(
                    f"demo-gateway started {1000 * (starting['demo-gateway'] - last_dep):.1f} ms after both"
                    " of its dependencies answered their health probes"
                )

                states = await manager.status(names)
                table = Table(title="status")
                for column in ("service", "status", "port", "memory", "cpu %", "restarts"):
                    table.add_column(column)
                for name, st in states.items():
                    _check(st.status == ServiceStatus.HEALTHY, name, f"status is {st.status}")
                    table.add_row(
                        name,
                        str(st.status),
                        str(next(iter(st.ports.values()), "")),
                        f"{st.resource_usage.memory_bytes / 1e6:.1f} MB",
                        f"{st.resource_usage.cpu_percent:.1f}",
                        str(st.restarts),
                    )
                console.print(table)
                host, port = manager.endpoint("demo-gateway")
                status = await _http_status(host, port)
                _check(status == 200, "demo-gateway", f"GET / answered {status}")
                console.print(f"GET http://{host}:{port}/ -> {status}; the gateway's last log lines:")
                async for entry in manager.logs("demo-gateway", tail=3):
                    console.print(f"  [dim]{entry.stream}[/] {escape(entry.message)}")
            finally:
                results = await manager.stop(names, timeout=5)
                console.print(
                    "stopped (dependents first): "
                    + ", ".join(f"{name}={result}" for name, result in results.items())
                )
            _check(set(results.values()) == {"stopped"}, "demo", f"stop results {results}")
