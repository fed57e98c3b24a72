"""The ``container`` task handler against a raw one-shot container, on each real engine.

Every variant runs the same one-shot container (the busybox test image, ``sh -c "echo hi"``,
no network) to its end: created, started, waited for, its output read, removed. Per round
each variant runs once, in a new (seeded, shuffled) order.

- *raw*: bare aiodocker ``containers.create``, ``start``, ``wait``, ``log``, ``delete`` on
  one open client (the floor);
- *handler*: ``container_handler`` called directly with no scheduler (``ctx.shared`` is None):
  it opens a backend for the call and closes it after;
- *handler_shared*: the handler with a ``SharedResources`` its caller owns (the backend is
  opened by the first call and kept for the next ones, closed by the owner);
- *task*: a ``container`` task through a real ``Scheduler`` (submit, then wait for the
  result): the scheduler owns the shared backend;
- *raw_libpod_wait* (Podman only): *raw*, but waiting through libpod's wait endpoint with a
  10 ms interval, as the backend does (Podman's Docker-compatible wait looks at the container
  every 250 ms, so *raw* sees an exit up to 250 ms late).

Ratios are medians of per-round ratios to *raw*. Target: the task <= 1.1x raw on both
engines. Run by ``benchmarks/services.py`` (``--containers N``; ``--n 0 --rounds 0`` for
this row alone), on each engine that answers.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import aiodocker  # noqa: E402

from dspy_infra.config import load_settings  # noqa: E402
from dspy_infra.events import EventBus  # noqa: E402
from dspy_infra.handlers.container import container_handler  # noqa: E402
from dspy_infra.metrics import InfraMetrics  # noqa: E402
from dspy_infra.models import TaskSpec, TaskStatus  # noqa: E402
from dspy_infra.plugins import build_plugin_manager  # noqa: E402
from dspy_infra.scheduler.context import SharedResources, TaskContext  # noqa: E402
from dspy_infra.scheduler.scheduler import Scheduler  # noqa: E402

__all__ = ["run_engine"]

_CMD = "echo hi"


async def run_engine(kind: str, host: str, image: str, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dspy-bench-") as home:
        settings = load_settings(env={}, home=Path(home), durable=False, docker_host=host)
        shared = SharedResources()
        pm = build_plugin_manager(load_entry_points=False)
        async with (
            aiodocker.Docker(url=host) as docker,
            Scheduler(settings, bus=EventBus(), metrics=InfraMetrics(), plugins=pm) as scheduler,
        ):
            try:
                counter = iter(range(1_000_000))

                async def raw_one_shot(wait: Callable[[Any], Awaitable[object]]) -> None:
                    container = await docker.containers.create(
                        {
                            "Image": image,
                            "Cmd": ["/bin/sh", "-c", _CMD],
                            "HostConfig": {"NetworkMode": "none"},
                        }
                    )
                    await container.start()
                    await wait(container)
                    await container.log(stdout=True, stderr=True)
                    await container.delete(force=True)

                async def raw() -> None:
                    await raw_one_shot(lambda container: container.wait())

                async def libpod_wait(container: Any) -> object:
                    # Podman only: libpod's wait endpoint with a 10 ms interval (its
                    # Docker-compatible wait looks every 250 ms), as the backend does.
                    return await docker._query_json(
                        f"v4.0.0/libpod/containers/{container.id}/wait",
                        method="POST",
                        params={"condition": "stopped", "interval": "10ms"},
                        versioned_api=False,
                        timeout=None,
                    )

                async def raw_libpod_wait() -> None:
                    await raw_one_shot(libpod_wait)

                async def handler() -> None:
                    payload = {"image": image, "cmd": _CMD}
                    await container_handler(TaskContext(TaskSpec("c", payload=payload), 1, settings))

                async def handler_shared() -> None:
                    payload = {"image": image, "cmd": _CMD}
                    await container_handler(TaskContext(TaskSpec("c", payload=payload), 1, settings, shared))

                async def task() -> None:
                    task_id = f"c{next(counter)}"
                    payload = {"handler": "container", "image": image, "cmd": _CMD}
                    await scheduler.submit(TaskSpec(task_id, payload=payload))
                    result = await scheduler.wait(task_id, timeout=60)
                    assert result.status is TaskStatus.COMPLETED, result.error

                variants: dict[str, Callable[[], Awaitable[None]]] = {
                    "raw": raw,
                    "handler": handler,
                    "handler_shared": handler_shared,
                    "task": task,
                }
                if kind == "podman":
                    variants["raw_libpod_wait"] = raw_libpod_wait
                for run in variants.values():  # warm-up; opens the shared backends
                    await run()
                samples: dict[str, list[float]] = {name: [] for name in variants}
                names = list(variants)
                shuffler = random.Random(11)  # a new order each round, the same each run
                for _ in range(rounds):
                    for name in shuffler.sample(names, len(names)):
                        started = time.perf_counter()
                        await variants[name]()
                        samples[name].append(time.perf_counter() - started)
            finally:
                await shared.aclose()
    out: dict[str, Any] = {}
    for name, values in samples.items():
        ms = statistics.median(values) * 1000
        ratio = statistics.median(v / r for v, r in zip(values, samples["raw"], strict=True))
        out[f"container_{name}_ms"] = round(ms, 1)
        out[f"container_{name}_over_raw"] = round(ratio, 3)
        print(f"{kind:6s} container {name:15s} median {ms:7.1f} ms  x{ratio:.3f} of raw  (n={rounds})")
    print(f"{kind:6s} container task/raw       {out['container_task_over_raw']:.3f}  (target <= 1.1)")
    if "raw_libpod_wait" in samples:
        vs_fast = statistics.median(
            v / r for v, r in zip(samples["task"], samples["raw_libpod_wait"], strict=True)
        )
        out["container_task_over_raw_libpod_wait"] = round(vs_fast, 3)
        print(f"{kind:6s} container task/raw with libpod's 10 ms wait  {vs_fast:.3f}")
    return out
