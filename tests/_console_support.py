"""A real Infra + its servers on an event loop in a thread, for clients that block (a browser
driven by Selenium, schemathesis' requests): the test thread drives, the loop serves."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
from _rpc_support import base_settings

from dspy_infra.config import load_settings
from dspy_infra.infra import Infra
from dspy_infra.serve import InfraServer

T = TypeVar("T")


@attrs.define
class ThreadedServer:
    loop: asyncio.AbstractEventLoop
    infra: Infra
    server: InfraServer

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def threaded_server(home: Path, **overrides: Any) -> Iterator[ThreadedServer]:
    settings = load_settings(**base_settings(home, **overrides))
    loop = asyncio.new_event_loop()
    ready: asyncio.Future[ThreadedServer] = loop.create_future()
    stop = asyncio.Event()

    async def serve() -> None:
        try:
            async with (
                Infra(settings, load_entry_points=False) as infra,
                InfraServer(infra, settings) as server,
            ):
                ready.set_result(ThreadedServer(loop, infra, server))
                await stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    def run() -> None:
        asyncio.set_event_loop(loop)
        with contextlib.suppress(BaseException):
            loop.run_until_complete(serve())
        loop.close()

    thread = threading.Thread(target=run, name="console-test-server", daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(_wait(ready), loop).result(60)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)


async def _wait(fut: asyncio.Future[T]) -> T:
    return await fut
