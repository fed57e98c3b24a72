"""The backend registry: the one module that imports the concrete backends.

Everything else reaches a backend through the ``Backend`` seam (``base.py``): the service
manager picks one by name from the ``dspy_infra_backends`` hook (this module registers the
built-ins there, like any plugin), and the ``container`` task handler asks for the engine
behind ``settings.docker_host`` with ``container_engine``.
"""

from __future__ import annotations

import attrs

from ..config import Settings
from ..hookspecs import hookimpl
from .base import Backend
from .docker import DockerBackend, resolve_docker_host
from .process import ProcessBackend

__all__ = ["BUILTIN_BACKENDS", "container_engine", "dspy_infra_backends", "engine_address"]

#: The built-in backends by name.
BUILTIN_BACKENDS: dict[str, type[Backend]] = {"docker": DockerBackend, "process": ProcessBackend}


@hookimpl
def dspy_infra_backends() -> dict[str, type[Backend]]:
    """The built-in backends (``docker`` also drives Podman through its Docker API)."""
    return dict(BUILTIN_BACKENDS)


def engine_address(settings: Settings) -> str:
    """The container engine ``settings`` name (``docker_host``, ``$DOCKER_HOST``, the default)."""
    return resolve_docker_host(settings)


def container_engine(settings: Settings, *, network: str) -> Backend:
    """A backend (not opened yet) for the container engine of ``settings`` on ``network``."""
    return DockerBackend(attrs.evolve(settings, network=network))
