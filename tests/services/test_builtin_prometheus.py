"""The built-in ``prometheus`` service scrapes the server's ``/metrics`` wherever it bound.

Its config finds targets through ``targets/*.json``, which a server rewrites at each start
(``services/prometheus.py``); a real Prometheus (Debian's binary, on the process backend)
started through the catalog must then report the server's job ``up``; on Docker and Podman
too (``test_the_builtin_prometheus_scrapes_the_server_from_a_container``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import aiohttp
import anyio
import pytest
from _rpc_support import in_process_server
from engines import (
    Engine,
    docker_engine,
    engine,
    engine_kind,
    engine_settings,
    podman_engine,
    prometheus_image,
    skip_or_fail,
)

from dspy_infra.config import Settings
from dspy_infra.services.prometheus import scrape_address, write_config, write_scrape_target

__all__ = ["docker_engine", "engine", "engine_kind", "podman_engine"]  # fixtures, imported on purpose

# What versions before the targets directory wrote, with the port setting of the time.
_OLD = (
    "# Written by dspy_infra; edit freely (it is not overwritten).\n"
    "global:\n  scrape_interval: 15s\n"
    "scrape_configs:\n"
    "  - job_name: prometheus\n    static_configs:\n      - targets: ['127.0.0.1:9090']\n"
    "  - job_name: dspy_infra\n    static_configs:\n"
    "      - targets: ['127.0.0.1:{port}']\n"
)


@pytest.mark.parametrize("port", [0, 9097])
def test_an_unedited_old_config_is_replaced_and_an_edited_one_kept(tmp_path: Path, port: int) -> None:
    settings = Settings(home=tmp_path / "home")
    config = settings.resolved_home() / "prometheus" / "prometheus.yml"
    config.parent.mkdir(parents=True)
    config.write_text(_OLD.format(port=port))
    assert write_config(settings) == config
    text = config.read_text()
    assert "file_sd_configs" in text and "127.0.0.1:9090" not in text
    edited = text + "  - job_name: mine\n    static_configs:\n      - targets: ['db:9187']\n"
    config.write_text(edited)
    write_config(settings)
    assert config.read_text() == edited
    config.write_text(_OLD.format(port=port) + "# mine\n")  # edited after all: kept
    write_config(settings)
    assert config.read_text().endswith("# mine\n")


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1:9097"),
        ("0.0.0.0", "127.0.0.1:9097"),
        ("::", "[::1]:9097"),
        ("::1", "[::1]:9097"),
        ("10.1.2.3", "10.1.2.3:9097"),
        ("infra.example.com", "infra.example.com:9097"),
    ],
)
def test_scrape_address_is_what_prometheus_can_dial(host: str, address: str) -> None:
    assert scrape_address(host, 9097) == address


def test_a_scrape_target_file_is_replaced_whole(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    path = write_scrape_target(settings, "dspy_infra", "127.0.0.1:1", scheme="https")
    path = write_scrape_target(settings, "dspy_infra", "127.0.0.1:2")
    assert json.loads(path.read_text()) == [{"targets": ["127.0.0.1:2"], "labels": {"__scheme__": "http"}}]
    assert [p.name for p in path.parent.iterdir()] == ["dspy_infra.json"]  # no temporary left


async def _scrapes_the_server(home: Path, **overrides: object) -> None:
    """Start the catalog's ``prometheus`` beside a server; its ``dspy_infra`` job must be up."""
    async with in_process_server(home, **overrides) as (infra, server):
        target = json.loads((home / "prometheus" / "targets" / "dspy_infra.json").read_text())
        assert target[0]["targets"] == [f"127.0.0.1:{server.http_port}"]
        await infra.ensure_services(["prometheus"])
        host, port = infra.services.endpoint("prometheus")
        base = f"http://{host}:{port}"
        seen: list[dict[str, object]] = []
        async with aiohttp.ClientSession() as session:
            # The first scrape comes within one scrape interval (15 s) of discovery.
            with anyio.fail_after(60):
                while True:
                    async with session.get(f"{base}/api/v1/targets") as resp:
                        seen = (await resp.json())["data"]["activeTargets"]
                    if [t["health"] for t in seen] == ["up"]:
                        break
                    await anyio.sleep(0.5)
            async with session.get(f"{base}/api/v1/query", params={"query": 'up{job="dspy_infra"}'}) as resp:
                up = (await resp.json())["data"]["result"]
    assert seen[0]["scrapeUrl"] == f"http://127.0.0.1:{server.http_port}/metrics"
    assert [float(series["value"][1]) for series in up] == [1.0]


async def test_the_builtin_prometheus_scrapes_the_server_on_its_free_port(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        skip_or_fail("the prometheus binary is absent (apt-get install prometheus)")
    await _scrapes_the_server(tmp_path / "state")


async def test_the_builtin_prometheus_scrapes_the_server_from_a_container(
    engine: Engine, tmp_path: Path
) -> None:
    """The same on Docker and Podman, from an image shaped like the official one (its own
    ENTRYPOINT, run as nobody): the catalog's spec clears the entrypoint, mounts the state's
    ``prometheus`` directory at the same path, runs as the caller and joins the host's network,
    where the server listens on loopback. Before, the container could not start (its command
    went to the image's entrypoint, its config was not there) and could not reach the server."""
    image = prometheus_image(engine)
    names = engine_settings(tmp_path)
    home = tmp_path / "state"
    await _scrapes_the_server(
        home,
        backend="docker",
        docker_host=engine.host,
        network=names.network,
        owner=names.owner,
        services={"prometheus": {"image": image}},
    )
    # What it wrote in the state directory is the caller's, so the user can remove it.
    written = [p for p in (home / "prometheus" / "data").rglob("*")]
    assert written and {p.stat().st_uid for p in written} == {os.getuid()}
