"""Shared plumbing of the rpc/http tests: a real ``dspy-infra serve`` subprocess on free
ports, and an in-process Infra + InfraServer. No doubles: both run the real scheduler,
service manager (process backend) and servers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs

from dspy_infra.config import load_settings
from dspy_infra.infra import Infra
from dspy_infra.serve import InfraServer

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"dspy-infra serving grpc=(\S+):(\d+) env_manager=\S+:(\d+) http=\S+:(\d+)")

# Runs what `dspy-infra serve` runs, with settings passed as JSON (so nothing depends on the CLI).
SERVE_CODE = """
import asyncio, json, sys
from dspy_infra.config import load_settings
from dspy_infra.serve import run_server
settings = load_settings(**json.loads(sys.argv[1]))
raise SystemExit(asyncio.run(run_server(settings, own_process=True)))
"""


def base_settings(home: Path, **overrides: Any) -> dict[str, Any]:
    """Free ports (0), the process backend and a private state directory."""
    doc: dict[str, Any] = {
        "home": str(home),
        "backend": "process",
        "grpc_port": 0,
        "env_manager_port": 0,
        "http_port": 0,
        "mode": "embedded",
    }
    doc.update(overrides)
    return doc


@attrs.frozen
class ServeProcess:
    proc: subprocess.Popen[str]
    host: str
    grpc_port: int
    env_manager_port: int
    http_port: int
    lines: list[str]

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.grpc_port}"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


@contextlib.contextmanager
def serve_process(home: Path, *, timeout: float = 60.0, **overrides: Any) -> Iterator[ServeProcess]:
    """A real server subprocess; stopped with SIGTERM (graceful) at exit, killed if it hangs."""
    home.mkdir(parents=True, exist_ok=True)
    settings = base_settings(home, **overrides)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_CODE, json.dumps(settings)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=str(home),
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError("server exited before ready:\n" + "".join(lines))
            lines.append(line)
            match = READY.search(line)
            if match:
                break
            if time.monotonic() > deadline:
                raise AssertionError("server not ready in time:\n" + "".join(lines))
        yield ServeProcess(proc, match[1], int(match[2]), int(match[3]), int(match[4]), lines)
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM (a server's graceful shutdown), SIGKILL if it is still there after ``timeout``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def in_process_server(home: Path, **overrides: Any) -> AsyncIterator[tuple[Infra, InfraServer]]:
    """An embedded Infra with its servers on free ports, in this event loop."""
    settings = load_settings(**base_settings(home, **overrides))
    async with Infra(settings, load_entry_points=False) as infra:
        async with InfraServer(infra, settings) as server:
            yield infra, server
