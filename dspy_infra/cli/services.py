"""Services: ``up``, ``down``, ``logs``, ``services`` (what runs, with URLs) and ``catalog``
(the specs you can start)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from ..api import InfraAPI
from ..config import CONFIG_FILE_NAME, load_settings
from ..errors import SpecError
from .output import console, print_json, status_text, table
from .run import EXIT_OK, Command, CommandFailed, non_negative_int, positive_float, run_with_infra

__all__ = ["register"]

_BAD_SERVICE = frozenset({"unhealthy", "failed"})


def _service_names(args: argparse.Namespace, settings_services: Mapping[str, Any]) -> list[str]:
    if args.names:
        return list(args.names)
    if settings_services:
        return list(settings_services)
    raise SpecError(
        "no services named",
        field="NAMES",
        fix=f"name them (e.g. `dspy-infra up redis`) or declare [services.NAME] tables in {CONFIG_FILE_NAME}",
    )


def _cmd_up(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn

    async def body(infra: InfraAPI) -> int:
        configured = infra.settings.services if infra.mode == "embedded" else {}
        names = _service_names(args, configured)
        out = console()
        final: dict[str, Any] = {}
        progress = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[status]:<10} {task.fields[message]}"),
            console=out,
            transient=not out.is_terminal,
        )
        with progress:
            rows: dict[str, Any] = {}
            keep = True if args.keep else None
            async for update in infra.services.start(names, parallel=not args.sequential, keep=keep):
                name = update.service_name
                if name not in rows:
                    rows[name] = progress.add_task(name, total=100, status="", message="")
                status = status_text(update.status)
                progress.update(rows[name], completed=update.progress, status=status, message=update.message)
                final[name] = update
        failed = []
        for name, update in final.items():
            status = status_text(update.status)
            mark = "FAILED" if status in _BAD_SERVICE else "ok"
            out.print(f"{name}: {status} [{mark}]" + (f" {update.message}" if update.message else ""))
            if status in _BAD_SERVICE:
                failed.append(name)
        if infra.mode == "embedded" and not args.keep:
            await infra.services.stop(list(final))
            out.print(
                "note: no server is running and --keep was not given, so they were stopped again"
                " as this command ends. `dspy-infra up --keep NAMES` leaves them running (the next"
                " command adopts them; `dspy-infra down` stops them), `dspy-infra serve` supervises them."
            )
        if failed:
            raise CommandFailed(f"service(s) did not come up: {', '.join(failed)}")
        return EXIT_OK

    return run_with_infra(args, body)


def _cmd_down(args: argparse.Namespace) -> int:
    async def body(infra: InfraAPI) -> int:
        names = list(args.names)
        if not names:
            states = await infra.services.status()
            names = [n for n, st in states.items() if status_text(st.status) != "stopped"]
        if not names:
            console().print("no services are running")
            return EXIT_OK
        results = await infra.services.stop(names, timeout=args.timeout)
        out = console()
        bad = []
        for name in names:
            outcome = results.get(name, "unknown")
            out.print(f"{name}: {outcome}")
            if outcome not in ("stopped", "not running", "ok", "already stopped"):
                bad.append(name)
        if bad:
            raise CommandFailed(f"could not stop: {', '.join(bad)}")
        return EXIT_OK

    return run_with_infra(args, body)


def _cmd_logs(args: argparse.Namespace) -> int:
    async def body(infra: InfraAPI) -> int:
        stream = infra.services.logs(args.name, follow=args.follow, tail=args.tail, since=args.since)
        async for entry in stream:
            target = sys.stderr if entry.stream == "stderr" else sys.stdout
            target.write(entry.message.rstrip("\n") + "\n")
            target.flush()
        return EXIT_OK

    return run_with_infra(args, body)


def _cmd_services(args: argparse.Namespace) -> int:
    """Each running service with its status and the URL a client connects to."""

    async def body(infra: InfraAPI) -> int:
        states = await infra.services.status(list(args.names) or None)
        running = {n: st for n, st in states.items() if status_text(st.status) != "stopped" or args.names}
        if args.json:
            print_json(
                {
                    n: {
                        "status": status_text(st.status),
                        "url": st.url,
                        "host": st.host,
                        "port": st.port,
                        "ports": {str(c): h for c, h in st.ports.items()},
                        "backend": st.backend,
                    }
                    for n, st in sorted(running.items())
                }
            )
            return EXIT_OK
        out = console()
        if not running:
            out.print("no services are running (start one: dspy-infra up NAME)")
            return EXIT_OK
        rows = [
            (
                name,
                status_text(st.status),
                st.url or "-",
                ", ".join(f"{c}->{h}" for c, h in sorted(st.ports.items())) or "-",
            )
            for name, st in sorted(running.items())
        ]
        columns = ("service", "status", "url", "ports (container->host)")
        out.print(table("Services", columns, rows, fold=True))
        return EXIT_OK

    return run_with_infra(args, body)


def _cmd_catalog(args: argparse.Namespace) -> int:
    """The service specs this configuration knows (built-ins, plugins, [services.NAME])."""
    from ..plugins import build_plugin_manager
    from ..services.catalog import build_catalog, spec_to_toml
    from ..services.graph import unknown_service
    from ..services.handles import default_url_template

    settings = load_settings(args.config, home=args.home)
    catalog = build_catalog(settings, build_plugin_manager(), expand_home=False)
    if args.show:
        spec = catalog.get(args.show)
        if spec is None:
            raise unknown_service(args.show, catalog, field="--show")
        sys.stdout.write(spec_to_toml(spec))
        return EXIT_OK
    rows = [
        (
            name,
            spec.image or "-",
            spec.command[0] if spec.command else "-",
            ", ".join(
                str(p.container_port) if not p.host_port else f"{p.host_port}:{p.container_port}"
                for p in spec.ports
            )
            or "-",
            spec.health.kind,
            default_url_template(spec) if spec.ports or spec.health.port else "-",
            "yes" if spec.required else "no",
        )
        for name, spec in sorted(catalog.items())
    ]
    columns = ("service", "image", "process command", "ports", "health", "url", "required")
    title = "Service catalog (dspy-infra catalog --show NAME prints one as TOML)"
    console().print(table(title, columns, rows, fold=True))
    return EXIT_OK


def register(command: Command) -> None:
    """Add ``up``, ``down``, ``logs``, ``services`` and ``catalog``."""
    p = command("up", _cmd_up, "start services (and their dependencies) with live progress")
    p.add_argument("names", nargs="*", metavar="NAMES")
    p.add_argument("--backend", choices=("auto", "docker", "process"))
    p.add_argument("--sequential", action="store_true", help="start one at a time")
    p.add_argument(
        "--keep", action="store_true", help="leave them running after this command (no server needed)"
    )

    p = command("down", _cmd_down, "stop services (default: every running one)")
    p.add_argument("names", nargs="*", metavar="NAMES")
    p.add_argument("--timeout", type=positive_float, default=10.0, help="seconds before a kill")

    p = command("logs", _cmd_logs, "a service's log lines")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", type=non_negative_int, help="only the last N lines")
    p.add_argument("--since", type=float, metavar="UNIX_TIME")

    p = command("services", _cmd_services, "running services with the URL a client connects to")
    p.add_argument("names", nargs="*", metavar="NAMES")
    p.add_argument("--json", action="store_true")
    p = command("catalog", _cmd_catalog, "the service specs you can start; --show NAME prints one as TOML")
    p.add_argument("--show", metavar="NAME", help="print NAME's spec as a [services.NAME] table to paste")
