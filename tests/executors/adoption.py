"""The SIGKILL adoption round shared by the Slurm and Ray tests (a real owner process is
killed mid-task and a new owner of the same state directory adopts the attempt), and where
the Ray tests find their cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from harness import finish

HERE = Path(__file__).resolve().parent
#: The head's GCS address (scripts/ray.sh: DSPY_INFRA_RAY_PORT, default 26379).
RAY_ADDRESS = os.environ.get("DSPY_INFRA_TEST_RAY_ADDRESS", "127.0.0.1:26379")
# Ray 2.60 clusters started by scripts/ray.sh require token auth from every driver, and the
# owner subprocesses of the adoption tests inherit it.
os.environ.setdefault("RAY_AUTH_MODE", "token")


async def wait_for_text(path: Path, timeout: float = 60) -> str:
    """The text of ``path`` once something is written to it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            text = await anyio.Path(path).read_text()
            if text.strip():
                return text
        await anyio.sleep(0.1)
    raise AssertionError(f"{path} never written")


async def adoption_round(
    settings: dict[str, Any], task: dict[str, Any], runs: Path, *, ended: Path | None = None
) -> dict[str, Any]:
    """Owner 1 submits and is SIGKILLed once the command runs; owner 2 adopts (after the
    command wrote ``ended``, when given: the attempt finished while no owner watched). The
    command ran exactly once and owner 2 has its result."""
    script = str(HERE / "owner_process.py")
    first = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, script, "submit", json.dumps(settings), json.dumps(task)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await wait_for_text(runs, timeout=180)
    finally:
        first.send_signal(signal.SIGKILL)
        finish(first, timeout=30)
    if ended is not None:
        await wait_for_text(ended, timeout=120)
    second = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, script, "resume", json.dumps(settings), task["id"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    outcome: dict[str, Any] = json.loads(second.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "completed", outcome
    assert await anyio.Path(runs).read_text() == "run\n", "the command ran more than once"
    assert "finished" in str(outcome["result"].get("stdout"))
    # Attempt 1 died with its owner; attempt 2 adopted it instead of running it again.
    assert outcome["attempts"] == 2
    return outcome
