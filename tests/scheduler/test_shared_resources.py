"""SharedResources: what handlers reuse across attempts, owned (and closed) by the scheduler."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspy_infra.config import load_settings
from dspy_infra.events import EventBus
from dspy_infra.hookspecs import hookimpl
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskSpec, TaskStatus
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.context import Handler, SharedResources, TaskContext
from dspy_infra.scheduler.scheduler import Scheduler


class Ledger:
    """Records opens and closes of resources made by ``opener``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.fail_next = False

    def opener(self, key: str) -> contextlib.AbstractAsyncContextManager[str]:
        @contextlib.asynccontextmanager
        async def resource() -> AsyncIterator[str]:
            await anyio.sleep(0.01)  # let concurrent callers pile up on the first open
            if self.fail_next:
                self.fail_next = False
                raise ConnectionError("engine down")
            self.events.append(("open", key))
            try:
                yield f"resource-{key}"
            finally:
                self.events.append(("close", key))

        return resource()


async def test_concurrent_gets_open_each_key_once_and_aclose_closes_in_reverse() -> None:
    shared, ledger = SharedResources(), Ledger()
    got: list[str] = []

    async def get(key: str) -> None:
        got.append(await shared.get(key, lambda: ledger.opener(key)))

    async with anyio.create_task_group() as tg:
        for key in ("a", "a", "a", "b", "a", "b"):
            tg.start_soon(get, key)
    assert sorted(got) == ["resource-a"] * 4 + ["resource-b"] * 2
    assert sorted(ledger.events) == [("open", "a"), ("open", "b")]
    opened = [k for _, k in ledger.events]
    await shared.aclose()
    assert [k for e, k in ledger.events if e == "close"] == opened[::-1]
    with pytest.raises(RuntimeError, match="closed"):
        await shared.get("c", lambda: ledger.opener("c"))


async def test_a_failed_open_is_not_kept_and_the_next_get_tries_again() -> None:
    shared, ledger = SharedResources(), Ledger()
    ledger.fail_next = True
    with pytest.raises(ConnectionError):
        await shared.get("a", lambda: ledger.opener("a"))
    assert await shared.get("a", lambda: ledger.opener("a")) == "resource-a"
    await shared.aclose()
    assert ledger.events == [("open", "a"), ("close", "a")]


@settings(deadline=None)  # each example starts a loop and sleeps for real: no per-example time limit
@given(st.lists(st.sampled_from("abcde"), max_size=20))
def test_opens_equal_distinct_keys_and_every_open_is_closed(keys: list[str]) -> None:
    async def scenario() -> list[tuple[str, str]]:
        shared, ledger = SharedResources(), Ledger()
        for key in keys:
            assert await shared.get(key, lambda key=key: ledger.opener(key)) == f"resource-{key}"
        await shared.aclose()
        return ledger.events

    events = anyio.run(scenario)
    opens = [k for e, k in events if e == "open"]
    assert sorted(opens) == sorted(set(keys))
    assert [k for e, k in events if e == "close"] == opens[::-1]


async def test_the_scheduler_passes_one_shared_store_to_every_attempt_and_closes_it(tmp_path: Path) -> None:
    ledger = Ledger()
    seen: list[SharedResources | None] = []

    async def uses_shared(ctx: TaskContext) -> dict[str, str]:
        assert ctx.settings is not None and ctx.shared is not None
        seen.append(ctx.shared)
        return {"got": await ctx.shared.get("conn", lambda: ledger.opener("conn"))}

    class Plugin:
        @hookimpl
        def dspy_infra_handlers(self) -> Mapping[str, Handler]:
            return {"uses_shared": uses_shared}

    cfg = load_settings(env={}, home=tmp_path, durable=False, shutdown_grace=0.5)
    pm = build_plugin_manager([Plugin()], load_entry_points=False)
    async with Scheduler(cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=pm) as sched:
        for i in range(3):
            await sched.submit(TaskSpec(f"s{i}", payload={"handler": "uses_shared"}))
        results = [await sched.wait(f"s{i}", timeout=10) for i in range(3)]
        assert ledger.events == [("open", "conn")]  # opened once, still open while running
    assert all(r.status is TaskStatus.COMPLETED and r.result == {"got": "resource-conn"} for r in results)
    assert len({id(s) for s in seen}) == 1
    assert ledger.events == [("open", "conn"), ("close", "conn")]
