"""One contract every backend keeps, run unchanged against the local-process backend, a real
Docker Engine and real Podman: run, probe, logs, stats, exec, stop, inspect an exited
instance, adopt through ``list_instances`` by labels, reap with ``remove``.

Each backend differs only in how a service is *spelled* (an image + in-container port, or a
host command + host port), which the ``Target`` below captures; every assertion is shared.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import attrs
import pytest
from engines import (
    Engine,
    docker_engine,
    engine_settings,
    free_port,
    podman_engine,
    unique_name,
    which_or_skip,
)

from dspy_infra.backends.base import LABEL_OWNER, LABEL_SERVICE, LABEL_SPEC_HASH, Backend
from dspy_infra.backends.docker import DockerBackend
from dspy_infra.backends.process import ProcessBackend
from dspy_infra.errors import NotFound
from dspy_infra.models import Instance, LogEntry, PortMapping, ServiceSpec

__all__ = ["docker_engine", "podman_engine"]  # fixtures this module uses, imported on purpose

# Requesting anyio_backend up front keeps anyio's plugin from re-creating these items at
# collection finish, which would drop the backend parametrization.
pytestmark = pytest.mark.usefixtures("anyio_backend")

# The service every backend runs: prints one line to each stream, serves HTTP, and on
# SIGTERM says so and exits 0 (so a graceful stop is observable).
_SERVE = (
    "echo out-line; echo err-line >&2; {httpd} -f -p {port} -h {root} & child=$!; "
    'trap "echo stopping; kill $child; exit 0" TERM; wait'
)


@attrs.frozen
class Target:
    """A backend under test and how a service is spelled on it."""

    kind: str
    backend: Backend
    owner: str
    image: str = ""
    web_root: str = "/www"

    def labels(self, service: str) -> dict[str, str]:
        return {LABEL_OWNER: self.owner, LABEL_SERVICE: service, LABEL_SPEC_HASH: "contract"}

    def web_spec(self, name: str) -> tuple[ServiceSpec, int]:
        """An HTTP service; returns it and the port to probe (container or host port)."""
        if self.kind == "process":
            busybox = which_or_skip("busybox")
            port = free_port()
            command = _SERVE.format(httpd=f"{busybox} httpd", port=f"127.0.0.1:{port}", root=self.web_root)
            return ServiceSpec(
                name=name, command=["sh", "-c", command], ports=[PortMapping(port, port)]
            ), port
        command = _SERVE.format(httpd="httpd", port="8080", root=self.web_root)
        return ServiceSpec(
            name=name, image=self.image, command=["sh", "-c", command], ports=[PortMapping(8080, 0)]
        ), 8080

    def script_spec(self, name: str, script: str) -> ServiceSpec:
        """A one-shot shell script."""
        if self.kind == "process":
            return ServiceSpec(name=name, command=["sh", "-c", script], one_shot=True)
        return ServiceSpec(name=name, image=self.image, command=["sh", "-c", script], one_shot=True)


@pytest.fixture(params=["process", "docker", "podman"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def engine_for_kind(backend_kind: str, request: pytest.FixtureRequest) -> Engine | None:
    """The engine (sync fixture, so session setup happens outside any running loop)."""
    if backend_kind == "process":
        return None
    return request.getfixturevalue(f"{backend_kind}_engine")


@pytest.fixture
async def target(backend_kind: str, engine_for_kind: Engine | None, tmp_path: Path) -> AsyncIterator[Target]:
    settings = engine_settings(tmp_path)
    owner = settings.resolved_owner()
    backend: Backend
    if backend_kind == "process":
        web_root = tmp_path / "www"
        web_root.mkdir()
        (web_root / "index.html").write_text("ok\n")
        backend, image, root = ProcessBackend(settings), "", str(web_root)
    else:
        assert engine_for_kind is not None
        backend = DockerBackend(settings, host=engine_for_kind.host)
        image, root = engine_for_kind.images.busybox, "/www"
    async with backend:
        try:
            yield Target(kind=backend_kind, backend=backend, owner=owner, image=image, web_root=root)
        finally:
            # Reap everything this test's owner created, then the test network.
            for instance in await backend.list_instances({LABEL_OWNER: owner}):
                await backend.stop(instance.id, timeout=1)
                await backend.remove(instance.id)
            if isinstance(backend, DockerBackend):
                try:
                    await (await backend.docker.networks.get(backend.network)).delete()
                except Exception:
                    pass


async def _start(target: Target, spec: ServiceSpec) -> Instance:
    await target.backend.prepare([spec])
    return await target.backend.run(
        spec, instance_name=unique_name(spec.name), labels=target.labels(spec.name)
    )


async def _http_get(host: str, port: int, *, within: float = 15.0) -> str:
    """GET / until the service answers (a real probe over TCP), returning the body."""
    last: Exception | None = None
    with anyio.move_on_after(within):
        while True:
            try:
                async with await anyio.connect_tcp(host, port) as stream:
                    await stream.send(f"GET /index.html HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                    data = b""
                    with anyio.fail_after(5):
                        async for chunk in stream:
                            data += chunk
                if b" 200 " in data.split(b"\r\n", 1)[0] + b" ":
                    return data.split(b"\r\n\r\n", 1)[1].decode()
                last = RuntimeError(data[:200].decode(errors="replace"))
            except (OSError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                last = exc
            await anyio.sleep(0.05)
    raise AssertionError(f"no HTTP answer from {host}:{port} within {within}s: {last!r}")


async def _collect(logs: AsyncIterator[LogEntry], *, within: float = 15.0) -> list[LogEntry]:
    out: list[LogEntry] = []
    with anyio.fail_after(within):
        async for entry in logs:
            out.append(entry)
    return out


async def _wait_exited(backend: Backend, instance_id: str, *, within: float = 15.0) -> Instance:
    with anyio.fail_after(within):
        while True:
            instance = await backend.inspect(instance_id)
            if instance.state == "exited":
                return instance
            await anyio.sleep(0.05)


async def test_run_answers_probe_and_carries_labels(target: Target) -> None:
    spec, port = target.web_spec(unique_name("web"))
    before = time.time()
    instance = await _start(target, spec)
    assert instance.state == "running"
    assert instance.labels.items() >= target.labels(spec.name).items()
    assert before - 2 <= instance.started_at <= time.time() + 2
    host, host_port = target.backend.probe_address(instance, port)
    assert await _http_get(host, host_port) == "ok\n"
    again = await target.backend.inspect(instance.id)
    assert (again.id, again.state, again.ports) == (instance.id, "running", instance.ports)


async def test_logs_tag_streams_and_honour_tail_and_since(target: Target) -> None:
    spec, port = target.web_spec(unique_name("logs"))
    instance = await _start(target, spec)
    await _http_get(*target.backend.probe_address(instance, port))
    entries: list[LogEntry] = []
    with anyio.fail_after(15):
        while not {"out-line", "err-line"} <= {e.message for e in entries}:
            entries = await _collect(target.backend.logs(instance.id, service_name=spec.name))
            await anyio.sleep(0.05)
    streams = {e.message: e.stream for e in entries}
    assert streams["out-line"] == "stdout" and streams["err-line"] == "stderr"
    assert all(e.service_name == spec.name and e.instance_id == instance.id for e in entries)
    tail = await _collect(target.backend.logs(instance.id, service_name=spec.name, tail=1))
    assert len(tail) <= 1 and len(tail) < len(entries)
    future = await _collect(
        target.backend.logs(instance.id, service_name=spec.name, since=time.time() + 3600)
    )
    assert future == []


async def test_follow_streams_until_exit(target: Target) -> None:
    script = "for i in 1 2 3; do echo line$i; sleep 0.2; done; echo done >&2"
    spec = target.script_spec(unique_name("follow"), script)
    instance = await _start(target, spec)
    entries = await _collect(target.backend.logs(instance.id, service_name=spec.name, follow=True))
    assert [e.message for e in entries if e.stream == "stdout"] == ["line1", "line2", "line3"]
    assert [e.message for e in entries if e.stream == "stderr"] == ["done"]
    stamps = [e.timestamp for e in entries]
    assert stamps == sorted(stamps)


async def test_exited_instance_reports_exit_code(target: Target) -> None:
    spec = target.script_spec(unique_name("oneshot"), "echo bye; exit 3")
    instance = await _start(target, spec)
    exited = await _wait_exited(target.backend, instance.id)
    assert exited.exit_code == 3
    assert exited.labels.items() >= target.labels(spec.name).items()
    logs = await _collect(target.backend.logs(instance.id, service_name=spec.name))
    assert [e.message for e in logs] == ["bye"]


async def test_stats_and_exec(target: Target) -> None:
    spec, port = target.web_spec(unique_name("stats"))
    instance = await _start(target, spec)
    await _http_get(*target.backend.probe_address(instance, port))
    usage = await target.backend.stats(instance.id)
    assert usage.memory_bytes > 0
    assert usage.cpu_percent >= 0.0
    result = await target.backend.exec(instance.id, ["sh", "-c", "echo from-exec; echo to-err >&2; exit 7"])
    assert result.exit_code == 7
    assert "from-exec" in result.output
    ok = await target.backend.exec(instance.id, ["true"])
    assert ok.exit_code == 0


async def test_stop_is_graceful_and_idempotent(target: Target) -> None:
    spec, port = target.web_spec(unique_name("stop"))
    instance = await _start(target, spec)
    await _http_get(*target.backend.probe_address(instance, port))
    started = time.perf_counter()
    await target.backend.stop(instance.id, timeout=10)
    # The TERM handler ran (exit 0, logged) well before the kill timeout.
    assert time.perf_counter() - started < 8
    stopped = await _wait_exited(target.backend, instance.id)
    assert stopped.exit_code == 0
    await target.backend.stop(instance.id, timeout=1)  # again: no error
    logs = await _collect(target.backend.logs(instance.id, service_name=spec.name))
    assert "stopping" in [e.message for e in logs]


async def test_adopt_by_labels_then_reap(target: Target, tmp_path: Path) -> None:
    spec, port = target.web_spec(unique_name("adopt"))
    instance = await _start(target, spec)
    other_spec = target.script_spec(unique_name("other"), "sleep 30")
    other = await target.backend.run(
        other_spec,
        instance_name=unique_name("other"),
        labels={**target.labels(other_spec.name), LABEL_OWNER: target.owner + "-someone-else"},
    )
    try:
        mine = await target.backend.list_instances({LABEL_OWNER: target.owner})
        assert [i.id for i in mine] == [instance.id]
        by_service = await target.backend.list_instances(
            {LABEL_OWNER: target.owner, LABEL_SERVICE: spec.name}
        )
        assert [i.id for i in by_service] == [instance.id]
        assert await target.backend.list_instances({LABEL_OWNER: target.owner, LABEL_SERVICE: "nope"}) == []
        # Adopt: what is found by labels is the live instance, still answering.
        adopted = mine[0]
        assert adopted.state == "running"
        assert await _http_get(*target.backend.probe_address(adopted, port)) == "ok\n"
        # Reap: stop + remove leaves nothing; removing twice is fine; inspect says NotFound.
        await target.backend.stop(adopted.id, timeout=5)
        await target.backend.remove(adopted.id)
        await target.backend.remove(adopted.id)
        with pytest.raises(NotFound):
            await target.backend.inspect(adopted.id)
        assert await target.backend.list_instances({LABEL_OWNER: target.owner}) == []
        # The other owner's instance was never touched.
        assert (await target.backend.inspect(other.id)).state == "running"
    finally:
        await target.backend.stop(other.id, timeout=1)
        await target.backend.remove(other.id)
