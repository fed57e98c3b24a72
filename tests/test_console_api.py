"""``/api/v1``: the console's read API over a real Infra and a real HTTP server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from _rpc_support import in_process_server
from engines import skip_or_fail

from dspy_infra.console import PUBLIC_PATHS
from dspy_infra.console.api import API_PREFIX, CONSOLE_KEY
from dspy_infra.console.openapi import openapi_document
from dspy_infra.events import EventBus
from dspy_infra.http import build_app
from dspy_infra.infra import Infra

TOKEN = "console-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLEEPER = {"command": ["sleep", "300"], "health": {"kind": "engine"}}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, str, Infra, Any]]:
    async with in_process_server(tmp_path / "state", token=TOKEN, services={"sleeper": SLEEPER}) as (
        infra,
        server,
    ):
        async with aiohttp.ClientSession(headers=AUTH) as session:
            yield session, f"http://127.0.0.1:{server.http_port}{API_PREFIX}", infra, server


async def _json(resp: aiohttp.ClientResponse, status: int = 200) -> Any:
    text = await resp.text()
    assert resp.status == status, text
    return json.loads(text)


# -- the document ---------------------------------------------------------------------------------


def test_openapi_document_is_valid_openapi_3() -> None:
    try:
        from openapi_spec_validator import validate
    except ImportError:
        skip_or_fail("openapi-spec-validator is not installed (pip install -e '.[dev]')")
    validate(openapi_document())  # raises on any violation of the OpenAPI 3.0 schema


async def test_every_api_route_is_documented_and_every_documented_path_exists(tmp_path: Path) -> None:
    async with Infra(load_settings_for(tmp_path), load_entry_points=False) as infra:
        app = build_app(infra)
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith(API_PREFIX) and route.method != "HEAD":
            routes.add((route.method.lower(), path.removeprefix(API_PREFIX)))
    documented = {(m, p) for p, ops in openapi_document()["paths"].items() for m in ops}
    assert routes == documented


def load_settings_for(tmp_path: Path) -> Any:
    from _rpc_support import base_settings

    from dspy_infra.config import load_settings

    return load_settings(**base_settings(tmp_path / "state"))


# -- the rules of the rest of HTTP ----------------------------------------------------------------


async def test_api_needs_the_token_and_the_page_does_not(api: tuple[Any, str, Infra, Any]) -> None:
    _session, base, _infra, server = api
    root = f"http://127.0.0.1:{server.http_port}"
    async with aiohttp.ClientSession() as anonymous:
        for path in ("/overview", "/tasks", "/openapi.json", "/events", "/services/sleeper"):
            async with anonymous.get(base + path) as resp:
                assert resp.status == 401, path
                assert (await resp.json())["field"] == "Authorization"
        for path in sorted(PUBLIC_PATHS):
            async with anonymous.get(root + path) as resp:
                assert resp.status == 200, path
                # The page's code must not be framed or mixed with foreign scripts.
                assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        # DNS rebinding: the page too is answered only under this server's names.
        async with anonymous.get(root + "/", headers={"Host": "evil.example"}) as resp:
            assert resp.status == 421


async def test_posts_are_refused_cross_origin_and_without_json(api: tuple[Any, str, Infra, Any]) -> None:
    session, base, infra, _server = api
    await infra.submit_task("held", payload={"handler": "sleep", "seconds": 30})
    async with session.post(
        f"{base}/tasks/held/cancel", json={}, headers={"Origin": "http://evil.example"}
    ) as resp:
        assert resp.status == 403
    async with session.post(
        f"{base}/tasks/held/cancel", data="{}", headers={"Content-Type": "text/plain"}
    ) as resp:
        assert resp.status == 415
    assert str((await infra.get_task("held")).status) == "running"
    async with session.post(f"{base}/tasks/held/cancel", json={}) as resp:
        doc = await _json(resp)
    assert doc["status"] == "cancelled"


# -- tasks ------------------------------------------------------------------------------------------


async def test_tasks_filter_and_page(api: tuple[Any, str, Infra, Any]) -> None:
    session, base, infra, _server = api
    for i in range(7):
        await infra.submit_task(f"short-{i}", "cpu_short", {"handler": "noop"})
    for i in range(3):
        await infra.submit_task(f"long-{i}", "cpu_long", {"handler": "noop"})
    await infra.submit_task("broken", "cpu_short", {"handler": "fail", "message": "boom"})
    for task_id in ("short-6", "long-2", "broken"):
        await infra.wait(task_id, timeout=30)

    async with session.get(f"{base}/tasks", params={"limit": "4"}) as resp:
        first = await _json(resp)
    assert [t["id"] for t in first["tasks"]] == ["broken", "long-2", "long-1", "long-0"]
    assert first["next_offset"] == 4
    seen = [t["id"] for t in first["tasks"]]
    offset = first["next_offset"]
    while offset is not None:
        async with session.get(f"{base}/tasks", params={"limit": "4", "offset": str(offset)}) as resp:
            page = await _json(resp)
        seen += [t["id"] for t in page["tasks"]]
        offset = page["next_offset"]
    assert sorted(seen) == sorted(
        [f"short-{i}" for i in range(7)] + [f"long-{i}" for i in range(3)] + ["broken"]
    )

    async with session.get(f"{base}/tasks", params={"class": "cpu_long"}) as resp:
        assert {t["id"] for t in (await _json(resp))["tasks"]} == {"long-0", "long-1", "long-2"}
    async with session.get(f"{base}/tasks", params={"q": "ort-1"}) as resp:
        assert [t["id"] for t in (await _json(resp))["tasks"]] == ["short-1"]
    async with session.get(f"{base}/tasks", params={"status": "failed"}) as resp:
        failed = (await _json(resp))["tasks"]
    assert [t["id"] for t in failed] == ["broken"] and "boom" in failed[0]["error"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"offset": "100001"}, "offset"),
        ({"status": "done"}, "status"),
        ({"q": "x" * 300}, "q"),
        ({"class": "a\x00b"}, "class"),
    ],
)
async def test_bad_list_parameters_name_the_field(
    api: tuple[Any, str, Infra, Any], params: dict[str, str], field: str
) -> None:
    session, base, _infra, _server = api
    async with session.get(f"{base}/tasks", params=params) as resp:
        doc = await _json(resp, 400)
    assert doc["field"] == field


async def test_task_detail_keeps_json_and_times_every_attempt(api: tuple[Any, str, Infra, Any]) -> None:
    session, base, infra, _server = api
    payload = {
        "handler": "exec",
        "cmd": ["sh", "-c", "echo out-$0; exit 3"],
        "nested": {"n": 1.5, "list": [1, 2]},
    }
    async with session.post(
        f"{base}/tasks", json={"id": "twice", "payload": payload, "max_attempts": 2}
    ) as resp:
        submitted = await _json(resp, 201)
    assert submitted["payload"] == payload  # numbers stay numbers, objects stay objects
    await infra.wait("twice", timeout=60)
    async with session.get(f"{base}/tasks/twice") as resp:
        doc = await _json(resp)
    assert doc["status"] == "failed" and doc["attempts"] == 2
    first, second = doc["attempt_history"]
    assert (first["attempt"], first["outcome"], second["attempt"], second["outcome"]) == (
        1,
        "retried",
        2,
        "failed",
    )
    assert first["started_at"] <= first["ended_at"] <= second["started_at"] <= second["ended_at"]
    assert "exited with 3" in first["error"]
    assert doc["log"].count("out-sh") == 2 and doc["log_truncated"] is False


async def test_submit_follows_the_rules_of_queue_submit(tmp_path: Path) -> None:
    async with in_process_server(tmp_path / "state", exec_policy="embedded", max_payload_bytes=4096) as (
        _infra,
        server,
    ):
        base = f"http://127.0.0.1:{server.http_port}"
        async with aiohttp.ClientSession() as session:
            for body, status, field in [
                ({"payload": {"handler": "exec", "cmd": "true"}}, 403, None),
                ({"class": "warp", "payload": {}}, 400, "task_class"),
                ({"payload": {"blob": "x" * 5000}}, 400, "payload"),
                ({"payload": {}, "colour": 1}, 400, "colour"),
            ]:
                answers = []
                for path in ("/queue/submit", f"{API_PREFIX}/tasks"):
                    async with session.post(base + path, json=body) as resp:
                        answers.append((resp.status, (await resp.json())["field"]))
                assert answers[0] == answers[1], body
                assert answers[1][0] == status and (field is None or answers[1][1] == field)


async def test_unknown_ids_are_404_naming_the_field(api: tuple[Any, str, Infra, Any]) -> None:
    session, base, _infra, _server = api
    for path, field in [
        ("/tasks/nope", "task_id"),
        ("/runs/nope", "run_id"),
        ("/services/nope", "service_names"),
    ]:
        async with session.get(base + path) as resp:
            assert (await _json(resp, 404))["field"] == field, path
    async with session.post(f"{base}/tasks/nope/cancel", json={}) as resp:
        assert resp.status == 404


# -- queues, services, workflows -----------------------------------------------------------------


async def test_queues_and_overview(api: tuple[Any, str, Infra, Any]) -> None:
    session, base, infra, _server = api
    await infra.submit_task("bad", payload={"handler": "fail"})
    await infra.wait("bad", timeout=30)
    # The adaptive limiter may change the limit between two reads: compare against reads
    # taken just before and just after the HTTP one, retried until those two agree.
    with anyio.fail_after(30):
        while True:
            before = (await infra.queue_status())["cpu_short"]
            async with session.get(f"{base}/queues") as resp:
                queues = {q["class"]: q for q in (await _json(resp))["queues"]}
            after = (await infra.queue_status())["cpu_short"]
            if (before.limit, before.max_limit) == (after.limit, after.max_limit):
                break
    assert queues["cpu_short"]["limit"] == after.limit
    assert queues["cpu_short"]["max_limit"] == after.max_limit
    async with session.get(f"{base}/overview") as resp:
        overview = await _json(resp)
    assert [t["id"] for t in overview["recent_failures"]] == ["bad"]
    assert {s["name"] for s in overview["services"]} >= {"sleeper"}


async def test_service_detail_restart_and_stop(api: tuple[Any, str, Infra, Any]) -> None:
    session, base, infra, _server = api
    await infra.ensure_services(["sleeper"])
    async with session.get(f"{base}/services/sleeper") as resp:
        doc = await _json(resp)
    assert doc["status"] == "healthy" and doc["backend"] == "process" and isinstance(doc["logs"], list)
    async with session.post(f"{base}/services/sleeper/restart", json={}) as resp:
        restarted = await _json(resp)
    assert restarted["status"] == "healthy" and restarted["started_at"] > doc["started_at"]
    async with session.post(f"{base}/services/sleeper/stop", json={}) as resp:
        assert await _json(resp) == {"name": "sleeper", "result": "stopped"}
    async with session.get(f"{base}/services") as resp:
        states = {s["name"]: s["status"] for s in (await _json(resp))["services"]}
    assert states["sleeper"] == "stopped"


async def test_workflow_runs_show_their_dag_and_results(api: tuple[Any, str, Infra, Any]) -> None:
    session, base, infra, _server = api
    spec = {
        "steps": [
            {"name": "fetch", "payload": {"handler": "sleep", "seconds": 0.01}},
            {"name": "train", "payload": {"handler": "noop"}, "depends_on": ["fetch"]},
            {"name": "report", "payload": {"handler": "noop"}, "depends_on": ["fetch", "train"]},
        ]
    }
    await infra.create_workflow("pipeline", name="Pipeline", spec=spec)
    run_id = await infra.start_run("pipeline", input={"size": 7})
    async for update in infra.run_status(run_id):
        if update.status.terminal:
            break
    async with session.get(f"{base}/workflows") as resp:
        workflows = (await _json(resp))["workflows"]
    assert [w["id"] for w in workflows] == ["pipeline"] and len(workflows[0]["spec"]["steps"]) == 3
    async with session.get(f"{base}/runs/{run_id}") as resp:
        run = await _json(resp)
    assert run["status"] == "completed" and run["input"] == {"size": 7}
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["report"]["depends_on"] == ["fetch", "train"]
    assert steps["fetch"]["result"] == {"slept": 0.01}
    assert all(
        s["status"] == "completed" and s["completed_at"] >= s["started_at"] > 0 for s in steps.values()
    )
    async with session.get(f"{base}/runs", params={"workflow": "pipeline"}) as resp:
        assert [r["run_id"] for r in (await _json(resp))["runs"]] == [run_id]
    async with session.get(f"{base}/tasks", params={"workflow": "pipeline"}) as resp:
        assert len((await _json(resp))["tasks"]) == 3


# -- events -----------------------------------------------------------------------------------------


async def _read_events(
    resp: aiohttp.ClientResponse, count: int, timeout: float = 20
) -> list[tuple[str, dict[str, Any]]]:
    """``count`` (id, data) pairs from an SSE response."""
    out: list[tuple[str, dict[str, Any]]] = []
    event_id = ""
    async with asyncio.timeout(timeout):
        while len(out) < count:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                out.append((event_id, json.loads(line[6:])))
    return out


async def test_events_resume_after_the_last_event_id(api: tuple[Any, str, Infra, Any]) -> None:
    session, base, infra, _server = api
    async with session.get(f"{base}/events", params={"types": "task_submitted"}) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        await infra.submit_task("e1", payload={"handler": "noop"})
        await infra.submit_task("e2", payload={"handler": "noop"})
        got = await _read_events(resp, 2)
    assert [d["resource_id"] for _, d in got] == ["e1", "e2"]
    last_id = got[0][0]
    # Gone after e1; e2 and e3 happen meanwhile: resuming from e1 gets exactly e2, e3.
    await infra.submit_task("e3", payload={"handler": "noop"})
    async with session.get(
        f"{base}/events", params={"types": "task_submitted"}, headers={"Last-Event-ID": last_id}
    ) as resp:
        resumed = await _read_events(resp, 2)
    assert [d["resource_id"] for _, d in resumed] == ["e2", "e3"]
    assert resumed[0][0] == got[1][0]
    # An id from another server process cannot be resumed: the client is told to re-read.
    async with session.get(f"{base}/events", headers={"Last-Event-ID": "0badc0de-5"}) as resp:
        ((reset_id, first),) = await _read_events(resp, 1)
    # ... and its id stays as it was (no id line): resuming must not replay the whole history.
    assert first["type"] == "stream_reset" and reset_id == ""


async def test_event_streams_end_when_the_client_leaves_and_when_the_server_stops(tmp_path: Path) -> None:
    async with in_process_server(tmp_path / "state") as (_infra, server):
        base = f"http://127.0.0.1:{server.http_port}{API_PREFIX}"
        app = server.http_app
        assert app is not None
        console = app[CONSOLE_KEY]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/events") as resp:
                await resp.content.readline()
                assert console.open_streams == 1
            # The client left: noticed at the latest at the next keep-alive write.
            for _ in range(400):  # 20 s
                if not console.open_streams:
                    break
                await asyncio.sleep(0.05)
            assert console.open_streams == 0
            resp = await session.get(f"{base}/events")
            await resp.content.readline()
            started = time.monotonic()
            await server.aclose()  # aiohttp would wait 60 s for a handler that never ends
            assert time.monotonic() - started < 20
            assert await asyncio.wait_for(resp.content.read(), 10) is not None
            assert console.open_streams == 0
            resp.release()


async def test_numbered_subscription_resumes_and_reports_what_left_the_history() -> None:
    bus = EventBus(history=4)
    for i in range(3):
        bus.publish("t", f"r{i}")
    bus.close()
    got = [(seq, e.resource_id) async for seq, e in bus.subscribe_numbered(after=0)]
    assert got == [(1, "r1"), (2, "r2")]
    bus = EventBus(history=4)
    for i in range(10):
        bus.publish("t", f"r{i}")
    bus.close()
    dropped = [(seq, e.type, e.data) async for seq, e in bus.subscribe_numbered(after=2)]
    # Events 3..5 left the ring: one events_dropped (numbered as the last one it stands for).
    assert dropped[0] == (5, "events_dropped", {"missed": "3"})
    assert [seq for seq, _, _ in dropped[1:]] == [6, 7, 8, 9]


def test_history_of_one_resource_builds_only_its_events() -> None:
    bus = EventBus(history=100)
    for i in range(10):
        bus.emit("task_started", f"t{i % 3}", {"attempt": i})
    bus.publish("task_failed", "t1", {"error": "x"})
    got = bus.history(["task_started", "task_failed"], resource_id="t1")
    assert [(e.type, e.data.get("attempt")) for e in got] == [
        ("task_started", "1"),
        ("task_started", "4"),
        ("task_started", "7"),
        ("task_failed", None),
    ]


async def test_event_streams_are_capped(
    api: tuple[Any, str, Infra, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dspy_infra.console import sse

    session, base, _infra, _server = api
    monkeypatch.setattr(sse, "MAX_STREAMS", 2)
    first = await session.get(f"{base}/events")
    second = await session.get(f"{base}/events")
    try:
        async with session.get(f"{base}/events") as resp:
            doc = await _json(resp, 503)
        assert "event streams" in doc["message"] and doc["fix"]
    finally:
        first.close()
        second.close()
