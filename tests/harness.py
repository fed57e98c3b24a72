"""How tests build the real components (no doubles): one place to open a ``Scheduler`` on a
state directory, so each test module states only what differs (durability, grace, classes,
plugins). The fixtures in the conftest files use it too."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import attrs

from dspy_infra.config import Settings, load_settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import HardwareInfo
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.scheduler import Scheduler

__all__ = ["NO_GPU", "finish", "open_scheduler"]

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
