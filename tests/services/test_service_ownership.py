"""Issue 9 item 7: nothing outlives its owner unless asked; issue 8 item 10: services adopted
after a restart are monitored from the moment of adoption.

Real processes throughout: a script calls ``ensure_infra(services=["redis"])`` and ends without
any shutdown call (returns, is interrupted with SIGINT, terminated with SIGTERM or killed with
SIGKILL); what it left is checked from outside by pid and port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from _rpc_support import ROOT, base_settings, stop_process
from engines import Engine, docker_engine, engine, engine_kind, podman_engine, which_or_skip

from dspy_infra.backends.process import ProcessBackend, pid_alive
from dspy_infra.config import load_settings
from dspy_infra.infra import Infra

__all__ = ["docker_engine", "engine", "engine_kind", "podman_engine"]

pytestmark = pytest.mark.usefixtures("anyio_backend")

_SCRIPT = """
import asyncio, json, sys
from dspy_infra import ensure_infra

async def main():
    keep = sys.argv[3] == "keep"
    infra = await ensure_infra(
        services=["redis"], state_dir=sys.argv[1], mode="embedded", backend="process", keep=keep
    )
    state = (await infra.services.status(["redis"]))["redis"]
    pid = infra.services.backend.main_pid(state.instance_id)
    print(json.dumps({"port": infra.services["redis"].port, "pid": pid}), flush=True)
    if sys.argv[2] == "wait":
        await asyncio.sleep(3600)
    elif sys.argv[2] == "fork":
        import os
        from dspy_infra.backends.process import pid_alive
        child = os.fork()
        if child == 0:
            sys.exit(0)  # a child that exits normally runs the atexit hooks it inherited
        os.waitpid(child, 0)
        print(json.dumps({"alive_after_child_exit": pid_alive(pid)}), flush=True)
    elif sys.argv[2] == "raise":
        raise RuntimeError("the app failed")

asyncio.run(main())
"""


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _run_app(home: Path, how: str, keep: bool = False) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    which_or_skip("redis-server")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(home), how, "keep" if keep else "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        pytest.fail(f"the app did not start redis: {proc.stderr.read() if proc.stderr else ''}")
    return proc, json.loads(line)


def _wait_gone(pid: int, port: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid) and not _listening(port):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["return", "raise", "sigint", "sigterm", "fork"])
def test_the_one_liner_leaves_nothing_running(tmp_path: Path, how: str) -> None:
    home = tmp_path / "state"
    proc, started = _run_app(home, "wait" if how.startswith("sig") else how)
    try:
        if how == "fork":  # a forked child's exit leaves its parent's services alone
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline()) == {"alive_after_child_exit": True}
        else:
            assert pid_alive(started["pid"]) and _listening(started["port"])
        if how == "sigint":
            proc.send_signal(signal.SIGINT)
        elif how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        assert _wait_gone(started["pid"], started["port"]), f"redis outlived its app ({how})"
        assert not [p for p in (home / "services").iterdir() if not p.name.startswith(".")]
    finally:
        stop_process(proc)
        with contextlib.suppress(ProcessLookupError):
            os.kill(started["pid"], signal.SIGKILL)


async def test_a_later_start_reaps_what_a_killed_app_left(tmp_path: Path) -> None:
    home = tmp_path / "state"
    proc, started = _run_app(home, "wait")
    proc.send_signal(signal.SIGKILL)  # no cleanup at all can run
    proc.wait(30)
    try:
        assert pid_alive(started["pid"])  # left behind, as only SIGKILL can
        cfg = load_settings(**base_settings(home))
        async with Infra(cfg, load_entry_points=False) as infra:  # asks for no service
            assert await anyio.to_thread.run_sync(_wait_gone, started["pid"], started["port"], 1.0)
            assert str((await infra.services.status(["redis"]))["redis"].status) == "stopped"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(started["pid"], signal.SIGKILL)


async def test_kept_services_are_adopted_and_monitored_from_the_start(tmp_path: Path) -> None:
    home = tmp_path / "state"
    proc, started = _run_app(home, "return", keep=True)
    proc.wait(60)
    try:
        assert pid_alive(started["pid"]) and _listening(started["port"])  # kept on purpose
        cfg = load_settings(**base_settings(home))
        async with Infra(cfg, load_entry_points=False) as infra:  # asks for nothing: adopts
            handle = infra.services["redis"]
            assert handle.port == started["port"] and str(handle.status) == "healthy"
            # Monitored from adoption, with no StartServices: a crash is noticed and restarted.
            os.kill(started["pid"], signal.SIGKILL)
            with anyio.fail_after(30):
                while True:
                    await anyio.sleep(0.2)
                    state = (await infra.services.status(["redis"]))["redis"]
                    if state.restarts >= 1 and str(state.status) == "healthy":
                        break
            new_pid = infra.services.backend.main_pid(state.instance_id)
            assert new_pid != started["pid"] and pid_alive(new_pid)
            assert infra.services.is_kept("redis")  # a restart does not drop the keep
        # This infra did not start it and it is kept: it is still running after close...
        assert pid_alive(new_pid)
        # ...until someone stops it explicitly.
        async with Infra(cfg, load_entry_points=False) as infra:
            assert (await infra.services.stop([]))["redis"] == "stopped"
            assert not infra.services.is_kept("redis")
        assert not pid_alive(new_pid)
    finally:
        stop_process(proc)
        backend = ProcessBackend(home=home)
        for inst in await backend.list_instances({}):
            await backend.remove(inst.id)


_DOCKER_SCRIPT = """
import asyncio, sys
from dspy_infra import ensure_infra

async def main():
    infra = await ensure_infra(services=["sleeper"], config_file=sys.argv[1], mode="embedded")
    print(infra.services["sleeper"].port, flush=True)

asyncio.run(main())
"""


async def test_the_one_liner_leaves_no_container_either(tmp_path: Path, engine: Engine) -> None:
    """The ``atexit`` path with a container backend: a fresh backend in a private loop."""
    import aiodocker
    from engines import unique_name

    owner, network = unique_name("owner"), unique_name("net")
    config = tmp_path / "dspy-infra.toml"
    config.write_text(
        f'home = "{tmp_path / "state"}"\nbackend = "docker"\ndocker_host = "{engine.host}"\n'
        f'owner = "{owner}"\nnetwork = "{network}"\n'
        "[services.sleeper]\n"
        f'image = "{engine.images.busybox}"\n'
        "command = \"sh -c 'exec httpd -f -p {port} -h /www'\"\n"
        "ports = [8080]\n"
        'health = {kind = "http", path = "/index.html"}\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = await anyio.run_process([sys.executable, "-c", _DOCKER_SCRIPT, str(config)], env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert int(done.stdout.split()[-1]) not in (0, 8080)
    docker = aiodocker.Docker(url=engine.host)
    try:
        left = await docker.containers.list(all=True, filters={"label": [f"dspy_infra.owner={owner}"]})
        assert left == []
        with contextlib.suppress(aiodocker.DockerError):
            await (await docker.networks.get(network)).delete()
    finally:
        await docker.close()
