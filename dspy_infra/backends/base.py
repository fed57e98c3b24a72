"""The one seam every service backend implements.

A backend turns a ``ServiceSpec`` into a running *instance* (a container or a process group)
and answers questions about instances. It knows nothing of dependency order, health policy
or restarts: that is the ``ServiceManager``'s job. Every instance a backend creates carries
the labels it was given (``dspy_infra.owner``, ``dspy_infra.service``, ``dspy_infra.spec_hash``,
...) and ``list_instances`` finds instances by those labels only, so a backend never touches
anything dspy_infra did not create.

A backend is an anyio ``AsyncResource``: ``async with backend:`` opens it, leaving closes it.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Self

from anyio.abc import AsyncResource

from ..models import ExecResult, ImagePullProgress, Instance, LogEntry, ResourceUsage, ServiceSpec

__all__ = [
    "LABEL_OWNER",
    "LABEL_OWNER_PID",
    "LABEL_OWNER_STARTED",
    "LABEL_PREFIX",
    "LABEL_SERVICE",
    "LABEL_SPEC_HASH",
    "Backend",
]

LABEL_PREFIX = "dspy_infra."
LABEL_OWNER = "dspy_infra.owner"
LABEL_OWNER_PID = "dspy_infra.owner_pid"
#: The owner process's start time (from /proc), so a reused pid is not taken for the owner.
LABEL_OWNER_STARTED = "dspy_infra.owner_started"
LABEL_SERVICE = "dspy_infra.service"
LABEL_SPEC_HASH = "dspy_infra.spec_hash"


class Backend(AsyncResource):
    """Runs service instances. Subclasses set ``name`` and implement every abstract method."""

    name: str = ""

    # -- lifecycle -----------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect / check prerequisites. Raise ``BackendUnavailable`` if this backend cannot
        work here (no engine answers, ...)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections. Does not stop instances (the manager decides that)."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    # -- instances -----------------------------------------------------------------------

    @abc.abstractmethod
    async def prepare(self, specs: Sequence[ServiceSpec]) -> None:
        """Once before a start: create the shared network / check binaries exist. Raises
        ``MissingBinary`` / ``BackendError`` naming the service and what to install."""

    @abc.abstractmethod
    async def run(self, spec: ServiceSpec, *, instance_name: str, labels: Mapping[str, str]) -> Instance:
        """Create and start one instance of ``spec``; return it as started."""

    @abc.abstractmethod
    async def inspect(self, instance_id: str) -> Instance:
        """Current state of one instance; ``NotFound`` if it is gone."""

    @abc.abstractmethod
    async def list_instances(self, labels: Mapping[str, str]) -> list[Instance]:
        """Instances (running or exited) whose labels include all of ``labels``."""

    @abc.abstractmethod
    async def stop(self, instance_id: str, *, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), then kill after ``timeout``. Idempotent."""

    @abc.abstractmethod
    async def remove(self, instance_id: str) -> None:
        """Remove a stopped instance and its runtime leftovers. Idempotent."""

    # -- observation -----------------------------------------------------------------------

    @abc.abstractmethod
    def logs(
        self,
        instance_id: str,
        *,
        service_name: str,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
    ) -> AsyncIterator[LogEntry]:
        """Log lines (stdout and stderr, each tagged), oldest first; with ``follow``, keeps
        yielding until the instance exits or the iterator is closed."""

    @abc.abstractmethod
    async def stats(self, instance_id: str) -> ResourceUsage:
        """CPU percent, memory and network counters right now."""

    @abc.abstractmethod
    async def exec(self, instance_id: str, command: Sequence[str], *, timeout: float = 10.0) -> ExecResult:
        """Run ``command`` inside the instance's environment (for exec probes)."""

    @abc.abstractmethod
    def pull(self, image: str) -> AsyncIterator[ImagePullProgress]:
        """Fetch ``image`` with progress; a backend without images yields one ``complete``."""

    @abc.abstractmethod
    def probe_address(self, instance: Instance, container_port: int) -> tuple[str, int]:
        """Where the host reaches ``container_port`` of ``instance`` (for health probes)."""
