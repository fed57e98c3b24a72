"""Real container engines for tests: where they are, backends on them, and test images.

Engines are started by ``bash scripts/engines.sh start`` and found at well-known sockets
(override with ``DSPY_INFRA_TEST_DOCKER_HOST`` / ``DSPY_INFRA_TEST_PODMAN_HOST``; the local
registry at ``DSPY_INFRA_TEST_REGISTRY``). A missing engine is ``skip_or_fail``: a skip
locally, a failure in CI.

No registry is reachable, so images are built through the engine's own API (``POST /build``
of a ``FROM scratch`` tar context) from host binaries:

- ``busybox``: Debian's static ``/bin/busybox`` with applet links (``sh``, ``httpd``, ``nc``...);
- ``busybox-health``: the same with an image HEALTHCHECK (healthy once ``/tmp/ready`` exists);
- ``redis``: ``/usr/bin/redis-server`` plus every library ``ldd`` lists and the loader.

Tags carry a hash of the build context, so repeated sessions reuse what is already built.

Test modules import the fixtures they use by name (``from engines import docker_engine,
engine_backend, ...``): they are plain pytest fixtures, found in the importing module.
``docker_engine`` / ``podman_engine`` / ``registry`` are session-scoped and synchronous (so
no event loop is shared between tests); ``docker_backend`` / ``podman_backend`` /
``engine_backend`` (both engines in turn) open a ``DockerBackend`` per test with its own
network and owner, and remove what the test left behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlparse

import aiodocker
import attrs
import pytest

from dspy_infra.backends.base import LABEL_OWNER
from dspy_infra.backends.docker import DockerBackend
from dspy_infra.config import Settings

#: CI sets DSPY_INFRA_REQUIRE_ENGINES=1: a test that would skip for a missing engine fails.
REQUIRE_ENGINES = os.environ.get("DSPY_INFRA_REQUIRE_ENGINES") == "1"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip with ``reason`` locally; fail under DSPY_INFRA_REQUIRE_ENGINES=1 (CI), so a missing
    engine or binary never hides."""
    if REQUIRE_ENGINES:
        pytest.fail(f"DSPY_INFRA_REQUIRE_ENGINES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


__all__ = [
    "ENGINE_KINDS",
    "REQUIRE_ENGINES",
    "Engine",
    "TestImages",
    "build_context",
    "build_image",
    "docker_backend",
    "docker_engine",
    "engine",
    "engine_backend",
    "engine_host",
    "engine_kind",
    "engine_settings",
    "ensure_test_images",
    "free_port",
    "image_build_contexts",
    "podman_backend",
    "podman_engine",
    "registry",
    "registry_address",
    "skip_or_fail",
    "unique_name",
    "which_or_skip",
]

ENGINE_KINDS = ("docker", "podman")
_DEFAULT_HOSTS = {
    "docker": "unix:///run/dspy-test/docker.sock",
    "podman": "unix:///run/dspy-test/podman.sock",
}
BUSYBOX = "/bin/busybox"
REDIS_SERVER = "/usr/bin/redis-server"
_APPLETS = ("sh", "httpd", "nc", "sleep", "echo", "cat", "test", "touch", "wget", "ls", "kill", "true")


def _host_for(kind: str) -> str:
    return os.environ.get(f"DSPY_INFRA_TEST_{kind.upper()}_HOST") or _DEFAULT_HOSTS[kind]


def _ping(address: str, timeout: float = 2.0) -> bool:
    """A synchronous GET /_ping (usable before any event loop exists)."""
    url = urlparse(address)
    try:
        if url.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(url.path)
        elif url.scheme in ("tcp", "http"):
            sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 2375), timeout)
        else:
            return False
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: engine\r\n\r\n")
            reply = sock.recv(4096)
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0] + b" "
    except OSError:
        return False


def engine_host(kind: str) -> str:
    """The address of the ``kind`` engine if it answers, else ``skip_or_fail`` with how to start it."""
    if kind not in _DEFAULT_HOSTS:
        raise ValueError(f"unknown engine kind {kind!r}; use one of {ENGINE_KINDS}")
    address = _host_for(kind)
    if not _ping(address):
        skip_or_fail(
            f"no {kind} engine answers at {address} (start one: `bash scripts/engines.sh start`,"
            f" or set DSPY_INFRA_TEST_{kind.upper()}_HOST)"
        )
    return address


def registry_address() -> str:
    """``host:port`` of the local registry if it answers, else ``skip_or_fail``."""
    address = os.environ.get("DSPY_INFRA_TEST_REGISTRY") or "127.0.0.1:5000"
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2) as sock:
            sock.sendall(f"GET /v2/ HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            ok = b" 200 " in sock.recv(4096).split(b"\r\n", 1)[0] + b" "
    except OSError:
        ok = False
    if not ok:
        skip_or_fail(f"no registry answers at http://{address}/v2/ (start: `bash scripts/engines.sh start`)")
    return address


def free_port() -> int:
    """A TCP port that was free a moment ago (for services that need a fixed host port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique_name(prefix: str = "t") -> str:
    """A container/service name no other test run uses (runs overlap on shared engines)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------------------
# Images


@attrs.frozen
class TestImages:
    """Tags of the test images on one engine."""

    __test__ = False  # not a test class

    busybox: str
    busybox_health: str
    redis: str


def _shared_libraries(binary: str) -> list[str]:
    """Absolute paths of everything ``ldd`` lists for ``binary`` (the loader included)."""
    out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    paths = re.findall(r"(/\S+)", out)
    return sorted({p for p in paths if Path(p).exists()})


def build_context(
    dockerfile: str, files: dict[str, str | bytes], links: dict[str, str] | None = None
) -> tuple[bytes, str]:
    """A tar build context: ``files`` maps path-in-context to a host path or content;
    ``links`` maps path-in-context to a symlink target. Returns ``(tar bytes, content hash)``."""
    digest = hashlib.sha256(dockerfile.encode())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
            digest.update(name.encode() + b"\0" + data)

        add("Dockerfile", dockerfile.encode())
        for name, source in sorted(files.items()):
            if isinstance(source, bytes):
                add(name, source)
            else:
                path = Path(source).resolve()
                add(name, path.read_bytes(), path.stat().st_mode & 0o777)
        for name, target in sorted((links or {}).items()):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
            digest.update(f"{name}->{target}".encode())
    return buffer.getvalue(), digest.hexdigest()[:16]


async def build_image(docker: aiodocker.Docker, repository: str, context: bytes, content_hash: str) -> str:
    """Build ``context`` as ``repository:content_hash`` through the engine API unless present."""
    tag = f"{repository}:{content_hash}"
    try:
        await docker.images.inspect(tag)
        return tag
    except aiodocker.DockerError as exc:
        if exc.status != 404:
            raise
    log = await docker.images.build(fileobj=io.BytesIO(context), encoding="identity", tag=tag, rm=True)
    errors = [m for m in log if "error" in m]
    if errors:
        raise RuntimeError(f"building {tag} failed: {json.dumps(errors)[:2000]}")
    await docker.images.inspect(tag)
    return tag


def _busybox_files() -> tuple[dict[str, str | bytes], dict[str, str]]:
    if not Path(BUSYBOX).exists():
        skip_or_fail(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    files: dict[str, str | bytes] = {
        "rootfs/bin/busybox": BUSYBOX,
        "rootfs/tmp/.keep": b"",
        "rootfs/www/index.html": b"ok\n",
    }
    links = {f"rootfs/bin/{applet}": "busybox" for applet in _APPLETS}
    return files, links


def image_build_contexts() -> dict[str, tuple[bytes, str]]:
    """Build contexts (tar bytes, content hash) of the test images, by repository name.
    Reads host files, so call it off the event loop (or before one runs)."""
    files, links = _busybox_files()
    health_dockerfile = (
        "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\n"
        'HEALTHCHECK --interval=1s --timeout=2s --retries=2 CMD ["test", "-f", "/tmp/ready"]\n'
        'CMD ["sh"]\n'
    )
    if not Path(REDIS_SERVER).exists():
        skip_or_fail(f"{REDIS_SERVER} is missing (apt-get install redis-server)")
    redis_files: dict[str, str | bytes] = {"rootfs" + REDIS_SERVER: REDIS_SERVER, "rootfs/data/.keep": b""}
    for library in _shared_libraries(REDIS_SERVER):
        redis_files["rootfs" + library] = library
    redis_dockerfile = (
        "FROM scratch\nCOPY rootfs/ /\nWORKDIR /data\n"
        f'CMD ["{REDIS_SERVER}", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", ""]\n'
    )
    return {
        "dspy-infra-test/busybox": build_context(
            'FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\nCMD ["sh"]\n', files, links
        ),
        "dspy-infra-test/busybox-health": build_context(health_dockerfile, files, links),
        "dspy-infra-test/redis": build_context(redis_dockerfile, redis_files),
    }


async def ensure_test_images(docker: aiodocker.Docker, contexts: dict[str, tuple[bytes, str]]) -> TestImages:
    """Build (or find) the busybox, busybox-with-HEALTHCHECK and Redis images on ``docker``."""
    tags = {repo: await build_image(docker, repo, *context) for repo, context in contexts.items()}
    return TestImages(
        busybox=tags["dspy-infra-test/busybox"],
        busybox_health=tags["dspy-infra-test/busybox-health"],
        redis=tags["dspy-infra-test/redis"],
    )


def prometheus_image(engine: Engine) -> str:
    """A Prometheus image built like the official one (``prom/prometheus``): the binary at
    ``/bin/prometheus`` as its ENTRYPOINT, run as ``nobody`` (65534), from Debian's binary
    and the libraries it links. Built on first use (50 MB), not with the session's images."""
    binary = shutil.which("prometheus")
    if binary is None:
        skip_or_fail("the prometheus binary is absent (apt-get install prometheus)")
    files: dict[str, str | bytes] = {"rootfs/bin/prometheus": binary, "rootfs/prometheus/.keep": b""}
    for library in _shared_libraries(binary):
        files["rootfs" + library] = library
    dockerfile = (
        "FROM scratch\nCOPY rootfs/ /\nUSER 65534\nWORKDIR /prometheus\n"
        'ENTRYPOINT ["/bin/prometheus"]\n'
        'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]\n'
    )
    context = build_context(dockerfile, files)

    async def build() -> str:
        async with aiodocker.Docker(url=engine.host) as docker:
            return await build_image(docker, "dspy-infra-test/prometheus", *context)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, build()).result()


# ---------------------------------------------------------------------------------------
# Fixtures


@attrs.frozen
class Engine:
    """One reachable engine and the test images built on it."""

    kind: str
    host: str
    images: TestImages


def _engine(kind: str) -> Engine:
    host = engine_host(kind)
    contexts = image_build_contexts()

    async def build() -> TestImages:
        async with aiodocker.Docker(url=host) as docker:
            return await ensure_test_images(docker, contexts)

    # Session setup may happen while a test's loop is running (getfixturevalue from an async
    # fixture): build on a private loop in a worker thread so neither loop blocks the other.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        images = pool.submit(asyncio.run, build()).result()
    return Engine(kind=kind, host=host, images=images)


@pytest.fixture(scope="session")
def registry() -> str:
    """``host:port`` of the local registry (checked once, outside any event loop)."""
    return registry_address()


@pytest.fixture(scope="session")
def docker_engine() -> Engine:
    """The Docker Engine (address + test images), once per session."""
    return _engine("docker")


@pytest.fixture(scope="session")
def podman_engine() -> Engine:
    """Podman's Docker-compatible service (address + test images), once per session."""
    return _engine("podman")


#: Networks this session's tests asked for (by name); removed from every engine at its end.
#: A network per test and none removed used up Docker's default address pools (31 bridge
#: networks) after a few runs, and every later network create failed.
_session_networks: set[str] = set()


def engine_settings(tmp_path: Path) -> Settings:
    # A network per test keeps overlapping runs from seeing each other's aliases.
    network = unique_name("net")
    _session_networks.add(network)
    return Settings(home=tmp_path / "home", network=network, owner=unique_name("owner"))


def remove_session_networks() -> list[str]:
    """Remove the networks this session's tests created, on every engine that answers.

    Called once at the end of the session (tests/conftest.py); returns what it removed."""
    names = set(_session_networks)
    if not names:
        return []

    async def sweep(host: str) -> list[str]:
        removed: list[str] = []
        async with aiodocker.Docker(url=host) as docker:
            for network in await docker.networks.list():
                if network.get("Name") in names:
                    try:
                        await (await docker.networks.get(network["Id"])).delete()
                        removed.append(str(network["Name"]))
                    except aiodocker.DockerError:
                        pass  # still in use by a leftover container: the engine keeps it
        return removed

    removed: list[str] = []
    for kind in ENGINE_KINDS:
        host = _host_for(kind)
        if _ping(host):
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                removed += pool.submit(asyncio.run, sweep(host)).result()
    return removed


async def _open_backend(engine: Engine, tmp_path: Path) -> AsyncIterator[DockerBackend]:
    backend = DockerBackend(engine_settings(tmp_path), host=engine.host)
    async with backend:
        try:
            yield backend
        finally:
            # Nothing a test created outlives it: its containers (by owner label), then its network.
            owner = backend.settings.resolved_owner()
            for instance in await backend.list_instances({LABEL_OWNER: owner}):
                await backend.remove(instance.id)
            await _remove_network(backend)


async def _remove_network(backend: DockerBackend) -> None:
    # Every network of the name: a failed race may have left more than one.
    for found in await backend.docker.networks.list(filters={"name": [backend.network]}):
        if found.get("Name") == backend.network:
            try:
                await (await backend.docker.networks.get(found["Id"])).delete()
            except aiodocker.DockerError:
                pass


@pytest.fixture
async def docker_backend(docker_engine: Engine, tmp_path: Path) -> AsyncIterator[DockerBackend]:
    """An open ``DockerBackend`` on the Docker Engine, with its own network (removed after)."""
    async for backend in _open_backend(docker_engine, tmp_path):
        yield backend


@pytest.fixture(params=ENGINE_KINDS)
def engine_kind(request: pytest.FixtureRequest) -> str:
    """Each real engine kind in turn (a sync fixture: anyio's wrapper drops async params)."""
    return str(request.param)


@pytest.fixture
def engine(engine_kind: str, request: pytest.FixtureRequest) -> Engine:
    """Each real engine in turn (Docker Engine, then Podman)."""
    return request.getfixturevalue(f"{engine_kind}_engine")


@pytest.fixture
async def engine_backend(engine: Engine, tmp_path: Path) -> AsyncIterator[DockerBackend]:
    """An open ``DockerBackend`` on each engine in turn."""
    async for backend in _open_backend(engine, tmp_path):
        yield backend


@pytest.fixture
async def podman_backend(podman_engine: Engine, tmp_path: Path) -> AsyncIterator[DockerBackend]:
    """An open ``DockerBackend`` on Podman, with its own network (removed after)."""
    async for backend in _open_backend(podman_engine, tmp_path):
        yield backend


def which_or_skip(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        skip_or_fail(f"{binary} is not installed")
    assert path is not None
    return path
