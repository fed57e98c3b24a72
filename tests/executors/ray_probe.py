"""Handlers imported on the Ray cluster by path (``"ray_probe:where"``): the tests give the
workers this directory on ``PYTHONPATH`` through the class's runtime_env."""

from __future__ import annotations

from typing import Any


async def where(ctx: Any) -> dict[str, Any]:
    """The node and worker process this attempt ran on."""
    import os

    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "task": ctx.spec.id}
