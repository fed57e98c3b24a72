"""One exception hierarchy for everything dspy_infra raises.

::

    InfraError
     ├── SpecError                 a spec, payload or request field is wrong (names field + fix)
     │    ├── CycleError           a dependency graph has a cycle (names the cycle)
     │    └── ConfigError          a config value (file or environment) is wrong
     ├── NotFound                  no task / service / workflow / run with that id
     ├── AlreadyExists             the id is taken by something with different content
     ├── FailedPrecondition        valid request the current state cannot honour
     │    └── ResourceUnavailable  e.g. a gpu task on a machine with no GPU
     ├── Unavailable               not started, shutting down, or a server that does not answer
     ├── DeadlineExceeded          a wait ran out of time (also a TimeoutError)
     ├── Unauthenticated           missing or wrong bearer token
     ├── PermissionDenied          allowed callers only (e.g. commands under exec_policy)
     ├── BackendError              the container engine / process runner failed
     │    ├── BackendUnavailable   no engine answers at the configured address
     │    └── MissingBinary        a process service's executable is not installed
     ├── ServiceError              a service could not be brought up
     │    └── HealthCheckFailed    startup timed out; carries the last probe failure + logs
     ├── TaskError                 a task ended badly (raised by callers that asked for it)
 └── HandlerFailure            a task handler failed an attempt; ``result`` keeps what it made
      └── PermanentFailure     ... and no retry can fix it (bad payload, unknown handler)

Every error carries an optional ``field`` (the input that was wrong) and ``fix`` (what to do);
``str(err)`` always includes both, so a one-line CLI message is enough for a user.
The gRPC status and HTTP code for each class are decided in exactly one place: ``wire.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "AlreadyExists",
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "CycleError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "HandlerFailure",
    "HealthCheckFailed",
    "InfraError",
    "MissingBinary",
    "NotFound",
    "PermanentFailure",
    "PermissionDenied",
    "ResourceUnavailable",
    "ServiceError",
    "SpecError",
    "TaskError",
    "Unauthenticated",
    "Unavailable",
]


class InfraError(Exception):
    """Base of every error dspy_infra raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None) -> None:
        self.message = message
        self.field = field
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.field}: {self.message}" if self.field else self.message
        if self.fix:
            text = f"{text} (fix: {self.fix})"
        return text


class SpecError(InfraError, ValueError):
    """A spec, payload, request or argument is invalid; ``field`` names it."""


class CycleError(SpecError):
    """A dependency graph contains a cycle; ``cycle`` lists it, first node repeated last."""

    def __init__(self, cycle: Sequence[str], *, field: str = "depends_on") -> None:
        self.cycle = list(cycle)
        super().__init__(
            "cycle found: " + " -> ".join(self.cycle),
            field=field,
            fix="remove one of these dependencies",
        )


class ConfigError(SpecError):
    """A configuration value (TOML file or DSPY_INFRA_* variable) is invalid."""


class NotFound(InfraError, LookupError):
    """No object of that kind with that id."""


class AlreadyExists(InfraError):
    """The id is already used by an object with different content."""


class FailedPrecondition(InfraError):
    """The request is valid but the system's current state cannot honour it."""


class ResourceUnavailable(FailedPrecondition):
    """The resource a request needs (a GPU, an executor) is not available here."""


class Unavailable(InfraError):
    """The infra is not running (not started, shutting down, or a server does not answer)."""


class DeadlineExceeded(InfraError, TimeoutError):
    """A wait ran out of time before the thing waited for happened."""


class Unauthenticated(InfraError):
    """The request lacks a valid bearer token."""


class PermissionDenied(InfraError):
    """The caller is authenticated but may not do this (e.g. run a command under ``exec_policy``)."""


class BackendError(InfraError):
    """The service backend (container engine or process runner) failed an operation."""


class BackendUnavailable(BackendError):
    """No container engine answers at the configured address."""


class MissingBinary(BackendError):
    """A process-backend service names an executable that is not installed."""


class ServiceError(InfraError):
    """A service could not be started, stopped or restarted."""

    def __init__(
        self, message: str, *, service: str, field: str | None = None, fix: str | None = None
    ) -> None:
        self.service = service
        super().__init__(message, field=field, fix=fix)


class HealthCheckFailed(ServiceError):
    """A service did not become healthy in time; carries the last probe error and log lines."""

    def __init__(
        self,
        service: str,
        *,
        last_failure: str,
        last_logs: Sequence[str] = (),
        timeout: float | None = None,
    ) -> None:
        self.last_failure = last_failure
        self.last_logs = list(last_logs)
        waited = f" within {timeout:g}s" if timeout is not None else ""
        message = f"service {service!r} did not become healthy{waited}: {last_failure}"
        if self.last_logs:
            message += "\n  last log lines:\n" + "\n".join(f"    {ln}" for ln in self.last_logs)
        super().__init__(message, service=service)


class TaskError(InfraError):
    """A task ended failed or cancelled where the caller asked for success."""

    def __init__(self, message: str, *, task_id: str, status: str) -> None:
        self.task_id = task_id
        self.status = status
        super().__init__(message)


class HandlerFailure(InfraError):
    """A task handler failed this attempt (the scheduler retries while attempts remain).

    ``result`` is the JSON object the attempt produced before failing (an exit code and
    output, an HTTP status and body, a Slurm job's state); the scheduler keeps it on the task.
    Handlers raise a subclass naming their failure (``ExecFailed``, ``HttpStatusFailed``,
    ``SlurmJobFailed``) or ``PermanentFailure``.
    """

    def __init__(self, message: str, result: Mapping[str, Any] | None = None) -> None:
        self.result: dict[str, Any] | None = dict(result) if result is not None else None
        super().__init__(message)


class PermanentFailure(HandlerFailure):
    """A handler failure no retry can fix (bad payload, unknown handler): the task fails now."""
