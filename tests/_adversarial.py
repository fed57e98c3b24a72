"""Shared plumbing of the adversarial tests: a watchdog that measures how long the event loop
was held, and the official grpcio stubs generated from proto/ (as tests/test_rpc_interop.py
does), so the hostile calls go through the same client other languages use."""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType

import anyio
import anyio.abc
import attrs
from _rpc_support import ROOT
from grpc_tools import protoc

PROTOS = ("orchestrator/v1/orchestrator.proto", "env_manager/v1/env_manager.proto")
#: A generous bound on the longest loop stall while a hostile request runs: the bugs this
#: guards against held the loop for 2 s (one replaying client) to 135 s; the fixed code stays
#: under 0.1 s, and the rest is room for a machine shared by several test runs.
STALL_BOUND = 1.0
#: The bound for tests whose guarded bug held the loop for many seconds (its comment says how
#: long): more room for a loaded machine, still far below the stall it catches.
LONG_STALL_BOUND = 2.0


@attrs.define
class Watchdog:
    """Longest gap between ticks beyond the tick itself, in seconds."""

    longest: float = 0.0


@contextlib.asynccontextmanager
async def loop_watchdog(tick: float = 0.01) -> AsyncIterator[Watchdog]:
    """Measure the longest stall of the running loop while the body runs."""
    dog = Watchdog()

    async def watch(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        last = time.monotonic()
        task_status.started()
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            dog.longest = max(dog.longest, now - last - tick)
            last = now

    async with anyio.create_task_group() as tg:
        await tg.start(watch)  # ticking before the body runs, so a stall at its start counts
        try:
            yield dog
        finally:
            tg.cancel_scope.cancel()


@contextlib.contextmanager
def official_stubs(out: Path) -> Iterator[dict[str, ModuleType]]:
    """grpcio-tools stubs of both services, importable while the context is open."""
    args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}", *PROTOS]
    assert protoc.main(args) == 0
    sys.path.insert(0, str(out))
    try:
        yield {
            "orch": importlib.import_module("orchestrator.v1.orchestrator_pb2"),
            "orch_grpc": importlib.import_module("orchestrator.v1.orchestrator_pb2_grpc"),
            "env": importlib.import_module("env_manager.v1.env_manager_pb2"),
            "env_grpc": importlib.import_module("env_manager.v1.env_manager_pb2_grpc"),
        }
    finally:
        sys.path.remove(str(out))
        for name in list(sys.modules):
            if name.split(".")[0] in ("orchestrator", "env_manager"):
                del sys.modules[name]
