"""The rules every face of the infra (gRPC, HTTP, the web console) applies at its edge, in
one place so that they all say the same thing:

- the one table between dspy_infra errors and gRPC statuses (``grpc_status_for``; a client
  reads a status back with ``error_class_for``), and from there HTTP codes (``http_status_for``,
  Google's published gRPC -> HTTP mapping); what an error's text may show a client
  (``error_message``: bounded, never the internals of an unexpected exception);
- the bearer-token check (``bearer_matches``);
- who may run commands from afar (``Settings.exec_policy``: ``refuse_remote_command``,
  ``check_remote_payload``);
- a task written as JSON and the one way to build its ``TaskSpec`` from it (``spec_from_doc``,
  ``json_task_list``, ``remote_payload``).
"""

from __future__ import annotations

import hmac
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from .config import Settings
from .errors import (
    AlreadyExists,
    BackendUnavailable,
    DeadlineExceeded,
    FailedPrecondition,
    InfraError,
    MissingBinary,
    NotFound,
    PermissionDenied,
    ServiceError,
    SpecError,
    Unauthenticated,
    Unavailable,
)
from .models import PAYLOAD_HARD_LIMIT, TaskSpec
from .values import (
    MAX_JSON_DEPTH,
    check_json_object,
    check_text,
    preview,
)

__all__ = [
    "COMMAND_HANDLERS",
    "HTTP_STATUS_BY_GRPC",
    "INTERNAL_MESSAGE",
    "MAX_ERROR_MESSAGE",
    "MAX_TASKS_JSON_BYTES",
    "TASK_JSON_KEYS",
    "bearer_matches",
    "check_remote_payload",
    "error_class_for",
    "error_message",
    "from_grpc_error",
    "grpc_status_for",
    "http_status_for",
    "json_task_list",
    "preview_text",
    "refuse_remote_command",
    "remote_payload",
    "runs_command",
    "spec_from_doc",
    "to_grpc_error",
]

# -- the one error <-> status table ---------------------------------------------------------

#: First match wins, so subclasses come before their bases.
_STATUS_BY_ERROR: tuple[tuple[type[BaseException], Status], ...] = (
    (SpecError, Status.INVALID_ARGUMENT),  # also ConfigError, CycleError
    (NotFound, Status.NOT_FOUND),
    (AlreadyExists, Status.ALREADY_EXISTS),
    (FailedPrecondition, Status.FAILED_PRECONDITION),  # also ResourceUnavailable
    # The request was fine; this machine cannot honour it (binary not installed, a service's
    # port taken, a service that never became healthy): the client must change something.
    (MissingBinary, Status.FAILED_PRECONDITION),
    (ServiceError, Status.FAILED_PRECONDITION),  # also HealthCheckFailed
    (Unavailable, Status.UNAVAILABLE),
    (BackendUnavailable, Status.UNAVAILABLE),
    (DeadlineExceeded, Status.DEADLINE_EXCEEDED),
    (Unauthenticated, Status.UNAUTHENTICATED),
    (PermissionDenied, Status.PERMISSION_DENIED),
)


def grpc_status_for(exc: BaseException) -> Status:
    """The gRPC status for an exception (INTERNAL for anything not in the table)."""
    for cls, status in _STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return Status.INTERNAL


#: Longest error text a response carries (gRPC trailer, HTTP error body, rejected task).
#: Errors echo only a ``preview`` of bad input, so this is a last line of defence: grpclib
#: percent-encodes the trailer on the event loop, and a 400k-character message held the loop
#: for 20 s (and broke the client's header limit, which then saw RESOURCE_EXHAUSTED).
MAX_ERROR_MESSAGE = 1024
#: What a client sees for an error that is not a dspy_infra error (the log has the details).
INTERNAL_MESSAGE = "internal error (fix: see the server log; this is a bug, please report it)"


def error_message(exc: BaseException) -> str:
    """The text a client sees for ``exc``: ``str(exc)`` of our errors, cut to
    ``MAX_ERROR_MESSAGE``; never the text or class of an unexpected exception."""
    if not isinstance(exc, InfraError):
        return INTERNAL_MESSAGE
    text = str(exc)
    if len(text) > MAX_ERROR_MESSAGE:
        text = text[: MAX_ERROR_MESSAGE - 40] + f"... ({len(text)} characters)"
    return text


def to_grpc_error(exc: BaseException) -> GRPCError:
    """A ``GRPCError`` whose message names the field and the fix (bounded, no internals)."""
    if isinstance(exc, GRPCError):
        if exc.message is not None and len(exc.message) > MAX_ERROR_MESSAGE:
            return GRPCError(exc.status, exc.message[:MAX_ERROR_MESSAGE])
        return exc
    return GRPCError(grpc_status_for(exc), error_message(exc))


#: gRPC status -> the error class a client raises: the first class the table maps to it.
_ERROR_BY_STATUS: dict[Status, type[InfraError]] = {}
for _cls, _status in _STATUS_BY_ERROR:
    if issubclass(_cls, InfraError):
        _ERROR_BY_STATUS.setdefault(_status, _cls)


def error_class_for(status: Status) -> type[InfraError]:
    """The dspy_infra error class for a gRPC status (``InfraError`` for anything unmapped)."""
    return _ERROR_BY_STATUS.get(status, InfraError)


# The server renders errors as "field: message (fix: ...)"; read them back into parts.
_RENDERED = re.compile(r"^(?:(?P<field>[^\s:]+): )?(?P<message>.*?)(?: \(fix: (?P<fix>.*)\))?$", re.DOTALL)


def from_grpc_error(exc: GRPCError, addr: str = "") -> InfraError:
    """The dspy_infra error for a gRPC status (``InfraError`` for anything unmapped)."""
    cls = error_class_for(exc.status)
    text = exc.message or exc.status.name
    match = _RENDERED.match(text)
    if match is None:  # pragma: no cover - the pattern matches any string
        return cls(text)
    if cls is InfraError and addr:
        return InfraError(f"{exc.status.name} from {addr}: {text}")
    return cls(match["message"], field=match["field"], fix=match["fix"])


#: gRPC status -> HTTP status (google.rpc's published mapping).
HTTP_STATUS_BY_GRPC: dict[Status, int] = {
    Status.INVALID_ARGUMENT: 400,
    Status.FAILED_PRECONDITION: 400,
    Status.OUT_OF_RANGE: 400,
    Status.UNAUTHENTICATED: 401,
    Status.PERMISSION_DENIED: 403,
    Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409,
    Status.ABORTED: 409,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.CANCELLED: 499,
    Status.UNIMPLEMENTED: 501,
    Status.UNAVAILABLE: 503,
    Status.DEADLINE_EXCEEDED: 504,
}


def http_status_for(exc: BaseException) -> int:
    """The HTTP status for an exception: its gRPC status, then the published mapping."""
    return HTTP_STATUS_BY_GRPC.get(grpc_status_for(exc), 500)


def preview_text(text: str, limit: int = 512) -> str:
    """An error's message, cut like every error text the servers send."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# -- the bearer token -------------------------------------------------------------------------


def bearer_matches(given: str | bytes, token: str | None) -> bool:
    """Whether an ``Authorization`` value (HTTP header or gRPC metadata) carries ``token``
    (always true without a token). Constant-time, so the comparison leaks nothing."""
    if not token:
        return True
    given_bytes = given.encode("utf-8", "surrogateescape") if isinstance(given, str) else bytes(given)
    return hmac.compare_digest(given_bytes, f"Bearer {token}".encode())


# -- who may run commands (Settings.exec_policy) ----------------------------------------------

#: Handlers whose payload names something to run: ``exec`` runs a command, ``container`` runs
#: any image with any command. Under exec_policy "embedded" or "deny" remote clients may not
#: submit them.
COMMAND_HANDLERS = frozenset({"exec", "container"})


def refuse_remote_command(settings: Settings, what: str, field: str) -> None:
    """Raise ``PermissionDenied`` when a remote client (gRPC, HTTP) asks to run a command
    and ``settings.exec_policy`` allows that only to the owning process (or nobody)."""
    if settings.exec_policy == "allow":
        return
    raise PermissionDenied(
        f"{what} is refused for remote clients under exec_policy = {settings.exec_policy!r}",
        field=field,
        fix="run commands from the Python API of the process that owns the infra,"
        ' or set exec_policy = "allow" if every client that can reach the server may run commands',
    )


def runs_command(payload: Mapping[str, Any]) -> bool:
    """Whether a payload may run a command or code the client chose, wherever its class runs.

    Not only the handler: the Slurm executor runs ``cmd`` whatever the handler says, the Ray
    executor runs ``cmd`` as ``exec`` when no handler is named, and a ``"module:function"``
    handler imports code on the Ray cluster. Judging by the handler alone let a remote
    ``{"cmd": ...}`` to such a class through under exec_policy "embedded"."""
    if "cmd" in payload:
        return True
    handler = payload.get("handler")
    return isinstance(handler, str) and (handler in COMMAND_HANDLERS or "{{" in handler or ":" in handler)


def check_remote_payload(settings: Settings, payload: Mapping[str, Any], field: str) -> None:
    """Refuse a remote task whose handler runs commands (see ``refuse_remote_command``)."""
    if runs_command(payload):
        handler = payload.get("handler")
        refuse_remote_command(settings, f"a task with handler {preview(handler)}", f"{field}.handler")


# -- a task written as JSON ------------------------------------------------------------------

#: Largest ``SubmitTasks.tasks_json`` (grpclib refuses bigger messages anyway: 4 MiB).
MAX_TASKS_JSON_BYTES = 4 << 20
#: Keys of a task written as JSON (POST /queue/submit, SubmitTasks.tasks_json).
TASK_JSON_KEYS = ("id", "class", "payload", "priority", "timeout", "max_attempts", "workflow_id")
_TASK_JSON_KEY_SET = frozenset(TASK_JSON_KEYS)


def json_task_list(raw: bytes, field: str, *, max_bytes: int) -> list[Any]:
    """A JSON array of task objects (``SubmitTasks.tasks_json``): size, UTF-8 and nesting
    are checked for the whole text; each entry's values are checked by ``spec_from_doc``, so
    one bad task is rejected alone, as in the ``tasks`` field."""
    if len(raw) > max_bytes:
        raise SpecError(
            f"is {len(raw)} bytes, the limit is {max_bytes}", field=field, fix="send fewer tasks per call"
        )
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecError(f"is not UTF-8 (byte {exc.start})", field=field, fix="send UTF-8 JSON") from None
    except RecursionError:
        raise SpecError(
            f"is nested more than {MAX_JSON_DEPTH} levels deep", field=field, fix="flatten the tasks"
        ) from None
    except ValueError as exc:
        # json.JSONDecodeError: its text names line and column only, never the input.
        raise SpecError(
            f"is not valid JSON: {str(exc)[:120]}", field=field, fix='send [{"payload": {...}}, ...]'
        ) from None
    if not isinstance(doc, list):
        raise SpecError(
            f"expected a JSON array of tasks, got {preview(doc)}",
            field=field,
            fix='send [{"payload": {...}}, ...]',
        )
    return doc


def remote_payload(value: Any, field: str = "payload") -> dict[str, Any]:
    """A payload from a client, checked once for what the store and the wire hold (text,
    numbers, nesting, key length, and the hard size bound every ``TaskSpec`` payload has):
    the result goes into ``TaskSpec.with_checked_payload`` without a second walk. The exact
    size rule (``max_payload_bytes``) is the scheduler's, so that rule (and its message) lives
    in one place; the request itself is already bounded (HTTP body limit, gRPC message limit)."""
    return check_json_object(value, field, max_bytes=PAYLOAD_HARD_LIMIT)


def spec_from_doc(doc: Any, *, generate_id: bool) -> TaskSpec:
    """A ``TaskSpec`` from a task written as JSON: ``{"id"?, "class"?, "payload", ...}``.
    A missing class means ``cpu_short``; a missing id is generated only if ``generate_id``.
    Every field is checked against what the store and the wire hold, naming the field."""
    if type(doc) is not dict and not isinstance(doc, Mapping):  # (the ABC check is slow)
        raise SpecError(
            f"expected a JSON object, got {preview(doc)}", field="body", fix='send {"payload": {...}}'
        )
    unknown = (
        [] if doc.keys() <= _TASK_JSON_KEY_SET else sorted(str(k) for k in doc.keys() - _TASK_JSON_KEY_SET)
    )
    if unknown:
        raise SpecError(
            f"unknown key {preview(unknown[0])}",
            field=unknown[0][:64],
            fix="use " + ", ".join(TASK_JSON_KEYS),
        )
    task_id = doc.get("id")
    if task_id is None:
        task_id = ""
    if generate_id:  # (without, TaskSpec checks the id, naming it "id" too)
        task_id = check_text(task_id, "id", allow_empty=True) or uuid.uuid4().hex
    task_class = doc.get("class")
    task_class = "cpu_short" if task_class is None else check_text(task_class, "class", allow_empty=True)
    payload = remote_payload(doc.get("payload"))
    priority = doc.get("priority")
    max_attempts = doc.get("max_attempts")
    workflow_id = doc.get("workflow_id")
    # The fields below are checked by TaskSpec itself, under the same names as the JSON keys
    # and with the same rules (and a null is the field's default), so not here a second time.
    return TaskSpec.with_checked_payload(
        payload,
        id=task_id,
        task_class=task_class or "cpu_short",
        priority=0 if priority is None else priority,
        timeout=doc.get("timeout"),
        max_attempts=1 if max_attempts is None else max_attempts,
        workflow_id="" if workflow_id is None else workflow_id,
    )
