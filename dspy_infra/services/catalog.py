"""The service catalog: built-in specs, then plugins, then ``[services.NAME]`` tables, then Python.

``build_catalog(settings, plugins, extra)`` merges, later sources winning by name:

1. ``dspy_infra_services`` hook results (the built-ins below are registered through that hook
   exactly like a third-party plugin; a later plugin overrides by name);
2. ``settings.services``: TOML tables that override any field of an existing spec (nested
   ``health`` / ``restart`` / ``resources`` tables are merged field by field) or declare new
   services; an unknown key is a ``ConfigError`` naming ``services.NAME.KEY`` with the closest
   known key;
3. ``extra``: ``ServiceSpec`` objects given in Python.

A ``{home}`` in a command argument or a volume path expands to the state directory (the
built-in Prometheus keeps its config and data there); ``{uid}`` and ``{gid}`` in ``user`` to
the calling process's ids. ``{port}``, ``{port.N}``, ``{host_port}``, ``{host_port.N}``
and ``{listen_host}`` in a command or environment value are filled by the backend with the
ports it assigns (see ``backends/base.py``). A ``command`` (and ``health.command``) may be a
list of arguments or one string, split with shell rules (``shlex``; no shell runs it).
``url`` says how clients reach the service (``"redis://{host}:{port}/0"``; default from the
health check: ``http://{host}:{port}`` for http, ``{host}:{port}`` otherwise).

TOML shapes accepted::

    [services.web]
    command = ["python3", "-m", "http.server", "{port}"]
    ports = [8000]                         # a free host port; "18000:8000" pins host port 18000
    health = {kind = "http", path = "/"}
    depends_on = ["redis", {name = "init", condition = "service_completed_successfully"}]
    volumes = ["data:/data", "/srv/conf:/etc/conf:ro"]
    restart = {mode = "on-failure", max_restarts = 3}
    entrypoint = []                        # clear the image's; [..] replaces it
    network_mode = "host"                  # the host's network instead of the service network
    user = "{uid}:{gid}"                   # run the container as you
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import pluggy

from ..config import Settings
from ..errors import ConfigError, SpecError
from ..hookspecs import hookimpl
from ..models import (
    DependsOn,
    HealthCheck,
    PortMapping,
    Resources,
    RestartPolicy,
    ServiceSpec,
    VolumeMount,
    validate_name,
)
from ..values import preview

__all__ = [
    "BUILTIN_SERVICES",
    "apply_fields",
    "build_catalog",
    "dspy_infra_services",
    "parse_overrides",
    "parse_service_table",
    "spec_to_toml",
]

_OPTIONAL_RESTART = RestartPolicy(mode="on-failure", max_restarts=3)


#: The built-in specs. ``command`` is what the process backend runs (only where a local binary
#: exists; the rest need a container backend). Ports are the old stack's fixed ports, now as
#: *container* ports: every one is published on a free host port (host port 0) unless a
#: ``[services.NAME]`` table pins one (``ports = ["16379:6379"]``); commands take the assigned
#: port from placeholders (``{port}``, see ``backends/base.py``).
BUILTIN_SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        name="redis",
        image="redis:7-alpine",
        command=(
            "redis-server",
            "--port",
            "{port}",
            "--bind",
            "{listen_host}",
            "--save",
            "",
            "--appendonly",
            "no",
        ),
        ports=(PortMapping(6379, 0),),
        health=HealthCheck(kind="redis"),
        url="redis://{host}:{port}/0",
    ),
    ServiceSpec(
        name="reddb",
        image="dspy-lightweight:latest",
        ports=(PortMapping(8080, 0),),
        health=HealthCheck(kind="http", path="/health", port=8080),
    ),
    ServiceSpec(
        name="ollama",
        image="ollama/ollama:latest",
        ports=(PortMapping(11434, 0),),
        health=HealthCheck(kind="http", path="/api/tags", port=11434, startup_timeout=120.0),
        required=False,
        restart=_OPTIONAL_RESTART,
    ),
    *(
        ServiceSpec(
            name=f"infermesh-node-{node}",
            image="official-infermesh:latest",
            environment={"NODE_ID": f"node-{node}", "REDIS_URL": "redis://redis:6379"},
            depends_on=(DependsOn("redis"),),
            health=HealthCheck(kind="engine"),
            required=False,
            restart=_OPTIONAL_RESTART,
        )
        for node in ("a", "b")
    ),
    ServiceSpec(
        name="infermesh-router",
        image="official-infermesh:latest",
        environment={"ROLE": "router", "NODES": "infermesh-node-a,infermesh-node-b"},
        ports=(PortMapping(9000, 0),),
        depends_on=(DependsOn("infermesh-node-a"), DependsOn("infermesh-node-b")),
        health=HealthCheck(kind="http", path="/health", port=9000),
        required=False,
        restart=_OPTIONAL_RESTART,
    ),
    ServiceSpec(
        name="zookeeper",
        image="confluentinc/cp-zookeeper:7.5.0",
        environment={"ZOOKEEPER_CLIENT_PORT": "2181", "ZOOKEEPER_TICK_TIME": "2000"},
        ports=(PortMapping(2181, 0),),
        health=HealthCheck(kind="tcp", port=2181),
        required=False,
        restart=_OPTIONAL_RESTART,
    ),
    ServiceSpec(
        name="kafka",
        image="confluentinc/cp-kafka:7.5.0",
        environment={
            "KAFKA_BROKER_ID": "1",
            "KAFKA_ZOOKEEPER_CONNECT": "zookeeper:2181",
            "KAFKA_LISTENERS": "PLAINTEXT://0.0.0.0:29092",
            "KAFKA_ADVERTISED_LISTENERS": "PLAINTEXT://localhost:{host_port}",
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        },
        ports=(PortMapping(29092, 0),),
        url="{host}:{port}",  # bootstrap servers
        depends_on=(DependsOn("zookeeper"),),
        health=HealthCheck(kind="tcp", port=29092, startup_timeout=120.0),
        required=False,
        restart=_OPTIONAL_RESTART,
    ),
    ServiceSpec(
        name="prometheus",
        image="prom/prometheus:latest",
        # The image's entrypoint is /bin/prometheus; the command names it, as a process needs.
        entrypoint=(),
        command=(
            "prometheus",
            "--config.file={home}/prometheus/prometheus.yml",
            "--storage.tsdb.path={home}/prometheus/data",
            "--web.listen-address={listen_host}:{port}",
        ),
        ports=(PortMapping(9090, 0),),
        # In a container too: its config and data at the same paths as for a process, written
        # as you (the image's own user could not write your directory), and on the host's
        # network, where the server's /metrics listens (on loopback by default).
        volumes=(VolumeMount("{home}/prometheus", "{home}/prometheus"),),
        user="{uid}:{gid}",
        network_mode="host",
        health=HealthCheck(kind="http", path="/-/ready", port=9090),  # /-/healthy answers before queries do
        required=False,
        restart=_OPTIONAL_RESTART,
    ),
)


@hookimpl
def dspy_infra_services() -> Iterable[ServiceSpec]:
    return BUILTIN_SERVICES


# -- parsing TOML tables -------------------------------------------------------------------

_SPEC_KEYS = [a.name for a in attrs.fields(ServiceSpec) if a.name != "name"]
_NESTED: dict[str, type[Any]] = {"health": HealthCheck, "restart": RestartPolicy, "resources": Resources}


def _unknown_key(where: str, key: str, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    fix = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(sorted(known))
    return ConfigError(f"unknown key {key!r}", field=f"{where}.{key}", fix=fix)


def _check_keys(table: Mapping[Any, Any], known: Iterable[str], where: str) -> None:
    """Refuse a key of ``table`` that is not in ``known``, suggesting the closest one."""
    known = list(known)
    for key in table:
        if key not in known:
            raise _unknown_key(where, str(key), known)


def _field_names(cls: type[Any]) -> list[str]:
    return [a.name for a in attrs.fields(cls)]


def _parse_port(value: Any, where: str) -> PortMapping:
    if isinstance(value, PortMapping):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return PortMapping(container_port=value, host_port=0)
    if isinstance(value, Mapping):
        _check_keys(value, _field_names(PortMapping), where)
        return PortMapping(**dict(value))
    if isinstance(value, str):
        text, _, protocol = value.partition("/")
        parts = text.split(":")
        try:
            nums = [int(p) for p in parts[-2:]]
        except ValueError:
            nums = []
        if nums and 1 <= len(parts) <= 3:
            if len(parts) == 1:
                return PortMapping(container_port=nums[0], host_port=0, protocol=protocol or "tcp")
            ip = parts[0] if len(parts) == 3 else "127.0.0.1"
            return PortMapping(
                container_port=nums[1], host_port=nums[0], host_ip=ip, protocol=protocol or "tcp"
            )
    raise ConfigError(
        f"cannot read port {value!r}",
        field=where,
        fix='write "HOST:CONTAINER" (e.g. "6379:6379") or {host_port = 6379, container_port = 6379}',
    )


def _parse_volume(value: Any, where: str) -> VolumeMount:
    if isinstance(value, VolumeMount):
        return value
    if isinstance(value, Mapping):
        _check_keys(value, _field_names(VolumeMount), where)
        return VolumeMount(**dict(value))
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) in (2, 3) and (len(parts) == 2 or parts[2] in ("ro", "rw")):
            return VolumeMount(parts[0], parts[1], read_only=len(parts) == 3 and parts[2] == "ro")
    raise ConfigError(
        f"cannot read volume {value!r}",
        field=where,
        fix='write "NAME:/path", "/host/path:/path" or "/host/path:/path:ro"',
    )


def _parse_depends(value: Any, where: str) -> tuple[DependsOn, ...]:
    items: list[Any]
    if isinstance(value, Mapping):  # Compose style: {redis = {condition = "service_started"}}
        items = [{"name": k, **(dict(v) if isinstance(v, Mapping) else {})} for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(
            f"expected a list, got {value!r}", field=where, fix='write depends_on = ["redis", ...]'
        )
    out: list[DependsOn] = []
    for item in items:
        if isinstance(item, DependsOn):
            out.append(item)
        elif isinstance(item, str):
            out.append(DependsOn(validate_name(item, where)))
        elif isinstance(item, Mapping):
            _check_keys(item, ("name", "condition"), where)
            if "name" not in item:
                raise ConfigError("a dependency table needs a name", field=where)
            out.append(
                DependsOn(validate_name(item["name"], where), item.get("condition", "service_healthy"))
            )
        else:
            raise ConfigError(f"cannot read dependency {item!r}", field=where)
    return tuple(out)


def _parse_nested(key: str, value: Any, base: Any, where: str) -> Any:
    cls = _NESTED[key]
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a table, got {value!r}", field=where)
    _check_keys(value, _field_names(cls), where)
    fields = dict(value)
    if key == "health" and "command" in fields:
        fields["command"] = parse_command(fields["command"], f"{where}.command")
    # A partial table overrides only the fields it names.
    return attrs.evolve(base, **fields) if base is not None else cls(**fields)


def apply_fields(name: str, fields: Mapping[str, Any], base: ServiceSpec | None = None) -> ServiceSpec:
    """A spec for ``name`` with ``fields`` (TOML-shaped values) applied over ``base`` (or over
    the defaults for a new service). Errors name ``services.NAME.KEY``."""
    where = f"services.{name}"
    changes: dict[str, Any] = {}
    try:
        validate_name(name, where)
        for key, value in fields.items():
            field = f"{where}.{key}"
            if key not in _SPEC_KEYS:
                raise _unknown_key(where, key, _SPEC_KEYS)
            if key == "ports":
                changes[key] = tuple(_parse_port(v, field) for v in _as_list(value, field))
            elif key == "volumes":
                changes[key] = tuple(_parse_volume(v, field) for v in _as_list(value, field))
            elif key == "depends_on":
                changes[key] = _parse_depends(value, field)
            elif key in _NESTED:
                changes[key] = _parse_nested(key, value, getattr(base, key) if base else None, field)
            elif key == "command":
                changes[key] = parse_command(value, field)
            elif key == "entrypoint":
                # [] or "" clears the image's entrypoint (as in Docker Compose).
                changes[key] = () if value in ([], ()) or value == "" else parse_command(value, field)
            elif key == "url":
                if not isinstance(value, str):
                    raise ConfigError(
                        f"expected a string, got {preview(value)}",
                        field=field,
                        fix='write e.g. url = "http://{host}:{port}/api"',
                    )
                changes[key] = value
            elif key in ("required", "one_shot"):
                if not isinstance(value, bool):
                    raise ConfigError(f"expected true or false, got {value!r}", field=field)
                changes[key] = value
            else:
                changes[key] = value
        return attrs.evolve(base, **changes) if base is not None else ServiceSpec(name=name, **changes)
    except ConfigError:
        raise
    except SpecError as exc:
        field = exc.field or ""
        if not field.startswith("services."):
            field = f"{where}.{field}" if field else where
        raise ConfigError(exc.message, field=field, fix=exc.fix) from None
    except TypeError as exc:
        raise ConfigError(f"invalid value: {exc}", field=where) from None


def parse_command(value: Any, field: str) -> tuple[str, ...]:
    """A command as TOML gives it: a list of arguments as is, or one string split with shell
    rules (``shlex``: ``"redis-cli -p 6379 ping"``, quotes group words; no shell runs it)."""
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            raise ConfigError(
                f"cannot split {preview(value)} with shell rules: {exc}",
                field=field,
                fix='close the quote, or write a list: ["binary", "arg", ...]',
            ) from None
        if not parts:
            raise ConfigError("the command is empty", field=field, fix='write ["binary", "arg", ...]')
        return tuple(parts)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(
        f"expected a list of strings or one string, got {preview(value)}",
        field=field,
        fix='write ["binary", "arg", ...] or "binary arg ..."',
    )


def _as_list(value: Any, field: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"expected a list, got {value!r}", field=field)


def parse_service_table(name: str, table: Mapping[str, Any], base: ServiceSpec | None = None) -> ServiceSpec:
    """One ``[services.NAME]`` table, over ``base`` when the name is already in the catalog."""
    return apply_fields(name, table, base)


def parse_overrides(
    overrides: Mapping[str, str], catalog: Mapping[str, ServiceSpec]
) -> dict[str, ServiceSpec]:
    """``{"NAME.KEY": value}`` (the wire's StartServices overrides) applied to the catalog.
    A value is read as JSON when it parses (``'["redis-server", "--port", "7000"]'``), else as a
    plain string. Returns the changed specs by name."""
    grouped: dict[str, dict[str, Any]] = {}
    for dotted, raw in overrides.items():
        name, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(
                f"override key {dotted!r} has no field",
                field="overrides",
                fix='write "SERVICE.FIELD", e.g. "redis.command"',
            )
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        grouped.setdefault(name, {})[key] = value
    return {name: apply_fields(name, fields, catalog.get(name)) for name, fields in grouped.items()}


def _expand_host_values(spec: ServiceSpec, home: Path) -> ServiceSpec:
    """``{home}`` in command arguments and volume paths; ``{uid}``/``{gid}`` in ``user``."""
    changes: dict[str, Any] = {}
    if any("{home}" in arg for arg in spec.command):
        changes["command"] = tuple(arg.replace("{home}", str(home)) for arg in spec.command)
    if any("{home}" in v.source + v.target for v in spec.volumes):
        changes["volumes"] = tuple(
            attrs.evolve(
                v, source=v.source.replace("{home}", str(home)), target=v.target.replace("{home}", str(home))
            )
            for v in spec.volumes
        )
    if "{uid}" in spec.user or "{gid}" in spec.user:
        changes["user"] = spec.user.replace("{uid}", str(os.getuid())).replace("{gid}", str(os.getgid()))
    return attrs.evolve(spec, **changes) if changes else spec


def build_catalog(
    settings: Settings,
    plugins: pluggy.PluginManager,
    extra: Iterable[ServiceSpec] = (),
    *,
    expand_home: bool = True,
) -> dict[str, ServiceSpec]:
    """Hook results, then ``settings.services`` tables, then ``extra`` (later wins by name);
    ``expand_home=False`` keeps ``{home}`` as written (to show a spec as TOML)."""
    catalog: dict[str, ServiceSpec] = {}
    # pluggy calls later-registered plugins first; walk backwards so later plugins win.
    for result in reversed(list(plugins.hook.dspy_infra_services())):
        for spec in result or ():
            catalog[spec.name] = spec
    for name, table in settings.services.items():
        catalog[name] = parse_service_table(name, table, catalog.get(name))
    for spec in extra:
        catalog[spec.name] = spec
    if not expand_home:
        return catalog
    home = settings.resolved_home()
    return {name: _expand_host_values(spec, home) for name, spec in catalog.items()}


# -- showing a spec as TOML ------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A TOML basic string: JSON's escapes, plus DEL, which JSON leaves raw and TOML refuses.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def _changed_fields(value: Any) -> dict[str, Any]:
    """The fields of an attrs value that differ from the class defaults (None left out)."""
    default = type(value)()
    return {
        a.name: getattr(value, a.name)
        for a in attrs.fields(type(value))
        if getattr(value, a.name) != getattr(default, a.name) and getattr(value, a.name) is not None
    }


def _port_text(port: PortMapping) -> Any:
    if not port.host_port:  # a free host port
        if port.protocol == "tcp" and port.host_ip == "127.0.0.1" and port.host_port == 0:
            return port.container_port
        return {k: v for k, v in attrs.asdict(port).items() if v is not None}
    text = f"{port.host_port}:{port.container_port}"
    if port.host_ip != "127.0.0.1":
        text = f"{port.host_ip}:{text}"
    return text + (f"/{port.protocol}" if port.protocol != "tcp" else "")


def spec_to_toml(spec: ServiceSpec) -> str:
    """``spec`` as a ``[services.NAME]`` table that ``parse_service_table`` reads back to the
    same spec (fields at their defaults are left out)."""
    lines = [f"[services.{_toml_key(spec.name)}]"]
    for a in attrs.fields(ServiceSpec):
        if a.name == "name":
            continue
        value = getattr(spec, a.name)
        if a.name in _NESTED:
            changed = _changed_fields(value)
            if changed:
                lines.append(f"{a.name} = {_toml_value(changed)}")
            continue
        if value is None or (a.default is not attrs.NOTHING and value == a.default):
            continue
        if value in ((), {}, "") and a.name != "entrypoint":  # an empty entrypoint clears the image's
            continue
        if a.name == "ports":
            value = [_port_text(p) for p in value]
        elif a.name == "volumes":
            value = [f"{v.source}:{v.target}" + (":ro" if v.read_only else "") for v in value]
        elif a.name == "depends_on":
            value = [d.name if d.condition == "service_healthy" else attrs.asdict(d) for d in value]
        lines.append(f"{a.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
