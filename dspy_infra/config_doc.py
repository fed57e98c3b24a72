"""The settings reference, generated from ``config.Settings`` itself: one generator for
``dspy-infra config init`` (a commented TOML file), ``dspy-infra config reference`` and the
table in docs/configuration.md, so none of them can drift from the code.
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

import attrs

from .config import CONFIG_FILE_NAME, ENV_PREFIX, Settings

__all__ = ["SettingDoc", "render_config_template", "render_settings_markdown", "settings_reference"]


#: Example values shown (commented out) for settings whose default is unset.
_EXAMPLES: dict[str, Any] = {
    "home": "/var/lib/dspy-infra",
    "docker_host": "unix:///var/run/docker.sock",
    "owner": "my-app",
    "addr": "127.0.0.1:50052",
    "token": "change-me",
    "tls_cert": "/etc/dspy-infra/tls/server.crt",
    "tls_key": "/etc/dspy-infra/tls/server.key",
    "slurm": "cli",
    "slurm_partition": "gpu",
    "ray_address": "127.0.0.1:26379",
}

_TABLE_FIELDS = ("task_classes", "services", "ray_classes")

_TABLE_EXAMPLES = """\
# -- Task classes -------------------------------------------------------------------------------
# Each [task_classes.NAME] table overrides a built-in class (cpu_short, cpu_long, gpu,
# gpu_slurm, ray) or declares a new one. The limit adapts between min and max, starting at base.
#
# [task_classes.cpu_short]
# max_concurrency = 16
#
# [task_classes.embed]
# min_concurrency = 1
# base_concurrency = 2
# max_concurrency = 8
# adaptive = true
#
# [task_classes.train]              # runs on a Ray cluster (pip install 'dspy-infra[ray]')
# executor = "ray"
# max_concurrency = 8
#
# [ray_classes.train]               # what each attempt of `train` asks of the cluster
# num_cpus = 1
# num_gpus = 1
# resources = { worker2 = 1 }

# -- Services -----------------------------------------------------------------------------------
# Each [services.NAME] table overrides a built-in service (redis, reddb, ollama, kafka,
# zookeeper, prometheus, infermesh-*) or declares a new one. `image` is used by the docker
# backend, `command` by the process backend. Every port gets a free host port unless a table
# pins one; a command takes its port from {port} (`dspy-infra catalog --show redis` shows how).
#
# [services.redis]                  # pin host port 16379 (on every backend)
# ports = ["16379:6379"]
#
# [services.web]
# image = "python:3.11-slim"
# command = ["python3", "-m", "http.server", "{port}"]
# ports = [8000]                    # a free host port: `dspy-infra services` shows the URL
# health = { kind = "http", path = "/", startup_timeout = 30 }
# depends_on = ["redis"]
"""


@attrs.frozen
class SettingDoc:
    """One ``Settings`` field as documented: name, type, default, environment variable, text."""

    name: str
    type: str
    default: Any
    env_var: str | None
    description: str
    #: The value written (commented out) by ``config init``: the default, or an example.
    example: Any


def _field_comments() -> dict[str, str]:
    """The ``#:`` comment lines above each field in the source of ``Settings``."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(Settings).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"^([a-z_][a-z0-9_]*)\s*:\s*[^=]+", stripped)
        if match and line.startswith("    ") and not line.startswith("     "):
            if pending:
                comments[match.group(1)] = " ".join(pending)
            pending = []
        elif not stripped.startswith("#"):
            pending = []
    return comments


def settings_reference() -> list[SettingDoc]:
    """Every ``Settings`` field, in declaration order, with its documentation."""
    comments = _field_comments()
    docs: list[SettingDoc] = []
    for field in attrs.fields(Settings):
        default: Any = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        description = comments.get(field.name, "")
        docs.append(
            SettingDoc(
                name=field.name,
                type=str(field.type),
                default=default,
                env_var=None if field.name in _TABLE_FIELDS else ENV_PREFIX + field.name.upper(),
                description=description,
                example=_EXAMPLES.get(field.name, default) if default is None else default,
            )
        )
    return docs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple, frozenset, set)):  # list settings: a TOML array
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return "[" + ", ".join(_toml_value(item) for item in items) + "]"
    return json.dumps(str(value))  # a TOML basic string for plain text and paths


def render_config_template() -> str:
    """A commented ``dspy-infra.toml`` covering every setting and example tables."""
    out = [
        f"# {CONFIG_FILE_NAME}: configuration of dspy_infra (written by `dspy-infra config init`).",
        "#",
        "# Precedence: built-in defaults < this file < DSPY_INFRA_* environment < command-line options.",
        "# The file is found at $DSPY_INFRA_CONFIG, else ./dspy-infra.toml, or given with --config.",
        "# Every line is commented out, so as written this file changes nothing. Each value shown is",
        "# the default, or an example for settings that are unset by default.",
        "",
    ]
    for doc in settings_reference():
        if doc.name in _TABLE_FIELDS:
            continue
        out.extend(f"# {line}" for line in _wrap(doc.description, 92))
        out.append(f"# Environment: {doc.env_var}" + ("   (unset by default)" if doc.default is None else ""))
        out.append(f"# {doc.name} = {_toml_value(doc.example)}")
        out.append("")
    out.append(_TABLE_EXAMPLES)
    return "\n".join(out)


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [*lines, current] if current else lines


def _markdown_default(doc: SettingDoc) -> str:
    if doc.default is None:
        return "unset"
    if isinstance(doc.default, dict):
        return "`{}` (tables)"
    return f"`{_toml_value(doc.default)}`"


def render_settings_markdown() -> str:
    """The settings table of docs/configuration.md (``dspy-infra config reference``)."""
    rows = [
        "| Setting | Environment variable | Type | Default | Description |",
        "|---|---|---|---|---|",
    ]
    for doc in settings_reference():
        env = f"`{doc.env_var}`" if doc.env_var else "TOML tables only"
        description = doc.description.replace("|", "\\|")
        type_ = doc.type.replace("|", "\\|")
        rows.append(f"| `{doc.name}` | {env} | `{type_}` | {_markdown_default(doc)} | {description} |")
    return "\n".join(rows) + "\n"
