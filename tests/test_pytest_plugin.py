"""The pytest plugin, exercised with `pytester` in real pytest subprocesses.

The service is real: a small Python HTTP server run by the process backend on a free port.
Its command line carries a per-test token, so "nothing left behind" is checked by scanning
/proc for that token, and it appends its pid to a file on start, so "started once" is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiodocker
import attrs
import pytest
from engines import Engine, docker_engine, engine, engine_kind, podman_engine, unique_name  # noqa: F401  (fixtures, used by name)
from harness import processes_with
from hypothesis import given, settings
from hypothesis import strategies as st

from dspy_infra.ownership import pid_alive
from dspy_infra.pytest_plugin import ServiceEndpoint, _Coordinator

pytest_plugins = ["pytester"]

SERVICE_SCRIPT = """
import http.server, os, sys
port, token, pidfile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(pidfile, "a") as fh:
    fh.write(f"{os.getpid()}\\n")
http.server.ThreadingHTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler).serve_forever()
"""

CONFTEST = f"""
import os, sys
import pytest
from dspy_infra import HealthCheck, PortMapping, ServiceSpec

PORT = int(os.environ["WEB_PORT"])
SCRIPT = {SERVICE_SCRIPT!r}

@pytest.fixture(scope="session")
def infra_service_specs():
    return [
        ServiceSpec(
            name="web",
            command=[sys.executable, "-c", SCRIPT, str(PORT), os.environ["WEB_TOKEN"], os.environ["WEB_PIDFILE"]],
            ports=[PortMapping(container_port=PORT)],
            health=HealthCheck(kind="http", path="/", startup_timeout=20),
        )
    ]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def assert_nothing_left(token: str, port: int) -> None:
    # The backend stops the process group; PID 1 may reap it a moment later (zombies are ignored).
    deadline = time.monotonic() + 5
    while (processes_with(token) or port_open(port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(token) == []
    assert not port_open(port)


@attrs.frozen
class Web:
    """The test service the conftest declares: where it listens, its marker, its pid file."""

    port: int
    token: str
    pidfile: Path


@pytest.fixture
def web(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[Web]:
    port, token = free_port(), f"dspy-plugin-test-{uuid.uuid4().hex}"
    pidfile = pytester.path / "service-pids.txt"
    monkeypatch.setenv("WEB_PORT", str(port))
    monkeypatch.setenv("WEB_TOKEN", token)
    monkeypatch.setenv("WEB_PIDFILE", str(pidfile))
    pytester.makeconftest(CONFTEST)
    yield Web(port, token, pidfile)
    for pid in processes_with(token):  # never leave a leak to the next test, even on failure
        os.kill(pid, 9)


def started_pids(pidfile: Path) -> list[str]:
    return pidfile.read_text().split() if pidfile.exists() else []


def test_infra_fixture_marker_and_factory(pytester: pytest.Pytester, web: Web) -> None:
    pytester.makepyfile(
        f"""
        import urllib.request
        import pytest

        @pytest.mark.infra_services("web")
        def test_marker_starts_the_service(infra_endpoints):
            ep = infra_endpoints["web"]
            assert (ep.host, ep.port) == ("127.0.0.1", {web.port})
            assert ep.ports == {{{web.port}: {web.port}}}
            with urllib.request.urlopen(f"http://{{ep.address}}/") as resp:
                assert resp.status == 200
            # The same handle as infra.services["web"]: a URL from its http health check.
            from dspy_infra.services.handles import ServiceHandle
            assert isinstance(ep, ServiceHandle) and str(ep.status) == "healthy"
            assert ep.url == f"http://127.0.0.1:{web.port}" == ep.get_connection_url()

        def test_factory_returns_the_same_endpoint(infra_service):
            assert infra_service("web").port == {web.port}

        def test_infra_runs_tasks(infra):
            infra.submit_task("t1", "cpu_short", {{"handler": "exec", "cmd": "echo plugin"}})
            result = infra.wait("t1", timeout=30)
            assert str(result.status) == "completed"
            assert "plugin" in result.result["stdout"]

        def test_unmarked_tests_get_no_endpoints(infra_endpoints):
            assert infra_endpoints == {{}}
        """
    )
    result = pytester.runpytest_subprocess("--infra-backend", "process", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    assert len(started_pids(web.pidfile)) == 1
    assert_nothing_left(web.token, web.port)


def test_markers_are_registered_and_options_shown(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["*infra_services(*names)*"])
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*--infra-backend*", "*--infra-reuse*"])


def test_bad_marker_argument_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.infra_services(42)
        def test_x():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*service names must be non-empty strings, got 42*"])


def test_ctrl_c_mid_session_leaves_nothing_behind(pytester: pytest.Pytester, web: Web) -> None:
    pytester.makepyfile(
        """
        import os, signal
        import pytest

        @pytest.mark.infra_services("web")
        def test_interrupted(infra_endpoints, infra):
            os.kill(os.getpid(), signal.SIGINT)

        def test_never_runs():
            pass
        """
    )
    result = pytester.runpytest_subprocess("--infra-backend", "process", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert len(started_pids(web.pidfile)) == 1
    assert_nothing_left(web.token, web.port)


def test_xdist_workers_share_one_service(pytester: pytest.Pytester, web: Web) -> None:
    pytester.makepyfile(
        f"""
        import os, time, urllib.request
        import pytest

        @pytest.mark.infra_services("web")
        @pytest.mark.parametrize("n", range(4))
        def test_uses_web(infra_endpoints, n):
            ep = infra_endpoints["web"]
            with urllib.request.urlopen(f"http://{{ep.address}}/") as resp:
                assert resp.status == 200
            with open(os.path.join({str(web.pidfile.parent)!r}, "workers.txt"), "a") as fh:
                fh.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
            time.sleep(0.5)  # keep both workers busy at once
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "--infra-backend", "process", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    workers = set((pytester.path / "workers.txt").read_text().split())
    assert workers == {"gw0", "gw1"}
    assert len(started_pids(web.pidfile)) == 1
    assert_nothing_left(web.token, web.port)


def test_reuse_keeps_the_service_for_the_next_run(pytester: pytest.Pytester, web: Web) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.infra_services("web")
        def test_uses_web(infra_endpoints):
            assert infra_endpoints["web"].port > 0
        """
    )
    args = ("--infra-backend", "process", "--infra-reuse", "-p", "no:cacheprovider")
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    assert port_open(web.port)
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    assert len(started_pids(web.pidfile)) == 1  # adopted by spec hash, not started again
    # A run without --infra-reuse adopts it too, and then stops it.
    pytester.runpytest_subprocess("--infra-backend", "process", "-p", "no:cacheprovider").assert_outcomes(
        passed=1
    )
    assert_nothing_left(web.token, web.port)


# -- the coordination primitives, in-process --------------------------------------------------


@given(
    st.text(min_size=1, max_size=20),
    st.sampled_from(["127.0.0.1", "::1", "localhost"]),
    st.integers(1, 65535),
    st.dictionaries(st.integers(1, 65535), st.integers(1, 65535), max_size=4),
)
def test_endpoint_json_round_trips(name: str, host: str, port: int, ports: dict[int, int]) -> None:
    endpoint = ServiceEndpoint(name=name, host=host, port=port, ports=ports)
    doc = json.loads(json.dumps(endpoint.to_json()))
    assert ServiceEndpoint.from_json(name, doc) == endpoint


@given(st.integers(2, 4), st.integers(1, 15))
@settings(max_examples=15, deadline=None)
def test_coordinator_lock_loses_no_update(
    tmp_path_factory: pytest.TempPathFactory, threads: int, rounds: int
) -> None:
    # Each thread opens the lock file itself, so flock excludes the threads from each other
    # exactly as it excludes xdist workers.
    coordinator = _Coordinator(tmp_path_factory.mktemp("coord"))

    def bump() -> None:
        for _ in range(rounds):
            with coordinator.locked() as state:
                count = state.get("count", 0)
                time.sleep(0)  # invite a race
                state["count"] = count + 1

    workers = [threading.Thread(target=bump) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    with coordinator.locked() as state:
        assert state["count"] == threads * rounds
        assert state["services"] == {}


def test_dead_pids_are_not_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert pid_alive(os.getpid())
    assert not pid_alive(proc.pid)


# -- container engines ------------------------------------------------------------------------

ENGINE_CONFTEST = """
import os
import pytest
from dspy_infra import HealthCheck, PortMapping, ServiceSpec

@pytest.fixture(scope="session")
def infra_config():
    return {"docker_host": os.environ["ENGINE_HOST"], "network": os.environ["ENGINE_NETWORK"]}

@pytest.fixture(scope="session")
def infra_service_specs():
    return [
        ServiceSpec(
            name="cache",
            image=os.environ["ENGINE_IMAGE"],
            ports=[PortMapping(container_port=6379, host_port=0)],
            health=HealthCheck(kind="redis", startup_timeout=30),
            labels={"test_token": os.environ["ENGINE_TOKEN"]},
        )
    ]
"""


def _containers(host: str, token: str) -> list[str]:
    async def listing() -> list[str]:
        async with aiodocker.Docker(url=host) as docker:
            found = await docker.containers.list(all=True, filters={"label": [f"test_token={token}"]})
            return [c.id for c in found]

    return asyncio.run(listing())


def _remove_network(host: str, name: str) -> None:
    async def remove() -> None:
        async with aiodocker.Docker(url=host) as docker:
            with contextlib.suppress(aiodocker.DockerError):
                await (await docker.networks.get(name)).delete()

    asyncio.run(remove())


def test_ctrl_c_leaves_no_container_behind(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    engine: Engine,  # noqa: F811  (the fixture imported above)
) -> None:
    token, network = f"dspy-plugin-{uuid.uuid4().hex[:10]}", unique_name("net")
    for key, value in {
        "ENGINE_HOST": engine.host,
        "ENGINE_NETWORK": network,
        "ENGINE_IMAGE": engine.images.redis,
        "ENGINE_TOKEN": token,
    }.items():
        monkeypatch.setenv(key, value)
    pytester.makeconftest(ENGINE_CONFTEST)
    pytester.makepyfile(
        """
        import os, signal, socket
        import pytest

        @pytest.mark.infra_services("cache")
        def test_interrupted(infra_endpoints):
            ep = infra_endpoints["cache"]
            with socket.create_connection((ep.host, ep.port), timeout=5) as s:
                s.sendall(b"PING\\r\\n")
                assert s.recv(16) == b"+PONG\\r\\n"
            with open("endpoint.txt", "w") as fh:
                fh.write(str(ep.port))
            os.kill(os.getpid(), signal.SIGINT)
        """
    )
    try:
        result = pytester.runpytest_subprocess("--infra-backend", "docker", "-p", "no:cacheprovider")
        assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()
        port = int((pytester.path / "endpoint.txt").read_text())  # the test really reached Redis
        assert _containers(engine.host, token) == []
        assert not port_open(port)
    finally:
        for container in _containers(engine.host, token):  # never leak into the shared engine
            subprocess.run(
                ["docker", "-H", engine.host, "rm", "-f", container], capture_output=True, check=False
            )
        _remove_network(engine.host, network)


def test_a_service_that_fails_to_start_errors_clearly(pytester: pytest.Pytester) -> None:
    port = free_port()
    pytester.makeconftest(
        f"""
        import sys
        import pytest
        from dspy_infra import HealthCheck, PortMapping, RestartPolicy, ServiceSpec

        @pytest.fixture(scope="session")
        def infra_service_specs():
            return [
                ServiceSpec(
                    name="broken",
                    command=[sys.executable, "-c", "print('boom: no config', flush=True); raise SystemExit(3)"],
                    ports=[PortMapping(container_port={port})],
                    health=HealthCheck(kind="tcp", startup_timeout=5),
                    restart=RestartPolicy(mode="no"),
                )
            ]
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.infra_services("broken")
        def test_one():
            pass

        @pytest.mark.infra_services("broken")
        def test_two():
            pass

        def test_unaffected():
            pass
        """
    )
    result = pytester.runpytest_subprocess("--infra-backend", "process", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=2)
    text = result.stdout.str()
    assert "service 'broken' did not become healthy" in text
    assert "boom: no config" in text  # the service's last log lines are in the error
    assert "Traceback" not in text.split("short test summary")[-1]
