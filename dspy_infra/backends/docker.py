"""The ``docker`` backend: services as containers through the Docker Engine API (aiodocker).

The same code drives a real Docker Engine and Podman's Docker-compatible service; where the
two differ (Podman runs image HEALTHCHECKs only on request when there is no systemd) the
difference is handled here and named. Three things live in exactly one place each:

- ``container_config`` turns a ``ServiceSpec`` into the engine's create-container body;
- ``translate_docker_error`` turns aiodocker / aiohttp failures into ``dspy_infra.errors``;
- ``DockerBackend._api`` times every engine call into
  ``env_manager_docker_api_duration_seconds{operation,status}``.

Size: over 600 lines on purpose: the whole Docker Engine API surface the backend uses
(containers, images, networks, logs, stats, health) with its one error translation, which
reads best in one place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ..config import Settings
from ..errors import (
    AlreadyExists,
    BackendError,
    BackendUnavailable,
    DeadlineExceeded,
    InfraError,
    NotFound,
    SpecError,
)
from ..metrics import InfraMetrics
from ..models import ExecResult, ImagePullProgress, Instance, LogEntry, ResourceUsage, ServiceSpec
from ..ownership import LABEL_HOST_PORTS, LABEL_NETWORK
from .base import (
    LABEL_SERVICE,
    Backend,
    expand_port_placeholders,
    free_port,
    host_port_placeholders,
    listen_port_placeholders,
    template_texts,
)

if TYPE_CHECKING:
    import aiodocker
    import aiodocker.containers

__all__ = [
    "BUILTIN_NETWORKS",
    "DEFAULT_DOCKER_HOST",
    "DockerBackend",
    "LogDemuxer",
    "PullTracker",
    "container_config",
    "parse_engine_time",
    "resolve_docker_host",
    "split_image_ref",
    "translate_docker_error",
    "with_ports_filled",
]

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
#: Network modes every engine provides (nothing to create; no per-network aliases).
BUILTIN_NETWORKS = frozenset({"none", "bridge", "host"})

_START_ENGINE_FIX = (
    "start Docker or Podman (`dockerd`, or "
    "`podman system service --time=0 unix:///run/podman/podman.sock`), point "
    "DSPY_INFRA_DOCKER_HOST / DOCKER_HOST at a socket that answers, or use backend='process'"
)


def resolve_docker_host(settings: Settings, host: str | None = None) -> str:
    """The engine address: ``host``, else ``settings.docker_host``, else ``$DOCKER_HOST``,
    else the default socket."""
    return host or settings.docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


# ---------------------------------------------------------------------------------------
# One place: errors


def translate_docker_error(exc: BaseException, *, operation: str, target: str = "") -> InfraError:
    """Map an aiodocker / aiohttp / OS error from ``operation`` on ``target`` to our hierarchy."""
    what = f"{operation} {target}".strip()
    if isinstance(exc, InfraError):
        return exc
    import aiodocker
    import aiohttp

    if isinstance(exc, aiodocker.DockerError):
        status, message = exc.status, str(exc.message)
        lowered = message.lower()
        if status == 900:  # aiodocker's "cannot connect"
            return BackendUnavailable(f"{what}: {message}", field="docker_host", fix=_START_ENGINE_FIX)
        if status == 404 or "no such" in lowered:
            if "image" in lowered:
                return NotFound(
                    f"{what}: {message}",
                    field="image",
                    fix="pull the image (infra.services.pull) or build it first",
                )
            return NotFound(f"{what}: {message}")
        # Podman answers some conflicts with 500 "... already exists" instead of 409.
        if status == 409 or "already in use" in lowered or "already exists" in lowered:
            return AlreadyExists(
                f"{what}: {message}", fix="remove the existing object or choose another name"
            )
        if status == 400:
            return SpecError(f"{what}: the engine refused the request: {message}", field=operation)
        return BackendError(f"{what}: engine answered {status}: {message}")
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return DeadlineExceeded(f"{what}: the engine did not answer in time")
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return BackendUnavailable(f"{what}: {exc}", field="docker_host", fix=_START_ENGINE_FIX)
    return BackendError(f"{what}: {type(exc).__name__}: {exc}")


def _names_missing_network(exc: InfraError) -> bool:
    """A create refused because its network is gone (Docker: 404 "network X not found";
    Podman: "unable to find network ... network not found")."""
    lowered = exc.message.lower()
    return "network" in lowered and "not found" in lowered


# ---------------------------------------------------------------------------------------
# One place: container config


def container_config(
    spec: ServiceSpec, *, instance_name: str, labels: Mapping[str, str], network: str
) -> dict[str, Any]:
    """The body of ``POST /containers/create`` for ``spec`` (Docker and Podman alike).

    ``labels`` (ownership) win over ``spec.labels``; the service name is the container's
    alias on ``network`` so other services reach it by name. ``spec.network_mode`` may put it
    on the engine's default ``bridge`` or the host's network instead (no alias there).
    """
    _require_image(spec)
    if spec.network_mode == "bridge":
        network = "bridge"  # the engine's default network (Podman's compat API maps it too)
    exposed: dict[str, dict[str, Any]] = {}
    bindings: dict[str, list[dict[str, str]]] = {}
    host_network = spec.network_mode == "host"
    for port in () if host_network else spec.ports:
        key = f"{port.container_port}/{port.protocol}"
        exposed[key] = {}
        if port.host_port is not None:
            # "" lets the engine choose a free host port (host_port 0).
            host_port = str(port.host_port) if port.host_port else ""
            bindings.setdefault(key, []).append({"HostIp": port.host_ip, "HostPort": host_port})
    host_config: dict[str, Any] = {
        "NetworkMode": "host" if host_network else network,
        "PortBindings": bindings,
        "Binds": [
            f"{volume.source}:{volume.target}" + (":ro" if volume.read_only else "")
            for volume in spec.volumes
        ],
        # Restarts are the manager's policy, never the engine's.
        "RestartPolicy": {"Name": "no"},
    }
    if spec.resources.cpus is not None:
        host_config["NanoCpus"] = int(spec.resources.cpus * 1e9)
    if spec.resources.memory_bytes is not None:
        host_config["Memory"] = int(spec.resources.memory_bytes)
    config: dict[str, Any] = {
        "Image": spec.image,
        "Env": [f"{key}={value}" for key, value in spec.environment.items()],
        "Labels": {**spec.labels, **labels},
        "ExposedPorts": exposed,
        "HostConfig": host_config,
    }
    if host_network:
        # Nothing is published: the engine cannot report these ports, so they ride along.
        config["Labels"][LABEL_HOST_PORTS] = json.dumps(
            {str(p.container_port): [p.host_ip, p.host_port] for p in spec.ports if p.host_port}
        )
    elif network not in BUILTIN_NETWORKS:  # engines refuse aliases on their built-in networks
        config["NetworkingConfig"] = {"EndpointsConfig": {network: {"Aliases": [spec.name]}}}
    if spec.entrypoint is not None:
        # [""] clears it on both engines (what `docker run --entrypoint ""` sends); Podman
        # reads an empty list as "keep the image's".
        config["Entrypoint"] = list(spec.entrypoint) or [""]
    if spec.command:
        config["Cmd"] = list(spec.command)
    if spec.user:
        config["User"] = spec.user
    if spec.workdir:
        config["WorkingDir"] = spec.workdir
    return config


def with_ports_filled(spec: ServiceSpec) -> ServiceSpec:
    """``spec`` with its port placeholders filled (see ``backends/base.py``): ``{port}`` is
    the container port. An unpinned port is published on a host port the engine chooses (read
    back on inspect), except one that ``{host_port}`` names: the command needs that number
    before the container exists, so a free host port is chosen here and pinned."""
    wanted = host_port_placeholders(spec)
    listen_placeholders = listen_port_placeholders(spec)  # validates {port.N} names too
    if spec.network_mode == "host":
        # On the host's network the service binds host ports itself: every port is a free one
        # (or the pinned one), and {port} is that number, bound on the port's host address.
        ports = tuple(
            p if p.host_port else attrs.evolve(p, host_port=free_port(_local_ip(p.host_ip)))
            for p in spec.ports
        )
        bound = {p.container_port: p.host_port for p in ports if p.host_port}
        listen_host = _local_ip(ports[0].host_ip) if ports else "127.0.0.1"
        return expand_port_placeholders(
            attrs.evolve(spec, ports=ports), listen=bound, published=bound, listen_host=listen_host
        )
    if not wanted and not listen_placeholders and "{listen_host}" not in " ".join(template_texts(spec)):
        return spec
    ports = tuple(
        attrs.evolve(p, host_port=free_port(_local_ip(p.host_ip)))
        if p.container_port in wanted and not p.host_port
        else p
        for p in spec.ports
    )
    spec = attrs.evolve(spec, ports=ports)
    listen = {p.container_port: p.container_port for p in ports}
    published = {p.container_port: p.host_port for p in ports if p.host_port}
    return expand_port_placeholders(spec, listen=listen, published=published, listen_host="0.0.0.0")


def _local_ip(host_ip: str) -> str:
    """Where a free port is looked for (and a host-network service binds): a published port's
    address, loopback for an unset or wildcard one."""
    return host_ip if host_ip not in ("", "0.0.0.0") else "127.0.0.1"


def _require_image(spec: ServiceSpec) -> None:
    if not spec.image:
        raise SpecError(
            "the docker backend needs an image",
            field=f"services.{spec.name}.image",
            fix="set image = 'name:tag', or use the process backend with a command",
        )


def split_image_ref(image: str) -> tuple[str, str]:
    """``repo[:tag]`` -> ``(repo, tag)``; a ``host:port/`` prefix is not a tag; digests stay whole."""
    if "@" in image:
        return image, ""
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1 :]
    return image, "latest"


# ---------------------------------------------------------------------------------------
# Engine output parsing (pure, so property tests can cover them)

_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_engine_time(text: str) -> float:
    """RFC 3339 with up to nanoseconds (as engines write it) -> Unix seconds; 0.0 for unset."""
    match = _TIME_RE.match(text.strip())
    if not match:
        return 0.0
    whole, fraction, zone = match.groups()
    stamp = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    if stamp.year <= 1:  # "0001-01-01T00:00:00Z": never happened
        return 0.0
    seconds = stamp.astimezone(UTC).timestamp()
    if fraction:
        seconds += int(fraction[:9].ljust(9, "0")) / 1e9
    return seconds


_STREAMS = {0: "stdout", 1: "stdout", 2: "stderr"}


@attrs.define
class LogDemuxer:
    """Splits the engine's multiplexed log stream (8-byte frame headers: stream id, length)
    into ``(stream, line)`` pairs, however the bytes were chunked on the wire."""

    _buffer: bytearray = attrs.field(factory=bytearray)
    _partial: dict[str, bytes] = attrs.field(factory=dict)

    def feed(self, chunk: bytes) -> Iterator[tuple[str, str]]:
        self._buffer += chunk
        while len(self._buffer) >= 8:
            stream_id, length = struct.unpack(">BxxxL", self._buffer[:8])
            if len(self._buffer) < 8 + length:
                break
            payload = bytes(self._buffer[8 : 8 + length])
            del self._buffer[: 8 + length]
            yield from self._lines(_STREAMS.get(stream_id, "stdout"), payload)

    def close(self) -> Iterator[tuple[str, str]]:
        """Flush lines that never got their newline."""
        for stream, rest in sorted(self._partial.items()):
            if rest:
                yield stream, rest.decode("utf-8", "replace")
        self._partial.clear()

    def _lines(self, stream: str, payload: bytes) -> Iterator[tuple[str, str]]:
        data = self._partial.pop(stream, b"") + payload
        *complete, rest = data.split(b"\n")
        for line in complete:
            yield stream, line.decode("utf-8", "replace").removesuffix("\r")
        if rest:
            self._partial[stream] = rest


@attrs.define
class PullTracker:
    """Folds the engine's per-layer pull messages into one image-level progress figure.

    Bytes come from ``progressDetail`` (Docker reports them while a layer downloads). Podman
    reports bytes at most once a second, so a fast pull may carry none: then the percent
    counts finished layers instead, and ``complete`` takes the image size as the byte total.
    The percent never goes backwards and reaches 100 only at ``complete``.
    """

    image: str
    _layers: dict[str, tuple[int, int]] = attrs.field(factory=dict)
    _finished: dict[str, bool] = attrs.field(factory=dict)
    _percent: int = 0

    def update(self, message: Mapping[str, Any]) -> ImagePullProgress:
        status_text = str(message.get("status", ""))
        lowered = status_text.lower()
        layer = str(message.get("id", ""))
        detail = message.get("progressDetail") or {}
        current, total = int(detail.get("current") or 0), int(detail.get("total") or 0)
        if layer and "pulling from" not in lowered and not lowered.startswith(("digest", "status")):
            done = lowered in ("download complete", "pull complete", "already exists")
            self._finished[layer] = self._finished.get(layer, False) or done
            if total:
                self._layers[layer] = (min(current, total), total)
            elif done and layer in self._layers:
                self._layers[layer] = (self._layers[layer][1], self._layers[layer][1])
        kind = "extracting" if "extract" in lowered or "pull complete" in lowered else "downloading"
        return self._progress(kind, status_text)

    def complete(self, message: str = "", *, size: int = 0) -> ImagePullProgress:
        self._layers = {k: (t, t) for k, (_c, t) in self._layers.items()}
        progress = self._progress("complete", message)
        if not progress.total and size:
            progress = attrs.evolve(progress, current=size, total=size)
        return attrs.evolve(progress, progress_percent=100)

    def _progress(self, status: str, message: str) -> ImagePullProgress:
        current = sum(c for c, _t in self._layers.values())
        total = sum(t for _c, t in self._layers.values())
        if total:
            percent = current * 100 // total
        elif self._finished:
            percent = sum(self._finished.values()) * 100 // len(self._finished)
        else:
            percent = 0
        self._percent = max(self._percent, min(percent, 99))
        return ImagePullProgress(
            image_name=self.image,
            status=status,
            current=current,
            total=total,
            progress_percent=self._percent,
            message=message,
        )


def _usage_from_stats(stats: Mapping[str, Any]) -> ResourceUsage:
    cpu = stats.get("cpu_stats") or {}
    pre = stats.get("precpu_stats") or {}
    cpu_delta = (cpu.get("cpu_usage") or {}).get("total_usage", 0) - (pre.get("cpu_usage") or {}).get(
        "total_usage", 0
    )
    # Percent of one core over the interval between the two samples (as `docker stats`).
    # The interval is read from the samples' own timestamps when both have one: Podman's
    # system_cpu_usage is read at a different moment than the cgroup counter, which skews
    # the system-time formula on a busy machine.
    wall_delta = (
        parse_engine_time(str(stats.get("read", ""))) - parse_engine_time(str(stats.get("preread", "")))
    ) * 1e9
    system_delta = (cpu.get("system_cpu_usage") or 0) - (pre.get("system_cpu_usage") or 0)
    cpus = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or ()) or 1
    if cpu_delta <= 0:
        percent = 0.0
    elif 0 < wall_delta < 3600e9:
        percent = cpu_delta / wall_delta * 100.0
    elif system_delta > 0:
        percent = cpu_delta / system_delta * cpus * 100.0
    else:
        percent = 0.0
    memory = stats.get("memory_stats") or {}
    detail = memory.get("stats") or {}
    # What `docker stats` shows: usage minus page cache (cgroup v1 "cache", v2 "inactive_file").
    cache = detail.get("inactive_file", detail.get("total_inactive_file", detail.get("cache", 0))) or 0
    used = max(int(memory.get("usage") or 0) - int(cache), 0)
    networks = stats.get("networks") or {}
    rx = sum(int(n.get("rx_bytes") or 0) for n in networks.values())
    tx = sum(int(n.get("tx_bytes") or 0) for n in networks.values())
    return ResourceUsage(cpu_percent=percent, memory_bytes=used, network_rx_bytes=rx, network_tx_bytes=tx)


def _instance_from_inspect(data: Mapping[str, Any]) -> Instance:
    state = data.get("State") or {}
    config = data.get("Config") or {}
    labels = dict(config.get("Labels") or {})
    status = str(state.get("Status", "")).lower()
    if state.get("Running") or status in ("running", "paused", "restarting"):
        kind = "running"
    elif status in ("created", "configured", "initialized"):
        kind = "created"
    else:
        kind = "exited"
    ports: dict[int, tuple[str, int]] = {}
    if LABEL_HOST_PORTS in labels:  # a host-network container (see container_config)
        try:
            ports = {
                int(k): (str(ip), int(port)) for k, (ip, port) in json.loads(labels[LABEL_HOST_PORTS]).items()
            }
        except (ValueError, TypeError, AttributeError):
            ports = {}  # not ours after all: report no ports rather than fail every listing
    for key, bound in ((data.get("NetworkSettings") or {}).get("Ports") or {}).items():
        number, _, _proto = key.partition("/")
        for binding in bound or ():
            if binding.get("HostPort"):
                ports.setdefault(int(number), (binding.get("HostIp") or "", int(binding["HostPort"])))
    health = state.get("Health") or state.get("Healthcheck") or {}
    return Instance(
        id=str(data["Id"]),
        name=str(data.get("Name", "")).lstrip("/"),
        labels=labels,
        state=kind,
        exit_code=int(state.get("ExitCode", 0)) if kind == "exited" else None,
        ports=ports,
        started_at=parse_engine_time(str(state.get("StartedAt", ""))),
        engine_health=(health.get("Status") or None) if health else None,
        address=labels.get(LABEL_SERVICE) or str(data.get("Name", "")).lstrip("/"),
    )


#: (polling interval, seconds for that stage) of a wait on Podman; the last has no end.
_PODMAN_WAIT_STAGES: tuple[tuple[str, float], ...] = (("10ms", 1.0), ("50ms", 10.0), ("250ms", math.inf))


async def _identify_engine(docker: aiodocker.Docker) -> tuple[str, str, str]:
    """``("docker" | "podman", API version, libpod API version)`` of the engine behind
    ``docker`` (the last is "" unless Podman names it), and pin the API version on the client.

    From the headers of ``GET /_ping`` (``Api-Version``; Podman adds ``Libpod-Api-Version``):
    under a millisecond on both engines, where ``GET /version`` takes about 300 ms on Podman
    and aiodocker's default ("auto") asks for it once more before its first call. Only an
    engine whose ping names no API version is asked ``/version``.
    """
    async with docker._query("_ping", versioned_api=False) as response:
        headers = response.headers
        await response.read()
    api_version = headers.get("Api-Version", "")
    libpod = headers.get("Libpod-Api-Version", "")
    libpod = libpod if re.fullmatch(r"\d+\.\d+(\.\d+)?", libpod) else ""
    if headers.get("Libpod-Api-Version") or headers.get("Server", "").lower().startswith("libpod"):
        engine = "podman"
    else:
        engine = "docker"
    if not re.fullmatch(r"\d+\.\d+", api_version):
        version = await docker.version()  # also pins aiodocker's API version
        components = " ".join(str(c.get("Name", "")) for c in version.get("Components") or ())
        engine = "podman" if "podman" in components.lower() else engine
        return engine, str(version.get("ApiVersion", "")), libpod
    docker.api_version = f"v{api_version}"
    return engine, api_version, libpod


# ---------------------------------------------------------------------------------------
# The backend


class DockerBackend(Backend):
    """Services as containers on a Docker Engine or Podman (Docker-compatible API)."""

    name = "docker"

    def __init__(
        self, settings: Settings, *, host: str | None = None, metrics: InfraMetrics | None = None
    ) -> None:
        self.settings = settings
        self.address = resolve_docker_host(settings, host)
        self.network = settings.network
        self.metrics = metrics if metrics is not None else InfraMetrics()
        #: "docker" or "podman", known after ``open()``.
        self.engine = ""
        self.api_version = ""
        #: Podman's own API version (its ``Libpod-Api-Version``), "" elsewhere.
        self.libpod_api_version = ""
        self._docker: aiodocker.Docker | None = None
        self._network_ready = False
        #: Podman only: when each container's image HEALTHCHECK may run next (monotonic time).
        self._health_due: dict[str, float] = {}
        #: Last raw stats sample per container, for engines that send no ``precpu_stats``.
        self._last_stats: dict[str, tuple[float, dict[str, Any]]] = {}
        #: Created, not yet started containers whose every published port is pinned: their
        #: ports as an inspect after start would report them (so ``start`` need not ask).
        self._pinned_ports: dict[str, dict[int, tuple[str, int]]] = {}

    # -- plumbing ----------------------------------------------------------------------

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            raise BackendError(
                "the docker backend is not open", fix="use `async with backend:` or await backend.open()"
            )
        return self._docker

    @asynccontextmanager
    async def _api(self, operation: str, target: str = "") -> AsyncIterator[None]:
        """Time one engine call and translate its failure (the one place for both)."""
        import aiodocker
        import aiohttp

        started = time.perf_counter()
        status = "error"
        try:
            yield
            status = "ok"
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise translate_docker_error(exc, operation=operation, target=target) from exc
        finally:
            self.metrics.docker_api_duration_seconds.labels(operation=operation, status=status).observe(
                time.perf_counter() - started
            )

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self._docker is not None:
            return
        import aiodocker  # here, not at module level: only a container engine needs aiohttp's client

        try:
            docker = aiodocker.Docker(url=self.address)
        except ValueError as exc:
            raise SpecError(
                f"cannot use {self.address!r}: {exc}",
                field="docker_host",
                fix="use unix:///path/to.sock or tcp://host:port",
            ) from None
        try:
            with anyio.fail_after(10):
                async with self._api("ping", self.address):
                    self.engine, self.api_version, self.libpod_api_version = await _identify_engine(docker)
        except BaseException as exc:
            await docker.close()
            if isinstance(exc, TimeoutError):
                raise BackendUnavailable(
                    f"no container engine answers at {self.address} (timed out)",
                    field="docker_host",
                    fix=_START_ENGINE_FIX,
                ) from None
            if isinstance(exc, InfraError) and not isinstance(exc, BackendUnavailable):
                raise BackendUnavailable(
                    f"no container engine answers at {self.address}: {exc}",
                    field="docker_host",
                    fix=_START_ENGINE_FIX,
                ) from None
            raise
        self._docker = docker

    async def aclose(self) -> None:
        docker, self._docker = self._docker, None
        if docker is not None:
            await docker.close()

    # -- instances -----------------------------------------------------------------------

    async def prepare(self, specs: Sequence[ServiceSpec]) -> None:
        await self._ensure_network()
        checked: set[str] = set()
        for spec in specs:
            _require_image(spec)
            if spec.image in checked:  # services of one image: one engine call, not one each
                continue
            checked.add(spec.image)
            try:
                await self._ensure_image(spec.image)
            except InfraError as exc:
                raise BackendError(
                    f"service {spec.name!r}: image {spec.image!r} is not available: {exc.message}",
                    field=f"services.{spec.name}.image",
                    fix="check the image name, or build/pull it where this engine can see it",
                ) from exc

    async def _ensure_network(self) -> None:
        if self._network_ready or self.network in BUILTIN_NETWORKS:
            return
        try:
            async with self._api("network_inspect", self.network):
                await self.docker.networks.get(self.network)
        except NotFound:
            created = ""
            try:
                async with self._api("network_create", self.network):
                    reply = await self.docker.networks.create(
                        {
                            "Name": self.network,
                            "Driver": "bridge",
                            "CheckDuplicate": True,
                            "Labels": {LABEL_NETWORK: "1"},
                        }
                    )
                    created = str(reply.id)
            except AlreadyExists:
                pass  # another process created it in the meantime: same outcome
            if created:
                await self._settle_network_race(created)
        self._network_ready = True

    async def _settle_network_race(self, created: str) -> None:
        """Leave exactly one network of our name after concurrent first creations.

        ``CheckDuplicate`` is best effort: two owners creating the network at once can both
        succeed, and containers then fail to start ("network is ambiguous"). Every creator
        lists the networks of that name; all agree the oldest one stays, and a creator whose
        network is not that one removes it. Each waits until one is left before going on, and
        until it saw one left twice: a creator that lists before another's network shows up
        must not go on while the other keeps waiting for it to remove the older one.
        """
        alone = 0
        for _ in range(50):
            async with self._api("network_list", self.network):
                found = await self.docker.networks.list(filters={"name": [self.network]})
            # By time, not by text: engines trim trailing zeros of the fraction, so as text
            # "…01.25Z" sorts after "…01.251Z".
            same = sorted(
                (n for n in found if n.get("Name") == self.network),
                key=lambda n: (parse_engine_time(str(n.get("Created", ""))), str(n.get("Id", ""))),
            )
            if len(same) <= 1:
                alone += 1
                if alone == 2:
                    return
                await anyio.sleep(0.05)
                continue
            alone = 0
            keeper = str(same[0].get("Id", ""))
            if created != keeper and any(str(n.get("Id")) == created for n in same):
                with contextlib.suppress(InfraError):
                    async with self._api("network_remove", self.network):
                        await (await self.docker.networks.get(created)).delete()
            await anyio.sleep(0.05)

    async def release(self) -> bool:
        if self.network in BUILTIN_NETWORKS:
            return False
        self._network_ready = False  # whatever happens below, the next create checks again
        try:
            async with self._api("network_list", self.network):
                found = await self.docker.networks.list(filters={"name": [self.network]})
            ours = [
                str(n.get("Id", ""))
                for n in found
                if n.get("Name") == self.network and (n.get("Labels") or {}).get(LABEL_NETWORK) == "1"
            ]
            if not ours:
                return False  # gone, or a network the user made: not ours to remove
            # Created and exited containers count: a created one is attached only at its start.
            filters = json.dumps({"network": [self.network]})
            async with self._api("container_list", self.network):
                if await self.docker.containers.list(all=True, filters=filters):
                    return False
            for network_id in ours:
                async with self._api("network_remove", self.network):
                    await (await self.docker.networks.get(network_id)).delete()
        except InfraError:
            return False  # a container arrived meanwhile (the engine refuses), or it is gone
        return True

    async def has_image(self, image: str) -> bool:
        try:
            async with self._api("image_inspect", image):
                await self.docker.images.inspect(image)
        except NotFound:
            return False
        return True

    async def wait_exit(self, instance_id: str) -> int:
        # aiodocker sets no client timeout on wait: the caller's timeout bounds it.
        if self.engine == "podman" and self.libpod_api_version:
            return await self._podman_wait_exit(instance_id)
        async with self._api("container_wait", instance_id):
            reply = await self.docker.containers.container(instance_id).wait()
        code = reply.get("StatusCode")
        return int(code) if code is not None else -1

    async def _podman_wait_exit(self, instance_id: str) -> int:
        """Podman's wait endpoints look at the container every ``interval`` (250 ms unless
        told, and the Docker-compatible one cannot be told): an exit is seen up to 250 ms
        late, 125 ms on average, which was most of a short ``container`` task's gap to Docker.
        Libpod's own endpoint (at the version its ping names) takes the interval: 10 ms for the first second, 50 ms until
        10 s, then the default, so an exit is seen at most ~5 % of the wait late (the rule of
        the startup wait) without polling a long task 100 times a second. A stage that ends
        without the exit drops its request (Podman stops that wait) and the next one asks
        again."""
        for interval, budget in _PODMAN_WAIT_STAGES:
            with anyio.move_on_after(budget):
                async with self._api("container_wait", instance_id):
                    reply = await self.docker._query_json(
                        f"v{self.libpod_api_version}/libpod/containers/{instance_id}/wait",
                        method="POST",
                        params={"condition": "stopped", "interval": interval},
                        versioned_api=False,
                        timeout=None,
                    )
                return int(reply)
        raise AssertionError("the last wait stage has no budget")  # pragma: no cover

    async def _ensure_image(self, image: str) -> None:
        if not await self.has_image(image):
            async for _progress in self.pull(image):
                pass

    async def run(self, spec: ServiceSpec, *, instance_name: str, labels: Mapping[str, str]) -> Instance:
        return await self.start(await self.create(spec, instance_name=instance_name, labels=labels))

    async def create(self, spec: ServiceSpec, *, instance_name: str, labels: Mapping[str, str]) -> Instance:
        spec = with_ports_filled(spec)
        config = container_config(spec, instance_name=instance_name, labels=labels, network=self.network)
        await self._ensure_network()
        try:
            container = await self._create(config, instance_name)
        except InfraError as exc:
            if isinstance(exc, NotFound) and exc.field == "image":
                await self._ensure_image(spec.image)
            elif _names_missing_network(exc):
                # Another owner's ``release`` removed the shared network between our check
                # and this create: make it again.
                self._network_ready = False
                await self._ensure_network()
            else:
                raise
            container = await self._create(config, instance_name)
        if all(p.host_port for p in spec.ports if p.host_port is not None):
            self._pinned_ports[str(container.id)] = {
                p.container_port: (p.host_ip, p.host_port) for p in spec.ports if p.host_port
            }
        # What the engine would answer on inspect, without asking it: ports are published on
        # start, so a created container has none yet.
        return Instance(
            id=str(container.id),
            name=instance_name,
            labels=dict(config["Labels"]),
            state="created",
            address=labels.get(LABEL_SERVICE) or instance_name,
        )

    async def start(self, instance: Instance) -> Instance:
        pinned = self._pinned_ports.pop(instance.id, None)
        try:
            try:
                await self._start_container(instance)
            except InfraError as exc:
                if not _names_missing_network(exc):
                    raise
                # Docker lets another owner's ``release`` remove the network under a created
                # container; the engine finds it again by name once it exists.
                self._network_ready = False
                await self._ensure_network()
                await self._start_container(instance)
        except BaseException:
            # A created-but-unstartable container would leak: remove it, then report.
            with anyio.CancelScope(shield=True):
                await self.remove(instance.id)
            raise
        if pinned is None:
            # An engine-chosen host port is known only now: ask. (Docker answers an inspect
            # racing a fast exit only once the exit is handled: tens of ms, so not always.)
            return await self.inspect(instance.id)
        return attrs.evolve(instance, state="running", ports=pinned, started_at=time.time())

    async def _start_container(self, instance: Instance) -> None:
        async with self._api("container_start", instance.name):
            await self.docker.containers.container(instance.id).start()

    async def _create(
        self, config: dict[str, Any], instance_name: str
    ) -> aiodocker.containers.DockerContainer:
        async with self._api("container_create", instance_name):
            container = await self.docker.containers.create(config, name=instance_name)
        return container

    async def inspect(self, instance_id: str) -> Instance:
        data = await self._inspect_raw(instance_id)
        if self.engine == "podman" and await self._podman_healthcheck_due(data):
            data = await self._inspect_raw(instance_id)
        return _instance_from_inspect(data)

    async def _inspect_raw(self, instance_id: str) -> dict[str, Any]:
        for retries_left in (2, 1, 0):
            try:
                async with self._api("container_inspect", instance_id):
                    data: dict[str, Any] = await self.docker.containers.container(instance_id).show()
                return data
            except NotFound as exc:
                # Podman fails an inspect that races the container's exit ("read
                # /proc/PID/cgroup: no such process"); the container is there: ask again.
                if not retries_left or "no such process" not in str(exc):
                    raise
                await anyio.sleep(0.02)
        raise AssertionError("unreachable")

    async def _podman_healthcheck_due(self, data: Mapping[str, Any]) -> bool:
        """Podman schedules image HEALTHCHECK runs with systemd timers; without systemd they
        never run. Stand in for the timer: when the check is due (the image's interval after
        start, then every interval), ask Podman to run it (libpod endpoint). True if it ran."""
        check = (data.get("Config") or {}).get("Healthcheck") or {}
        test = check.get("Test") or []
        if not (data.get("State") or {}).get("Running") or not test or test[0] == "NONE":
            return False
        interval = (check.get("Interval") or 30_000_000_000) / 1e9
        instance_id = str(data["Id"])
        now = time.monotonic()
        if instance_id not in self._health_due:
            running_for = max(time.time() - parse_engine_time(str(data["State"].get("StartedAt", ""))), 0.0)
            self._health_due[instance_id] = now + max(interval - running_for, 0.0)
        if now < self._health_due[instance_id]:
            return False
        self._health_due[instance_id] = now + interval
        try:
            async with (
                self._api("healthcheck_run", instance_id),
                self.docker._query(f"libpod/containers/{instance_id}/healthcheck") as response,
            ):
                await response.read()
        except NotFound:
            return False  # gone meanwhile; the next inspect says so
        return True

    async def list_instances(self, labels: Mapping[str, str]) -> list[Instance]:
        filters = json.dumps({"label": [f"{k}={v}" for k, v in labels.items()]})
        async with self._api("container_list"):
            found = await self.docker.containers.list(all=True, filters=filters)
        instances: list[Instance] = []
        for container in found:
            try:
                instances.append(_instance_from_inspect(await self._inspect_raw(container.id)))
            except NotFound:
                continue  # removed between list and inspect
        # The label filter is the engine's; check again so nothing unlabelled is ever returned.
        return [i for i in instances if all(i.labels.get(k) == v for k, v in labels.items())]

    async def stop(self, instance_id: str, *, timeout: float = 10.0) -> None:
        import aiohttp

        grace = max(0, math.ceil(timeout))
        try:
            async with self._api("container_stop", instance_id):
                await self.docker.containers.container(instance_id).stop(
                    t=grace, timeout=aiohttp.ClientTimeout(total=grace + 30)
                )
        except NotFound:
            return

    async def remove(self, instance_id: str) -> None:
        self._health_due.pop(instance_id, None)
        self._pinned_ports.pop(instance_id, None)
        self._last_stats.pop(instance_id, None)
        try:
            async with self._api("container_remove", instance_id):
                await self.docker.containers.container(instance_id).delete(force=True, v=True)
        except NotFound:
            return
        except BackendError as exc:
            # Both engines answer 409 while a removal is already in progress: same outcome.
            if "in progress" not in str(exc):
                raise

    # -- observation -----------------------------------------------------------------------

    async def logs(
        self,
        instance_id: str,
        *,
        service_name: str,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
    ) -> AsyncIterator[LogEntry]:
        params: dict[str, Any] = {
            "stdout": True,
            "stderr": True,
            "timestamps": True,
            "follow": follow,
            "tail": "all" if tail is None else str(max(tail, 0)),
        }
        if since is not None:
            params["since"] = f"{since:.6f}"
        import aiohttp

        demux = LogDemuxer()
        async with contextlib.AsyncExitStack() as stack:
            async with self._api("container_logs", instance_id):
                # aiodocker's log API merges stdout and stderr; read the raw frames instead.
                response = await stack.enter_async_context(
                    self.docker._query(
                        f"containers/{instance_id}/logs", params=params, timeout=aiohttp.ClientTimeout()
                    )
                )
            # aiodocker's _query does not release the response; a follow stream closed early
            # must drop its connection, or the engine keeps streaming into it.
            stack.callback(response.close)
            while True:
                try:
                    chunk = await response.content.readany()
                except (aiohttp.ClientError, OSError):
                    break
                if not chunk:
                    break
                # ``since`` is applied by the engine (Podman stamps lines to the second only,
                # so filtering again here would drop lines of the same second).
                for stream, line in demux.feed(chunk):
                    yield self._log_entry(instance_id, service_name, stream, line)
            for stream, line in demux.close():
                yield self._log_entry(instance_id, service_name, stream, line)

    @staticmethod
    def _log_entry(instance_id: str, service_name: str, stream: str, line: str) -> LogEntry:
        stamp_text, _, message = line.partition(" ")
        stamp = parse_engine_time(stamp_text)
        if not stamp:  # no timestamp prefix after all: keep the whole line
            message, stamp = line, time.time()
        return LogEntry(
            service_name=service_name,
            instance_id=instance_id,
            stream=stream,
            message=message,
            timestamp=stamp,
        )

    async def stats(self, instance_id: str) -> ResourceUsage:
        previous = self._last_stats.get(instance_id)
        sample = await self._stats_sample(instance_id)
        if not (sample.get("precpu_stats") or {}).get("system_cpu_usage"):
            # Podman sends no previous sample with stream=0: pair this one with our last one,
            # or take a second one shortly after, so CPU percent is over a real interval.
            if previous is None or time.monotonic() - previous[0] > 60:
                await anyio.sleep(0.5)
                previous, sample = (time.monotonic(), sample), await self._stats_sample(instance_id)
            sample = {
                **sample,
                "precpu_stats": previous[1].get("cpu_stats") or {},
                "preread": previous[1].get("read", ""),
            }
        return _usage_from_stats(sample)

    async def _stats_sample(self, instance_id: str) -> dict[str, Any]:
        async with self._api("container_stats", instance_id):
            # stream=0: Docker samples twice, so precpu_stats is filled for a CPU percent.
            samples = await self.docker.containers.container(instance_id).stats(stream=False)
        sample = dict(samples[0]) if samples else {}
        self._last_stats[instance_id] = (time.monotonic(), sample)
        return sample

    async def exec(self, instance_id: str, command: Sequence[str], *, timeout: float = 10.0) -> ExecResult:
        container = self.docker.containers.container(instance_id)
        async with self._api("exec_create", instance_id):
            execution = await container.exec(list(command), stdout=True, stderr=True)
        chunks: list[bytes] = []
        try:
            with anyio.fail_after(timeout):
                async with self._api("exec_start", instance_id):
                    async with execution.start(detach=False) as stream:
                        while (message := await stream.read_out()) is not None:
                            chunks.append(message.data)
                while True:
                    async with self._api("exec_inspect", instance_id):
                        details = await execution.inspect()
                    if not details.get("Running"):
                        break
                    await anyio.sleep(0.01)
        except TimeoutError:
            raise DeadlineExceeded(
                f"exec {list(command)!r} in {instance_id[:12]} did not finish within {timeout:g}s",
                field="timeout",
            ) from None
        code = details.get("ExitCode")
        return ExecResult(
            exit_code=int(code) if code is not None else -1,
            output=b"".join(chunks).decode("utf-8", "replace"),
        )

    async def pull(self, image: str) -> AsyncIterator[ImagePullProgress]:
        repo, tag = split_image_ref(image)
        tracker = PullTracker(image)
        async with self._api("image_pull", image):
            async for message in self.docker.images.pull(repo, tag=tag, stream=True):
                if message.get("error"):
                    yield attrs.evolve(tracker.complete(), status="error", message=str(message["error"]))
                    raise BackendError(f"pull {image}: {message['error']}", field="image")
                yield tracker.update(message)
        async with self._api("image_inspect", image):
            size = int((await self.docker.images.inspect(image)).get("Size") or 0)
        yield tracker.complete(f"pulled {image}", size=size)

    def probe_address(self, instance: Instance, container_port: int) -> tuple[str, int]:
        published = instance.ports.get(container_port)
        if published is None:
            raise SpecError(
                f"port {container_port} of {instance.name!r} is not published, so the host cannot probe it",
                field="ports",
                fix=f"publish it: PortMapping(container_port={container_port}, host_port=0)",
            )
        host_ip, host_port = published
        if host_ip in ("", "0.0.0.0", "::"):
            host_ip = "127.0.0.1"
        return host_ip, host_port
