"""The services part of ``dspy-infra demo``: a small graph on the local-process backend.

Needs nothing beyond Python: two ``python -m http.server`` services on free ports and a
third that depends on both, started with live progress, inspected (status, resource use,
logs) and torn down again; plus a real Redis when ``redis-server`` is installed.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..models import ServiceSpec, ServiceStatus, ServiceStatusUpdate
from .catalog import apply_fields
from .manager import ServiceManager

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


async def services_section(infra: Any, console: Console) -> None:
    """Bring the demo graph up with live progress, show status and logs, tear it down."""
    console.rule("[bold]services: dependency order, health gates, live progress")
    with tempfile.TemporaryDirectory(prefix="dspy-infra-demo-") as tmp:
        root = Path(tmp)
        (root / "index.html").write_text("<h1>dspy_infra demo</h1>\n")
        specs = demo_services(root)
        names = [s.name for s in specs]
        manager = ServiceManager(
            infra.settings,
            bus=infra.bus,
            metrics=infra.metrics,
            plugins=infra.plugins,
            backend="process",
            extra_services=specs,
        )
        async with manager:
            rows: dict[str, ServiceStatusUpdate] = {
                n: ServiceStatusUpdate(n, ServiceStatus.STOPPED, "waiting") for n in names
            }
            started = time.monotonic()
            try:
                with Live(_progress_table(rows, started), console=console, refresh_per_second=12) as live:
                    async for update in manager.start(names):
                        rows[update.service_name] = update
                        live.update(_progress_table(rows, started))
                console.print(f"all {len(names)} services healthy in {time.monotonic() - started:.2f}s")

                states = await manager.status(names)
                table = Table(title="status")
                for column in ("service", "status", "instance", "port", "memory", "cpu %"):
                    table.add_column(column)
                for name, st in states.items():
                    port = next(iter(st.ports.values()), 0)
                    table.add_row(
                        name,
                        str(st.status),
                        st.instance_id,
                        str(port),
                        f"{st.resource_usage.memory_bytes / 1e6:.1f} MB",
                        f"{st.resource_usage.cpu_percent:.1f}",
                    )
                console.print(table)
                host, port = manager.endpoint("demo-gateway")
                console.print(f"gateway answers at http://{host}:{port}/ ; its last log lines:")
                async for entry in manager.logs("demo-gateway", tail=3):
                    console.print(f"  [dim]{entry.stream}[/] {entry.message}")
            finally:
                results = await manager.stop(names, timeout=5)
                console.print(
                    "stopped (dependents first): "
                    + ", ".join(f"{name}={result}" for name, result in results.items())
                )
