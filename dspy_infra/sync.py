"""``ensure_infra_sync()`` and ``SyncInfra``: the shared infra for code without an event
loop, run on a private loop in a daemon thread (``LoopThread``, which the pytest plugin
uses too)."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

from .api import InfraAPI
from .ensure import ensure_infra, shutdown_infra
from .errors import SpecError

__all__ = ["LoopThread", "SyncInfra", "ensure_infra_sync"]

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread; ``call`` runs a coroutine there and blocks.
    The one loop-in-a-thread helper (``ensure_infra_sync`` and the pytest plugin)."""

    def __init__(self, name: str = "dspy_infra-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        """Stop the loop and its thread (the loop is closed once the thread has ended)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class SyncInfra:
    """Blocking proxy to an infra running on a private event loop in a daemon thread.

    Coroutine methods become blocking calls; ``close()`` shuts the infra down and the loop.
    """

    def __init__(self, runner: LoopThread, infra: InfraAPI) -> None:
        self._runner, self._infra = runner, infra

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._infra, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._runner.call(attr(*args, **kwargs))

        return call

    def close(self) -> None:
        self._runner.call(shutdown_infra())
        self._runner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ensure_infra_sync(**kwargs: Any) -> SyncInfra:
    """``ensure_infra`` for code without an event loop. Inside a running loop, use
    ``await ensure_infra()`` instead (this raises ``SpecError`` there)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise SpecError(
            "ensure_infra_sync() was called inside a running event loop",
            fix="use `await ensure_infra(...)` in async code",
        )
    runner = LoopThread()
    try:
        infra = runner.call(ensure_infra(**kwargs))
    except BaseException:
        runner.close()
        raise
    return SyncInfra(runner, infra)
