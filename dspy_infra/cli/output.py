"""How the commands print: rich tables for people, JSON (``--json``) for programs."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from .run import EXIT_OK

__all__ = [
    "as_dict",
    "console",
    "pairs_text",
    "print_json",
    "print_listing",
    "status_text",
    "table",
    "ts",
    "value_text",
]

T = TypeVar("T")


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Not a terminal (a pipe, a log): wide enough that tables of ids do not wrap.
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, markup=False, soft_wrap=True, width=width)


def ts(seconds: float) -> str:
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def value_text(value: Any) -> str:
    """A JSON value for a human: a string as is (trailing newline dropped), else compact JSON."""
    if isinstance(value, str):
        return value.rstrip("\n")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def pairs_text(mapping: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={value_text(v)}" for k, v in mapping.items())


def as_dict(obj: Any) -> dict[str, Any]:
    """An attrs instance, a mapping or an object with a ``__dict__`` as a JSON-able dict."""
    if attrs.has(type(obj)):
        doc = attrs.asdict(obj, recurse=True)
    elif isinstance(obj, Mapping):
        doc = dict(obj)
    else:
        doc = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    return json.loads(json.dumps(doc, default=str))


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def status_text(value: Any) -> str:
    return str(getattr(value, "value", value))


def table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    fold: bool = False,
    right: Container[str] = (),
) -> Any:
    """A rich table of ``rows``: the human view of every listing (``--json`` is the other).
    ``fold`` wraps long cells (URLs) instead of cutting them; ``right`` aligns those columns."""
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(
            column,
            overflow="fold" if fold else "ellipsis",
            justify="right" if column in right else "left",
        )
    for row in rows:
        table.add_row(*row)
    return table


def print_listing(
    as_json: bool,
    items: Sequence[T],
    *,
    doc: Callable[[T], Any],
    title: str,
    columns: Sequence[str],
    row: Callable[[T], Sequence[str]],
) -> int:
    """A listing command's output: ``doc`` of each item as a JSON array with ``--json``, else
    a table titled ``title (count)`` with ``row`` of each item."""
    if as_json:
        print_json([doc(item) for item in items])
    else:
        console().print(table(f"{title} ({len(items)})", columns, [row(item) for item in items]))
    return EXIT_OK
