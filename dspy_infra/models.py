"""Value classes: specs (what a user asks for) and states (what the system reports).

Small, frozen, slotted attrs classes, validated at construction so a bad spec fails at the
edge with a ``SpecError`` naming the field. No I/O here and nothing of ours but ``errors``.

Size: a little over 600 lines: every value class of the public API, each short.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import attrs

from .errors import SpecError
from .values import (
    INT32_MAX,
    INT32_MIN,
    MAX_ID_LENGTH,
    check_finite,
    check_int,
    check_json_object,
    check_text,
    preview,
)

__all__ = [
    "CONDITIONS",
    "PAYLOAD_HARD_LIMIT",
    "DependsOn",
    "Event",
    "ExecResult",
    "GPUInfo",
    "HardwareInfo",
    "HealthCheck",
    "HealthUpdate",
    "ImagePullProgress",
    "Instance",
    "LogEntry",
    "PortMapping",
    "QueueStatus",
    "ResourceAvailability",
    "ResourceUsage",
    "Resources",
    "RestartPolicy",
    "ServiceSpec",
    "ServiceState",
    "ServiceStatus",
    "ServiceStatusUpdate",
    "TaskClass",
    "TaskResult",
    "TaskSpec",
    "TaskState",
    "TaskStatus",
    "VolumeMount",
    "coerce_str_map",
    "validate_name",
]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
#: Longest task timeout accepted (a year): anything longer is a mistake, and asyncio's timers
#: and SQLite's REAL hold it exactly.
MAX_TASK_TIMEOUT = 365 * 24 * 3600.0
#: Most attempts a task may ask for.
MAX_ATTEMPTS = 100
#: Highest concurrency limit a task class may have.
MAX_CONCURRENCY = 100_000


def validate_name(value: str, field: str) -> str:
    """A service / class / step name: lowercase letters, digits, ``_ . -``; 1-63 chars."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise SpecError(
            f"invalid name {value!r}",
            field=field,
            fix="use 1-63 lowercase letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return value


def coerce_str_map(value: Any, field: str) -> dict[str, str]:
    """A ``map<string,string>`` as on the wire: str keys; str, int, float or bool values.

    Numbers and booleans are turned into strings (JSON spelling for booleans) so that a
    payload written in Python arrives the same as one sent over gRPC; anything else is refused.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"expected a mapping of strings, got {type(value).__name__}", field=field)
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise SpecError(f"key {key!r} is not a string", field=field)
        if isinstance(item, bool):
            out[key] = "true" if item else "false"
        elif isinstance(item, (str, int, float)):
            out[key] = str(item)
        else:
            raise SpecError(
                f"value of {key!r} is a {type(item).__name__}",
                field=f"{field}.{key}",
                fix="payload values must be strings (JSON-encode structured data)",
            )
    return out


def _payload(value: Any) -> dict[str, Any]:
    # The size limit of a payload is ``settings.max_payload_bytes``, enforced at submit; the
    # bound here is the largest any setting may allow (what one store row should hold).
    if value is None:  # no payload (and what with_checked_payload passes): nothing to walk
        return {}
    return check_json_object(value, "payload", max_bytes=PAYLOAD_HARD_LIMIT)


#: No payload is ever larger than this, whatever ``max_payload_bytes`` says (64 MiB).
PAYLOAD_HARD_LIMIT = 64 << 20


def _environment(value: Any) -> dict[str, str]:
    return coerce_str_map(value, "environment")


def _labels(value: Any) -> dict[str, str]:
    return coerce_str_map(value, "labels")


def _str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise SpecError(
            f"expected a list of arguments, got the string {value!r}",
            field="command",
            fix='write it as a list, e.g. ["redis-server", "--port", "6379"]',
        )
    return tuple(str(v) for v in value)


def _optional_str_tuple(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, str):
        raise SpecError(
            f"expected a list of arguments, got the string {value!r}",
            field="entrypoint",
            fix='write it as a list, e.g. ["/bin/sh", "-c"], or [] to clear the image\'s',
        )
    return None if value is None else _str_tuple(value)


#: ``ServiceSpec.network_mode`` values.
NETWORK_MODES = ("service", "bridge", "host")


def _service_name(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    validate_name(value, "name")


# ---------------------------------------------------------------------------------------
# Tasks


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


def _check_task_id(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    check_text(value, "id", max_length=MAX_ID_LENGTH)


@attrs.frozen
class TaskClass:
    """A resource class: its own queue and an adaptive concurrency limit in [min, max]."""

    name: str = attrs.field(validator=_service_name)
    min_concurrency: int = 1
    base_concurrency: int = 1
    max_concurrency: int = 1
    adaptive: bool = True
    #: True for classes that need an accelerator (refused at submit when none is present).
    needs_gpu: bool = False
    #: Name of the executor that runs this class ("local" or e.g. "slurm").
    executor: str = "local"
    #: What a graceful stop of the owner does to a running attempt of this class: "leave"
    #: (it runs on and the next start adopts it; Slurm/Ray on a durable scheduler) or
    #: "cancel". None: "leave" where the executor's attempts outlive their owner, else "cancel".
    on_shutdown: str | None = None

    def __attrs_post_init__(self) -> None:
        where = f"task_classes.{self.name}"
        for name in ("min_concurrency", "base_concurrency", "max_concurrency"):
            check_int(getattr(self, name), f"{where}.{name}", lo=1, hi=MAX_CONCURRENCY)
        for name in ("adaptive", "needs_gpu"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(
                    f"must be true or false, got {preview(getattr(self, name))}", field=f"{where}.{name}"
                )
        check_text(self.executor, f"{where}.executor", max_length=63)
        if self.on_shutdown not in (None, "leave", "cancel"):
            raise SpecError(
                f'must be "leave" or "cancel", got {preview(self.on_shutdown)}',
                field=f"{where}.on_shutdown",
                fix='on_shutdown = "leave" (a running job outlives a restart) or "cancel"',
            )
        if not 1 <= self.min_concurrency <= self.base_concurrency <= self.max_concurrency:
            raise SpecError(
                f"need 1 <= min ({self.min_concurrency}) <= base ({self.base_concurrency})"
                f" <= max ({self.max_concurrency})",
                field=f"task_classes.{self.name}",
                fix="set min_concurrency <= base_concurrency <= max_concurrency, all >= 1",
            )


@attrs.frozen
class TaskSpec:
    """A task as submitted. ``content_hash`` decides idempotent resubmission.

    Every field is checked at construction against what the store (SQLite) and the wire
    (protobuf) can hold, so a spec that exists can always be written: ``priority`` fits the
    wire's int32, ``timeout`` is finite, positive and at most a year, ``payload`` is a JSON
    object (``values.check_json_object``; its size limit ``max_payload_bytes`` is enforced
    by the scheduler at submit).
    """

    id: str = attrs.field(validator=_check_task_id)
    task_class: str = "cpu_short"
    payload: dict[str, Any] = attrs.field(factory=dict, converter=_payload)
    priority: int = 0
    timeout: float | None = None
    max_attempts: int = 1
    workflow_id: str = ""

    @classmethod
    def with_checked_payload(cls, payload: dict[str, Any], **fields: Any) -> TaskSpec:
        """A spec whose ``payload`` is already checked: the plain ``dict`` that
        ``values.check_json_object`` (or ``decode_json_object``) returned for it with a bound
        of at most ``PAYLOAD_HARD_LIMIT``, which is exactly what the constructor's converter
        checks. It is taken as is instead of being walked a second time (the remote faces
        check each payload once, at the edge, where the error names the request's field).
        Every other field is checked as by the constructor."""
        if type(payload) is not dict:
            raise TypeError(f"expected the dict check_json_object returned, got {type(payload).__name__}")
        spec = cls(payload=None, **fields)  # None converts to {} at once (no walk)
        object.__setattr__(spec, "payload", payload)
        return spec

    def __attrs_post_init__(self) -> None:
        # Each check is skipped only for a value of exactly the default's type that passes it
        # by inspection (the defaults, and a plain int in range): a spec is built for every
        # task a client sends, and most leave these fields alone. Anything else (a bool, a
        # subclass, a string to scan) takes the full check, which names the field.
        task_class, priority, max_attempts = self.task_class, self.priority, self.max_attempts
        if type(task_class) is not str or task_class != "cpu_short":
            check_text(task_class, "task_class", max_length=MAX_ID_LENGTH)
        if type(priority) is not int or not INT32_MIN <= priority <= INT32_MAX:
            check_int(priority, "priority", lo=INT32_MIN, hi=INT32_MAX)
        if self.timeout is not None:
            # Stored as a float: an int timeout of 10**400 must not reach the store as an int.
            timeout = check_finite(self.timeout, "timeout", lo=0, lo_open=True, hi=MAX_TASK_TIMEOUT)
            object.__setattr__(self, "timeout", timeout)
        if type(max_attempts) is not int or not 1 <= max_attempts <= MAX_ATTEMPTS:
            check_int(max_attempts, "max_attempts", lo=1, hi=MAX_ATTEMPTS)
        if type(self.workflow_id) is not str or self.workflow_id:
            check_text(self.workflow_id, "workflow_id", max_length=MAX_ID_LENGTH, allow_empty=True)

    @property
    def content_hash(self) -> str:
        doc = attrs.asdict(self)
        text = json.dumps(doc, sort_keys=True, ensure_ascii=False, allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@attrs.frozen
class TaskResult:
    """Outcome of a task, shaped like the wire's ``TaskResult``."""

    task_id: str
    status: TaskStatus
    #: The handler's result: a JSON object (numbers stay numbers, nested objects stay objects).
    result: dict[str, Any] = attrs.field(factory=dict)
    error: str = ""
    duration_ms: float = 0.0
    #: Unix time in seconds (0 while not terminal).
    completed_at: float = 0.0

    @classmethod
    def of(cls, task: TaskOutcome) -> TaskResult:
        """The result of a task's state (a ``TaskState``, or the scheduler's own record)."""
        return cls(
            task_id=task.spec.id,
            status=task.status,
            result=dict(task.result),
            error=task.error,
            duration_ms=task.duration_ms,
            completed_at=task.completed_at,
        )


class TaskOutcome(Protocol):
    """What ``TaskResult.of`` reads from a task."""

    @property
    def spec(self) -> TaskSpec: ...
    @property
    def status(self) -> TaskStatus: ...
    @property
    def result(self) -> Mapping[str, Any]: ...
    @property
    def error(self) -> str: ...
    @property
    def duration_ms(self) -> float: ...
    @property
    def completed_at(self) -> float: ...


@attrs.frozen
class TaskState:
    """Everything known about one task right now."""

    spec: TaskSpec
    status: TaskStatus
    attempts: int = 0
    #: The handler's result: a JSON object.
    result: dict[str, Any] = attrs.field(factory=dict)
    error: str = ""
    submitted_at: float = 0.0
    started_at: float = 0.0
    completed_at: float = 0.0
    duration_ms: float = 0.0

    @property
    def id(self) -> str:
        return self.spec.id

    def to_result(self) -> TaskResult:
        return TaskResult.of(self)


@attrs.frozen
class QueueStatus:
    """One class's queue: waiting tasks, running tasks, current limit and its bounds."""

    task_class: str
    depth: int
    inflight: int
    limit: int
    min_limit: int
    max_limit: int


# ---------------------------------------------------------------------------------------
# Events


@attrs.frozen
class Event:
    """Something that happened: ``task_completed``, ``service_healthy``, ``workflow_started``..."""

    type: str
    resource_id: str
    data: dict[str, str] = attrs.field(factory=dict)
    #: Unix time in seconds.
    timestamp: float = 0.0


# ---------------------------------------------------------------------------------------
# Services


CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")


def _check_port(field: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise SpecError(f"port must be an integer 0-65535, got {value!r}", field=field)


@attrs.frozen
class PortMapping:
    """``host_port`` on ``host_ip`` forwards to ``container_port``; host_port 0 = any free port,
    None = not published (reachable only inside the service network)."""

    container_port: int
    host_port: int | None = None
    host_ip: str = "127.0.0.1"
    protocol: str = "tcp"

    def __attrs_post_init__(self) -> None:
        _check_port("ports.container_port", self.container_port)
        if self.host_port is not None:
            _check_port("ports.host_port", self.host_port)
        if self.protocol not in ("tcp", "udp"):
            raise SpecError(
                f"unknown protocol {self.protocol!r}", field="ports.protocol", fix="use tcp or udp"
            )


@attrs.frozen
class VolumeMount:
    """A named volume (``source`` is a name) or bind mount (``source`` is an absolute path)."""

    source: str
    target: str
    read_only: bool = False

    def __attrs_post_init__(self) -> None:
        # "{home}/...": the state directory, filled in by the catalog (see services/catalog.py).
        if not self.source or not self.target.startswith(("/", "{home}")):
            raise SpecError(
                f"bad volume {self.source!r}:{self.target!r}",
                field="volumes",
                fix="source is a volume name or absolute host path; target an absolute path",
            )


@attrs.frozen
class DependsOn:
    """A dependency edge with a Docker Compose condition."""

    name: str
    condition: str = "service_healthy"

    def __attrs_post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise SpecError(
                f"unknown condition {self.condition!r}",
                field=f"depends_on.{self.name}.condition",
                fix="use one of " + ", ".join(CONDITIONS),
            )


@attrs.frozen
class HealthCheck:
    """How to tell a service is ready.

    kind: ``http`` (GET ``path`` expects ``expected_status``), ``tcp``, ``redis`` (RESP PING),
    ``exec`` (``command`` inside the service's environment exits 0), ``engine`` (the image's
    own HEALTHCHECK state; for processes: still running), or ``none``.
    ``port`` is the container/process port to probe (default: the first published port).
    """

    kind: str = "tcp"
    port: int | None = None
    path: str = "/"
    expected_status: int = 200
    command: tuple[str, ...] = ()
    interval: float = 0.5
    timeout: float = 2.0
    start_period: float = 0.0
    #: Overall time to wait for the first success before the start fails.
    startup_timeout: float = 60.0
    retries: int = 3

    def __attrs_post_init__(self) -> None:
        if self.kind not in ("http", "tcp", "redis", "exec", "engine", "none"):
            raise SpecError(
                f"unknown health check kind {self.kind!r}",
                field="health.kind",
                fix="use http, tcp, redis, exec, engine or none",
            )
        if self.kind == "exec" and not self.command:
            raise SpecError("an exec health check needs a command", field="health.command")
        for name in ("interval", "timeout", "startup_timeout"):
            if not getattr(self, name) > 0:
                raise SpecError(f"must be > 0, got {getattr(self, name)!r}", field=f"health.{name}")


@attrs.frozen
class RestartPolicy:
    """``no`` | ``on-failure`` | ``always``; restarts back off exponentially from ``backoff``."""

    mode: str = "on-failure"
    max_restarts: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0

    def __attrs_post_init__(self) -> None:
        if self.mode not in ("no", "on-failure", "always"):
            raise SpecError(
                f"unknown restart mode {self.mode!r}",
                field="restart.mode",
                fix="use no, on-failure or always",
            )


@attrs.frozen
class Resources:
    """Limits passed to the backend (cpus as a fraction of cores, memory in bytes)."""

    cpus: float | None = None
    memory_bytes: int | None = None
    gpus: int = 0


# Typed converters (a bare ``tuple`` converter makes mypy's attrs plugin reject even tuples).
def _port_tuple(value: Iterable[PortMapping]) -> tuple[PortMapping, ...]:
    return tuple(value)


def _volume_tuple(value: Iterable[VolumeMount]) -> tuple[VolumeMount, ...]:
    return tuple(value)


def _depends_tuple(value: Iterable[DependsOn]) -> tuple[DependsOn, ...]:
    return tuple(value)


@attrs.frozen
class ServiceSpec:
    """A supporting service. ``image`` is used by container backends, ``command`` by the
    process backend (and, when set, overrides the image's command in a container)."""

    name: str = attrs.field(validator=_service_name)
    image: str = ""
    command: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    ports: tuple[PortMapping, ...] = attrs.field(default=(), converter=_port_tuple)
    environment: dict[str, str] = attrs.field(factory=dict, converter=_environment)
    volumes: tuple[VolumeMount, ...] = attrs.field(default=(), converter=_volume_tuple)
    depends_on: tuple[DependsOn, ...] = attrs.field(default=(), converter=_depends_tuple)
    health: HealthCheck = attrs.field(factory=HealthCheck)
    required: bool = True
    restart: RestartPolicy = attrs.field(factory=RestartPolicy)
    labels: dict[str, str] = attrs.field(factory=dict, converter=_labels)
    resources: Resources = attrs.field(factory=Resources)
    #: A one-shot job (init container): it is expected to exit; exit 0 means success.
    one_shot: bool = False
    #: Working directory for the process backend.
    workdir: str | None = None
    #: How clients reach it, e.g. ``"redis://{host}:{port}/0"`` (see ``services/handles.py``);
    #: empty: derived from the health check kind. Not part of the spec hash.
    url: str = ""
    #: What a container runs ``command`` with: None keeps the image's ENTRYPOINT, ``()``
    #: clears it (``command`` then runs as given, as a process runs it), a list replaces it.
    #: A process runs ``entrypoint + command``.
    entrypoint: tuple[str, ...] | None = attrs.field(default=None, converter=_optional_str_tuple)
    #: ``service``: the owner's container network, where other services reach it by name.
    #: ``bridge``: the engine's default network, as testcontainers and ``docker run`` use:
    #: a faster start (no name resolver to set up), no name, and any container on that
    #: network can reach it. ``host``: the host's network (container backends): it binds free
    #: host ports itself (``{port}``), reaches the host's loopback (a server bound to
    #: 127.0.0.1) and is not reachable by name. A process is always on the host's network.
    network_mode: str = "service"
    #: The user a container runs as (``uid[:gid]``, or a name the image knows); "" keeps the
    #: image's. ``{uid}`` and ``{gid}`` are the calling process's (files it writes to a bind
    #: mount stay yours). A process runs as you: anything else is refused there.
    user: str = ""

    def __attrs_post_init__(self) -> None:
        if self.network_mode not in NETWORK_MODES:
            raise SpecError(
                f"unknown network mode {self.network_mode!r}",
                field=f"services.{self.name}.network_mode",
                fix="use service (the default: other services reach it by name), bridge or host",
            )
        if not isinstance(self.user, str):
            raise SpecError(
                f"expected a string, got {self.user!r}",
                field=f"services.{self.name}.user",
                fix='write e.g. user = "1000:1000" or user = "{uid}:{gid}"',
            )
        seen: set[int] = set()
        for p in self.ports:
            if p.host_port:
                if p.host_port in seen:
                    raise SpecError(
                        f"host port {p.host_port} is published twice", field=f"services.{self.name}.ports"
                    )
                seen.add(p.host_port)
        for dep in self.depends_on:
            if dep.name == self.name:
                raise SpecError("a service cannot depend on itself", field=f"services.{self.name}.depends_on")

    @property
    def spec_hash(self) -> str:
        """Stable hash of everything that shapes the running instance (not restart policy)."""
        doc = attrs.asdict(
            self,
            filter=lambda a, v: (
                a.name not in ("restart", "required", "url")
                # Fields added later count only when set, so an upgrade does not replace
                # instances whose spec did not change.
                and not (a.name in _LATER_SPEC_FIELDS and v == a.default)
            ),
        )
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


_LATER_SPEC_FIELDS = frozenset({"entrypoint", "network_mode", "user"})


class ServiceStatus(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    STOPPED = "stopped"
    FAILED = "failed"


@attrs.frozen
class ResourceUsage:
    cpu_percent: float = 0.0
    memory_bytes: int = 0
    network_rx_bytes: int = 0
    network_tx_bytes: int = 0


@attrs.frozen
class Instance:
    """A running (or exited) container or process as a backend reports it."""

    id: str
    name: str
    labels: dict[str, str] = attrs.field(factory=dict)
    #: ``created`` | ``running`` | ``exited``
    state: str = "running"
    exit_code: int | None = None
    #: container port -> (host ip, host port) as published.
    ports: dict[int, tuple[str, int]] = attrs.field(factory=dict)
    started_at: float = 0.0
    #: The engine's own HEALTHCHECK status (``healthy``/``unhealthy``/``starting``) or None.
    engine_health: str | None = None
    #: The address at which other services reach this one by name (container network alias).
    address: str = ""


@attrs.frozen
class ExecResult:
    exit_code: int
    output: str = ""


@attrs.frozen
class ServiceState:
    name: str
    status: ServiceStatus
    instance_id: str = ""
    ports: dict[int, int] = attrs.field(factory=dict)
    health_checks: dict[str, str] = attrs.field(factory=dict)
    started_at: float = 0.0
    resource_usage: ResourceUsage = attrs.field(factory=ResourceUsage)
    restarts: int = 0
    backend: str = ""
    host: str = "127.0.0.1"
    #: The connection URL of the service (``redis://127.0.0.1:PORT/0``), "" when it has no port.
    url: str = ""
    #: The host port of its main (first) port, 0 when it publishes none.
    port: int = 0


@attrs.frozen
class ServiceStatusUpdate:
    service_name: str
    status: ServiceStatus
    message: str = ""
    progress: int = 0


@attrs.frozen
class HealthUpdate:
    service_name: str
    healthy: bool
    message: str = ""
    timestamp: float = 0.0
    details: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class LogEntry:
    service_name: str
    instance_id: str
    stream: str
    message: str
    timestamp: float = 0.0


@attrs.frozen
class ImagePullProgress:
    image_name: str
    #: ``downloading`` | ``extracting`` | ``complete`` | ``error``
    status: str
    current: int = 0
    total: int = 0
    progress_percent: int = 0
    message: str = ""


@attrs.frozen
class GPUInfo:
    index: int
    name: str
    memory_bytes: int = 0
    utilization_percent: float = 0.0


@attrs.frozen
class HardwareInfo:
    cpu_cores: int
    memory_bytes: int
    gpus: tuple[GPUInfo, ...] = ()


@attrs.frozen
class ResourceAvailability:
    available: bool
    capacity: int
    in_use: int
    hardware: HardwareInfo
