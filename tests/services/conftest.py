"""Tests of dspy_infra/services: the engine fixtures (engines.py) for services on Docker and Podman."""

from __future__ import annotations

from engines import docker_backend, docker_engine, engine, engine_kind, podman_engine, registry

__all__ = ["docker_backend", "docker_engine", "engine", "engine_kind", "podman_engine", "registry"]
