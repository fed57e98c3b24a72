"""Tests of dspy_infra/executors: Slurm against the single-node Slurm CI runs, Ray against
the two-node Ray cluster of ``bash scripts/ray.sh start`` (head on 127.0.0.1:26379)."""

from __future__ import annotations

import importlib.util
import socket

import pytest
from adoption import RAY_ADDRESS
from engines import skip_or_fail


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    """The address of a running Ray cluster (skip, or fail in CI, without one)."""
    if importlib.util.find_spec("ray") is None:
        skip_or_fail(
            "Ray is not installed (fix: .venv/bin/pip install -e '.[ray]', or make venv EXTRAS=dev,ray)"
        )
    if not _answers(RAY_ADDRESS):
        skip_or_fail(f"no Ray cluster answers at {RAY_ADDRESS} (run: bash scripts/ray.sh start)")
    return RAY_ADDRESS
