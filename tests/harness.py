"""How tests build the real components (no doubles): one place to open a ``Scheduler`` on a
state directory, so each test module states only what differs (durability, grace, classes,
plugins). The fixtures in the conftest files use it too."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any
from unittest import mock

import attrs
import pytest

from dspy_infra.config import Settings, load_settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import HardwareInfo, TaskSpec
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler import scheduler as scheduler_module
from dspy_infra.scheduler.context import TaskContext
from dspy_infra.scheduler.journal import JOURNAL_FILE_NAMES
from dspy_infra.scheduler.scheduler import Scheduler

__all__ = [
    "NO_GPU",
    "crash_image",
    "fast_retries",
    "finish",
    "handler_context",
    "kill_when",
    "open_scheduler",
    "processes_with",
    "wait_until",
]

#: A machine without a GPU, so gpu classes behave the same on every test host.
NO_GPU = HardwareInfo(cpu_cores=2, memory_bytes=8 << 30)


@contextlib.asynccontextmanager
async def open_scheduler(
    where: Path | Settings,
    *,
    hardware: HardwareInfo | None = NO_GPU,
    plugins: Iterable[Any] = (),
    bus: EventBus | None = None,
    metrics: InfraMetrics | None = None,
    **overrides: Any,
) -> AsyncIterator[Scheduler]:
    """A running scheduler on ``where`` (a state directory, read with no environment, plus
    ``overrides``; or ready ``Settings``). ``hardware=None`` detects this machine's."""
    if isinstance(where, Settings):
        cfg = attrs.evolve(where, **overrides) if overrides else where
    else:
        cfg = load_settings(env={}, home=where, **overrides)
    pm = build_plugin_manager(tuple(plugins), load_entry_points=False)
    extra = {} if hardware is None else {"hardware": hardware}
    async with Scheduler(
        cfg, bus=bus or EventBus(), metrics=metrics or InfraMetrics(), plugins=pm, **extra
    ) as s:
        yield s


def finish(child: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    """A child process's (stdout, stderr) once it exits; killed (and reaped) if it outlives
    ``timeout``, so a hung child never outlives its test."""
    try:
        return child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def handler_context(**payload: object) -> TaskContext:
    """What a handler is called with for a task ``t`` with ``payload`` (its first attempt)."""
    return TaskContext(spec=TaskSpec("t", payload=payload), attempt=1)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` (from a test without an event loop) until it holds; fail the test
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_when(child: subprocess.Popen[Any], ready: Callable[[], bool], timeout: float) -> None:
    """SIGKILL ``child`` once ``ready()`` holds (or after ``timeout`` seconds, or once it has
    exited), and reap it: a crash at a point the test chose. The caller asserts the outcome."""
    try:
        deadline = time.monotonic() + timeout
        while not ready() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=10)


def processes_with(text: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line (arguments joined by spaces)
    contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def fast_retries(base: float = 0.001) -> contextlib.AbstractContextManager[Any]:
    """Within it, a failed attempt is retried after about ``base`` seconds instead of the
    production backoff (a context manager, so hypothesis tests can use it too)."""
    return mock.patch.object(scheduler_module, "RETRY_BACKOFF_BASE", base)


def crash_image(home: Path, target: Path) -> None:
    """Copy what a crash of the scheduler on ``home`` would leave on disk into ``target``: the
    attempt journal first, then the committed database through SQLite's backup API (an
    attempt retired from the journal meanwhile is in the database by then)."""
    target.mkdir()
    for name in JOURNAL_FILE_NAMES:
        if (home / name).exists():
            (target / name).write_bytes((home / name).read_bytes())
    src = sqlite3.connect(home / "state.db")
    dst = sqlite3.connect(target / "state.db")
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
