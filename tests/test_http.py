"""The HTTP app over a real Infra, exercised with a real aiohttp client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _rpc_support import in_process_server
from hypothesis import given
from hypothesis import strategies as st
from strategies import task_doc

from dspy_infra import errors
from dspy_infra.infra import Infra
from dspy_infra.metrics import CONTENT_TYPE_LATEST
from dspy_infra.wire import http_status_for


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, str, Infra]]:
    async with in_process_server(tmp_path / "state", max_payload_bytes=4096) as (infra, server):
        async with aiohttp.ClientSession() as session:
            yield session, f"http://127.0.0.1:{server.http_port}", infra


async def test_metrics_health_and_queue_status(http: tuple[aiohttp.ClientSession, str, Infra]) -> None:
    session, base, infra = http
    async with session.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await resp.text()
    assert "env_manager_active_services" in text
    assert "orchestrator_concurrency_limit" in text

    async with session.get(f"{base}/health") as resp:
        doc = await resp.json()
    assert resp.status == 200 and doc["healthy"] is True
    assert set(doc) == {"healthy", "version", "services"}

    async with session.get(f"{base}/queue/status") as resp:
        queues = await resp.json()
    assert "cpu_short" in queues
    assert set(queues["cpu_short"]) >= {"depth", "inflight", "limit"}
    assert queues["cpu_short"]["limit"] == (await infra.queue_status())["cpu_short"].limit


async def test_submit_defaults_and_runs(http: tuple[aiohttp.ClientSession, str, Infra]) -> None:
    session, base, infra = http
    async with session.post(f"{base}/queue/submit", json={"payload": {"handler": "noop"}}) as resp:
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
    # A missing id is generated (uuid4 hex), a missing class is cpu_short.
    assert len(doc["id"]) == 32 and int(doc["id"], 16) >= 0
    assert doc["class"] == "cpu_short"
    result = await infra.wait(doc["id"], timeout=30)
    assert result.status == "completed"

    async with session.post(
        f"{base}/queue/submit",
        json={"id": "given", "class": "cpu_long", "payload": {"handler": "noop"}, "priority": 3},
    ) as resp:
        assert resp.status == 200
    state = await infra.get_task("given")
    assert state.spec.task_class == "cpu_long" and state.spec.priority == 3


JSON = {"Content-Type": "application/json"}
BAD_SUBMISSIONS: list[tuple[bytes, int, str]] = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"class": "warp", "payload": {}}).encode(), 400, "class"),
    (json.dumps({"payload": {"blob": "x" * 5000}}).encode(), 400, "payload"),
    (b'{"payload": {"a": Infinity}}', 400, "payload.a"),
    # Lists are JSON payload values now; a lone surrogate is what no store can hold.
    (b'{"payload": {"a": ["\\ud800"]}}', 400, "payload.a"),
    (json.dumps({"payload": {}, "priority": "high"}).encode(), 400, "priority"),
    (json.dumps({"payload": {}, "colour": 1}).encode(), 400, "colour"),
]


async def test_bad_submissions_are_refused_with_the_reason(
    http: tuple[aiohttp.ClientSession, str, Infra],
) -> None:
    session, base, infra = http
    before = await infra.list_tasks(limit=1000)
    for body, status, needle in BAD_SUBMISSIONS:
        async with session.post(f"{base}/queue/submit", data=body, headers=JSON) as resp:
            assert resp.status == status, body
            doc = await resp.json()
        assert needle in doc["error"], (body, doc)
    assert await infra.list_tasks(limit=1000) == before
    async with session.get(f"{base}/health") as resp:
        assert resp.status == 200  # still serving


async def test_duplicate_id_with_other_content_is_409(http: tuple[aiohttp.ClientSession, str, Infra]) -> None:
    session, base, _ = http
    async with session.post(f"{base}/queue/submit", json={"id": "d", "payload": {"handler": "noop"}}) as resp:
        assert resp.status == 200
    async with session.post(f"{base}/queue/submit", json={"id": "d", "payload": {"handler": "fail"}}) as resp:
        assert resp.status == 409


async def test_token_guards_all_but_health_and_metrics(tmp_path: Path) -> None:
    async with in_process_server(tmp_path / "s", token="s3cret") as (_infra, server):
        base = f"http://127.0.0.1:{server.http_port}"
        async with aiohttp.ClientSession() as session:
            for path in ("/health", "/metrics"):
                async with session.get(base + path) as resp:
                    assert resp.status == 200
            async with session.get(base + "/queue/status") as resp:
                assert resp.status == 401
                assert "Authorization" in (await resp.json())["error"]
            async with session.post(base + "/queue/submit", json={"payload": {}}) as resp:
                assert resp.status == 401
            good = {"Authorization": "Bearer s3cret"}
            async with session.get(base + "/queue/status", headers=good) as resp:
                assert resp.status == 200
            async with session.get(base + "/queue/status", headers={"Authorization": "Bearer nope"}) as resp:
                assert resp.status == 401


@given(
    cls=st.sampled_from(
        [errors.SpecError, errors.NotFound, errors.AlreadyExists, errors.Unavailable, errors.DeadlineExceeded]
    )
)
def test_http_status_follows_the_grpc_table(cls: type[errors.InfraError]) -> None:
    expected = {
        errors.SpecError: 400,
        errors.NotFound: 404,
        errors.AlreadyExists: 409,
        errors.Unavailable: 503,
        errors.DeadlineExceeded: 504,
    }[cls]
    assert http_status_for(cls("x")) == expected


@given(doc=task_doc)
def test_task_json_is_accepted_as_written_or_refused_naming_the_key(doc: dict[str, object]) -> None:
    from dspy_infra.wire import spec_from_doc

    try:
        spec = spec_from_doc(doc, generate_id=True)
    except errors.SpecError as exc:
        assert exc.field is not None
        # The field named is one the document has (or a key inside its payload), or the id.
        assert exc.field.split(".")[0] in {*doc, "id", "payload", "timeout", "max_attempts"}
        return
    assert "extra" not in doc
    assert spec.id == (doc.get("id") or spec.id) and spec.id
    assert spec.task_class == (doc.get("class") or "cpu_short")
    assert spec.priority == (doc.get("priority") or 0)
    payload: Any = doc.get("payload") or {}
    assert set(spec.payload) == set(payload)
