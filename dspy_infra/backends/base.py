"""The one seam every service backend implements.

A backend turns a ``ServiceSpec`` into a running *instance* (a container or a process group)
and answers questions about instances. It knows nothing of dependency order, health policy
or restarts: that is the ``ServiceManager``'s job. Every instance a backend creates carries
the labels it was given (``dspy_infra.owner``, ``dspy_infra.service``, ``dspy_infra.spec_hash``,
...) and ``list_instances`` finds instances by those labels only, so a backend never touches
anything dspy_infra did not create.

A backend is an anyio ``AsyncResource``: ``async with backend:`` opens it, leaving closes it.
"""

from __future__ import annotations

import abc
import re
import socket
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Self

import attrs
from anyio.abc import AsyncResource

from ..errors import BackendError, NotFound, SpecError
from ..models import ExecResult, ImagePullProgress, Instance, LogEntry, ResourceUsage, ServiceSpec

# The ownership labels are ownership.py's; re-exported (``X as X``) for the backends and
# handlers that import them from here.
from ..ownership import LABEL_OWNER as LABEL_OWNER
from ..ownership import LABEL_OWNER_PID as LABEL_OWNER_PID
from ..ownership import LABEL_OWNER_STARTED as LABEL_OWNER_STARTED
from ..ownership import LABEL_PREFIX as LABEL_PREFIX
from ..ownership import LABEL_SERVICE as LABEL_SERVICE
from ..ownership import LABEL_SPEC_HASH as LABEL_SPEC_HASH

__all__ = [
    "Backend",
    "expand_port_placeholders",
    "fill_port_placeholders",
    "free_port",
    "host_port_placeholders",
    "listen_port_placeholders",
    "template_texts",
]


# -- port placeholders -------------------------------------------------------------------------
#
# A service's ``command`` arguments and ``environment`` values may name its ports, so it can be
# given a free host port instead of a fixed one:
#
#   {port}              the port the service itself listens on, for its first ``ports`` entry
#   {port.6379}         the same for the entry whose container port is 6379
#   {host_port}         the host port clients on this machine connect to (first entry)
#   {host_port.6379}    the same for container port 6379
#   {listen_host}       the address to bind: 127.0.0.1 for a local process, 0.0.0.0 in a container
#
# On the process backend the service runs on the host, so ``{port}`` and ``{host_port}`` are
# the same assigned host port. In a container ``{port}`` is the container port (the engine
# forwards the host port to it) and ``{host_port}`` the published host port (what a service
# advertises to clients, e.g. Kafka's advertised listener). Any other text in braces is left
# as it is.

_PLACEHOLDER = re.compile(r"\{(port|host_port)(?:\.(\d+))?\}")
_LISTEN_HOST = "{listen_host}"


def template_texts(spec: ServiceSpec) -> list[str]:
    """The texts whose placeholders a backend fills: entrypoint, command, environment values."""
    return [*(spec.entrypoint or ()), *spec.command, *spec.environment.values()]


def _placeholder_ports(spec: ServiceSpec, kind: str) -> set[int]:
    """Container ports that ``kind`` placeholders name; a name of no published port is a
    ``SpecError``."""
    known = [p.container_port for p in spec.ports]
    out: set[int] = set()
    for text in template_texts(spec):
        for match in _PLACEHOLDER.finditer(text):
            if match.group(1) != kind:
                continue
            if match.group(2) is None:
                if not known:
                    raise SpecError(
                        f"{match.group(0)} is used but the service publishes no port",
                        field=f"services.{spec.name}.ports",
                        fix='add one, e.g. ports = [6379] (a free host port) or ["16379:6379"]',
                    )
                out.add(known[0])
            else:
                port = int(match.group(2))
                if port not in known:
                    raise SpecError(
                        f"{match.group(0)} names container port {port}, which is not in ports",
                        field=f"services.{spec.name}.ports",
                        fix="use one of: " + (", ".join(str(p) for p in known) or "(none)"),
                    )
                out.add(port)
    return out


def listen_port_placeholders(spec: ServiceSpec) -> set[int]:
    """Container ports named by ``{port}`` / ``{port.N}`` in ``spec``'s command or env."""
    return _placeholder_ports(spec, "port")


def host_port_placeholders(spec: ServiceSpec) -> set[int]:
    """Container ports named by ``{host_port}`` / ``{host_port.N}``."""
    return _placeholder_ports(spec, "host_port")


def fill_port_placeholders(
    text: str, *, first: int | None, listen: Mapping[int, int], published: Mapping[int, int], listen_host: str
) -> str:
    """``text`` with its port placeholders filled: ``listen`` and ``published`` map each
    container port to the port the service binds and the host port clients use; ``first`` is
    the container port ``{port}`` / ``{host_port}`` mean. Unknown names stay as they are."""

    def one(match: re.Match[str]) -> str:
        port = int(match.group(2)) if match.group(2) is not None else first
        table = listen if match.group(1) == "port" else published
        if port is None or port not in table:
            return match.group(0)
        return str(table[port])

    return _PLACEHOLDER.sub(one, text).replace(_LISTEN_HOST, listen_host)


def expand_port_placeholders(
    spec: ServiceSpec, *, listen: Mapping[int, int], published: Mapping[int, int], listen_host: str
) -> ServiceSpec:
    """``spec`` with the placeholders of its entrypoint, command and environment filled (see
    ``fill_port_placeholders``)."""
    first = spec.ports[0].container_port if spec.ports else None

    def fill(text: str) -> str:
        return fill_port_placeholders(
            text, first=first, listen=listen, published=published, listen_host=listen_host
        )

    return attrs.evolve(
        spec,
        entrypoint=None if spec.entrypoint is None else tuple(fill(arg) for arg in spec.entrypoint),
        command=tuple(fill(arg) for arg in spec.command),
        environment={key: fill(value) for key, value in spec.environment.items()},
    )


def free_port(host_ip: str = "127.0.0.1", *, avoid: Collection[int] = ()) -> int:
    """A TCP port nothing listens on right now at ``host_ip`` (the kernel's choice), not one
    of ``avoid`` (ports about to be bound by services pinned to them). Another process may
    take it before the service binds it; a service that then fails to bind exits, and its
    start fails with that log line."""
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    for _ in range(64):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host_ip, 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port
    raise BackendError(f"no free port at {host_ip} outside the {len(avoid)} pinned ones")


class Backend(AsyncResource):
    """Runs service instances. Subclasses set ``name`` and implement every abstract method."""

    name: str = ""
    #: True when a service binds its host port itself (a local process): then ``{port}`` is
    #: the host port; False in a container, where it is the container port.
    binds_host_ports: bool = False

    # -- lifecycle -----------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect / check prerequisites. Raise ``BackendUnavailable`` if this backend cannot
        work here (no engine answers, ...)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections. Does not stop instances (the manager decides that)."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    # -- instances -----------------------------------------------------------------------

    @abc.abstractmethod
    async def prepare(self, specs: Sequence[ServiceSpec]) -> None:
        """Once before a start: create the shared network / check binaries exist. Raises
        ``MissingBinary`` / ``BackendError`` naming the service and what to install."""

    async def release(self) -> bool:
        """After an owner stopped all its services: remove what ``prepare`` created and nobody
        uses any more (the docker backend's service network, when it created it and no
        container of anyone is on it). True when something was removed. Never raises: what
        is still in use stays for its users."""
        return False

    @abc.abstractmethod
    async def run(self, spec: ServiceSpec, *, instance_name: str, labels: Mapping[str, str]) -> Instance:
        """Create and start one instance of ``spec``; return it as started."""

    async def create(
        self, spec: ServiceSpec, *, instance_name: str, labels: Mapping[str, str]
    ) -> Instance | None:
        """Create an instance of ``spec`` without starting it (state ``created``), so a start
        that must first wait for other services has its slow part done ahead; ``start``
        runs it, ``remove`` drops it. None when this backend has nothing to do ahead (a
        process starts in one step): then ``run`` it when its time comes."""
        return None

    async def start(self, instance: Instance) -> Instance:
        """Start an instance ``create`` made; return it as started. On failure it is removed."""
        raise BackendError(
            f"the {type(self).__name__} creates nothing ahead of a start", field="backend", fix="use run()"
        )

    @abc.abstractmethod
    async def inspect(self, instance_id: str) -> Instance:
        """Current state of one instance; ``NotFound`` if it is gone."""

    async def inspect_or_none(self, instance_id: str) -> Instance | None:
        """Current state of one instance, or None if it is gone."""
        try:
            return await self.inspect(instance_id)
        except NotFound:
            return None

    @abc.abstractmethod
    async def list_instances(self, labels: Mapping[str, str]) -> list[Instance]:
        """Instances (running or exited) whose labels include all of ``labels``."""

    @abc.abstractmethod
    async def stop(self, instance_id: str, *, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), then kill after ``timeout``. Idempotent."""

    @abc.abstractmethod
    async def remove(self, instance_id: str) -> None:
        """Remove a stopped instance and its runtime leftovers. Idempotent."""

    # -- observation -----------------------------------------------------------------------

    @abc.abstractmethod
    def logs(
        self,
        instance_id: str,
        *,
        service_name: str,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
    ) -> AsyncIterator[LogEntry]:
        """Log lines (stdout and stderr, each tagged), oldest first; with ``follow``, keeps
        yielding until the instance exits or the iterator is closed."""

    @abc.abstractmethod
    async def stats(self, instance_id: str) -> ResourceUsage:
        """CPU percent, memory and network counters right now."""

    @abc.abstractmethod
    async def exec(self, instance_id: str, command: Sequence[str], *, timeout: float = 10.0) -> ExecResult:
        """Run ``command`` inside the instance's environment (for exec probes)."""

    @abc.abstractmethod
    def pull(self, image: str) -> AsyncIterator[ImagePullProgress]:
        """Fetch ``image`` with progress; a backend without images yields one ``complete``."""

    @abc.abstractmethod
    def probe_address(self, instance: Instance, container_port: int) -> tuple[str, int]:
        """Where the host reaches ``container_port`` of ``instance`` (for health probes)."""

    # -- one-shot instances (the ``container`` task handler) -------------------------------

    async def has_image(self, image: str) -> bool:
        """Whether ``image`` is here without a pull (a backend without images: always)."""
        return True

    async def wait_exit(self, instance_id: str) -> int:
        """Wait until a one-shot instance exits; its exit code (-1 when the engine gives none).
        Unbounded: the caller's timeout bounds it."""
        raise BackendError(
            f"the {type(self).__name__} cannot wait for an instance to exit",
            field="backend",
            fix="run one-shot containers on the docker backend",
        )
