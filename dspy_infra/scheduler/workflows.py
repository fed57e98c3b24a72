"""Workflows: DAGs of scheduler tasks, idempotent runs and a live status stream.

(Minimal placeholder so ``Infra`` can start; the full engine lands in the next commits.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from ..config import Settings
from ..errors import NotFound
from ..events import EventBus

if TYPE_CHECKING:
    from .scheduler import Scheduler

__all__ = ["WorkflowEngine"]


class WorkflowEngine:
    """Creates workflows and drives their runs on the scheduler."""

    def __init__(self, settings: Settings, *, scheduler: Scheduler, bus: EventBus) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.bus = bus

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        return None

    async def create_workflow(self, id: str, name: str = "", description: str = "", spec: Any = None) -> Any:
        raise NotImplementedError("workflows are not implemented yet")

    async def start_run(
        self, workflow_id: str, *, input: Mapping[str, Any] | None = None, idempotency_key: str = ""
    ) -> str:
        raise NotFound(f"no workflow {workflow_id!r}", field="workflow_id")

    async def get_run(self, run_id: str) -> Any:
        raise NotFound(f"no run {run_id!r}", field="run_id")

    async def run_status(self, run_id: str) -> AsyncIterator[Any]:
        raise NotFound(f"no run {run_id!r}", field="run_id")
        yield  # pragma: no cover

    async def cancel_run(self, run_id: str) -> Any:
        raise NotFound(f"no run {run_id!r}", field="run_id")

    async def list_workflows(self) -> list[Any]:
        return []
