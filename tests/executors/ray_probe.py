"""Handlers imported on the Ray cluster by path (``"ray_probe:where"``): the tests give the
workers this directory on ``PYTHONPATH`` through the class's runtime_env."""

from __future__ import annotations

from typing import Any


async def where(ctx: Any) -> dict[str, Any]:
    """The node and worker process this attempt ran on."""
    import os

    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "task": ctx.spec.id}


#: (task id, attempt) of every ``count`` attempt started in this process (the runner's
#: property test runs the runner in process).
STARTED: list[tuple[str, int]] = []


async def count(ctx: Any) -> dict[str, Any]:
    """Records that the attempt started; returns its attempt number."""
    STARTED.append((ctx.spec.id, ctx.attempt))
    return {"attempt": ctx.attempt}
