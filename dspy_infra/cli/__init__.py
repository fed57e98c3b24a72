"""The ``dspy-infra`` command.

Every command that needs an infra goes through ``ensure_infra()``: it talks to the server
named by ``--addr`` / ``DSPY_INFRA_ADDR``, or in ``mode=auto`` to the one at the default
address when it serves this state directory, and otherwise runs an embedded ``Infra`` on the
state directory for the length of the command (shut down at its end, saying so if it waits).

Errors are one line on stderr, ``dspy-infra: error: <text>``, where the text is the
``InfraError``'s own (it names the field and the fix), with fixes that name Python calls
rewritten as the matching ``dspy-infra`` command (``cli_fix``). Exit codes: 0 ok, 1 a failure
(a task failed, was cancelled or had no handler, a service did not come up, a server did not
answer), 2 bad input (a ``SpecError``, an unknown id, a bad argument), 130 interrupted.
``--debug`` shows the traceback instead. Results are JSON objects and print as JSON.

One module per command group, each adding its commands to the parser (``register``):
``serve`` (serve, status, demo), ``services`` (up, down, logs, services, catalog), ``tasks``
(submit, cancel, tasks, events), ``workflows`` (workflow), ``settings`` (config; the settings
reference itself is ``config_doc.py``'s). ``output`` prints tables and JSON; ``run`` holds
exit codes, argument types and running against an infra.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from ..config import CONFIG_FILE_NAME
from ..config_doc import SettingDoc, render_config_template, render_settings_markdown, settings_reference
from ..errors import AlreadyExists, InfraError, NotFound, SpecError
from ..rpc import import_betterproto2_without_pydantic
from . import serve, services, settings, tasks, workflows
from .run import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CommandFailed, parse_pairs

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "SettingDoc",
    "build_parser",
    "cli_fix",
    "command_tree",
    "main",
    "parse_pairs",
    "render_config_template",
    "render_settings_markdown",
    "settings_reference",
]


class _Parser(argparse.ArgumentParser):
    """argparse that raises a one-line ``SpecError`` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise SpecError(message, field=self.prog, fix=f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    """The ``dspy-infra`` argument parser: global options, then each group's commands."""
    parser = _Parser(
        prog="dspy-infra",
        description="Services, tasks and workflows for AI-agent apps. Talks to a running server "
        "when one answers, else runs embedded.",
    )
    parser.add_argument("--config", metavar="FILE", help=f"settings file (default: ./{CONFIG_FILE_NAME})")
    parser.add_argument("--addr", metavar="HOST:PORT", help="gRPC address of a running server")
    parser.add_argument("--home", metavar="DIR", help="state directory (store, logs, locks)")
    parser.add_argument("--token", help="bearer token for the server")
    parser.add_argument(
        "--mode",
        choices=("auto", "embedded", "remote"),
        help="auto (default): the server of this state directory if one runs, else embedded",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(run=fn)
        return p

    for group in (serve, services, tasks, workflows, settings):
        group.register(command)
    return parser


def command_tree() -> dict[str, set[str]]:
    """Every command with its subcommands (an empty set when it has none): what the docs may
    name. argparse keeps its subparsers private; this is the one place that reads them."""
    tree: dict[str, set[str]] = {}
    for name, sub in _subcommands(build_parser()).items():
        tree[name] = set(_subcommands(sub))
    return tree


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, InfraError):
            return leaf
    return leaves[0] if leaves else group


#: Fixes written for Python callers, and the same advice as a command (the CLI's user types
#: commands). Each pattern is matched against an error's ``fix``; unknown fixes pass as is.
_CLI_FIXES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (
        re.compile(r"ensure\(\[(?P<names>[^\]]*)\]\)"),
        lambda m: "`dspy-infra up " + " ".join(n.strip(" '\"") for n in m["names"].split(",")) + "`",
    ),
    (
        re.compile(r"\(?infra\.services\.pull\)?"),
        lambda m: "(`docker pull IMAGE`, or `dspy-infra up` pulls it)",
    ),
    (re.compile(r"mode='embedded'"), lambda m: "--mode embedded"),
    (re.compile(r"mode='remote'"), lambda m: "--mode remote"),
    (re.compile(r"drop backend="), lambda m: "drop --backend"),
    (re.compile(r"await infra\.start\(\) first"), lambda m: "rerun the command"),
)


def cli_fix(fix: str) -> str:
    """Advice in an error as CLI advice: Python calls (``ensure(['redis'])``) become commands."""
    for pattern, replace in _CLI_FIXES:
        fix = pattern.sub(replace, fix)
    return fix


def _exit_code(err: InfraError) -> int:
    return EXIT_USAGE if isinstance(err, (SpecError, NotFound, AlreadyExists)) else EXIT_FAILURE


def _fail(text: str) -> None:
    sys.stderr.write(f"dspy-infra: error: {cli_fix(text)}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # The command's own process, one thread so far: the only place where hiding pydantic
    # from betterproto2 (a tenth of `serve`'s start) cannot race another import.
    import_betterproto2_without_pydantic()
    try:
        args = build_parser().parse_args(argv)
        try:
            return int(args.run(args))
        except BaseExceptionGroup as group:
            # Task groups wrap errors; report the first of ours (or the first at all).
            raise _first_leaf(group) from None
    except InfraError as err:
        if debug:
            raise
        _fail(str(err))
        return _exit_code(err)
    except CommandFailed as err:
        _fail(str(err))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        if debug:
            raise
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        text = str(err).splitlines()[0] if str(err) else ""
        _fail(f"unexpected {type(err).__name__}: {text} (rerun with --debug for the traceback)")
        return EXIT_FAILURE
