"""What the stores and the wire can hold, checked at the edge before anything is acknowledged.

SQLite holds 64-bit integers, finite reals and UTF-8 text; protobuf holds int32/int64, doubles
and valid UTF-8; JSON (our payloads, results, workflow inputs) holds objects, arrays,
strings, numbers, booleans and null. A value that passes validation but that one of them
cannot hold would fail later, inside a batch, after the client was told "accepted". So every
field that reaches a store or the wire passes one of these checks first, and each check
raises a ``SpecError`` that names the field and the fix.

Every check is linear in the size of its input and iterative (no recursion), so a hostile
value cannot hold the event loop or blow the stack, and every error echoes at most a short
``preview`` of the bad value, so a huge value cannot make a huge error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .errors import SpecError

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_ID_LENGTH",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_KEY_LENGTH",
    "JsonObject",
    "check_finite",
    "check_int",
    "check_json_object",
    "check_text",
    "decode_json_object",
    "json_text",
    "preview",
]

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
#: Longest task id, workflow id, run id or idempotency key.
MAX_ID_LENGTH = 256
#: Longest key of a JSON object (payload, result, input).
MAX_KEY_LENGTH = 256
#: Deepest nesting of arrays and objects in a JSON value.
MAX_JSON_DEPTH = 32
#: Default bound of one JSON document's encoded size (payloads use ``max_payload_bytes``).
MAX_JSON_BYTES = 1 << 20
_PREVIEW = 60

#: A JSON object as Python holds it: str keys; None, bool, int, float, str, list, dict values.
JsonObject = dict[str, Any]


def preview(value: object, limit: int = _PREVIEW) -> str:
    """A bounded ``repr`` for error texts: at most ``limit`` characters of it, then the length.

    Never calls ``repr`` on a whole huge string (that alone would cost time and memory).
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    if isinstance(value, bytes | bytearray):
        head = bytes(value[:limit])
        return repr(head) + (f"... ({len(value)} bytes)" if len(value) > limit else "")
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 200:
            return f"an integer of {value.bit_length()} bits"
        return repr(value)
    if isinstance(value, float | bool) or value is None:
        return repr(value)
    return f"a {type(value).__name__}"


def _is_utf8(text: str) -> bool:
    if text.isascii():  # O(1) in CPython (a flag of the string): ASCII holds no surrogate
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: Any, field: str, *, max_length: int = MAX_ID_LENGTH, allow_empty: bool = False) -> str:
    """A string the store and the wire can hold: valid UTF-8, no NUL, bounded length."""
    if not isinstance(value, str):
        raise SpecError(f"must be a string, got {preview(value)}", field=field)
    if not value and not allow_empty:
        raise SpecError("must not be empty", field=field)
    if len(value) > max_length:
        raise SpecError(
            f"is {len(value)} characters long, the limit is {max_length}: {preview(value)}",
            field=field,
            fix=f"use at most {max_length} characters",
        )
    if "\x00" in value:
        raise SpecError(f"contains a NUL character: {preview(value)}", field=field, fix="remove it")
    if not _is_utf8(value):
        raise SpecError(
            f"is not valid UTF-8 (it holds a lone surrogate): {preview(value)}",
            field=field,
            fix="send valid Unicode text",
        )
    return value


def check_int(value: Any, field: str, *, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    """An integer (not a bool) within ``[lo, hi]`` (default: what a 64-bit column holds)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"must be an integer, got {preview(value)}", field=field)
    if not lo <= value <= hi:
        raise SpecError(
            f"{preview(value)} is out of range", field=field, fix=f"use an integer from {lo} to {hi}"
        )
    return value


def check_finite(
    value: Any, field: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> float:
    """A finite number (int or float, not a bool) within the given bounds, as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"must be a number, got {preview(value)}", field=field)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise SpecError(f"must be a finite number, got {preview(value)}", field=field)
    if lo is not None and (number <= lo if lo_open else number < lo):
        raise SpecError(f"must be {'>' if lo_open else '>='} {lo:g}, got {number:g}", field=field)
    if hi is not None and number > hi:
        raise SpecError(f"must be <= {hi:g}, got {number:g}", field=field)
    return number


def check_json_object(
    value: Any,
    field: str,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> JsonObject:
    """A JSON object every store and client can hold; returns a plain ``dict`` copy.

    Keys are strings of at most ``MAX_KEY_LENGTH`` characters; values are None, bool, 64-bit
    integers, finite floats, valid UTF-8 strings, lists/tuples and mappings of the same,
    nested at most ``max_depth`` deep; the compact JSON encoding is at most ``max_bytes``.
    The walk is iterative and stops at the first problem, naming its path
    (``payload.items[3].name``).
    """
    if value is None:
        return {}
    flat = _flat_text_map(value, max_bytes)
    if flat is not None:
        return flat
    if not isinstance(value, Mapping):
        raise SpecError(f"must be a JSON object (a mapping), got {preview(value)}", field=field)
    root: JsonObject = {}
    # Each entry: (source container, destination container, path, depth).
    stack: list[tuple[Any, Any, str, int]] = [(value, root, field, 1)]
    # Two running bounds of the compact JSON size: ``low`` never exceeds it (so passing the
    # limit refuses at once, without encoding a huge value), ``high`` never falls short (a
    # character takes at most 6 bytes, as a \u escape). Only when the limit lies between them
    # is the value encoded to measure it exactly: most values are encoded once, by the store.
    low = high = 2  # the root's braces
    while stack:
        src, dst, path, depth = stack.pop()
        if depth > max_depth:
            raise SpecError(
                f"is nested more than {max_depth} levels deep",
                field=path,
                fix=f"flatten the value to at most {max_depth} levels",
            )
        items = src.items() if isinstance(src, Mapping) else enumerate(src)
        for key, item in items:
            if isinstance(src, Mapping):
                if not isinstance(key, str):
                    raise SpecError(f"has a key that is not a string: {preview(key)}", field=path)
                check_text(key, f"{path} key", max_length=MAX_KEY_LENGTH, allow_empty=True)
                where = f"{path}.{key}" if len(key) <= 40 else f"{path}.{key[:40]}..."
                low += len(key) + 3  # "key":
                high += 6 * len(key) + 4  # and a comma
            else:
                where = f"{path}[{key}]"
                high += 1  # a comma
            if item is None or isinstance(item, bool):
                out: Any = item
                size = 4 if item is not False else 5
            elif isinstance(item, int):
                out = check_int(item, where)
                size = len(repr(out))
            elif isinstance(item, float):
                out = check_finite(item, where)
                size = len(repr(out))
            elif isinstance(item, str):
                # Measured before check_text's own length rule: a string the byte limit
                # cannot hold is a size problem of the whole value, reported in bytes.
                if len(item) + low + 2 > max_bytes:
                    raise SpecError(
                        f"is larger than {max_bytes} bytes as JSON",
                        field=field,
                        fix="send less data (or raise the limit)",
                    )
                out = check_text(item, where, max_length=max_bytes, allow_empty=True)
                low += len(item) + 2
                high += 6 * len(item) + 2
                size = 0
            elif isinstance(item, Mapping):
                out = {}
                stack.append((item, out, where, depth + 1))
                size = 2
            elif isinstance(item, list | tuple):
                out = []
                stack.append((item, out, where, depth + 1))
                size = 2
            else:
                raise SpecError(
                    f"is a {type(item).__name__}, which JSON cannot hold",
                    field=where,
                    fix="use strings, numbers, booleans, null, lists and objects",
                )
            low += size
            high += size
            if low > max_bytes:
                raise SpecError(
                    f"is larger than {max_bytes} bytes as JSON",
                    field=field,
                    fix="send less data (or raise the limit)",
                )
            if isinstance(dst, dict):
                dst[key] = out
            else:
                dst.append(out)
    if high > max_bytes:
        exact = len(json_text(root).encode("utf-8"))
        if exact > max_bytes:
            raise SpecError(
                f"is {exact} bytes as JSON, the limit is {max_bytes}",
                field=field,
                fix="send less data (or raise the limit)",
            )
    return root


def _flat_text_map(value: Any, max_bytes: int) -> JsonObject | None:
    """The common payload, a ``dict`` of short strings to strings, checked in a few C-level
    passes instead of one ``check_text`` per key and value; its copy, or None when anything
    needs the full walk (which then names the problem). Accepts exactly what the walk does."""
    if type(value) is not dict:
        return None
    try:
        keys = "".join(value)
        texts = "".join(value.values())
    except TypeError:  # a key or a value that is not a str
        return None
    # A character takes at most 6 bytes as JSON (a \u escape); per entry "":"" and a comma.
    if 6 * (len(keys) + len(texts)) + 6 * len(value) + 2 > max_bytes:
        return None
    if "\x00" in keys or "\x00" in texts or max(map(len, value), default=0) > MAX_KEY_LENGTH:
        return None
    if not (_is_utf8(keys) and _is_utf8(texts)):
        return None
    return dict(value)


def json_text(value: Any) -> str:
    """Compact JSON text of a value that passed ``check_json_object`` (what the stores keep)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def decode_json_object(
    text: str | bytes,
    field: str,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> JsonObject:
    """Parse JSON text that must hold one object, with the same bounds as ``check_json_object``.

    The size is checked before parsing; deep nesting that the parser itself refuses
    (``RecursionError``) is reported like any other depth problem.
    """
    if len(text) > max_bytes:
        raise SpecError(f"is {len(text)} bytes, the limit is {max_bytes}", field=field, fix="send less data")
    try:
        doc = json.loads(text)
    except RecursionError:
        raise SpecError(
            f"is nested more than {max_depth} levels deep", field=field, fix="flatten the value"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        # json.JSONDecodeError is a ValueError; its message names line and column only.
        raise SpecError(
            f"is not valid JSON: {str(exc)[:120]}", field=field, fix="send a JSON object"
        ) from None
    return check_json_object(doc, field, max_bytes=max_bytes, max_depth=max_depth)
