"""Shutdown order: tasks still running when an Infra closes keep the services they use."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import anyio

from dspy_infra import HealthCheck, Infra, PortMapping, ServiceSpec, TaskStatus, load_settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_services_stop_after_running_tasks_drain(tmp_path: Path) -> None:
    port = free_port()
    web = ServiceSpec(
        name="web",
        command=[sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        ports=[PortMapping(port, port)],
        health=HealthCheck(kind="http", path="/", startup_timeout=30),
        workdir=str(tmp_path),
    )
    settings = load_settings(env={}, home=tmp_path / "home", backend="process", shutdown_grace=10)
    # The task calls the service only after close() has begun.
    fetch = (
        f"sleep 1 && {sys.executable} -c "
        f"\"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=5)\""
    )
    async with Infra(settings, services=[web]) as infra:
        await infra.ensure_services(["web"])
        await infra.submit_task("uses-web", payload={"handler": "exec", "cmd": fetch})
        for _ in range(500):
            if (await infra.get_task("uses-web")).status is TaskStatus.RUNNING:
                break
            await anyio.sleep(0.01)
        assert (await infra.get_task("uses-web")).status is TaskStatus.RUNNING
    async with Infra(settings) as again:
        done = await again.wait("uses-web", timeout=10)
    assert done.status is TaskStatus.COMPLETED, done.error
