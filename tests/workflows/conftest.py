"""Tests of dspy_infra/workflows: a real scheduler under a real ``WorkflowEngine``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dspy_infra.events import EventBus
from dspy_infra.scheduler.scheduler import Scheduler
from dspy_infra.workflows import WorkflowEngine


@pytest.fixture
async def workflow_engine(scheduler: Scheduler, state_dir: Path) -> AsyncIterator[WorkflowEngine]:
    """A running in-memory workflow engine over the ``scheduler`` fixture."""
    async with WorkflowEngine(scheduler.settings, scheduler=scheduler, bus=EventBus()) as engine:
        yield engine
