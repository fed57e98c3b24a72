"""Hostile HTTP requests against a real ``dspy-infra serve`` (issue 8 item 9): every bad body
gets a 4xx in the JSON error format naming a field, never a 500, plain text or a traceback;
nothing is submitted; ``/health`` keeps answering."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _adversarial import STALL_BOUND, loop_watchdog
from _rpc_support import ServeProcess, in_process_server, serve_process
from hypothesis import HealthCheck, given, settings
from strategies import hostile_json_bodies

from dspy_infra.infra import Infra

LEAKS = ("Traceback", "KeyError", "TypeError", "ValueError", "RecursionError", 'File "', "aiohttp")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serve_process(tmp_path_factory.mktemp("serve"), max_payload_bytes=64 * 1024) as proc:
        yield proc


def request(
    server: ServeProcess, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """(status, Content-Type, body text) of one request; errors are answers here."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}",
        data=body,
        headers=headers or {},
        method="POST" if body is not None else "GET",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


def assert_json_error(status: int, content_type: str, text: str, expected: set[int]) -> dict[str, Any]:
    assert status in expected, (status, text[:300])
    assert content_type.startswith("application/json"), (content_type, text[:300])
    doc = json.loads(text)
    assert set(doc) == {"error", "message", "field", "fix"}, doc
    assert doc["error"] and len(text) < 4096
    assert not any(leak in text for leak in LEAKS), text
    return doc


def queue_depth(server: ServeProcess) -> int:
    status, _, text = request(server, "/queue/status")
    assert status == 200
    return sum(q["depth"] + q["inflight"] for q in json.loads(text).values())


def submitted(server: ServeProcess) -> int:
    status, _, text = request(server, "/metrics")
    assert status == 200
    total = 0.0
    for line in text.splitlines():
        if line.startswith("orchestrator_tasks_submitted_total"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


JSON = {"Content-Type": "application/json"}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=hostile_json_bodies)
def test_hostile_bodies_get_a_named_4xx_and_submit_nothing(server: ServeProcess, body: bytes) -> None:
    before = submitted(server)
    status, content_type, text = request(server, "/queue/submit", body, JSON)
    doc = assert_json_error(status, content_type, text, {400, 413})
    assert doc["field"], doc
    assert submitted(server) == before
    status, _, _ = request(server, "/health")
    assert status == 200


DEEP: Any = 1
for _ in range(40):
    DEEP = [DEEP]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[" * 100_000, "body"),
        (b'{"a":' * 20_000 + b"1" + b"}" * 20_000, "body"),
        (json.dumps({"payload": {"handler": "noop", "d": DEEP}}).encode(), "body"),
    ],
)
def test_deeply_nested_json_is_400_json(server: ServeProcess, body: bytes, field: str) -> None:
    status, content_type, text = request(server, "/queue/submit", body, JSON)
    doc = assert_json_error(status, content_type, text, {400})
    assert doc["field"].startswith(field) and "nested" in doc["message"]


def test_a_too_large_body_is_413_json(server: ServeProcess) -> None:
    body = json.dumps({"payload": {"handler": "noop", "x": "x" * (1 << 20)}}).encode()
    status, content_type, text = request(server, "/queue/submit", body, JSON)
    doc = assert_json_error(status, content_type, text, {413})
    assert doc["field"] == "body" and "max_payload_bytes" in doc["fix"]


@pytest.mark.parametrize(
    ("path", "method", "status"), [("/nowhere", "GET", 404), ("/queue/submit", "GET", 405)]
)
def test_router_refusals_are_json(server: ServeProcess, path: str, method: str, status: int) -> None:
    got, content_type, text = request(server, path)
    assert_json_error(got, content_type, text, {status})


def test_a_huge_id_is_echoed_only_as_a_prefix(server: ServeProcess) -> None:
    body = json.dumps({"id": "i" * 60_000, "payload": {"handler": "noop"}}).encode()
    status, content_type, text = request(server, "/queue/submit", body, JSON)
    doc = assert_json_error(status, content_type, text, {400})
    assert doc["field"] == "id" and "60000 characters" in doc["error"]


# -- in-process: the 500 path and the loop -----------------------------------------------


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[tuple[Infra, str]]:
    async with in_process_server(tmp_path / "s") as (infra, server):
        yield infra, f"http://127.0.0.1:{server.http_port}"


async def test_an_unexpected_exception_is_500_json_without_internals(
    http: tuple[Infra, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    infra, base = http

    def broken() -> None:
        raise KeyError("string")

    monkeypatch.setattr(infra, "queue_status", broken)
    caplog.set_level(logging.ERROR, logger="dspy_infra.http")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/queue/status") as resp:
            text = await resp.text()
            assert resp.status == 500 and resp.content_type == "application/json"
    assert "KeyError" not in text and "string" not in text and "Traceback" not in text
    logged = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # logged once, with the details


async def test_hostile_bodies_do_not_hold_the_loop(http: tuple[Infra, str]) -> None:
    infra, base = http
    bodies = [
        b"[" * 900_000,
        b'{"a":' * 150_000 + b"1" + b"}" * 150_000,
        # 1 MB of escapes to decode, then a lone surrogate at the very end.
        b'{"payload": {"handler": "noop", "x": "' + b"\\u00e9" * 170_000 + b'\\ud800"}}',
    ]
    async with loop_watchdog() as dog:
        async with aiohttp.ClientSession() as session:
            for body in bodies:
                async with session.post(f"{base}/queue/submit", data=body, headers=JSON) as resp:
                    assert resp.status in (400, 413), await resp.text()
    assert dog.longest < STALL_BOUND, f"loop held {dog.longest:.2f}s"
    assert await infra.list_tasks() == []
