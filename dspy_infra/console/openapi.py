"""The OpenAPI 3.0 document of ``/api/v1`` (served at ``/api/v1/openapi.json``).

Written out by hand next to the routes it describes (``api.py``); the tests validate it with
openapi-spec-validator and fuzz the running API from it with schemathesis, so a route and its
description cannot drift apart unnoticed.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from ..models import ServiceStatus, TaskStatus
from ..version import __version__
from ..workflows.spec import StepStatus
from .state import API_PREFIX, MAX_LIMIT, MAX_OFFSET

__all__ = ["openapi_document"]

_JSON_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}
_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_NUM: dict[str, Any] = {"type": "number"}
_BOOL: dict[str, Any] = {"type": "boolean"}
_TEXT_PARAM: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 256}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required}


def _enum(values: type[StrEnum]) -> dict[str, Any]:
    """A string schema listing the values of ``values`` (the enum the server answers with)."""
    return {"type": "string", "enum": [v.value for v in values]}


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _ok(schema: str, description: str, status: str = "200") -> dict[str, Any]:
    return {
        status: {"description": description, "content": {"application/json": {"schema": _ref(schema)}}},
        "default": {
            "description": "an error: what is wrong, the field, the fix",
            "content": {"application/json": {"schema": _ref("Error")}},
        },
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _TEXT_PARAM, "description": description}


_LIMIT = _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50}, "page size")
_JSON_BODY = {
    "required": False,
    "content": {"application/json": {"schema": {"type": "object"}}},
    "description": "ignored; a POST must be application/json (a cross-site form cannot send it)",
}

_SCHEMAS: dict[str, Any] = {
    "Error": _obj(
        {"error": _STR, "message": _STR, "field": _nullable(_STR), "fix": _nullable(_STR)},
        ["error", "message"],
    ),
    "Task": _obj(
        {
            "id": _STR,
            "class": _STR,
            "status": _enum(TaskStatus),
            "priority": _INT,
            "workflow_id": _STR,
            "attempts": _INT,
            "max_attempts": _INT,
            "timeout": _nullable(_NUM),
            "error": _STR,
            "submitted_at": _NUM,
            "started_at": _NUM,
            "completed_at": _NUM,
            "duration_ms": _NUM,
        }
    ),
    "Attempt": _obj(
        {
            "attempt": _INT,
            "started_at": _nullable(_NUM),
            "ended_at": _nullable(_NUM),
            "outcome": {
                "type": "string",
                "enum": ["running", "retried", "completed", "failed", "cancelled", "pending", "unknown"],
            },
            "error": _STR,
        }
    ),
    "TaskDetail": {
        "allOf": [
            _ref("Task"),
            _obj(
                {
                    "payload": _JSON_OBJECT,
                    "result": _JSON_OBJECT,
                    "attempt_history": _array(_ref("Attempt")),
                    "log": _STR,
                    "log_truncated": _BOOL,
                },
                ["payload", "result"],
            ),
        ]
    },
    "TaskPage": _obj(
        {
            "tasks": _array(_ref("Task")),
            "offset": _INT,
            "limit": _INT,
            "next_offset": _nullable(_INT),
            "partial": _BOOL,
        }
    ),
    "SubmitTask": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "maxLength": 256},
            "class": {"type": "string", "maxLength": 256},
            "payload": _JSON_OBJECT,
            "priority": {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
            "timeout": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
            "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
            "workflow_id": {"type": "string", "maxLength": 256},
        },
        "additionalProperties": False,
    },
    "Queue": _obj(
        {
            "class": _STR,
            "depth": _INT,
            "running": _INT,
            "limit": _INT,
            "min_limit": _INT,
            "max_limit": _INT,
            "limit_changes": _array(_array(_NUM)),
        }
    ),
    "Queues": _obj({"queues": _array(_ref("Queue"))}),
    "Service": _obj(
        {
            "name": _STR,
            "status": _enum(ServiceStatus),
            "backend": _STR,
            "instance_id": _STR,
            "host": _STR,
            "port": _INT,
            "url": _STR,
            "ports": {"type": "object", "additionalProperties": _INT},
            "health": {"type": "object", "additionalProperties": _STR},
            "restarts": _INT,
            "started_at": _NUM,
            "cpu_percent": _NUM,
            "memory_bytes": _INT,
        }
    ),
    "Services": _obj({"services": _array(_ref("Service"))}),
    "ServiceDetail": {
        "allOf": [
            _ref("Service"),
            _obj({"logs": _array(_obj({"stream": _STR, "message": _STR, "timestamp": _NUM}))}),
        ]
    },
    "StopResult": _obj({"name": _STR, "result": _STR}),
    "Workflow": _obj(
        {
            "id": _STR,
            "name": _STR,
            "description": _STR,
            "created_at": _NUM,
            "spec_hash": _STR,
            "spec": _JSON_OBJECT,
        }
    ),
    "Workflows": _obj({"workflows": _array(_ref("Workflow"))}),
    "Step": _obj(
        {
            "name": _STR,
            "status": _enum(StepStatus),
            "task_id": _STR,
            "task_class": _STR,
            "depends_on": _array(_STR),
            "attempts": _INT,
            "result": _JSON_OBJECT,
            "error": _STR,
            "started_at": _NUM,
            "completed_at": _NUM,
        }
    ),
    "Run": _obj(
        {
            "run_id": _STR,
            "workflow_id": _STR,
            "status": _enum(TaskStatus),
            "input": _JSON_OBJECT,
            "output": _JSON_OBJECT,
            "error": _STR,
            "idempotency_key": _STR,
            "created_at": _NUM,
            "updated_at": _NUM,
            "steps": _array(_ref("Step")),
        }
    ),
    "Runs": _obj({"runs": _array(_ref("Run"))}),
    "Overview": _obj(
        {
            "queues": _array(_ref("Queue")),
            "services": _array(_ref("Service")),
            "recent_failures": _array(_ref("Task")),
            "throughput": _obj(
                {
                    "interval": _NUM,
                    "points": {
                        "type": "array",
                        "description": "per interval: [end time, completed, failed, cancelled]",
                        "items": _array(_NUM),
                    },
                }
            ),
        }
    ),
}


def _paths() -> dict[str, Any]:
    task_id = _path("task_id", "the task's id")
    name = _path("name", "the service's name")
    return {
        "/overview": {
            "get": {
                "operationId": "overview",
                "summary": "Queues, services, recent failures and throughput, in one call",
                "responses": _ok("Overview", "the overview"),
            }
        },
        "/tasks": {
            "get": {
                "operationId": "listTasks",
                "summary": "Tasks, newest first, filtered and paged",
                "parameters": [
                    _query(
                        "status",
                        _enum(TaskStatus),
                        "only this status",
                    ),
                    _query("class", _TEXT_PARAM, "only this task class"),
                    _query("workflow", _TEXT_PARAM, "only tasks of this workflow"),
                    _query("q", _TEXT_PARAM, "only ids containing this text"),
                    _query(
                        "offset", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET}, "skip this many"
                    ),
                    _LIMIT,
                ],
                "responses": _ok("TaskPage", "one page of tasks"),
            },
            "post": {
                "operationId": "submitTask",
                "summary": "Submit a task (the rules of POST /queue/submit)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SubmitTask")}},
                },
                "responses": _ok("TaskDetail", "the accepted task", "201"),
            },
        },
        "/tasks/{task_id}": {
            "get": {
                "operationId": "getTask",
                "summary": "One task: payload, result, error, attempts with timings, log",
                "parameters": [task_id],
                "responses": _ok("TaskDetail", "the task"),
            }
        },
        "/tasks/{task_id}/cancel": {
            "post": {
                "operationId": "cancelTask",
                "summary": "Cancel a queued or running task (a finished one is unchanged)",
                "parameters": [task_id],
                "requestBody": _JSON_BODY,
                "responses": _ok("TaskDetail", "the task after the cancel"),
            }
        },
        "/queues": {
            "get": {
                "operationId": "listQueues",
                "summary": "Each task class: depth, running, limit and its recent changes",
                "responses": _ok("Queues", "the queues"),
            }
        },
        "/services": {
            "get": {
                "operationId": "listServices",
                "summary": "Every known service: status, health, URL, restarts, CPU and memory",
                "responses": _ok("Services", "the services"),
            }
        },
        "/services/{name}": {
            "get": {
                "operationId": "getService",
                "summary": "One service with its recent log lines",
                "parameters": [name],
                "responses": _ok("ServiceDetail", "the service"),
            }
        },
        "/services/{name}/restart": {
            "post": {
                "operationId": "restartService",
                "summary": "Stop the service and start it afresh",
                "parameters": [name],
                "requestBody": _JSON_BODY,
                "responses": _ok("Service", "the restarted service"),
            }
        },
        "/services/{name}/stop": {
            "post": {
                "operationId": "stopService",
                "summary": "Stop and remove the service",
                "parameters": [name],
                "requestBody": _JSON_BODY,
                "responses": _ok("StopResult", "what happened"),
            }
        },
        "/workflows": {
            "get": {
                "operationId": "listWorkflows",
                "summary": "Created workflows with their specs",
                "responses": _ok("Workflows", "the workflows"),
            }
        },
        "/runs": {
            "get": {
                "operationId": "listRuns",
                "summary": "Workflow runs with their steps, newest first",
                "parameters": [_query("workflow", _TEXT_PARAM, "only runs of this workflow"), _LIMIT],
                "responses": _ok("Runs", "the runs"),
            }
        },
        "/runs/{run_id}": {
            "get": {
                "operationId": "getRun",
                "summary": "One run: its steps (with dependencies) and their states",
                "parameters": [_path("run_id", "the run's id")],
                "responses": _ok("Run", "the run"),
            }
        },
        "/events": {
            "get": {
                "operationId": "streamEvents",
                "summary": "Live events as Server-Sent Events; resume with Last-Event-ID",
                "parameters": [
                    _query("types", {"type": "string"}, "comma-separated event types (default: all)"),
                    _query(
                        "since",
                        {"type": "number", "minimum": 0},
                        "first replay the kept events since this Unix time",
                    ),
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": _STR},
                ],
                "responses": {
                    "200": {
                        "description": "the stream: `id: EPOCH-SEQ` and `data: {seq, type, resource_id, data, timestamp}`",
                        "content": {"text/event-stream": {"schema": _STR}},
                    },
                    "default": {
                        "description": "an error",
                        "content": {"application/json": {"schema": _ref("Error")}},
                    },
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.0",
                        "content": {"application/json": {"schema": _JSON_OBJECT}},
                    }
                },
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "dspy-infra API",
            "version": __version__,
            "description": "Tasks, queues, services, workflows and live events of one dspy-infra server. "
            "Every call needs `Authorization: Bearer <token>` when the server has a token.",
        },
        "servers": [{"url": API_PREFIX}],
        "security": [{"bearerAuth": []}],
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": _SCHEMAS,
        },
        "paths": _paths(),
    }
