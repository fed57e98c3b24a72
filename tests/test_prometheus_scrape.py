"""A real Prometheus (Debian's ``prometheus`` package) scrapes ``/metrics`` and its query API
returns the env_manager and scheduler series."""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

import aiohttp
import anyio
from _rpc_support import in_process_server
from engines import skip_or_fail


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _query(session: aiohttp.ClientSession, base: str, expr: str) -> list[dict[str, object]]:
    async with session.get(f"{base}/api/v1/query", params={"query": expr}) as resp:
        doc = await resp.json()
    assert doc["status"] == "success", doc
    result: list[dict[str, object]] = doc["data"]["result"]
    return result


async def test_prometheus_scrapes_env_manager_and_scheduler_series(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        skip_or_fail("the prometheus binary is absent (apt-get install prometheus)")
    async with in_process_server(tmp_path / "state") as (infra, server):
        # Some traffic so that labelled scheduler series exist.
        await infra.submit_task("scraped", payload={"handler": "noop"})
        await infra.wait("scraped", timeout=30)

        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: dspy_infra\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{server.http_port}']\n"
        )
        port = _free_port()
        proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as session:
                wanted = {
                    "env_manager_active_services": False,
                    'orchestrator_concurrency_limit{task_class="cpu_short"}': False,
                    'orchestrator_tasks_total{task_class="cpu_short",status="completed"}': False,
                    'up{job="dspy_infra"} == 1': False,
                }
                with anyio.fail_after(60):
                    while not all(wanted.values()):
                        for expr, seen in wanted.items():
                            if seen:
                                continue
                            try:
                                wanted[expr] = bool(await _query(session, base, expr))
                            except aiohttp.ClientError:
                                break  # not listening yet
                        await asyncio.sleep(0.5)
                limit = await _query(session, base, 'orchestrator_concurrency_limit{task_class="cpu_short"}')
                assert float(limit[0]["value"][1]) == (await infra.queue_status())["cpu_short"].limit  # type: ignore[index]
        finally:
            proc.terminate()
            _, err = await proc.communicate()
            assert proc.returncode is not None, err
