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

from .errors import ConfigError, SpecError
from .values import check_finite, preview

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


def _integer(lo: int, hi: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    """An integer setting (not a bool, not 1.5) within ``[lo, hi]``."""

    def check(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"must be an integer, got {preview(value)}",
                field=attr.name,
                fix=f"use a whole number, e.g. {lo}",
            )
        if not lo <= value <= hi:
            raise ConfigError(
                f"must be from {lo} to {hi}, got {preview(value)}", field=attr.name, fix=f"use {lo}..{hi}"
            )

    return check


def _seconds(hi: float) -> Callable[[object, attrs.Attribute[float], float], None]:
    """A duration setting: a finite number of seconds, > 0 and at most ``hi``."""

    def check(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
        try:
            check_finite(value, attr.name, lo=0, lo_open=True, hi=hi)
        except SpecError as exc:
            raise ConfigError(
                str(exc).removeprefix(f"{attr.name}: "),
                field=attr.name,
                fix=f"use a number of seconds greater than 0 and at most {hi:g}",
            ) from None

    return check


def _strict_bool(_inst: object, attr: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigError(
            f"must be true or false, got {preview(value)}", field=attr.name, fix="use true or false"
        )


_port = _integer(0, 65535)


def _path_or_none(value: Any) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str | os.PathLike):
        raise ConfigError(f"must be a path, got {preview(value)}", field="home", fix="give a directory path")
    return Path(value)


def _home_dir(_inst: object, _attr: attrs.Attribute[Path | None], value: Path | None) -> None:
    # A file where the state directory should be fails later, deep inside a start, with an
    # OS error; name the setting instead.
    if value is not None and value.exists() and not value.is_dir():
        raise ConfigError(
            f"{preview(str(value))} exists and is not a directory",
            field="home",
            fix="point home (--home, DSPY_INFRA_HOME) at a directory, or at a path that does not"
            " exist yet (it is created)",
        )


def _host_list(value: Any) -> tuple[str, ...]:
    """A list of host names (TOML array), or one comma-separated string (environment)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(h, str) for h in items):
        raise ConfigError(
            f"expected a list of host names, got {type(value).__name__}",
            field="allowed_hosts",
            fix='e.g. allowed_hosts = ["infra.example.com", "proxy.internal:8080"]',
        )
    return tuple(h.strip().lower() for h in items if h.strip())


@attrs.frozen
class Settings:
    """Every knob, with its default. See ``dspy-infra config init`` for a commented file."""

    #: State directory (SQLite store, process-backend logs, locks). None = per-user default.
    home: Path | None = attrs.field(default=None, converter=_path_or_none, validator=_home_dir)
    #: Service backend: auto (docker if an engine answers, else process), docker or process.
    backend: str = attrs.field(default="auto", validator=_one_of("auto", "docker", "process"))
    #: Docker Engine / Podman API address; None = $DOCKER_HOST or the default socket.
    docker_host: str | None = None
    #: User-defined container network the services share (those with ``network_mode =
    #: "service"``, the default); made on the first start when missing, removed once the last
    #: container on it is stopped (one you made yourself is never removed).
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
    #: Extra ``Host`` names the HTTP server answers to, besides loopback names and ``host``
    #: (e.g. the name a reverse proxy forwards): "name" (any port) or "name:port". Other
    #: names get 421, so a web page cannot reach the API through DNS rebinding.
    allowed_hosts: tuple[str, ...] = attrs.field(default=(), converter=_host_list)
    #: Bearer token every gRPC call and HTTP endpoint (except /health, /metrics) must carry.
    #: Required when host is not a loopback address.
    token: str | None = None
    #: PEM certificate for TLS on gRPC and HTTP (with ``tls_key``); unset = plaintext.
    tls_cert: str | None = None
    #: PEM private key matching ``tls_cert``.
    tls_key: str | None = None
    #: Finished tasks kept in the store; older ones are pruned.
    #: The ids of pruned tasks are kept (per short id about 40 bytes on disk; in memory only
    #: with durable = false, about 170 bytes), so a reused id is refused instead of running again.
    retention: int = attrs.field(default=10_000, validator=_integer(1, 100_000_000))
    #: Largest accepted task payload, in bytes of its compact JSON (at most 64 MiB).
    max_payload_bytes: int = attrs.field(default=1 << 20, validator=_integer(2, 64 << 20))
    #: Seconds between adaptive-limiter samples (at most an hour).
    limiter_interval: float = attrs.field(default=1.0, validator=_seconds(3600.0))
    #: Group-commit window of the durable store, in seconds (at most 1).
    commit_interval: float = attrs.field(default=0.005, validator=_seconds(1.0))
    #: Keep task and workflow state in SQLite under ``home`` so accepted work survives a crash;
    #: false keeps it in memory only (faster, lost when the process exits).
    durable: bool = attrs.field(default=True, validator=_strict_bool)
    #: Time running tasks get to finish on graceful shutdown (at most a day).
    shutdown_grace: float = attrs.field(default=10.0, validator=_seconds(86400.0))
    #: Seconds after start that a task recovered from the store waits for its handler to be
    #: registered (``@infra.handler`` runs after start) before it fails naming the known ones.
    handler_grace: float = attrs.field(default=30.0, validator=_seconds(86400.0))
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
    #: Ray cluster of the classes whose ``executor = "ray"``: "HOST:PORT" of the head's GCS,
    #: "ray://HOST:PORT" (Ray Client) or "auto"; None = Ray's own choice ($RAY_ADDRESS, else
    #: a cluster started on this machine, else a new local one). One per process: a Ray
    #: driver talks to one cluster.
    ray_address: str | None = None
    #: Default Ray namespace of the detached actors that keep attempts (``ray_classes.NAME``
    #: may set its own).
    ray_namespace: str = "dspy_infra"
    #: Per-class Ray options, ``[ray_classes.NAME]``: num_cpus (default 1), num_gpus,
    #: resources (custom resources, e.g. {worker2 = 1}), runtime_env, namespace. NAME is a
    #: task class with ``executor = "ray"``.
    ray_classes: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def resolved_home(self) -> Path:
        return self.home if self.home is not None else default_home()

    def resolved_owner(self) -> str:
        import hashlib

        if self.owner:
            return self.owner
        return "home-" + hashlib.sha256(str(self.resolved_home().resolve()).encode()).hexdigest()[:12]


_FIELDS = {a.name: a for a in attrs.fields(Settings)}
_TABLES = ("task_classes", "services", "ray_classes")


def _convert(name: str, raw: Any, source: str) -> Any:
    """Turn a TOML value or environment string into the field's type, naming the source.

    Strict: an integer setting takes an integer (``1.5`` and ``"1.5"`` are errors, not 1), a
    number setting a finite number, a boolean ``true``/``false`` (environment: also
    1/0/yes/no/on/off), a text setting a string; ranges are checked by ``Settings`` itself.
    """
    attr = _FIELDS[name]
    kind = attr.type if isinstance(attr.type, str) else str(attr.type)
    from_env = isinstance(raw, str) and source == ENV_PREFIX
    field = f"{source}{name}"
    if kind.startswith("bool"):
        if isinstance(raw, bool):
            return raw
        if from_env:
            text = raw.strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
        raise ConfigError(f"{preview(raw)} is not a boolean", field=field, fix="use true or false")
    if kind.startswith("int"):
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_env:
            try:
                return int(raw.strip(), 10)
            except ValueError:
                pass
        raise ConfigError(f"{preview(raw)} is not an integer", field=field, fix="use a whole number")
    if kind.startswith("float"):
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            number: Any = raw
        elif from_env:
            try:
                number = float(raw.strip())
            except ValueError:
                number = None
        else:
            number = None
        if number is None:
            raise ConfigError(f"{preview(raw)} is not a number", field=field, fix="use a number, e.g. 0.5")
        try:
            return check_finite(number, field)
        except SpecError:
            raise ConfigError(
                f"{preview(raw)} is not a finite number", field=field, fix="use a finite number, e.g. 0.5"
            ) from None
    if kind.startswith("tuple"):
        return raw  # the field's converter reads a list or a comma-separated string
    if kind.startswith("dict"):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{preview(raw)} is not a table", field=field, fix=f"write it as [{name}.NAME]")
        return {str(k): dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ConfigError(f"{preview(raw)} is not a string", field=field, fix='quote it, e.g. "value"')
    return raw


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
