"""Settings precedence and validation: defaults < TOML file < environment < arguments."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspy_infra.config import Settings, load_settings
from dspy_infra.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dspy-infra.toml"
    path.write_text(text)
    return path


def test_defaults_are_loopback_and_documented_ports() -> None:
    s = load_settings(env={})
    assert (s.host, s.grpc_port, s.env_manager_port, s.http_port) == ("127.0.0.1", 50052, 50100, 9097)
    assert s.backend == "auto" and s.durable is True


def test_file_then_env_then_arguments_win_in_order(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'grpc_port = 6000\nhttp_port = 6001\nbackend = "process"\n')
    s = load_settings(cfg, env={"DSPY_INFRA_HTTP_PORT": "7001"}, backend="docker")
    assert s.grpc_port == 6000  # file
    assert s.http_port == 7001  # env beats file
    assert s.backend == "docker"  # argument beats both


def test_none_arguments_do_not_override(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'backend = "process"\n')
    assert load_settings(cfg, env={}, backend=None).backend == "process"


def test_config_path_from_environment(tmp_path: Path) -> None:
    cfg = write(tmp_path, "retention = 5\n")
    assert load_settings(env={"DSPY_INFRA_CONFIG": str(cfg)}).retention == 5
    with pytest.raises(ConfigError, match="DSPY_INFRA_CONFIG"):
        load_settings(env={"DSPY_INFRA_CONFIG": str(tmp_path / "missing.toml")})


def test_unknown_key_suggests_the_closest_name(tmp_path: Path) -> None:
    cfg = write(tmp_path, "grpc_prot = 1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert err.value.field is not None and "grpc_prot" in err.value.field
    assert "grpc_port" in str(err.value)


def test_unknown_environment_variable_is_refused() -> None:
    with pytest.raises(ConfigError, match="DSPY_INFRA_BAKEND"):
        load_settings(env={"DSPY_INFRA_BAKEND": "docker"})


def test_test_suite_variables_are_not_settings() -> None:
    s = load_settings(env={"DSPY_INFRA_TEST_DOCKER_HOST": "x", "DSPY_INFRA_REQUIRE_ENGINES": "1"})
    assert s == Settings()


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"DSPY_INFRA_GRPC_PORT": "abc"}, "grpc_port"),
        ({"DSPY_INFRA_GRPC_PORT": "70000"}, "grpc_port"),
        ({"DSPY_INFRA_DURABLE": "maybe"}, "durable"),
        ({"DSPY_INFRA_BACKEND": "k8s"}, "backend"),
        ({"DSPY_INFRA_RETENTION": "0"}, "retention"),
        ({"DSPY_INFRA_SLURM": "rest"}, "slurm"),
    ],
)
def test_bad_values_name_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env=env)
    assert field in str(err.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, "grpc_port = = 1\n")
    with pytest.raises(ConfigError, match="dspy-infra.toml"):
        load_settings(cfg, env={})


def test_tables_for_classes_and_services(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        "[task_classes.embed]\nmax_concurrency = 4\n[services.redis]\nimage = 'redis:7'\n",
    )
    s = load_settings(cfg, env={})
    assert s.task_classes == {"embed": {"max_concurrency": 4}}
    assert s.services["redis"]["image"] == "redis:7"


def test_docker_host_falls_back_to_docker_host_variable() -> None:
    assert load_settings(env={"DOCKER_HOST": "unix:///x.sock"}).docker_host == "unix:///x.sock"
    env = {"DOCKER_HOST": "unix:///x.sock", "DSPY_INFRA_DOCKER_HOST": "unix:///y.sock"}
    assert load_settings(env=env).docker_host == "unix:///y.sock"


def test_owner_is_stable_per_home(tmp_path: Path) -> None:
    a = load_settings(env={}, home=str(tmp_path / "a"))
    b = load_settings(env={}, home=str(tmp_path / "b"))
    assert a.resolved_owner() == load_settings(env={}, home=str(tmp_path / "a")).resolved_owner()
    assert a.resolved_owner() != b.resolved_owner()


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ("grpc_port = 1.5\n", "grpc_port"),
        ("grpc_port = true\n", "grpc_port"),
        ('grpc_port = "50052"\n', "grpc_port"),
        ("retention = 2.0\n", "retention"),
        ("commit_interval = inf\n", "commit_interval"),
        ("commit_interval = nan\n", "commit_interval"),
        ("commit_interval = -1\n", "commit_interval"),
        ("commit_interval = 5.0\n", "commit_interval"),
        ("limiter_interval = 1e300\n", "limiter_interval"),
        ("shutdown_grace = inf\n", "shutdown_grace"),
        ("handler_grace = 0\n", "handler_grace"),
        ('durable = "yes"\n', "durable"),
        ("durable = 1\n", "durable"),
        ("host = 5\n", "host"),
        ("max_payload_bytes = 1e9\n", "max_payload_bytes"),
        ("max_payload_bytes = 100000000000\n", "max_payload_bytes"),
    ],
)
def test_toml_values_are_type_and_range_checked(tmp_path: Path, toml: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, toml), env={})
    assert field in str(err.value) and err.value.fix


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("GRPC_PORT", "1.5"),
        ("RETENTION", "1e3"),
        ("COMMIT_INTERVAL", "inf"),
        ("COMMIT_INTERVAL", "nan"),
        ("SHUTDOWN_GRACE", "-3"),
        ("DURABLE", "2"),
    ],
)
def test_environment_values_are_type_and_range_checked(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env={f"DSPY_INFRA_{var}": value})
    assert var.lower() in str(err.value).lower()


def test_environment_values_still_parse() -> None:
    s = load_settings(
        env={
            "DSPY_INFRA_GRPC_PORT": " 50060 ",
            "DSPY_INFRA_DURABLE": "off",
            "DSPY_INFRA_COMMIT_INTERVAL": "0.01",
        }
    )
    assert (s.grpc_port, s.durable, s.commit_interval) == (50060, False, 0.01)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"commit_interval": float("inf")}, "commit_interval"),
        ({"shutdown_grace": float("nan")}, "shutdown_grace"),
        ({"grpc_port": 1.5}, "grpc_port"),
        ({"durable": "false"}, "durable"),
        ({"retention": True}, "retention"),
    ],
)
def test_arguments_are_checked_like_files(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, **kwargs)
    assert field in str(err.value)


def test_home_that_is_a_file_names_home_and_the_fix(tmp_path: Path) -> None:
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, home=a_file)
    assert err.value.field == "home" and "not a directory" in str(err.value) and err.value.fix
    with pytest.raises(ConfigError, match="home"):
        load_settings(env={"DSPY_INFRA_HOME": str(a_file)})


@given(
    name=st.sampled_from(
        [
            "GRPC_PORT",
            "RETENTION",
            "MAX_PAYLOAD_BYTES",
            "COMMIT_INTERVAL",
            "SHUTDOWN_GRACE",
            "DURABLE",
            "HOME",
        ]
    ),
    value=st.text(max_size=12)
    | st.from_regex(r"-?[0-9]{1,25}(\.[0-9]{0,4})?(e[+-]?[0-9]{1,4})?", fullmatch=True),
)
def test_any_environment_value_is_a_valid_setting_or_a_named_error(name: str, value: str) -> None:
    try:
        settings = load_settings(env={f"DSPY_INFRA_{name}": value})
    except ConfigError as exc:
        assert name.lower() in str(exc).lower()
        return
    field = name.lower()
    got = getattr(settings, field)
    if field in ("commit_interval", "shutdown_grace"):
        assert isinstance(got, float) and math.isfinite(got) and got > 0
    elif field in ("grpc_port", "retention", "max_payload_bytes"):
        assert type(got) is int
    elif field == "durable":
        assert type(got) is bool
