"""The files the built-in ``prometheus`` service reads from the state directory.

``<home>/prometheus/prometheus.yml`` is written once and is the user's to edit. It finds what
to scrape through Prometheus's file-based discovery: every ``targets/*.json`` beside it, which
Prometheus re-reads when one changes. A server writes its own ``/metrics`` address there each
time it binds its HTTP port (``serve.InfraServer``), so the job follows the port the server
really got (``http_port = 0`` binds any free one), and a stopped server shows as ``up == 0``
until the next start rewrites the file.

A fixed target in the config could not do that: the server's port is only known once it is
bound, and earlier versions wrote ``127.0.0.1:<http_port setting>`` (``:0`` with a free port)
and a self-scrape of ``127.0.0.1:9090``, where Prometheus does not listen on the process
backend (its port is a free host port). An unedited config of that shape is replaced.

Blocking file I/O: call these in a worker thread.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

from ..config import Settings
from ..ownership import replace_file

__all__ = ["CONFIG_NAME", "TARGETS_DIR", "scrape_address", "write_config", "write_scrape_target"]

CONFIG_NAME = "prometheus.yml"
#: Beside the config; ``targets/<name>.json`` files in Prometheus's ``file_sd`` format.
TARGETS_DIR = "targets"

_CONFIG = """\
# Written by dspy_infra; edit freely (it is not overwritten).
# Targets come from targets/*.json beside this file: a dspy-infra server writes its /metrics
# address there each time it starts (its port may change between starts).
global:
  scrape_interval: 15s
scrape_configs:
  - job_name: dspy_infra
    file_sd_configs:
      - files: ['targets/*.json']
        refresh_interval: 30s
"""

#: What versions before the targets directory wrote (unedited, so safe to replace).
_OLD_CONFIG = re.compile(
    r"# Written by dspy_infra; edit freely \(it is not overwritten\)\.\n"
    r"global:\n  scrape_interval: 15s\n"
    r"scrape_configs:\n"
    r"  - job_name: prometheus\n    static_configs:\n      - targets: \['127\.0\.0\.1:9090'\]\n"
    r"  - job_name: dspy_infra\n    static_configs:\n"
    r"      - targets: \['127\.0\.0\.1:\d+'\]\n"
)


def _directory(settings: Settings) -> Path:
    return settings.resolved_home() / "prometheus"


def write_config(settings: Settings) -> Path:
    """``prometheus.yml`` unless the user has one (an unedited old one is replaced); its path."""
    directory = _directory(settings)
    (directory / TARGETS_DIR).mkdir(parents=True, exist_ok=True)
    config = directory / CONFIG_NAME
    try:
        current = config.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = None
    except UnicodeDecodeError:
        return config  # not ours
    if current is None or _OLD_CONFIG.fullmatch(current):
        replace_file(config, _CONFIG)
    return config


def scrape_address(host: str, port: int) -> str:
    """``host:port`` as a scrape target: a wildcard bind is scraped on loopback, and an IPv6
    address is bracketed."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass  # a name
    return f"{host}:{port}"


def write_scrape_target(settings: Settings, name: str, address: str, *, scheme: str = "http") -> Path:
    """Make ``targets/<name>.json`` list ``address`` (``scrape_address``); its path."""
    directory = _directory(settings) / TARGETS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    doc = [{"targets": [address], "labels": {"__scheme__": scheme}}]
    replace_file(path, json.dumps(doc, indent=2) + "\n")
    return path
