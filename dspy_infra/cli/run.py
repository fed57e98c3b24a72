"""What every command shares: exit codes, argument types, and running against an infra
(``ensure_infra()``, shut down at the command's end, saying so if that takes a while)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ..api import InfraAPI
from ..errors import SpecError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "SHUTDOWN_NOTICE_AFTER",
    "Command",
    "CommandFailed",
    "infra_kwargs",
    "non_negative_int",
    "parse_pairs",
    "positive_float",
    "run_with_infra",
    "shutdown_with_notice",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

N = TypeVar("N", int, float)

#: How a command group adds a command: ``command(name, run, help)`` returns its parser.
Command = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


class CommandFailed(Exception):
    """A command finished but what it did failed (exit 1), with a one-line message."""


def parse_pairs(values: Sequence[str] | None, field: str) -> dict[str, str]:
    """``["k=v", ...]`` to a dict; a missing ``=``, an empty key or a repeated key is refused."""
    out: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(
                f"expected KEY=VALUE, got {item!r}", field=field, fix=f"write e.g. {field} cmd=echo"
            )
        if key in out:
            raise SpecError(f"key {key!r} given twice", field=field, fix="give each key once")
        out[key] = value
    return out


def _number(text: str, parse: Callable[[str], N], kind: str, bound: str, ok: Callable[[N], bool]) -> N:
    """``text`` read by ``parse``; an argparse error naming ``kind`` or ``bound`` otherwise."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
    return value


def non_negative_int(text: str) -> int:
    return _number(text, int, "a whole number", ">= 0", lambda value: value >= 0)


def positive_float(text: str) -> float:
    # `not > 0` also refuses NaN.
    return _number(text, float, "a number of seconds", "> 0", lambda value: value > 0)


def infra_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "config_file": args.config,
        "addr": args.addr,
        "state_dir": args.home,
        "token": args.token,
        "mode": args.mode,
        "backend": getattr(args, "backend", None),
    }


#: Seconds of a silent shutdown before the CLI says what it is waiting for.
SHUTDOWN_NOTICE_AFTER = 0.5


def run_with_infra(args: argparse.Namespace, body: Callable[[InfraAPI], Awaitable[int]]) -> int:
    async def run() -> int:
        from ..ensure import ensure_infra

        infra = await ensure_infra(**infra_kwargs(args))
        try:
            return await body(infra)
        finally:
            await shutdown_with_notice(infra)

    return asyncio.run(run())


async def shutdown_with_notice(infra: InfraAPI) -> None:
    """Shut the infra down; if that takes a while (running tasks drain, services stop), say
    so on stderr instead of hanging silently."""
    from ..ensure import shutdown_infra

    closing = asyncio.ensure_future(shutdown_infra())
    try:
        await asyncio.wait_for(asyncio.shield(closing), timeout=SHUTDOWN_NOTICE_AFTER)
    except TimeoutError:
        grace = infra.settings.shutdown_grace if infra.mode == "embedded" else None
        wait = f"up to {grace:g} s" if grace is not None else "a moment"
        sys.stderr.write(
            f"dspy-infra: stopping: running tasks get {wait} to finish (the rest stay stored"
            " for the next start), then the services this command started stop...\n"
        )
        sys.stderr.flush()
        await closing
