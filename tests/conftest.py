"""Shared test plumbing for every folder (the folders mirror the package: tests/scheduler tests
dspy_infra/scheduler, ...; each folder's conftest.py adds what its tests share). Engine-dependent tests call ``skip_or_fail``: a skip with the reason
locally, a failure when DSPY_INFRA_REQUIRE_ENGINES=1 (CI), so a missing engine never hides."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from engines import remove_session_networks
from harness import open_scheduler

from dspy_infra.backends.process import ProcessBackend
from dspy_infra.scheduler.scheduler import Scheduler


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No test reads the developer's config or talks to a server they happen to run.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.delenv("DSPY_INFRA_ADDR", raising=False)
    monkeypatch.delenv("DSPY_INFRA_CONFIG", raising=False)
    monkeypatch.delenv("DSPY_INFRA_HOME", raising=False)


@pytest.fixture
async def scheduler(state_dir: Path) -> AsyncIterator[Scheduler]:
    """A running in-memory scheduler on ``state_dir`` with the built-in handlers and classes
    (``harness.open_scheduler`` for other settings)."""
    async with open_scheduler(state_dir, durable=False, shutdown_grace=0.5) as sched:
        yield sched


@pytest.fixture
async def process_backend(tmp_path: Path) -> AsyncIterator[ProcessBackend]:
    """An open process backend on ``tmp_path``; whatever a test left running is removed."""
    async with ProcessBackend(home=tmp_path) as b:
        yield b
        for inst in await b.list_instances({}):
            await b.remove(inst.id)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The per-test networks go with the session (see ``engines.engine_settings``)."""
    remove_session_networks()
