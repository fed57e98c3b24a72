"""Two separate processes that each call ``ensure_infra()`` while a server runs share one
scheduler: each sees and awaits the other's tasks. Plus connect-or-embed's quick miss."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _rpc_support import ROOT, serve_process
from engines import which_or_skip

from dspy_infra import errors
from dspy_infra.rpc.remote import RemoteInfra

CHILD = """
import asyncio, json, sys
from dspy_infra import NotFound, ensure_infra, shutdown_infra
from dspy_infra.rpc.remote import RemoteInfra

async def main(mine, theirs):
    infra = await ensure_infra()
    assert isinstance(infra, RemoteInfra), type(infra)
    await infra.submit_task(mine, payload={"handler": "sleep", "seconds": "0.5"})
    for _ in range(300):
        try:
            await infra.get_task(theirs)
            break
        except NotFound:
            await asyncio.sleep(0.1)
    theirs_result = await infra.wait(theirs, timeout=60)
    mine_result = await infra.wait(mine, timeout=60)
    listed = [t.id for t in await infra.list_tasks(limit=1000)]
    print(json.dumps({"theirs": str(theirs_result.status), "mine": str(mine_result.status), "listed": listed}))
    await shutdown_infra()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    env.update(PYTHONPATH=str(ROOT), XDG_STATE_HOME=str(tmp_path / "child-state"), **extra)
    return env


def test_two_processes_share_one_scheduler(tmp_path: Path) -> None:
    with serve_process(tmp_path / "server") as server:
        # One finds the server through DSPY_INFRA_ADDR, the other by auto mode at its port:
        # auto mode attaches because its settings resolve to the server's own home.
        a = subprocess.Popen(
            [sys.executable, "-c", CHILD, "from-a", "from-b"],
            env=_child_env(tmp_path, DSPY_INFRA_ADDR=server.addr),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        b = subprocess.Popen(
            [sys.executable, "-c", CHILD, "from-b", "from-a"],
            env=_child_env(
                tmp_path, DSPY_INFRA_GRPC_PORT=str(server.grpc_port), DSPY_INFRA_HOME=str(tmp_path / "server")
            ),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out_a, err_a = a.communicate(timeout=120)
        out_b, err_b = b.communicate(timeout=120)
        assert a.returncode == 0, err_a
        assert b.returncode == 0, err_b
        for out in (out_a, out_b):
            doc = json.loads(out.strip().splitlines()[-1])
            assert doc["theirs"] == "completed" and doc["mine"] == "completed"
            assert {"from-a", "from-b"} <= set(doc["listed"])
    # Neither child made an embedded infra of its own.
    assert not (tmp_path / "child-state" / "dspy-infra").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connect_misses_quickly_when_nothing_answers() -> None:
    addr = f"127.0.0.1:{_closed_port()}"
    began = time.perf_counter()
    assert await RemoteInfra.connect(addr, required=False) is None
    assert time.perf_counter() - began < 0.5
    with pytest.raises(errors.Unavailable) as info:
        await RemoteInfra.connect(addr, required=True)
    assert addr in str(info.value) and info.value.field == "addr" and info.value.fix


async def test_connect_refuses_a_malformed_address() -> None:
    with pytest.raises(errors.SpecError) as info:
        await RemoteInfra.connect("no-port-here", required=True)
    assert info.value.field == "addr"


async def test_connect_times_out_on_a_silent_listener() -> None:
    # A socket that accepts but never speaks HTTP/2: still a quick None, not a hang.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        addr = f"127.0.0.1:{listener.getsockname()[1]}"
        began = time.perf_counter()
        assert await RemoteInfra.connect(addr, required=False, timeout=0.3) is None
        assert time.perf_counter() - began < 1.0


def test_sigterm_drains_running_tasks_and_keeps_queued_ones(tmp_path: Path) -> None:
    import anyio

    from dspy_infra.rpc.client import OrchestratorClient

    home = tmp_path / "server"
    # One cpu_long slot: the first task runs, the second waits in the queue.
    classes = {
        "cpu_long": {"min_concurrency": 1, "base_concurrency": 1, "max_concurrency": 1, "adaptive": False}
    }
    with serve_process(home, task_classes=classes, shutdown_grace=20.0) as server:

        async def submit() -> None:
            async with OrchestratorClient.connect(server.addr) as orch:
                await orch.submit_task("running", "cpu_long", {"handler": "sleep", "seconds": "1.5"})
                await orch.submit_task("queued", "cpu_long", {"handler": "noop"})
                for _ in range(100):
                    if (await orch.get_task_status("running")).status == "running":
                        break
                    await anyio.sleep(0.05)

        anyio.run(submit)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
    # Restart on the same state directory: the running task had finished before exit, the
    # queued one survived and now runs.
    with serve_process(home, task_classes=classes) as again:

        async def check() -> None:
            async with OrchestratorClient.connect(again.addr) as orch:
                finished = await orch.get_task_status("running")
                assert finished.status == "completed", finished
                assert (await orch.wait("queued", timeout=30)).status == "completed"

        anyio.run(check)


def test_env_manager_on_the_same_port_is_served_once(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with serve_process(tmp_path / "server", grpc_port=port, env_manager_port=port) as server:
        assert server.grpc_port == server.env_manager_port == port


INFRA_METHODS = [
    "submit_task",
    "wait",
    "get_task",
    "cancel",
    "list_tasks",
    "stream_results",
    "events",
    "queue_status",
    "health",
    "create_workflow",
    "start_run",
    "get_run",
    "run_status",
    "cancel_run",
    "ensure_services",
    "aclose",
    "handler",
]
SERVICE_METHODS = ["start", "stop", "restart", "status", "logs", "health", "pull", "resources", "ensure"]


def test_remote_infra_offers_the_embedded_interface() -> None:
    import inspect

    from dspy_infra.infra import Infra
    from dspy_infra.rpc.remote import RemoteServices
    from dspy_infra.services.manager import ServiceManager

    for name in INFRA_METHODS:
        local, remote = getattr(Infra, name), getattr(RemoteInfra, name)
        # Same parameter names, so calls written for one work with the other.
        assert list(inspect.signature(local).parameters) == list(inspect.signature(remote).parameters), name
    assert isinstance(RemoteInfra.running, property)
    for name in SERVICE_METHODS:
        assert hasattr(ServiceManager, name) and hasattr(RemoteServices, name), name


async def test_remote_infra_end_to_end(tmp_path: Path) -> None:
    import anyio
    from _rpc_support import in_process_server

    async with in_process_server(tmp_path / "state") as (_infra, server):
        remote = await RemoteInfra.connect(f"127.0.0.1:{server.grpc_port}", required=True)
        assert remote is not None and remote.running
        async with remote:
            with pytest.raises(errors.FailedPrecondition):
                remote.handler("mine")
            state = await remote.submit_task("r1", payload={"handler": "exec", "cmd": "echo hello"})
            assert state.id == "r1"
            result = await remote.wait("r1", timeout=30)
            assert result.status == "completed" and "hello" in json.dumps(result.result)
            assert (await remote.get_task("r1")).spec.payload["cmd"] == "echo hello"
            assert "r1" in [t.id for t in await remote.list_tasks(status="completed")]
            async for replay in remote.stream_results(["r1"], include_completed=True):
                assert replay.task_id == "r1"
                break
            slow = await remote.submit_task("r2", payload={"handler": "sleep", "seconds": "30"})
            assert (await remote.cancel(slow.id)).status in ("cancelled", "running")
            assert (await remote.wait("r2", timeout=30)).status == "cancelled"
            async for event in remote.events(["task_completed"], since=0.001):
                assert event.type == "task_completed"
                break
            assert (await remote.queue_status())["cpu_short"].limit >= 1
            assert (await remote.health())["healthy"] is True

            await remote.create_workflow(
                "wf", spec={"steps": [{"name": "a", "payload": {"handler": "noop"}}]}
            )
            run_id = await remote.start_run("wf", idempotency_key="once")
            assert await remote.start_run("wf", idempotency_key="once") == run_id
            with anyio.fail_after(30):
                async for update in remote.run_status(run_id):
                    if update.status.terminal:
                        break
            assert (await remote.get_run(run_id)).status == "completed"
            assert (await remote.cancel_run(run_id)).status == "completed"

            which_or_skip("redis-server")
            await remote.ensure_services(["redis"])
            status = await remote.services.status(["redis"])
            assert str(status["redis"].status) in ("healthy", "running") and status["redis"].ports
            assert (await remote.services.resources("cpu_short")).hardware.cpu_cores >= 1
            assert (await remote.services.stop(["redis"]))["redis"] == "stopped"
        assert not remote.running
