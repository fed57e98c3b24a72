"""Settings: built-in defaults < ``dspy-infra.toml`` < ``DSPY_INFRA_*`` environment < arguments.

Nothing is read at import time: ``load_settings()`` is called by whoever builds an ``Infra``.
The TOML file is found at ``DSPY_INFRA_CONFIG`` if set, else ``./dspy-infra.toml`` if it
exists. Scalar settings are top-level keys; ``[task_classes.NAME]`` and ``[services.NAME]``
tables declare or override task classes and services. Every scalar setting ``foo_bar`` can
also be set as ``DSPY_INFRA_FOO_BAR``. Unknown keys are refused with the closest known name.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError

__all__ = ["CONFIG_FILE_NAME", "ENV_PREFIX", "Settings", "default_home", "load_settings"]

CONFIG_FILE_NAME = "dspy-infra.toml"
ENV_PREFIX = "DSPY_INFRA_"


def default_home() -> Path:
    """Per-user state directory: ``$XDG_STATE_HOME/dspy-infra`` or ``~/.local/state/dspy-infra``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dspy-infra"


def _one_of(*choices: str) -> Callable[[object, attrs.Attribute[str], str], None]:
    def check(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
        if value not in choices:
            raise ConfigError(
                f"unknown value {value!r}", field=attr.name, fix="use one of " + ", ".join(choices)
            )

    return check


def _port(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"port must be 0-65535, got {value}", field=attr.name)


def _positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"must be > 0, got {value!r}", field=attr.name)


def _path_or_none(value: Any) -> Path | None:
    return None if value in (None, "") else Path(value)


@attrs.frozen
class Settings:
    """Every knob, with its default. See ``dspy-infra config init`` for a commented file."""

    #: State directory (SQLite store, process-backend logs, locks). None = per-user default.
    home: Path | None = attrs.field(default=None, converter=_path_or_none)
    #: Service backend: auto (docker if an engine answers, else process), docker or process.
    backend: str = attrs.field(default="auto", validator=_one_of("auto", "docker", "process"))
    #: Docker Engine / Podman API address; None = $DOCKER_HOST or the default socket.
    docker_host: str | None = None
    #: User-defined container network the services share.
    network: str = "dspy_infra"
    #: Ownership label value; None = derived from the state directory (one owner per home).
    owner: str | None = None
    #: How ensure_infra() finds its infra: auto (the server at addr; else the server at
    #: grpc_port if it serves this home and owner; else embedded), embedded, or remote (must connect).
    mode: str = attrs.field(default="auto", validator=_one_of("auto", "embedded", "remote"))
    #: Address of a running server for remote/auto mode (host:port of the gRPC server).
    addr: str | None = None
    #: Bind address of the servers. Non-loopback requires a token.
    host: str = "127.0.0.1"
    #: gRPC port serving both OrchestratorService and EnvManagerService (0 = any free port).
    grpc_port: int = attrs.field(default=50052, validator=_port)
    #: Extra port serving EnvManagerService alone, for clients of the older env manager.
    env_manager_port: int = attrs.field(default=50100, validator=_port)
    #: HTTP port of /metrics, /health, /queue/status and /queue/submit.
    http_port: int = attrs.field(default=9097, validator=_port)
    #: Bearer token every gRPC call and HTTP endpoint (except /health, /metrics) must carry.
    #: Required when host is not a loopback address.
    token: str | None = None
    #: PEM certificate for TLS on gRPC and HTTP (with ``tls_key``); unset = plaintext.
    tls_cert: str | None = None
    #: PEM private key matching ``tls_cert``.
    tls_key: str | None = None
    #: Finished tasks kept in the store; older ones are pruned.
    retention: int = attrs.field(default=10_000, validator=_positive)
    #: Largest accepted task payload, in bytes (keys + values).
    max_payload_bytes: int = attrs.field(default=1 << 20, validator=_positive)
    #: Seconds between adaptive-limiter samples.
    limiter_interval: float = attrs.field(default=1.0, validator=_positive)
    #: Group-commit window of the durable store, in seconds.
    commit_interval: float = attrs.field(default=0.005, validator=_positive)
    #: Keep task and workflow state in SQLite under ``home`` so accepted work survives a crash;
    #: false keeps it in memory only (faster, lost when the process exits).
    durable: bool = True
    #: Time running tasks get to finish on graceful shutdown.
    shutdown_grace: float = attrs.field(default=10.0, validator=_positive)
    #: Seconds after start that a task recovered from the store waits for its handler to be
    #: registered (``@infra.handler`` runs after start) before it fails naming the known ones.
    handler_grace: float = attrs.field(default=30.0, validator=_positive)
    #: Task-class tables: overrides of built-in classes and new classes.
    task_classes: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    #: Service tables: overrides of built-in services and new services.
    services: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    #: Who may run commands (the ``exec`` handler, command overrides of services): "allow"
    #: (everyone who may submit), "embedded" (only the Python API of the process that owns
    #: the infra; gRPC and HTTP clients are refused) or "deny" (nobody).
    exec_policy: str = attrs.field(default="allow", validator=_one_of("allow", "embedded", "deny"))
    #: Slurm executor for gpu_slurm: None = not configured; "cli" = sbatch/squeue on PATH.
    slurm: str | None = attrs.field(default=None, validator=attrs.validators.optional(_one_of("cli")))
    #: Slurm partition for gpu_slurm jobs; None = the cluster's default partition.
    slurm_partition: str | None = None

    def resolved_home(self) -> Path:
        return self.home if self.home is not None else default_home()

    def resolved_owner(self) -> str:
        import hashlib

        if self.owner:
            return self.owner
        return "home-" + hashlib.sha256(str(self.resolved_home().resolve()).encode()).hexdigest()[:12]


_FIELDS = {a.name: a for a in attrs.fields(Settings)}
_TABLES = ("task_classes", "services")


def _convert(name: str, raw: Any, source: str) -> Any:
    """Turn a TOML value or environment string into the field's type, naming the source."""
    attr = _FIELDS[name]
    kind = attr.type if isinstance(attr.type, str) else str(attr.type)
    try:
        if kind.startswith("bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("dict"):
            if not isinstance(raw, Mapping):
                raise ValueError(raw)
            return {str(k): dict(v) for k, v in raw.items()}
        return None if raw is None else str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{raw!r} is not a valid {kind}", field=f"{source}{name}") from None


def _unknown(key: str, source: str, shown: str | None = None) -> ConfigError:
    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    fix = f"did you mean {close[0]!r}?" if close else "see `dspy-infra config init` for every setting"
    shown = shown or key
    return ConfigError(f"unknown setting {shown!r}", field=f"{source}{shown}", fix=fix)


def _from_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", field=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", field=str(path)) from None
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in _FIELDS:
            raise _unknown(key, f"{path.name}: ")
        out[key] = _convert(key, value, f"{path.name}: ")
    for table in _TABLES:
        for name, body in out.get(table, {}).items():
            if not isinstance(body, dict):
                raise ConfigError("must be a table", field=f"{path.name}: {table}.{name}")
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var in (ENV_PREFIX + "CONFIG", ENV_PREFIX + "REQUIRE_ENGINES"):
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key.startswith("test_"):
            continue  # test-suite knobs (DSPY_INFRA_TEST_*) are not settings
        if key not in _FIELDS or key in _TABLES:
            raise _unknown(key, "environment ", shown=var)
        out[key] = _convert(key, value, ENV_PREFIX)
    if "docker_host" not in out and env.get("DOCKER_HOST"):
        out["docker_host"] = env["DOCKER_HOST"]
    return out


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build ``Settings`` from defaults, the TOML file, the environment, then ``overrides``.

    Keyword overrides whose value is None are ignored, so callers can pass their optional
    arguments straight through.
    """
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    path = Path(config_file) if config_file else None
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = Path(env[ENV_PREFIX + "CONFIG"])
        if not path.exists():
            raise ConfigError("file does not exist", field=ENV_PREFIX + "CONFIG=" + str(path))
    if path is None and Path(CONFIG_FILE_NAME).exists():
        path = Path(CONFIG_FILE_NAME)
    if path is not None:
        merged.update(_from_file(path))
    merged.update(_from_env(env))
    for key, value in overrides.items():
        if key not in _FIELDS:
            raise _unknown(key, "argument ")
        if value is not None:
            merged[key] = value
    return Settings(**merged)
