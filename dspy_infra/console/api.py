"""``/api/v1``: the read API (and a few actions) the console and scripts use.

Every route mirrors a public method of ``Infra``; errors leave through the HTTP app's one
error format and status table. JSON values (payloads, results, run inputs and outputs) stay
JSON. Lists are bounded pages (``offset`` + ``limit``), never the whole store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from aiohttp import web

from ..errors import NotFound, SpecError
from ..models import ServiceState, TaskState, TaskStatus
from ..values import check_text, preview

if TYPE_CHECKING:
    from ..infra import Infra

__all__ = ["add_api_routes", "task_doc"]

from .sse import events_stream
from .state import (
    _DIGITS,
    API_PREFIX,
    CONSOLE_KEY,
    INFRA_KEY,
    MAX_LIMIT,
    MAX_LINE_CHARS,
    MAX_LOG_CHARS,
    MAX_OFFSET,
    MAX_SCAN,
    ROW_ERROR_CHARS,
    SAMPLE_INTERVAL,
    SERVICE_LOG_LINES,
    SUBMIT_KEY,
    ConsoleState,
    embedded,
)


def _infra(request: web.Request) -> Infra:
    return request.app[INFRA_KEY]


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not _DIGITS.fullmatch(raw) or not lo <= int(raw) <= hi:
        raise SpecError(f"must be an integer from {lo} to {hi}, got {preview(raw)}", field=name)
    return int(raw)


def _text_param(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    return check_text(raw, name)


def _path_text(request: web.Request, name: str) -> str:
    return check_text(request.match_info[name], name)


def _status_param(request: web.Request) -> str | None:
    raw = request.query.get("status")
    if raw is None or raw == "":
        return None
    if raw not in TaskStatus.__members__.values():
        raise SpecError(
            f"unknown status {preview(raw)}",
            field="status",
            fix="use one of " + ", ".join(s.value for s in TaskStatus),
        )
    return raw


# -- documents ----------------------------------------------------------------------------------


def task_doc(state: TaskState, *, detail: bool = False) -> dict[str, Any]:
    spec = state.spec
    doc: dict[str, Any] = {
        "id": spec.id,
        "class": spec.task_class,
        "status": str(state.status),
        "priority": spec.priority,
        "workflow_id": spec.workflow_id,
        "attempts": state.attempts,
        "max_attempts": spec.max_attempts,
        "timeout": spec.timeout,
        "error": state.error if detail else _cut(state.error, ROW_ERROR_CHARS),
        "submitted_at": state.submitted_at,
        "started_at": state.started_at,
        "completed_at": state.completed_at,
        "duration_ms": state.duration_ms,
    }
    if detail:
        doc["payload"] = spec.payload
        doc["result"] = state.result
    return doc


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


_ATTEMPT_EVENTS = ("task_started", "task_retried", "task_completed", "task_failed", "task_cancelled")


def _attempts(infra: Infra, state: TaskState) -> list[dict[str, Any]]:
    """Each attempt with its timings: from the event history while it still holds them,
    else (older attempts of a long-lived task) only what the task's row keeps, its last one."""
    rows: dict[int, dict[str, Any]] = {}
    current = 0
    # One attempt: the row has its timings; more: look them up in the history.
    history = infra.bus.history(_ATTEMPT_EVENTS, resource_id=state.id) if state.attempts > 1 else []
    for event in history:
        if event.type == "task_started":
            current = int(event.data.get("attempt", current + 1) or current + 1)
            rows[current] = _attempt(current, event.timestamp, None, "running", "")
        elif current in rows:
            outcome = "retried" if event.type == "task_retried" else event.type.removeprefix("task_")
            rows[current].update(ended_at=event.timestamp, outcome=outcome, error=event.data.get("error", ""))
    out = []
    for n in range(1, state.attempts + 1):
        row = rows.get(n)
        if row is None and n == state.attempts:
            ended = state.completed_at or None
            outcome = str(state.status) if state.status.terminal else "running"
            row = _attempt(n, state.started_at or None, ended, outcome, state.error)
        out.append(row if row is not None else _attempt(n, None, None, "unknown", ""))
    return out


def _attempt(n: int, started: float | None, ended: float | None, outcome: str, error: str) -> dict[str, Any]:
    return {"attempt": n, "started_at": started, "ended_at": ended, "outcome": outcome, "error": error}


def _service_doc(st: ServiceState) -> dict[str, Any]:
    return {
        "name": st.name,
        "status": str(st.status),
        "backend": st.backend,
        "instance_id": st.instance_id,
        "host": st.host,
        "port": st.port,
        "url": st.url,
        "ports": {str(c): p for c, p in st.ports.items()},
        "health": dict(st.health_checks),
        "restarts": st.restarts,
        "started_at": st.started_at,
        "cpu_percent": st.resource_usage.cpu_percent,
        "memory_bytes": st.resource_usage.memory_bytes,
    }


def _queue_docs(infra: Infra, console: ConsoleState) -> list[dict[str, Any]]:
    return [
        {
            "class": name,
            "depth": q.depth,
            "running": q.inflight,
            "limit": q.limit,
            "min_limit": q.min_limit,
            "max_limit": q.max_limit,
            "limit_changes": [[round(t, 3), v] for t, v in console.limit_changes.get(name, ())],
        }
        for name, q in sorted(infra.scheduler.queue_status().items())
    ]


def _run_doc(run: Any, workflow: Any | None) -> dict[str, Any]:
    specs = {s.name: s for s in workflow.spec.steps} if workflow is not None else {}
    steps = []
    for name, step in run.steps.items():
        spec = specs.get(name)
        steps.append(
            {
                "name": name,
                "status": str(step.status),
                "task_id": step.task_id,
                "task_class": spec.task_class if spec is not None else "",
                "depends_on": list(spec.depends_on) if spec is not None else [],
                "attempts": step.attempts,
                "result": step.result,
                "error": step.error,
                "started_at": step.started_at,
                "completed_at": step.completed_at,
            }
        )
    return {
        "run_id": run.run_id,
        "workflow_id": run.workflow_id,
        "status": str(run.status),
        "input": run.input,
        "output": run.output,
        "error": run.error,
        "idempotency_key": run.idempotency_key,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "steps": steps,
    }


async def _workflows_by_id(infra: Infra) -> dict[str, Any]:
    return {wf.id: wf for wf in await infra.list_workflows()}


# -- tasks --------------------------------------------------------------------------------------


async def list_tasks(request: web.Request) -> web.Response:
    infra = _infra(request)
    status = _status_param(request)
    task_class = _text_param(request, "class")
    workflow = _text_param(request, "workflow")
    text = _text_param(request, "q")
    offset = _int_param(request, "offset", 0, 0, MAX_OFFSET)
    limit = _int_param(request, "limit", 50, 1, MAX_LIMIT)
    filtered = task_class is not None or text is not None
    scan = MAX_SCAN if filtered else offset + limit + 1
    states = await infra.list_tasks(status=status, limit=scan, workflow_id=workflow)
    partial = filtered and len(states) >= MAX_SCAN
    if task_class is not None:
        states = [s for s in states if s.spec.task_class == task_class]
    if text is not None:
        states = [s for s in states if text in s.spec.id]
    page = states[offset : offset + limit]
    more = len(states) > offset + limit
    return web.json_response(
        {
            "tasks": [task_doc(s) for s in page],
            "offset": offset,
            "limit": limit,
            "next_offset": offset + limit if more else None,
            "partial": partial,
        }
    )


async def get_task(request: web.Request) -> web.Response:
    infra = _infra(request)
    task_id = _path_text(request, "task_id")
    state = await infra.get_task(task_id)
    doc = task_doc(state, detail=True)
    doc["attempt_history"] = _attempts(infra, state)
    log = await infra.task_log(task_id)
    doc["log"] = log if len(log) <= MAX_LOG_CHARS else log[-MAX_LOG_CHARS:]
    doc["log_truncated"] = len(log) > MAX_LOG_CHARS
    return web.json_response(doc)


async def cancel_task(request: web.Request) -> web.Response:
    infra = _infra(request)
    state = await infra.cancel(_path_text(request, "task_id"))
    return web.json_response(task_doc(state, detail=True))


async def submit_task(request: web.Request) -> web.Response:
    """The same code path as ``POST /queue/submit`` (its checks, its exec policy), answered
    with the whole task."""
    answer = await request.app[SUBMIT_KEY](request)
    assert isinstance(answer.body, bytes)
    state = await _infra(request).get_task(json.loads(answer.body)["id"])
    return web.json_response(task_doc(state, detail=True), status=201)


# -- queues, services ---------------------------------------------------------------------------


async def list_queues(request: web.Request) -> web.Response:
    return web.json_response({"queues": _queue_docs(_infra(request), request.app[CONSOLE_KEY])})


async def list_services(request: web.Request) -> web.Response:
    states = await _infra(request).services.status()
    return web.json_response({"services": [_service_doc(s) for s in states.values()]})


async def get_service(request: web.Request) -> web.Response:
    infra = _infra(request)
    name = _path_text(request, "name")
    state = (await infra.services.status([name]))[name]
    doc = _service_doc(state)
    doc["logs"] = await _service_logs(infra, name)
    return web.json_response(doc)


async def _service_logs(infra: Infra, name: str) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    # A log source that hangs must not hold the request: what arrived in 5 s is the answer.
    with anyio.move_on_after(5), contextlib.suppress(NotFound):
        async for entry in infra.services.logs(name, tail=SERVICE_LOG_LINES):
            lines.append(
                {
                    "stream": entry.stream,
                    "message": _cut(entry.message, MAX_LINE_CHARS),
                    "timestamp": entry.timestamp,
                }
            )
            if len(lines) >= SERVICE_LOG_LINES:
                break
    return lines


async def restart_service(request: web.Request) -> web.Response:
    state = await _infra(request).services.restart(_path_text(request, "name"))
    return web.json_response(_service_doc(state))


async def stop_service(request: web.Request) -> web.Response:
    name = _path_text(request, "name")
    results = await _infra(request).services.stop([name])
    return web.json_response({"name": name, "result": results.get(name, "not running")})


# -- workflows and runs -------------------------------------------------------------------------


async def list_workflows(request: web.Request) -> web.Response:
    workflows = await _infra(request).list_workflows()
    return web.json_response(
        {
            "workflows": [
                {
                    "id": wf.id,
                    "name": wf.name,
                    "description": wf.description,
                    "created_at": wf.created_at,
                    "spec_hash": wf.spec_hash,
                    "spec": wf.spec.to_dict(),
                }
                for wf in workflows
            ]
        }
    )


async def list_runs(request: web.Request) -> web.Response:
    infra = _infra(request)
    workflow = _text_param(request, "workflow")
    limit = _int_param(request, "limit", 50, 1, MAX_LIMIT)
    runs = await infra.list_runs(workflow, limit=limit)
    workflows = await _workflows_by_id(infra)
    return web.json_response({"runs": [_run_doc(r, workflows.get(r.workflow_id)) for r in runs]})


async def get_run(request: web.Request) -> web.Response:
    infra = _infra(request)
    run = await infra.get_run(_path_text(request, "run_id"))
    workflows = await _workflows_by_id(infra)
    return web.json_response(_run_doc(run, workflows.get(run.workflow_id)))


# -- overview -----------------------------------------------------------------------------------


async def overview(request: web.Request) -> web.Response:
    infra = _infra(request)
    console = request.app[CONSOLE_KEY]
    services = await infra.services.status()
    failures = await infra.list_tasks(status="failed", limit=10)
    return web.json_response(
        {
            "queues": _queue_docs(infra, console),
            "services": [_service_doc(s) for s in services.values()],
            "recent_failures": [task_doc(s) for s in failures],
            "throughput": {"interval": SAMPLE_INTERVAL, "points": console.throughput()},
        }
    )


async def openapi_document(request: web.Request) -> web.Response:
    from .openapi import openapi_document as build

    return web.json_response(build())


# -- wiring -------------------------------------------------------------------------------------


def add_api_routes(
    app: web.Application,
    infra: object,
    submit: Callable[[web.Request], Awaitable[web.Response]],
) -> None:
    """Add the ``/api/v1`` routes for ``infra`` (the embedded Infra the app serves);
    ``submit`` is ``/queue/submit``'s handler, which the API's submit reuses."""
    app[INFRA_KEY] = embedded(infra)
    app[SUBMIT_KEY] = submit
    p = API_PREFIX
    r = app.router
    r.add_get(f"{p}/openapi.json", openapi_document)
    r.add_get(f"{p}/overview", overview)
    r.add_get(f"{p}/tasks", list_tasks)
    r.add_post(f"{p}/tasks", submit_task)
    r.add_get(f"{p}/tasks/{{task_id}}", get_task)
    r.add_post(f"{p}/tasks/{{task_id}}/cancel", cancel_task)
    r.add_get(f"{p}/queues", list_queues)
    r.add_get(f"{p}/services", list_services)
    r.add_get(f"{p}/services/{{name}}", get_service)
    r.add_post(f"{p}/services/{{name}}/restart", restart_service)
    r.add_post(f"{p}/services/{{name}}/stop", stop_service)
    r.add_get(f"{p}/workflows", list_workflows)
    r.add_get(f"{p}/runs", list_runs)
    r.add_get(f"{p}/runs/{{run_id}}", get_run)
    r.add_get(f"{p}/events", events_stream)

    console = ConsoleState(app[INFRA_KEY])
    app[CONSOLE_KEY] = console

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        # Owned by the app: started with it, cancelled and awaited when it is cleaned up
        # (a plain task: aiohttp may start and clean up the app from different tasks).
        sampler = asyncio.create_task(_sample_loop(console), name="dspy_infra-console-sampler")
        try:
            yield
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler

    async def shutting_down(app: web.Application) -> None:
        # Open event streams end now (the server waits for running handlers to finish).
        app[CONSOLE_KEY].stopping.set()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(shutting_down)


async def _sample_loop(console: ConsoleState) -> None:
    while True:
        with contextlib.suppress(Exception):  # an infra that stopped first: try again later
            console.sample()
        await anyio.sleep(SAMPLE_INTERVAL)
