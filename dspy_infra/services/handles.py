"""Service handles: how an app reaches a running service.

``infra.services["redis"]`` (the services this infra knows to be running) and
``await infra.services.get("redis")`` (asks afresh) return a ``ServiceHandle``, the same on an
embedded ``Infra`` and on a ``RemoteInfra``::

    redis = await infra.services.get("redis")
    client = redis_py.Redis.from_url(redis.url)      # redis://127.0.0.1:PORT/0
    redis.host, redis.port, redis.ports               # "127.0.0.1", PORT, {6379: PORT}
    print(await redis.logs(tail=20))

``url`` comes from the spec's ``url`` template (``"redis://{host}:{port}/0"``; ``{port.N}``
names container port N), or, without one, from its health check: ``http://{host}:{port}`` for
an http check, ``{host}:{port}`` (e.g. Kafka's bootstrap servers) otherwise. A handle is a
snapshot: ``status`` is the status when it was made, and a restart may move an unpinned port,
so ask ``get()`` again after one.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import attrs

from ..errors import Unavailable
from ..models import LogEntry, ServiceSpec, ServiceState, ServiceStatus

__all__ = ["ServiceHandle", "default_url_template", "service_url"]

_URL_PORT = re.compile(r"\{port(?:\.(\d+))?\}")

#: ``logs(name, tail=...)`` of a ServiceManager or RemoteServices.
LogSource = Callable[..., AsyncIterator[LogEntry]]


def default_url_template(spec: ServiceSpec) -> str:
    """The spec's ``url``, else one derived from its health check kind."""
    if spec.url:
        return spec.url
    if spec.health.kind == "redis":
        return "redis://{host}:{port}/0"
    if spec.health.kind == "http":
        return "http://{host}:{port}"
    return "{host}:{port}"


def service_url(template: str, host: str, main_port: int | None, ports: Mapping[int, int]) -> str:
    """``template`` with ``{host}``, ``{port}`` (``main_port``) and ``{port.N}`` (the host port
    of container port N) filled; "" when it needs a port the service does not publish."""
    missing = False

    def one(match: re.Match[str]) -> str:
        nonlocal missing
        port = ports.get(int(match.group(1))) if match.group(1) is not None else main_port
        if port is None:
            missing = True
            return match.group(0)
        return str(port)

    text = _URL_PORT.sub(one, template).replace("{host}", host)
    return "" if missing else text


def main_container_port(spec: ServiceSpec) -> int | None:
    """The container port ``{port}`` means: the first published one, else the health port."""
    if spec.ports:
        return spec.ports[0].container_port
    return spec.health.port


@attrs.frozen
class ServiceHandle:
    """Where and how to reach one running service (see the module docstring)."""

    name: str
    host: str
    #: The host port of the first published port (0 when it publishes none).
    port: int
    #: ``{container port: host port}``.
    ports: dict[int, int] = attrs.field(factory=dict)
    url: str = ""
    status: ServiceStatus = ServiceStatus.STOPPED
    backend: str = ""
    _logs: LogSource | None = attrs.field(default=None, eq=False, repr=False, alias="log_source")

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"

    def get_connection_url(self) -> str:
        """The URL (testcontainers' name for it)."""
        return self.url

    async def logs(self, *, tail: int | None = 100) -> list[str]:
        """The service's last ``tail`` log lines (stdout and stderr, oldest first)."""
        if self._logs is None:
            raise Unavailable(
                f"this handle of {self.name!r} has no log source",
                fix=f"read them from the infra: infra.services.logs({self.name!r})",
            )
        return [entry.message async for entry in self._logs(self.name, tail=tail)]

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "ports": {str(k): v for k, v in self.ports.items()},
            "url": self.url,
            "status": str(self.status),
            "backend": self.backend,
        }

    @classmethod
    def from_json(
        cls, name: str, doc: Mapping[str, Any], *, log_source: LogSource | None = None
    ) -> ServiceHandle:
        return cls(
            name=name,
            host=str(doc["host"]),
            port=int(doc["port"]),
            ports={int(k): int(v) for k, v in doc.get("ports", {}).items()},
            url=str(doc.get("url", "")),
            status=ServiceStatus(doc.get("status", "healthy")),
            backend=str(doc.get("backend", "")),
            log_source=log_source,
        )

    @classmethod
    def from_state(
        cls, state: ServiceState, *, main_port: int | None = None, log_source: LogSource | None = None
    ) -> ServiceHandle:
        """From a ``ServiceState`` (what status() returns, here or over the wire)."""
        if main_port is not None and main_port in state.ports:
            port = state.ports[main_port]
        else:
            port = state.port or next(iter(state.ports.values()), 0)
        return cls(
            name=state.name,
            host=state.host,
            port=port,
            ports=dict(state.ports),
            url=state.url,
            status=state.status,
            backend=state.backend,
            log_source=log_source,
        )
