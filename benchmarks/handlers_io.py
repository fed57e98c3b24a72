"""The ``http`` and ``container`` task handlers against their floors, measured in one run.

- http: ``--n`` sequential GETs of a small body from a local aiohttp server (a subprocess on
  a free port). Floor: the same request with a bare aiohttp ``ClientSession`` per request
  (what the handler does when called directly). Measured, p50 each: the handler called
  directly, and a task through a real ``Scheduler`` (submit + wait; its attempts share one
  kept-alive client session, so this one can beat the floor).
- container: ``--containers`` sequential ``echo`` runs of the busybox test image on each
  engine that answers (Docker Engine, Podman; images built by ``tests/engines.py``). Floor:
  bare aiodocker create, start, wait, logs, delete. Measured, p50 each: the handler called
  directly (it opens a backend per call) and a task through a real ``Scheduler`` (the
  scheduler's shared backend, opened once).

Last line: one JSON object with the p50s (ms) and the ratios to the floors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import aiodocker  # noqa: E402
import aiohttp  # noqa: E402

from dspy_infra.config import load_settings  # noqa: E402
from dspy_infra.events import EventBus  # noqa: E402
from dspy_infra.handlers.container import container_handler  # noqa: E402
from dspy_infra.handlers.http import http_handler  # noqa: E402
from dspy_infra.metrics import InfraMetrics  # noqa: E402
from dspy_infra.models import TaskSpec, TaskStatus  # noqa: E402
from dspy_infra.plugins import build_plugin_manager  # noqa: E402
from dspy_infra.scheduler.context import TaskContext  # noqa: E402
from dspy_infra.scheduler.scheduler import Scheduler  # noqa: E402

__all__ = ["main"]

SERVER = """
import sys
from aiohttp import web
async def hello(request):
    return web.Response(text="hello")
app = web.Application()
app.router.add_get("/", hello)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _p50_ms(n: int, once: Callable[[int], Awaitable[object]]) -> float:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await once(i)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def _wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("the benchmark server did not start")


async def bench_http(n: int) -> dict[str, float]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])  # noqa: ASYNC220 (a fork, no wait)
    try:
        await _wait_listening(port)
        url = f"http://127.0.0.1:{port}/"

        async def floor(_i: int) -> None:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                await response.read()

        async def direct(_i: int) -> None:
            await http_handler(TaskContext(TaskSpec("h", payload={"url": url}), 1))

        await _p50_ms(5, floor)  # warm-up
        floor_ms = await _p50_ms(n, floor)
        direct_ms = await _p50_ms(n, direct)
        with tempfile.TemporaryDirectory() as home:
            cfg = load_settings(env={}, home=Path(home), durable=False)
            pm = build_plugin_manager(load_entry_points=False)
            async with Scheduler(cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=pm) as sched:

                async def task(i: int) -> None:
                    await sched.submit(TaskSpec(f"h{i}", payload={"handler": "http", "url": url}))
                    result = await sched.wait(f"h{i}", timeout=30)
                    assert result.status is TaskStatus.COMPLETED, result.error

                task_ms = await _p50_ms(n, task)
    finally:
        server.terminate()
        server.wait()
    return {
        "http_floor_p50_ms": round(floor_ms, 3),
        "http_handler_p50_ms": round(direct_ms, 3),
        "http_task_p50_ms": round(task_ms, 3),
        "http_handler_ratio": round(direct_ms / floor_ms, 2),
        "http_task_ratio": round(task_ms / floor_ms, 2),
    }


async def bench_container(kind: str, host: str, image: str, n: int) -> dict[str, float]:
    async with aiodocker.Docker(url=host) as docker:

        async def floor(_i: int) -> None:
            container = await docker.containers.create(
                {"Image": image, "Cmd": ["/bin/sh", "-c", "echo hi"], "HostConfig": {"NetworkMode": "none"}}
            )
            await container.start()
            await container.wait()
            await container.log(stdout=True, stderr=True)
            await container.delete(force=True)

        settings = load_settings(env={}, docker_host=host)

        async def direct(_i: int) -> None:
            payload = {"image": image, "cmd": "echo hi"}
            await container_handler(TaskContext(TaskSpec("c", payload=payload), 1, settings))

        await floor(0)  # warm-up
        floor_ms = await _p50_ms(n, floor)
        direct_ms = await _p50_ms(n, direct)
    with tempfile.TemporaryDirectory() as home:
        cfg = load_settings(env={}, home=Path(home), durable=False, docker_host=host)
        pm = build_plugin_manager(load_entry_points=False)
        async with Scheduler(cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=pm) as sched:

            async def task(i: int) -> None:
                payload = {"handler": "container", "image": image, "cmd": "echo hi"}
                await sched.submit(TaskSpec(f"c{i}", payload=payload))
                result = await sched.wait(f"c{i}", timeout=60)
                assert result.status is TaskStatus.COMPLETED, result.error

            await task(-1)  # the first attempt opens the scheduler's shared backend
            task_ms = await _p50_ms(n, task)
    return {
        f"container_{kind}_floor_p50_ms": round(floor_ms, 1),
        f"container_{kind}_handler_p50_ms": round(direct_ms, 1),
        f"container_{kind}_task_p50_ms": round(task_ms, 1),
        f"container_{kind}_handler_ratio": round(direct_ms / floor_ms, 2),
        f"container_{kind}_task_ratio": round(task_ms / floor_ms, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="http requests per variant")
    parser.add_argument("--containers", type=int, default=10, help="container runs per variant and engine")
    args = parser.parse_args()
    import engines  # tests/engines.py: engine addresses and the busybox test image

    figures: dict[str, float] = asyncio.run(bench_http(args.n))
    print(json.dumps(figures))
    for kind in engines.ENGINE_KINDS:
        if not engines._ping(engines._host_for(kind)):
            print(f"{kind}: no engine answers, skipped")
            continue
        engine = engines._engine(kind)
        found = asyncio.run(bench_container(kind, engine.host, engine.images.busybox, args.containers))
        print(json.dumps(found))
        figures.update(found)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
