"""``serve`` (the gRPC and HTTP faces for other processes), ``status`` (health, services,
queues and limits) and ``demo``."""

from __future__ import annotations

import argparse
import asyncio

from ..api import InfraAPI
from ..config import load_settings
from .output import as_dict, console, print_json, status_text, table, ts
from .run import EXIT_FAILURE, EXIT_OK, Command, non_negative_int, run_with_infra

__all__ = ["register"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import main as demo_main

    return int(demo_main() or 0)


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(
        args.config,
        home=args.home,
        token=args.token,
        backend=args.backend,
        host=args.host,
        grpc_port=args.grpc_port,
        env_manager_port=args.env_manager_port,
        http_port=args.http_port,
        mode="embedded",
    )
    from ..serve import run_server

    return int(asyncio.run(run_server(settings, stop_services=args.stop_services, own_process=True)) or 0)


def _cmd_status(args: argparse.Namespace) -> int:
    async def body(infra: InfraAPI) -> int:
        health = await infra.health()
        services = await infra.services.status()
        queues = await infra.queue_status()
        mode = "embedded" if infra.mode == "embedded" else "server"
        if args.json:
            print_json(
                {
                    "mode": mode,
                    "health": health,
                    "services": {n: as_dict(s) for n, s in services.items()},
                    "queues": {n: as_dict(q) for n, q in queues.items()},
                }
            )
            return EXIT_OK
        out = console()
        where = (
            f"embedded, home {infra.settings.resolved_home()}"
            if mode == "embedded"
            else f"{infra.location.removeprefix('the ')}"
            + (f", home {health['home']}" if health.get("home") else "")
        )
        out.print(
            f"dspy-infra {health.get('version', '?')} ({where}): "
            + ("healthy" if health.get("healthy") else "UNHEALTHY")
        )
        service_rows = [
            (
                name,
                status_text(st.status),
                st.backend or "-",
                ", ".join(f"{h}->{c}" for c, h in sorted(st.ports.items())) or "-",
                (st.instance_id or "-")[:12],
                ts(st.started_at),
                str(st.restarts),
            )
            for name, st in sorted(services.items())
        ]
        service_columns = ("service", "status", "backend", "ports", "instance", "started", "restarts")
        out.print(table("Services", service_columns, service_rows or [("(none)", "", "", "", "", "", "")]))
        queue_rows = [
            (name, str(q.depth), str(q.inflight), str(q.limit), str(q.min_limit), str(q.max_limit))
            for name, q in sorted(queues.items())
        ]
        queue_columns = ("class", "queued", "running", "limit", "min", "max")
        out.print(table("Queues and limits", queue_columns, queue_rows, right=queue_columns[1:]))
        return EXIT_OK if health.get("healthy") else EXIT_FAILURE

    return run_with_infra(args, body)


def register(command: Command) -> None:
    """Add ``serve``, ``status`` and ``demo``."""
    p = command("serve", _cmd_serve, "serve gRPC and HTTP for other processes (until SIGTERM/SIGINT)")
    p.add_argument("--host", help="bind address (non-loopback needs --token)")
    p.add_argument("--grpc-port", type=non_negative_int)
    p.add_argument("--env-manager-port", type=non_negative_int)
    p.add_argument("--http-port", type=non_negative_int)
    p.add_argument("--backend", choices=("auto", "docker", "process"))
    p.add_argument("--stop-services", action="store_true", help="stop running services on shutdown")

    p = command("status", _cmd_status, "health, services, queues and concurrency limits")
    p.add_argument("--json", action="store_true")

    command("demo", _cmd_demo, "run the demo on the embedded default (no container engine needed)")
