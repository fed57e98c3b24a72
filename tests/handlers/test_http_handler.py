"""The built-in ``http`` handler against a real aiohttp server on a free port (no doubles)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import fast_retries, handler_context, open_scheduler
from hypothesis import given
from hypothesis import strategies as st
from strategies import codes, http_fields, url_like

from dspy_infra.errors import PermanentFailure
from dspy_infra.handlers.http import (
    HttpStatusFailed,
    http_handler,
    http_request,
    parse_expect_status,
    status_outcome,
)
from dspy_infra.models import TaskResult, TaskSpec, TaskState, TaskStatus
from dspy_infra.plugins import build_plugin_manager, collect_mapping
from dspy_infra.scheduler.context import TAIL_BYTES, payload_json_object
from dspy_infra.scheduler.scheduler import Scheduler


class Server:
    """A real HTTP server: echo, fixed statuses, a flaky endpoint and a slow one."""

    def __init__(self) -> None:
        self.base = ""
        self.flaky_calls = 0
        self.slow_started = asyncio.Event()
        self.slow_closed = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_get("/status/{code}", self.status)
        app.router.add_get("/flaky/{failures}", self.flaky)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/big", self.big)
        app.router.add_get("/set-cookie", self.set_cookie)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.text()
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        return web.json_response(
            {"method": request.method, "headers": dict(request.headers), "body": body, "peer": list(peer)}
        )

    async def set_cookie(self, request: web.Request) -> web.Response:
        response = web.Response(text="cookie set")
        response.set_cookie("session", "secret-of-one-task")
        return response

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, text=f"answer {code}")

    async def flaky(self, request: web.Request) -> web.Response:
        self.flaky_calls += 1
        if self.flaky_calls <= int(request.match_info["failures"]):
            return web.Response(status=503, text="busy, try later")
        return web.Response(text=f"ok after {self.flaky_calls}")

    async def slow(self, request: web.Request) -> web.Response:
        self.slow_started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client drops the connection.
            self.slow_closed.set()
            raise
        return web.Response(text="late")

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=b"a" * 100_000 + b"END", content_type="application/octet-stream")


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    runner = web.AppRunner(srv.app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    srv.base = f"http://127.0.0.1:{port}"
    try:
        yield srv
    finally:
        await runner.cleanup()


def scheduler(home: Path) -> contextlib.AbstractAsyncContextManager[Scheduler]:
    return open_scheduler(home, hardware=None, durable=False, shutdown_grace=0.5)


# -- success ------------------------------------------------------------------------------


async def test_get_returns_status_body_and_content_type(server: Server) -> None:
    result = await http_handler(handler_context(url=f"{server.base}/status/200"))
    assert result == {"status": "200", "body": "answer 200", "content_type": "text/plain"}


async def test_method_body_and_headers_reach_the_server(server: Server) -> None:
    result = await http_handler(
        handler_context(
            url=f"{server.base}/echo",
            method="put",
            body='{"x": 1}',
            headers=json.dumps({"X-Token": "abc", "Content-Type": "application/json"}),
        )
    )
    seen = json.loads(result["body"])
    assert seen["method"] == "PUT" and seen["body"] == '{"x": 1}'
    assert seen["headers"]["X-Token"] == "abc"
    assert result["content_type"] == "application/json"


async def test_body_keeps_only_the_tail(server: Server) -> None:
    result = await http_handler(handler_context(url=f"{server.base}/big"))
    assert len(result["body"].encode()) == TAIL_BYTES and result["body"].endswith("aaaEND")


async def test_expect_status_accepts_a_listed_non_2xx_and_refuses_an_unlisted_2xx(server: Server) -> None:
    result = await http_handler(handler_context(url=f"{server.base}/status/404", expect_status="200, 404"))
    assert result["status"] == "404" and result["body"] == "answer 404"
    with pytest.raises(PermanentFailure, match=r"unexpected status 204 \(expected 200,404\)"):
        await http_handler(handler_context(url=f"{server.base}/status/204", expect_status="200,404"))


# -- failures -----------------------------------------------------------------------------


async def test_unexpected_4xx_is_permanent_and_quotes_the_body(server: Server) -> None:
    with pytest.raises(PermanentFailure) as info:
        await http_handler(handler_context(url=f"{server.base}/status/403"))
    message = str(info.value)
    assert "unexpected status 403 (expected 2xx)" in message and "answer 403" in message
    assert "payload.expect_status" in message  # the fix


async def test_unexpected_5xx_and_429_are_retryable_failures_carrying_the_result(server: Server) -> None:
    for code in (500, 503, 429):
        with pytest.raises(HttpStatusFailed) as info:
            await http_handler(handler_context(url=f"{server.base}/status/{code}"))
        assert not isinstance(info.value, PermanentFailure)
        assert info.value.result["status"] == str(code)
        assert info.value.result["body"] == f"answer {code}"


async def test_connection_refused_is_an_ordinary_failure_naming_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now.
    with pytest.raises(ConnectionError, match=f"GET http://127.0.0.1:{port}/x"):
        await http_handler(handler_context(url=f"http://127.0.0.1:{port}/x"))


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "payload.url: missing"),
        ({"url": "ftp://example.org/x"}, "payload.url"),
        ({"url": "/relative/path"}, "payload.url"),
        ({"url": "http://127.0.0.1:1/", "method": "GE T"}, "payload.method"),
        ({"url": "http://127.0.0.1:1/", "headers": "{not json"}, "payload.headers: not valid JSON"),
        ({"url": "http://127.0.0.1:1/", "headers": '["a"]'}, "payload.headers: expected a JSON object"),
        ({"url": "http://127.0.0.1:1/", "headers": '{"X-N": 1}'}, "payload.headers: values must be strings"),
        ({"url": "http://127.0.0.1:1/", "expect_status": "200,abc"}, "payload.expect_status"),
        ({"url": "http://127.0.0.1:1/", "expect_status": "700"}, "payload.expect_status"),
        ({"url": "http://127.0.0.1:1/", "expect_status": "2²0"}, "payload.expect_status"),
    ],
)
async def test_bad_payloads_are_permanent_failures_naming_the_field(
    payload: dict[str, str], field: str
) -> None:
    # Port 1 refuses connections: reaching the network would fail differently.
    with pytest.raises(PermanentFailure) as info:
        await http_handler(handler_context(**payload))
    assert field in str(info.value)
    assert "fix:" in str(info.value)


# -- through a real Scheduler ---------------------------------------------------------------


async def run_http_task(
    tmp_path: Path, task_id: str, url: str, max_attempts: int
) -> tuple[TaskResult, TaskState]:
    """Run one ``http`` task through a real scheduler (retries come fast): its result and state."""
    with fast_retries(0.01):
        async with scheduler(tmp_path) as sched:
            payload = {"handler": "http", "url": url}
            await sched.submit(TaskSpec(task_id, payload=payload, max_attempts=max_attempts))
            return await sched.wait(task_id, timeout=10), await sched.get(task_id)


async def test_5xx_is_retried_by_the_scheduler_until_it_succeeds(server: Server, tmp_path: Path) -> None:
    result, _ = await run_http_task(tmp_path, "flaky", f"{server.base}/flaky/2", max_attempts=3)
    assert result.status is TaskStatus.COMPLETED, result.error
    assert result.result["body"] == "ok after 3" and server.flaky_calls == 3
    assert result.result["status"] == "200"


async def test_5xx_fails_the_task_when_attempts_run_out(server: Server, tmp_path: Path) -> None:
    result, state = await run_http_task(tmp_path, "down", f"{server.base}/flaky/5", max_attempts=2)
    assert result.status is TaskStatus.FAILED and "unexpected status 503" in result.error
    assert state.attempts == 2 and server.flaky_calls == 2


async def test_4xx_is_not_retried_by_the_scheduler(server: Server, tmp_path: Path) -> None:
    result, state = await run_http_task(tmp_path, "bad", f"{server.base}/status/400", max_attempts=5)
    assert result.status is TaskStatus.FAILED and "unexpected status 400" in result.error
    assert state.attempts == 1


async def test_task_timeout_bounds_the_request_and_drops_the_connection(
    server: Server, tmp_path: Path
) -> None:
    async with scheduler(tmp_path) as sched:
        payload = {"handler": "http", "url": f"{server.base}/slow"}
        await sched.submit(TaskSpec("slow", payload=payload, timeout=0.5))
        result = await sched.wait("slow", timeout=10)
    assert result.status is TaskStatus.FAILED and "timed out after 0.5s" in result.error
    assert server.slow_started.is_set()
    # The client went away, so the server's handler was cancelled: nothing left hanging.
    await asyncio.wait_for(server.slow_closed.wait(), 5)


async def test_tasks_share_connections_but_never_cookies(server: Server, tmp_path: Path) -> None:
    # A host name, not an IP: cookie jars refuse cookies from IP addresses anyway.
    base = server.base.replace("127.0.0.1", "localhost")
    async with scheduler(tmp_path) as sched:
        seen = []
        for i, path in enumerate(("/set-cookie", "/echo", "/echo")):
            await sched.submit(TaskSpec(f"k{i}", payload={"handler": "http", "url": base + path}))
            result = await sched.wait(f"k{i}", timeout=10)
            assert result.status is TaskStatus.COMPLETED, result.error
            seen.append(result.result["body"])
    first, second = json.loads(seen[1]), json.loads(seen[2])
    assert "Cookie" not in first["headers"] and "Cookie" not in second["headers"]
    # One kept-alive connection served both tasks (the same client port).
    assert first["peer"] == second["peer"]


async def test_http_is_registered_as_a_built_in_handler() -> None:
    pm = build_plugin_manager(load_entry_points=False)
    handlers = collect_mapping(pm.hook.dspy_infra_handlers())
    assert handlers["http"] is http_handler


# -- properties -----------------------------------------------------------------------------


@given(st.frozensets(codes, min_size=1, max_size=6), st.sampled_from([",", ", ", " ,"]))
def test_expect_status_round_trips(expected: frozenset[int], separator: str) -> None:
    assert parse_expect_status(separator.join(map(str, sorted(expected)))) == expected


@given(
    st.text(min_size=1)
    .filter(lambda t: not t.strip().isascii() or not t.strip().isdigit())
    .filter(lambda t: "," not in t and t.strip())
)
def test_expect_status_refuses_any_non_code_naming_the_field(token: str) -> None:
    with pytest.raises(PermanentFailure, match=r"payload\.expect_status"):
        parse_expect_status(f"200,{token}")


@given(codes, st.one_of(st.none(), st.frozensets(codes, min_size=1, max_size=6)))
def test_status_outcome_is_ok_exactly_when_expected_and_retries_only_what_may_change(
    status: int, expected: frozenset[int] | None
) -> None:
    outcome = status_outcome(status, expected)
    is_expected = status in expected if expected is not None else 200 <= status < 300
    assert (outcome == "ok") == is_expected
    if not is_expected:
        assert (outcome == "retry") == (status >= 500 or status in (408, 429))


@given(st.dictionaries(st.text(), st.text(), max_size=5))
def test_json_object_payload_round_trips(mapping: dict[str, Any]) -> None:
    assert payload_json_object({"headers": json.dumps(mapping)}, "headers", "{}") == mapping


@given(st.dictionaries(http_fields, st.one_of(url_like, st.text(alphabet='{}[]":,0123456789 abGETPOST'))))
def test_any_payload_is_either_a_request_or_a_permanent_failure_naming_a_field(
    payload: dict[str, str],
) -> None:
    try:
        request = http_request(payload)
    except PermanentFailure as exc:
        assert str(exc).startswith("payload.") and "fix:" in str(exc)
    else:
        assert request.url.scheme in ("http", "https") and request.url.host
        assert request.method.isupper() and request.body == payload.get("body", "").encode()
