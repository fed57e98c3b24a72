"""The built-in ``http`` task handler: one HTTP request per attempt (aiohttp client).

Payload (all strings, as on the wire):

- ``url`` (required): an ``http://`` or ``https://`` URL;
- ``method``: default ``GET``;
- ``body``: sent as-is (UTF-8);
- ``headers``: a JSON object of strings, e.g. ``{"Content-Type": "application/json"}``;
- ``expect_status``: a comma list of status codes, e.g. ``200,204``; default any 2xx.

Result: ``status``, ``body`` (its last 4 KiB, the same tail rule as ``exec``) and
``content_type``. The task's timeout is the request's timeout (the scheduler wraps the
handler; the client sets none of its own). Under a scheduler, attempts share one client
session (kept in its ``SharedResources``, without a cookie jar), so connections to a host
are reused. What a retry can fix is an ordinary failure: a
connection error, an unexpected 5xx, 408 (request timeout) or 429 (too many requests). What
it cannot fix is a ``PermanentFailure``: any other unexpected status, or a malformed payload
(the message names the payload field and the fix).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import aiohttp
import attrs
import yarl

from ..errors import HandlerFailure, PermanentFailure
from ..hookspecs import hookimpl
from ..scheduler.context import Handler, Tail, TaskContext, payload_json_object

__all__ = [
    "HttpRequest",
    "HttpStatusFailed",
    "dspy_infra_handlers",
    "http_handler",
    "http_request",
    "parse_expect_status",
    "status_outcome",
]

#: Unexpected statuses below 500 that a later attempt can still succeed past.
_RETRYABLE_4XX = frozenset({408, 429})
_METHOD_RE = re.compile(r"^[A-Za-z]{1,20}$")
_CODE_RE = re.compile(r"^[0-9]{3}$")  # ASCII digits only: str.isdigit() accepts "²"
#: How much of the body an error message quotes (the result keeps the whole tail).
_QUOTED = 300


class HttpStatusFailed(HandlerFailure):
    """The server answered a status the task did not expect and a retry may fix (5xx, 408,
    429); carries the result map so the failed attempt keeps status and body."""


def parse_expect_status(raw: str) -> frozenset[int] | None:
    """``"200,204"`` -> ``{200, 204}``; ``""`` -> None (meaning any 2xx)."""
    if not raw.strip():
        return None
    codes: set[int] = set()
    for part in raw.split(","):
        text = part.strip()
        if not _CODE_RE.match(text) or not 100 <= int(text) <= 599:
            raise PermanentFailure(
                f"payload.expect_status: {part.strip()!r} is not an HTTP status code"
                ' (fix: a comma list of codes from 100 to 599, e.g. "200,204")'
            )
        codes.add(int(text))
    return frozenset(codes)


def _url(payload: Mapping[str, str]) -> yarl.URL:
    raw = payload.get("url", "").strip()
    if not raw:
        raise PermanentFailure(
            'payload.url: missing (fix: give the URL, e.g. {"url": "http://127.0.0.1:8080/"})'
        )
    try:
        url = yarl.URL(raw)
    except (ValueError, TypeError) as exc:
        raise PermanentFailure(
            f"payload.url: {raw!r} is not a URL ({exc}) (fix: e.g. http://127.0.0.1:8080/path)"
        ) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise PermanentFailure(
            f"payload.url: {raw!r} must be an absolute http:// or https:// URL"
            " (fix: e.g. http://127.0.0.1:8080/path)"
        )
    return url


def _method(payload: Mapping[str, str]) -> str:
    raw = payload.get("method", "").strip() or "GET"
    if not _METHOD_RE.match(raw):
        raise PermanentFailure(f"payload.method: {raw!r} is not an HTTP method (fix: e.g. GET or POST)")
    return raw.upper()


def _new_session() -> aiohttp.ClientSession:
    # No client-side timeout: the task's own timeout bounds the whole attempt. No cookie jar:
    # one task's cookies never reach another's request.
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None), cookie_jar=aiohttp.DummyCookieJar()
    )


@asynccontextmanager
async def _session(ctx: TaskContext) -> AsyncIterator[aiohttp.ClientSession]:
    """The scheduler's shared session (its connection pool keeps connections alive across
    attempts), or, outside a scheduler, one for this call."""
    if ctx.shared is not None:
        yield await ctx.shared.get("http.session", _new_session)
        return
    async with _new_session() as session:
        yield session


@attrs.frozen
class HttpRequest:
    """A validated ``http`` payload. ``expected`` None means any 2xx."""

    method: str
    url: yarl.URL
    headers: dict[str, str]
    body: bytes
    expected: frozenset[int] | None


def http_request(payload: Mapping[str, str]) -> HttpRequest:
    """Validate an ``http`` payload (every error names the payload field and the fix)."""
    return HttpRequest(
        method=_method(payload),
        url=_url(payload),
        headers=payload_json_object(payload, "headers", '{"Accept": "application/json"}'),
        body=payload.get("body", "").encode(),
        expected=parse_expect_status(payload.get("expect_status", "")),
    )


async def http_handler(ctx: TaskContext) -> dict[str, str]:
    # Validate everything before any I/O, so a bad payload never half-runs.
    request = http_request(ctx.payload)
    method, url, headers, expected = request.method, request.url, request.headers, request.expected
    body = request.body
    tail = Tail()
    try:
        async with (
            _session(ctx) as session,
            session.request(method, url, headers=headers, data=body or None) as response,
        ):
            async for chunk in response.content.iter_chunked(65536):
                tail.feed(chunk)
            status, content_type = response.status, response.content_type
    except aiohttp.InvalidURL as exc:
        raise PermanentFailure(
            f"payload.url: {str(url)!r} is not a usable URL ({exc}) (fix: e.g. http://127.0.0.1:8080/path)"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise ConnectionError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
    result = {"status": str(status), "body": tail.text(), "content_type": content_type}
    outcome = status_outcome(status, expected)
    if outcome == "ok":
        return result
    wanted = ",".join(map(str, sorted(expected))) if expected is not None else "2xx"
    quoted = result["body"].strip()[-_QUOTED:]
    message = f"{method} {url}: unexpected status {status} (expected {wanted})" + (
        f": {quoted}" if quoted else ""
    )
    if outcome == "retry":
        raise HttpStatusFailed(message, result)
    raise PermanentFailure(
        message + " (fix: correct the request, or list this status in payload.expect_status)"
    )


def status_outcome(status: int, expected: frozenset[int] | None) -> str:
    """``"ok"`` if ``status`` is expected (None: any 2xx), else ``"retry"`` when a later attempt
    may get another answer (5xx, 408, 429), else ``"permanent"``."""
    if status in expected if expected is not None else 200 <= status < 300:
        return "ok"
    if status >= 500 or status in _RETRYABLE_4XX:
        return "retry"
    return "permanent"


@hookimpl
def dspy_infra_handlers() -> Mapping[str, Handler]:
    """The built-in ``http`` handler."""
    return {"http": http_handler}
