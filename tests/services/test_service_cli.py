"""``dspy-infra catalog`` / ``catalog --show NAME`` / ``services`` / ``up --keep`` / ``down``
(issue 9 items 4, 7 and the catalog part of 9), run as a user runs them: the installed
command in a fresh directory, with another Redis on 6379 when one is there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest
from engines import which_or_skip
from hypothesis import given, settings
from strategies import service_cli_service_specs

from dspy_infra.backends.process import pid_alive
from dspy_infra.config import load_settings
from dspy_infra.models import PortMapping, ServiceSpec
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.services.catalog import BUILTIN_SERVICES, build_catalog, parse_service_table, spec_to_toml

CLI = shutil.which("dspy-infra", path=str(Path(sys.executable).parent)) or "dspy-infra"


def _run(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    env.update(XDG_STATE_HOME=str(cwd / "xdg-state"), COLUMNS="200", DSPY_INFRA_MODE="embedded")
    return subprocess.run(
        [CLI, "--home", str(cwd / "state"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_catalog_lists_the_builtins_and_show_prints_pasteable_toml(tmp_path: Path) -> None:
    listed = _run("catalog", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for spec in BUILTIN_SERVICES:
        assert spec.name in listed.stdout
    assert "redis://{host}:{port}/0" in listed.stdout

    shown = _run("catalog", "--show", "redis", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("[services.redis]\n") and "ports = [6379]" in shown.stdout
    # Pasted into a project's file (with one change), it is read back as the same spec.
    (tmp_path / "dspy-infra.toml").write_text(
        shown.stdout.replace("ports = [6379]", 'ports = ["16379:6379"]')
    )
    cfg = load_settings(tmp_path / "dspy-infra.toml", env={}, home=str(tmp_path / "state"))
    catalog = build_catalog(cfg, build_plugin_manager(load_entry_points=False))
    builtin = next(s for s in BUILTIN_SERVICES if s.name == "redis")
    assert catalog["redis"] == attrs.evolve(builtin, ports=(PortMapping(6379, 16379),))

    prometheus = _run("catalog", "--show", "prometheus", cwd=tmp_path)
    assert "{home}/prometheus/prometheus.yml" in prometheus.stdout  # as written, not expanded

    unknown = _run("catalog", "--show", "redsi", cwd=tmp_path)
    assert unknown.returncode != 0 and "did you mean 'redis'?" in unknown.stderr


@settings(max_examples=300, deadline=None)
@given(service_cli_service_specs())
def test_any_spec_round_trips_through_its_toml(spec: ServiceSpec) -> None:
    """Whatever ``catalog --show`` prints is read back as the same spec."""
    doc = tomllib.loads(spec_to_toml(spec))
    assert parse_service_table(spec.name, doc["services"][spec.name]) == spec


def test_up_keep_services_down(tmp_path: Path) -> None:
    which_or_skip("redis-server")
    up = _run("up", "redis", "--backend", "process", "--keep", cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    try:
        listed = _run("services", "--json", cwd=tmp_path)  # a new process: adopts the kept one
        assert listed.returncode == 0, listed.stderr
        # Seen once in a full run (1 in 1027 tests, not again in 14 reruns): "redis" missing
        # from the list. Say what the new process saw if it happens again.
        found = json.loads(listed.stdout)
        assert "redis" in found, (listed.stdout, listed.stderr, _run("status", cwd=tmp_path).stdout)
        redis = found["redis"]
        assert redis["status"] == "healthy" and redis["port"] != 6379
        assert redis["url"] == f"redis://127.0.0.1:{redis['port']}/0"
        table = _run("services", cwd=tmp_path)
        assert redis["url"] in table.stdout
    finally:
        down = _run("down", cwd=tmp_path)
    assert down.returncode == 0 and "redis: stopped" in down.stdout, down.stdout + down.stderr
    after = _run("services", "--json", cwd=tmp_path)
    assert json.loads(after.stdout) == {}


def test_up_without_keep_and_without_server_leaves_nothing_running(tmp_path: Path) -> None:
    which_or_skip("redis-server")
    up = _run("up", "redis", "--backend", "process", cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert "--keep" in up.stdout  # says how to leave them up
    records = [p for p in (tmp_path / "state" / "services").iterdir() if not p.name.startswith(".")]
    assert records == []
    for pid in _redis_pids_under(tmp_path):
        assert not pid_alive(pid)


def _redis_pids_under(root: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cmd.startswith(b"redis-server") and cwd.startswith(str(root)):
                found.append(int(entry))
    return found


@pytest.mark.parametrize("command", [["services"], ["catalog"]])
def test_new_commands_have_help(tmp_path: Path, command: list[str]) -> None:
    shown = _run(*command, "--help", cwd=tmp_path)
    assert shown.returncode == 0 and "usage: dspy-infra" in shown.stdout
