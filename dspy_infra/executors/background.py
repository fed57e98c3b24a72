"""The one background task an executor keeps while it is entered (Slurm's job watcher,
Ray's capacity poller), in a task group the executor owns and cancels when it closes."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc

__all__ = ["BackgroundTask"]


class BackgroundTask:
    """Runs ``fn`` from ``start`` until ``stop`` (which cancels it and waits for its end)."""

    def __init__(self, fn: Callable[[], Coroutine[Any, Any, object]], name: str) -> None:
        self.fn = fn
        self.name = name
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def running(self) -> bool:
        return self._tg is not None

    async def start(self) -> None:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        tg.start_soon(self.fn, name=self.name)
        self._tg = tg

    async def stop(self) -> None:
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
