"""dspy_infra: services, tasks and test fixtures for AI-agent apps from one line.

    infra = await ensure_infra(services=["redis"])

Only the public API lives here; everything else is an implementation module.
"""

from __future__ import annotations

from .api import InfraAPI
from .config import Settings, load_settings
from .ensure import ensure_infra, shutdown_infra, use_infra
from .errors import (
    AlreadyExists,
    BackendError,
    BackendUnavailable,
    ConfigError,
    CycleError,
    DeadlineExceeded,
    FailedPrecondition,
    HealthCheckFailed,
    InfraError,
    MissingBinary,
    NotFound,
    PermissionDenied,
    ResourceUnavailable,
    ServiceError,
    SpecError,
    TaskError,
    Unauthenticated,
    Unavailable,
)
from .hookspecs import hookimpl
from .infra import Infra
from .models import (
    DependsOn,
    Event,
    HealthCheck,
    PortMapping,
    Resources,
    RestartPolicy,
    ServiceSpec,
    TaskClass,
    TaskResult,
    TaskSpec,
    TaskState,
    TaskStatus,
    VolumeMount,
)
from .services.handles import ServiceHandle
from .sync import SyncInfra, ensure_infra_sync
from .version import __version__
from .workflows import RunState, RunUpdate, StepSpec, StepState, Workflow, WorkflowSpec

__all__ = [
    "AlreadyExists",
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "CycleError",
    "DeadlineExceeded",
    "DependsOn",
    "Event",
    "FailedPrecondition",
    "HealthCheck",
    "HealthCheckFailed",
    "Infra",
    "InfraAPI",
    "InfraError",
    "MissingBinary",
    "NotFound",
    "PermissionDenied",
    "PortMapping",
    "ResourceUnavailable",
    "Resources",
    "RestartPolicy",
    "RunState",
    "RunUpdate",
    "ServiceError",
    "ServiceHandle",
    "ServiceSpec",
    "Settings",
    "SpecError",
    "StepSpec",
    "StepState",
    "SyncInfra",
    "TaskClass",
    "TaskError",
    "TaskResult",
    "TaskSpec",
    "TaskState",
    "TaskStatus",
    "Unauthenticated",
    "Unavailable",
    "VolumeMount",
    "Workflow",
    "WorkflowSpec",
    "__version__",
    "ensure_infra",
    "ensure_infra_sync",
    "hookimpl",
    "load_settings",
    "shutdown_infra",
    "use_infra",
]
