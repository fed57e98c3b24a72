"""Service start cost through dspy_infra against raw aiodocker, on one real engine and image.

1. **Start overhead.** Alternating, ``--n`` times each, on the same engine and image (busybox
   ``httpd``, built through the engine API from the host's ``/bin/busybox``):

   - *raw*: aiodocker ``containers.create`` + ``start``, then poll the published port until
     the service answers;
   - *dspy_infra*: ``DockerBackend.run`` + ``wait_until_healthy`` (exactly what the
     ``ServiceManager`` does for one service), with an ``http`` health check.

   Both stop the clock on the same event, the service's first answer on its published port
   (the first bytes of its HTTP reply). A bare TCP accept is not used as the finish line:
   Docker's port proxy accepts on the host port before anything listens inside, so an accept
   would time the proxy, not the service. ``start_overhead_ratio`` = median dspy_infra time
   over median raw time (target <= 1.05).

2. **Graph.** A three-level graph (``base`` -> ``left``, ``right`` -> ``top``) brought up by
   ``ServiceManager.ensure`` against its critical path: the sum over levels of the slowest
   *single* start in that level, each single start measured alone through the same path in
   the same run (alternating with the graph runs). ``graph_ratio`` = median graph wall time
   over median critical path (target <= 1.1). Siblings started together each take longer
   than one started alone (the engine sets up their networks one at a time, on few cores),
   so a second floor is measured too: raw aiodocker starting each level's containers at once,
   level after level; ``graph_ratio_vs_raw_levels`` is what dspy_infra adds over that.

Run ``bash scripts/engines.sh start`` first. Prints the figures; the last line is one JSON
object. Removing containers between rounds is not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test image builders (one place for them)

import aiodocker  # noqa: E402
from engines import ensure_test_images, free_port, image_build_contexts  # noqa: E402

from dspy_infra.backends.base import LABEL_OWNER, LABEL_SERVICE  # noqa: E402
from dspy_infra.backends.docker import DockerBackend, container_config  # noqa: E402
from dspy_infra.config import Settings  # noqa: E402
from dspy_infra.events import EventBus  # noqa: E402
from dspy_infra.metrics import InfraMetrics  # noqa: E402
from dspy_infra.models import DependsOn, HealthCheck, PortMapping, ServiceSpec  # noqa: E402
from dspy_infra.plugins import build_plugin_manager  # noqa: E402
from dspy_infra.services.health import wait_until_healthy  # noqa: E402
from dspy_infra.services.manager import ServiceManager  # noqa: E402

__all__ = ["main"]

_HOSTS = {"docker": "unix:///run/dspy-test/docker.sock", "podman": "unix:///run/dspy-test/podman.sock"}
# A shell that traps TERM so stops between rounds are quick (httpd as PID 1 ignores TERM).
_HTTPD = ["sh", "-c", 'httpd -f -p 8080 -h /www & trap "exit 0" TERM; wait']
_POLL = 0.005  # raw path: seconds between attempts (tighter than any health backoff)
_SETTLE = 0.2  # after removing a container the engine still tears down its network: let it


def _spec(name: str, image: str, port: int, deps: Sequence[str] = ()) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        image=image,
        command=_HTTPD,
        ports=[PortMapping(8080, port)],
        depends_on=[DependsOn(d) for d in deps],
        health=HealthCheck(kind="http", path="/index.html", interval=0.5, startup_timeout=60),
    )


async def _first_answer(port: int) -> None:
    """Poll until the service behind 127.0.0.1:port answers an HTTP request (raw sockets)."""
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /index.html HTTP/1.0\r\n\r\n")
                if await reader.read(12):
                    return
            finally:
                writer.close()
        except OSError:
            pass
        await asyncio.sleep(_POLL)


async def raw_start(
    docker: aiodocker.Docker, spec: ServiceSpec, network: str, labels: dict[str, str]
) -> tuple[float, str]:
    # The same create body dspy_infra sends, built before the clock starts.
    config = container_config(spec, instance_name=spec.name, labels=labels, network=network)
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    container = await docker.containers.create(config, name=name)
    await container.start()
    await _first_answer(spec.ports[0].host_port or 0)
    return time.perf_counter() - started, container.id


async def dspy_start(backend: DockerBackend, spec: ServiceSpec, labels: dict[str, str]) -> tuple[float, str]:
    name = f"bench-dspy-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    instance = await backend.run(spec, instance_name=name, labels=labels)
    await wait_until_healthy(backend, spec, instance)
    return time.perf_counter() - started, instance.id


async def _clean(backend: DockerBackend, owner: str) -> None:
    for instance in await backend.list_instances({LABEL_OWNER: owner}):
        await backend.remove(instance.id)


async def start_overhead(backend: DockerBackend, image: str, n: int) -> dict[str, Any]:
    owner = backend.settings.resolved_owner()
    labels = {LABEL_OWNER: owner, LABEL_SERVICE: "web"}
    await backend.prepare([_spec("web", image, free_port())])
    # One untimed round of each warms the engine's caches and our connection pool.
    await raw_start(backend.docker, _spec("web", image, free_port()), backend.network, labels)
    await dspy_start(backend, _spec("web", image, free_port()), labels)
    await _clean(backend, owner)
    raw: list[float] = []
    ours: list[float] = []
    for i in range(n):
        order = ("raw", "dspy") if i % 2 == 0 else ("dspy", "raw")
        for which in order:
            spec = _spec("web", image, free_port())
            if which == "raw":
                raw.append((await raw_start(backend.docker, spec, backend.network, labels))[0])
            else:
                ours.append((await dspy_start(backend, spec, labels))[0])
            await _clean(backend, owner)
            await asyncio.sleep(_SETTLE)
    raw_ms, ours_ms = statistics.median(raw) * 1000, statistics.median(ours) * 1000
    # Each round's two starts ran back to back: the median of their ratios cancels the drift
    # of a machine shared with other work better than a ratio of medians does.
    ratio = statistics.median(o / r for o, r in zip(ours, raw, strict=True))
    print(f"start  raw aiodocker   median {raw_ms:7.1f} ms  (min {min(raw) * 1000:6.1f}, n={n})")
    print(f"start  dspy_infra      median {ours_ms:7.1f} ms  (min {min(ours) * 1000:6.1f}, n={n})")
    print(f"start  overhead ratio  {ratio:.3f}  (median of per-round ratios; target <= 1.05)")
    return {
        "raw_start_ms": raw_ms,
        "dspy_start_ms": ours_ms,
        "start_overhead_ratio": ratio,
        "start_overhead_ratio_of_medians": ours_ms / raw_ms,
    }


_LEVELS: tuple[tuple[tuple[str, tuple[str, ...]], ...], ...] = (
    (("base", ()),),
    (("left", ("base",)), ("right", ("base",))),
    (("top", ("left", "right")),),
)


def _graph_specs(image: str) -> list[ServiceSpec]:
    return [_spec(name, image, free_port(), deps) for level in _LEVELS for name, deps in level]


async def critical_path(backend: DockerBackend, image: str) -> float:
    """Sum over levels of the slowest single start, each started alone."""
    owner = backend.settings.resolved_owner()
    total = 0.0
    for level in _LEVELS:
        slowest = 0.0
        for name, _deps in level:
            spec = _spec(name, image, free_port())
            elapsed, _id = await dspy_start(backend, spec, {LABEL_OWNER: owner, LABEL_SERVICE: name})
            slowest = max(slowest, elapsed)
            await _clean(backend, owner)
        total += slowest
    return total


async def raw_levels(backend: DockerBackend, image: str) -> float:
    """The engine's own floor for the graph: raw aiodocker starts each level's containers
    at once (waiting for all to answer), levels one after another."""
    owner = backend.settings.resolved_owner()
    total = 0.0
    for level in _LEVELS:
        specs = [_spec(name, image, free_port()) for name, _deps in level]
        started = time.perf_counter()
        await asyncio.gather(
            *(
                raw_start(
                    backend.docker, spec, backend.network, {LABEL_OWNER: owner, LABEL_SERVICE: spec.name}
                )
                for spec in specs
            )
        )
        total += time.perf_counter() - started
        await _clean(backend, owner)
    return total


async def graph_wall(backend: DockerBackend, image: str, home: Path) -> float:
    settings = Settings(home=home, backend="docker", network=backend.network, owner=backend.settings.owner)
    specs = _graph_specs(image)
    async with ServiceManager(
        settings,
        bus=EventBus(),
        metrics=InfraMetrics(),
        plugins=build_plugin_manager(load_entry_points=False),
        backend=backend,
        extra_services=specs,
    ) as manager:
        started = time.perf_counter()
        await manager.ensure(["top"])
        elapsed = time.perf_counter() - started
        await manager.stop(timeout=5)
    await _clean(backend, backend.settings.resolved_owner())
    return elapsed


async def graph(backend: DockerBackend, image: str, rounds: int, home: Path) -> dict[str, Any]:
    await graph_wall(backend, image, home)  # warm-up, untimed
    samples: dict[str, list[float]] = {"wall": [], "path": [], "raw_levels": []}
    for i in range(rounds):
        # Rotate the order so machine load drifts over all three alike.
        order = ["wall", "path", "raw_levels"][i % 3 :] + ["wall", "path", "raw_levels"][: i % 3]
        for which in order:
            if which == "wall":
                samples[which].append(await graph_wall(backend, image, home))
            elif which == "path":
                samples[which].append(await critical_path(backend, image))
            else:
                samples[which].append(await raw_levels(backend, image))
    wall_ms, path_ms, raw_ms = (statistics.median(samples[k]) * 1000 for k in ("wall", "path", "raw_levels"))
    print(f"graph  3 levels wall    median {wall_ms:7.1f} ms  (ServiceManager.ensure, n={rounds})")
    print(f"graph  critical path    median {path_ms:7.1f} ms  (sum of slowest single start per level)")
    print(
        f"graph  raw level floor  median {raw_ms:7.1f} ms  (raw aiodocker, each level's containers at once)"
    )
    # Per-round ratios (the three runs of a round are back to back), then their median.
    ratio = statistics.median(w / p for w, p in zip(samples["wall"], samples["path"], strict=True))
    vs_raw = statistics.median(w / r for w, r in zip(samples["wall"], samples["raw_levels"], strict=True))
    print(f"graph  ratio            {ratio:.3f}  (median of per-round ratios; target <= 1.1)")
    print(f"graph  ratio vs raw     {vs_raw:.3f}  (over the engine's own cost of parallel starts)")
    return {
        "graph_wall_ms": wall_ms,
        "critical_path_ms": path_ms,
        "raw_levels_ms": raw_ms,
        "graph_ratio": ratio,
        "graph_ratio_vs_raw_levels": vs_raw,
    }


async def run(
    engine: str, host: str, n: int, rounds: int, contexts: dict[str, tuple[bytes, str]]
) -> dict[str, Any]:
    async with aiodocker.Docker(url=host) as docker:
        images = await ensure_test_images(docker, contexts)
    with tempfile.TemporaryDirectory(prefix="dspy-bench-") as tmp:
        settings = Settings(
            home=Path(tmp) / "home",
            network=f"bench-{uuid.uuid4().hex[:8]}",
            owner=f"bench-{uuid.uuid4().hex[:8]}",
        )
        async with DockerBackend(settings, host=host) as backend:
            try:
                print(
                    f"engine {engine} ({backend.engine}, API {backend.api_version}) at {host}; image {images.busybox}"
                )
                result: dict[str, Any] = {"engine": engine}
                result |= await start_overhead(backend, images.busybox, n)
                result |= await graph(backend, images.busybox, rounds, Path(tmp) / "graph-home")
                return result
            finally:
                await _clean(backend, settings.resolved_owner())
                try:
                    await (await backend.docker.networks.get(settings.network)).delete()
                except aiodocker.DockerError:
                    pass


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=sorted(_HOSTS), default="docker")
    parser.add_argument("--host", help="engine address (default: the engines.sh socket of --engine)")
    parser.add_argument("--n", type=int, default=40, help="starts of each kind")
    parser.add_argument("--rounds", type=int, default=6, help="graph runs (and critical-path runs)")
    args = parser.parse_args(argv)
    host = args.host or os.environ.get(f"DSPY_INFRA_TEST_{args.engine.upper()}_HOST") or _HOSTS[args.engine]
    contexts = image_build_contexts()  # reads host files: before the event loop starts
    result = asyncio.run(run(args.engine, host, args.n, args.rounds, contexts))
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
