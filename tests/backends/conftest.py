"""Tests of dspy_infra/backends: the contract suite runs on every engine (engines.py fixtures)."""

from __future__ import annotations

from engines import docker_backend, docker_engine, engine, engine_kind, podman_engine, registry

__all__ = ["docker_backend", "docker_engine", "engine", "engine_kind", "podman_engine", "registry"]
