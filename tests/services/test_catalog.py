"""The catalog: built-ins from DESIGN.md, TOML overrides of any field, new services, Python
extras and plugins (later wins), and bad fields named ``services.NAME.KEY``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import health_fields, port_numbers

from dspy_infra.config import Settings, load_settings
from dspy_infra.errors import ConfigError, CycleError
from dspy_infra.events import EventBus
from dspy_infra.hookspecs import hookimpl
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import DependsOn, HealthCheck, PortMapping, RestartPolicy, ServiceSpec, VolumeMount
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.services.catalog import (
    BUILTIN_SERVICES,
    apply_fields,
    build_catalog,
    parse_overrides,
)
from dspy_infra.services.graph import validate_graph
from dspy_infra.services.manager import ServiceManager
from dspy_infra.services.prometheus import write_config


def _catalog(
    tmp_path: Path, toml: str = "", extra: list[ServiceSpec] | None = None, plugins: Sequence[object] = ()
) -> dict[str, ServiceSpec]:
    path = tmp_path / "dspy-infra.toml"
    path.write_text(toml)
    cfg = load_settings(path, env={}, home=str(tmp_path / "home"))
    return build_catalog(cfg, build_plugin_manager(plugins, load_entry_points=False), extra or [])


def test_string_commands_are_split_with_shell_rules(tmp_path: Path) -> None:
    """Issue 8 item 9: ``health.command = "true"`` was split into characters (``t r u e``)."""
    cat = _catalog(
        tmp_path,
        "[services.web]\ncommand = 'python3 -m http.server \"{port}\"'\nports = [8000]\n"
        "health = {kind = 'exec', command = 'true'}\n"
        "[services.redis]\nhealth = {kind = 'exec', command = \"redis-cli -p '{port}' ping\"}\n",
    )
    assert cat["web"].command == ("python3", "-m", "http.server", "{port}")
    assert cat["web"].health.command == ("true",)
    assert cat["redis"].health.command == ("redis-cli", "-p", "{port}", "ping")
    for bad, fix in (("''", "write"), ("[1, 2]", "list of strings")):
        with pytest.raises(ConfigError) as info:
            _catalog(tmp_path, f"[services.web]\nhealth = {{kind = 'exec', command = {bad}}}\n")
        assert info.value.field == "services.web.health.command" and fix in str(info.value)


def test_builtins_match_the_design_table(tmp_path: Path) -> None:
    """The old stack's ports are the container ports; every host port is free (0) unless a
    user pins one, so nothing collides with another Redis on 6379."""
    cat = _catalog(tmp_path)
    expected = {
        "redis": ("redis:7-alpine", [(0, 6379)], [], "redis", True),
        "reddb": ("dspy-lightweight:latest", [(0, 8080)], [], "http", True),
        "ollama": ("ollama/ollama:latest", [(0, 11434)], [], "http", False),
        "infermesh-node-a": ("official-infermesh:latest", [], ["redis"], "engine", False),
        "infermesh-node-b": ("official-infermesh:latest", [], ["redis"], "engine", False),
        "infermesh-router": (
            "official-infermesh:latest",
            [(0, 9000)],
            ["infermesh-node-a", "infermesh-node-b"],
            "http",
            False,
        ),
        "zookeeper": ("confluentinc/cp-zookeeper:7.5.0", [(0, 2181)], [], "tcp", False),
        "kafka": ("confluentinc/cp-kafka:7.5.0", [(0, 29092)], ["zookeeper"], "tcp", False),
        "prometheus": ("prom/prometheus:latest", [(0, 9090)], [], "http", False),
    }
    assert set(cat) == set(expected)
    for name, (image, ports, deps, kind, required) in expected.items():
        spec = cat[name]
        assert spec.image == image
        assert [(p.host_port, p.container_port) for p in spec.ports] == ports
        assert all(p.host_ip == "127.0.0.1" for p in spec.ports)
        assert [d.name for d in spec.depends_on] == deps
        assert (spec.health.kind, spec.required) == (kind, required)
    assert cat["reddb"].health.path == "/health" and cat["ollama"].health.path == "/api/tags"
    assert cat["prometheus"].health.path == "/-/ready"
    validate_graph(cat)


def test_process_commands_and_home_expansion(tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    assert cat["redis"].command[:3] == ("redis-server", "--port", "{port}")
    assert "--save" in cat["redis"].command and "{listen_host}" in cat["redis"].command
    assert cat["redis"].url == "redis://{host}:{port}/0" and cat["kafka"].url == "{host}:{port}"
    assert cat["kafka"].environment["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://localhost:{host_port}"
    home = str(tmp_path / "home")
    assert any(arg == f"--config.file={home}/prometheus/prometheus.yml" for arg in cat["prometheus"].command)
    assert not cat["kafka"].command and not cat["ollama"].command  # container-only
    write_config(Settings(home=home))
    assert "scrape_configs" in (Path(home) / "prometheus" / "prometheus.yml").read_text()


def test_toml_overrides_any_field_of_a_builtin_and_merges_nested_tables(tmp_path: Path) -> None:
    cat = _catalog(
        tmp_path,
        """
[services.redis]
command = ["redis-server", "--port", "7000"]
ports = ["7000:7000"]
environment = {A = "1"}
health = {startup_timeout = 9.5}
restart = {max_restarts = 2}
required = false
""",
    )
    redis = cat["redis"]
    assert redis.command == ("redis-server", "--port", "7000")
    assert redis.ports == (PortMapping(7000, 7000),)
    assert redis.environment == {"A": "1"}
    # Only the named nested fields change: the probe is still a Redis PING.
    assert redis.health == HealthCheck(kind="redis", startup_timeout=9.5)
    assert redis.restart == RestartPolicy(max_restarts=2)
    assert redis.required is False
    assert redis.image == "redis:7-alpine"


def test_toml_declares_a_new_service_with_every_shape(tmp_path: Path) -> None:
    cat = _catalog(
        tmp_path,
        """
[services.init]
command = ["true"]
one_shot = true

[services.web]
command = ["python3", "-m", "http.server", "8000"]
ports = ["127.0.0.1:8000:8000", 9000, {host_port = 0, container_port = 9100}, "53:53/udp"]
volumes = ["data:/data", "/srv/conf:/etc/conf:ro", {source = "x", target = "/x"}]
depends_on = ["redis", {name = "init", condition = "service_completed_successfully"}]
health = {kind = "http", path = "/ready", port = 8000, expected_status = 204}
workdir = "/tmp"
labels = {team = "ml"}
""",
    )
    web = cat["web"]
    assert web.ports == (
        PortMapping(8000, 8000, host_ip="127.0.0.1"),
        PortMapping(9000, 0),
        PortMapping(9100, 0),
        PortMapping(53, 53, protocol="udp"),
    )
    assert web.volumes == (
        VolumeMount("data", "/data"),
        VolumeMount("/srv/conf", "/etc/conf", read_only=True),
        VolumeMount("x", "/x"),
    )
    assert web.depends_on == (DependsOn("redis"), DependsOn("init", "service_completed_successfully"))
    assert web.health == HealthCheck(kind="http", path="/ready", port=8000, expected_status=204)
    assert (web.workdir, web.labels) == ("/tmp", {"team": "ml"})
    assert cat["init"].one_shot is True
    validate_graph(cat)


def test_compose_style_depends_on_table(tmp_path: Path) -> None:
    cat = _catalog(tmp_path, '[services.app]\ndepends_on = {redis = {condition = "service_started"}}\n')
    assert cat["app"].depends_on == (DependsOn("redis", "service_started"),)


@pytest.mark.parametrize(
    ("toml", "field", "hint"),
    [
        ("[services.redis]\nimgae = 'x'\n", "services.redis.imgae", "did you mean 'image'?"),
        ("[services.redis]\nhealth = {knd = 'tcp'}\n", "services.redis.health.knd", "did you mean 'kind'?"),
        ("[services.redis]\nhealth = {kind = 'ping'}\n", "services.redis.health.kind", "use http, tcp"),
        ("[services.web]\nports = ['80:eighty']\n", "services.web.ports", "HOST:CONTAINER"),
        ("[services.web]\nports = ['99999:80']\n", "services.web.ports.host_port", ""),
        ("[services.web]\nvolumes = ['relative']\n", "services.web.volumes", "NAME:/path"),
        ("[services.web]\ndepends_on = 'redis'\n", "services.web.depends_on", "depends_on = ["),
        (
            "[services.web]\ndepends_on = [{name = 'redis', condition = 'up'}]\n",
            "services.web.depends_on.redis.condition",
            "service_healthy",
        ),
        ("[services.web]\nrequired = 'yes'\n", "services.web.required", ""),
        (
            "[services.web]\ncommand = 'python3 -c \"print(1)'\n",
            "services.web.command",
            "close the quote",
        ),
        ("[services.web]\nrestart = {mode = 'sometimes'}\n", "services.web.restart.mode", "on-failure"),
        ("[services.Bad]\nimage = 'x'\n", "services.Bad", "lowercase"),
    ],
)
def test_bad_fields_are_named_with_the_fix(tmp_path: Path, toml: str, field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        _catalog(tmp_path, toml)
    assert info.value.field == field, str(info.value)
    assert hint in str(info.value)


def test_python_extras_override_toml_and_plugins_override_builtins(tmp_path: Path) -> None:
    class Plugin:
        @hookimpl
        def dspy_infra_services(self) -> list[ServiceSpec]:
            return [ServiceSpec(name="redis", image="my/redis:1"), ServiceSpec(name="vector", image="v:1")]

    cat = _catalog(
        tmp_path,
        "[services.vector]\nimage = 'v:2'\n",
        extra=[ServiceSpec(name="redis", image="py/redis:3")],
        plugins=[Plugin()],
    )
    assert cat["vector"].image == "v:2"  # TOML over the plugin
    assert cat["redis"].image == "py/redis:3"  # Python over everything
    assert len(cat) == len(BUILTIN_SERVICES) + 1


def test_start_overrides_are_read_as_json_or_text(tmp_path: Path) -> None:
    cat = _catalog(tmp_path)
    changed = parse_overrides(
        {
            "redis.command": '["redis-server", "--port", "7001"]',
            "redis.image": "redis:7",
            "redis.required": "false",
        },
        cat,
    )
    assert changed["redis"].command == ("redis-server", "--port", "7001")
    assert changed["redis"].image == "redis:7" and changed["redis"].required is False
    with pytest.raises(ConfigError) as info:
        parse_overrides({"redis": "x"}, cat)
    assert info.value.field == "overrides"


def test_manager_refuses_a_catalog_with_a_cycle(tmp_path: Path) -> None:
    cfg = Settings(home=tmp_path, services={"a": {"depends_on": ["b"]}, "b": {"depends_on": ["a"]}})
    with pytest.raises(CycleError, match="a -> b -> a"):
        ServiceManager(
            cfg, bus=EventBus(), metrics=InfraMetrics(), plugins=build_plugin_manager(load_entry_points=False)
        )


@settings(max_examples=200, deadline=None)
@given(
    port_numbers,
    port_numbers,
    st.sampled_from(["", "127.0.0.1:", "0.0.0.0:"]),
    st.sampled_from(["", "/udp", "/tcp"]),
)
def test_port_strings_round_trip(host: int, container: int, ip: str, proto: str) -> None:
    spec = apply_fields("svc", {"ports": [f"{ip}{host}:{container}{proto}"]})
    (port,) = spec.ports
    assert (port.host_port, port.container_port) == (host, container)
    assert port.host_ip == (ip[:-1] or "127.0.0.1")
    assert port.protocol == (proto[1:] or "tcp")


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True), st.text(max_size=20), max_size=5)
)
def test_environment_overrides_survive_json_round_trip(env: dict[str, str]) -> None:
    cat = {"svc": ServiceSpec(name="svc")}
    changed = parse_overrides({"svc.environment": json.dumps(env)}, cat)
    assert changed["svc"].environment == env


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([s.name for s in BUILTIN_SERVICES]), health_fields)
def test_a_partial_health_table_changes_only_what_it_names(name: str, fields: dict) -> None:
    base = {s.name: s for s in BUILTIN_SERVICES}[name]
    merged = apply_fields(name, {"health": fields}, base)
    for field in (
        "kind",
        "path",
        "expected_status",
        "interval",
        "timeout",
        "startup_timeout",
        "retries",
        "port",
    ):
        expected = fields.get(field, getattr(base.health, field))
        assert getattr(merged.health, field) == expected
    # Nothing else about the service moved.
    assert attrs.evolve(merged, health=base.health) == base
