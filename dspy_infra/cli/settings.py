"""``config init | show | reference``: write, show or document the settings (the reference
itself is ``config_doc.py``'s)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import CONFIG_FILE_NAME, load_settings
from ..config_doc import render_config_template, render_settings_markdown
from ..errors import AlreadyExists, SpecError
from .output import as_dict, console, print_json
from .run import EXIT_OK, Command

__all__ = ["register"]


def _cmd_config(args: argparse.Namespace) -> int:
    out = console()
    if args.cfg_command == "init":
        path = Path(args.path)
        if path.is_dir():
            path = path / CONFIG_FILE_NAME
        if path.exists() and not args.force:
            raise AlreadyExists(f"{path} already exists", field="PATH", fix="pass --force to overwrite it")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render_config_template())
        except OSError as exc:
            raise SpecError(f"cannot write {path}: {exc.strerror}", field="PATH") from None
        out.print(f"wrote {path}")
        return EXIT_OK
    if args.cfg_command == "reference":
        sys.stdout.write(render_settings_markdown())
        return EXIT_OK
    settings = load_settings(args.config, home=args.home, token=args.token, addr=args.addr, mode=args.mode)
    doc = as_dict(settings)
    if doc.get("token"):
        doc["token"] = "***"
    doc["resolved_home"] = str(settings.resolved_home())
    doc["resolved_owner"] = settings.resolved_owner()
    print_json(doc)
    return EXIT_OK


def register(command: Command) -> None:
    """Add ``config`` and its subcommands."""
    p = command("config", _cmd_config, "write, show or document the settings")
    cfg = p.add_subparsers(dest="cfg_command", required=True, metavar="SUBCOMMAND")
    i = cfg.add_parser("init", help=f"write a commented {CONFIG_FILE_NAME}")
    i.add_argument("path", nargs="?", default=CONFIG_FILE_NAME, metavar="PATH")
    i.add_argument("--force", action="store_true", help="overwrite an existing file")
    cfg.add_parser("show", help="the effective settings as JSON")
    cfg.add_parser(
        "reference",
        help="every setting with its environment variable, type, default and meaning (a markdown table)",
    )
