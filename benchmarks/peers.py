"""The peers of the issue-11 table, measured the same way as dspy_infra over gRPC: Ray and
Celery (Redis broker and result backend), each only where it is installed.

Run as a script, one peer per process (``python benchmarks/peers.py ray``), so that a peer's
threads and child processes never share a process with the client being measured; the last
line is one JSON object: ``{"peer": ..., "p50_ms", "p99_ms", "per_s"}`` or ``{"peer": ...,
"skipped": reason}``. ``benchmarks/rpc.py`` runs it beside the dspy-infra figures.

- round trip: ``--n`` sequential submit -> result calls of a no-op task, p50/p99
  (Ray: ``ray.get(noop.remote())``; Celery: ``noop.delay().get()``);
- many clients: ``--clients`` threads doing the same round trips, ``--tp-n`` tasks in all.

Ray runs a private local instance (``ray.init(address="local", num_cpus=2,
include_dashboard=False)``: ``address="local"`` so that a cluster someone else started on this
machine is never joined; a local instance needs no ``RAY_AUTH_MODE``). Celery runs one worker
subprocess (prefork, ``--concurrency 2``) against a private ``redis-server`` on a free port
(never 6379).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _rpc_support import stop_process as stop

__all__ = ["main", "run_peer"]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _measure(call: Callable[[], object], n: int, tp_n: int, clients: int) -> dict[str, float]:
    for _ in range(min(100, n)):
        call()  # warm up
    latencies = []
    for _ in range(n):
        began = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - began)
    left = [tp_n]
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            call()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_s = tp_n / (time.perf_counter() - began)
    return {"p50_ms": _pct(latencies, 0.5), "p99_ms": _pct(latencies, 0.99), "per_s": per_s}


def _ray(args: argparse.Namespace) -> dict[str, Any]:
    if importlib.util.find_spec("ray") is None:
        return {"skipped": "ray is not installed (pip install 'dspy-infra[bench]')"}
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote
        def noop() -> None:
            return None

        return _measure(lambda: ray.get(noop.remote()), args.n, args.tp_n, args.clients)
    finally:
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _redis(workdir: Path) -> Iterator[int]:
    server = shutil.which("redis-server")
    if server is None:
        raise LookupError("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise LookupError(f"redis-server did not answer on port {port}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


CELERY_APP = """
from celery import Celery
import os
url = os.environ["BENCH_REDIS_URL"]
app = Celery("bench_tasks", broker=url, backend=url)
app.conf.update(worker_prefetch_multiplier=16, task_acks_late=False, result_expires=600,
                broker_connection_retry_on_startup=True)

@app.task
def noop():
    return None
"""


def _celery(args: argparse.Namespace) -> dict[str, Any]:
    for module in ("celery", "redis"):
        if importlib.util.find_spec(module) is None:
            return {"skipped": f"{module} is not installed (pip install 'dspy-infra[bench]')"}
    with tempfile.TemporaryDirectory(prefix="dspy-bench-celery-") as tmp:
        workdir = Path(tmp)
        try:
            redis_cm = _redis(workdir)
            port = redis_cm.__enter__()
        except LookupError as exc:
            return {"skipped": str(exc)}
        try:
            (workdir / "bench_tasks.py").write_text(textwrap.dedent(CELERY_APP))
            env = {**os.environ, "BENCH_REDIS_URL": f"redis://127.0.0.1:{port}/0", "PYTHONPATH": str(workdir)}
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bench_tasks", "worker", "--concurrency", "2",
                 "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"],
                cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                os.environ["BENCH_REDIS_URL"] = env["BENCH_REDIS_URL"]
                sys.path.insert(0, str(workdir))
                import bench_tasks

                bench_tasks.noop.delay().get(timeout=60)  # the worker is up
                return _measure(
                    lambda: bench_tasks.noop.delay().get(timeout=60), args.n, args.tp_n, args.clients
                )
            finally:
                stop(worker, timeout=20)
        finally:
            redis_cm.__exit__(None, None, None)


PEERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"ray": _ray, "celery": _celery}


def run_peer(name: str, *, n: int, tp_n: int, clients: int, timeout: float = 600) -> dict[str, Any]:
    """Measure one peer in a subprocess; its figures, or ``{"skipped": reason}``."""
    argv = [sys.executable, str(Path(__file__).resolve()), name, "--n", str(n), "--tp-n", str(tp_n)]
    argv += ["--clients", str(clients)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"peer": name, "skipped": f"did not finish within {timeout:g} s"}
    lines = out.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"peer": name, "skipped": f"failed (exit {out.returncode}): {out.stderr.strip()[-300:]}"}
    return dict(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--n", type=int, default=1000, help="sequential round trips")
    parser.add_argument("--tp-n", type=int, default=3000, help="tasks for the many-clients figure")
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        result = {"peer": args.peer, **PEERS[args.peer](args)}
    except Exception as exc:  # a peer that breaks is reported, never the end of the run
        result = {"peer": args.peer, "skipped": f"{type(exc).__name__}: {exc}"[:300]}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
