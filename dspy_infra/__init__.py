"""dspy_infra: services, tasks and test fixtures for AI-agent apps from one line.

    infra = await ensure_infra(services=["redis"])

Only the public API lives here; everything else is an implementation module.

The names are loaded when first used (PEP 562 ``__getattr__``): ``import dspy_infra`` stays
cheap for every CLI call and every process that only needs one corner of the package, and
the gRPC, HTTP and SQLite parts are imported by whoever uses them first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:  # the lazy names' types, for type checkers and editors
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
        HandlerFailure,
        HealthCheckFailed,
        InfraError,
        MissingBinary,
        NotFound,
        PermanentFailure,
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
    from .scheduler.context import TaskContext
    from .services.handles import ServiceHandle
    from .sync import SyncInfra, ensure_infra_sync
    from .workflows import RunState, RunUpdate, StepSpec, StepState, Workflow, WorkflowSpec

#: The module (relative to this package) -> the public names it defines.
_MODULES: dict[str, str] = {
    ".api": "InfraAPI",
    ".config": "Settings load_settings",
    ".ensure": "ensure_infra shutdown_infra use_infra",
    ".errors": "AlreadyExists BackendError BackendUnavailable ConfigError CycleError DeadlineExceeded FailedPrecondition HealthCheckFailed InfraError MissingBinary NotFound PermissionDenied ResourceUnavailable ServiceError SpecError TaskError Unauthenticated Unavailable HandlerFailure PermanentFailure",
    ".hookspecs": "hookimpl",
    ".infra": "Infra",
    ".models": "DependsOn Event HealthCheck PortMapping Resources RestartPolicy ServiceSpec TaskClass TaskResult TaskSpec TaskState TaskStatus VolumeMount",
    ".scheduler.context": "TaskContext",
    ".services.handles": "ServiceHandle",
    ".sync": "SyncInfra ensure_infra_sync",
    ".workflows": "RunState RunUpdate StepSpec StepState Workflow WorkflowSpec",
}
#: Public name -> the module that defines it.
_LAZY: dict[str, str] = {name: module for module, names in _MODULES.items() for name in names.split()}

# Literal (so type checkers see the re-exports), kept compact; a test checks it matches _MODULES.
# fmt: off
__all__ = [
    "AlreadyExists", "BackendError", "BackendUnavailable", "ConfigError", "CycleError",
    "DeadlineExceeded", "DependsOn", "Event", "FailedPrecondition", "HandlerFailure",
    "HealthCheck", "HealthCheckFailed", "Infra", "InfraAPI", "InfraError", "MissingBinary",
    "NotFound", "PermanentFailure", "PermissionDenied", "PortMapping", "ResourceUnavailable",
    "Resources", "RestartPolicy", "RunState", "RunUpdate", "ServiceError", "ServiceHandle",
    "ServiceSpec", "Settings", "SpecError", "StepSpec", "StepState", "SyncInfra", "TaskClass",
    "TaskContext", "TaskError", "TaskResult", "TaskSpec", "TaskState", "TaskStatus",
    "Unauthenticated", "Unavailable", "VolumeMount", "Workflow", "WorkflowSpec", "__version__",
    "ensure_infra", "ensure_infra_sync", "hookimpl", "load_settings", "shutdown_infra",
    "use_infra",
]
# fmt: on


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
