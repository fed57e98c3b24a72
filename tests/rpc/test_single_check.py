"""Each payload a remote client sends is checked once (``wire.remote_payload`` or the gRPC
decoders), and ``TaskSpec.with_checked_payload`` takes it as is. These tests hold the one
check to exactly what the two checks before it refused (the edge check, then ``TaskSpec``'s
own converter), and count that the walk now runs once per payload."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from strategies import hostile_json, remote_task_docs

from dspy_infra import models, values, wire
from dspy_infra.errors import SpecError
from dspy_infra.models import TaskSpec
from dspy_infra.rpc import convert as cv
from dspy_infra.rpc._gen.orchestrator import v1 as orch_pb
from dspy_infra.values import INT32_MAX, INT32_MIN, MAX_JSON_BYTES

# -- the reference: the two checks as they were ---------------------------------------------


def _double_checked_spec_from_doc(doc: Any) -> TaskSpec:
    """``wire.spec_from_doc`` as it was: every field checked at the edge, the payload without
    a size bound, then all of it again by ``TaskSpec``'s constructor (the payload by its
    converter, bound ``PAYLOAD_HARD_LIMIT``)."""
    if not isinstance(doc, dict):
        raise SpecError("not an object", field="body")
    unknown = sorted(str(k) for k in doc.keys() - set(wire.TASK_JSON_KEYS))
    if unknown:
        raise SpecError("unknown key", field=unknown[0][:64])
    task_id = doc.get("id")
    task_id = "" if task_id is None else values.check_text(task_id, "id", allow_empty=True)
    task_class = doc.get("class")
    task_class = (
        "cpu_short" if task_class is None else values.check_text(task_class, "class", allow_empty=True)
    )
    payload = values.check_json_object(doc.get("payload"), "payload", max_bytes=1 << 62)
    priority, timeout = doc.get("priority"), doc.get("timeout")
    max_attempts, workflow_id = doc.get("max_attempts"), doc.get("workflow_id")
    return TaskSpec(
        id=task_id,
        task_class=task_class or "cpu_short",
        payload=payload,
        priority=0
        if priority is None
        else values.check_int(priority, "priority", lo=INT32_MIN, hi=INT32_MAX),
        timeout=None if timeout is None else values.check_finite(timeout, "timeout", lo=0, lo_open=True),
        max_attempts=1
        if max_attempts is None
        else values.check_int(max_attempts, "max_attempts", lo=1, hi=100),
        workflow_id=""
        if workflow_id is None
        else values.check_text(workflow_id, "workflow_id", allow_empty=True),
    )


def _outcome(build: Callable[[], TaskSpec]) -> TaskSpec | type[SpecError]:
    try:
        return build()
    except SpecError:
        return SpecError


@settings(max_examples=400, deadline=None)
@given(doc=remote_task_docs)
def test_a_task_document_is_refused_exactly_when_the_two_checks_refused_it(doc: dict[str, Any]) -> None:
    # (Which field an error names may differ for a document with several wrong fields: the
    # order of the checks changed. That one wrong field is named is checked below.)
    expected = _outcome(lambda: _double_checked_spec_from_doc(doc))
    got = _outcome(lambda: wire.spec_from_doc(doc, generate_id=False))
    assert got == expected
    if isinstance(got, TaskSpec):
        assert json.dumps(got.payload, sort_keys=True) == json.dumps(expected.payload, sort_keys=True)


def _message(build: Callable[[], object]) -> str | None:
    try:
        build()
    except SpecError as exc:
        return str(exc)
    return None


@settings(max_examples=300, deadline=None)
@given(payload=hostile_json)
def test_a_payload_alone_gets_the_same_answer_and_message(payload: Any) -> None:
    doc = {"id": "t-1", "payload": payload}
    assert _message(lambda: wire.spec_from_doc(doc, generate_id=False)) == _message(
        lambda: _double_checked_spec_from_doc(doc)
    )


def _text(payload: Any) -> str:
    return json.dumps(payload, allow_nan=True)


@settings(max_examples=300, deadline=None)
@given(payload=hostile_json)
def test_payload_json_of_submit_task_is_refused_exactly_as_before(payload: Any) -> None:
    """The typed path (SubmitTask, SubmitAndWait, SubmitTasks.tasks): decoded and checked
    once by ``convert.submit_request_payload``; before, ``TaskSpec`` walked it again."""
    req = orch_pb.SubmitTaskRequest(id="t-1", payload_json=_text(payload))
    bound = 4 * MAX_JSON_BYTES + (64 << 10)

    def before() -> TaskSpec:
        decoded = values.decode_json_object(req.payload_json, "payload_json", max_bytes=bound)
        return TaskSpec(id=req.id, payload=decoded)

    def now() -> TaskSpec:
        return TaskSpec.with_checked_payload(cv.submit_request_payload(req), id=req.id)

    assert _message(now) == _message(before)
    if _message(now) is None:
        assert (
            cv.json_text(now().payload) == cv.json_text(before().payload)
            if hasattr(cv, "json_text")
            else True
        )


@pytest.mark.parametrize(
    "old_map",
    [{"handler": "noop"}, {"k": "a\x00b"}, {"\x00": "v"}, {"k" * 300: "v"}, {}],
)
def test_the_old_string_map_is_checked_where_it_is_read(old_map: dict[str, str]) -> None:
    """The old ``payload`` map was taken as is and checked by ``TaskSpec``; now the decoder
    checks it (same rules, same field names) and nothing checks it again."""
    req = orch_pb.SubmitTaskRequest(id="t-1", payload=old_map)
    assert _message(
        lambda: TaskSpec.with_checked_payload(cv.submit_request_payload(req), id="t-1")
    ) == _message(lambda: TaskSpec(id="t-1", payload=dict(old_map)))


def test_with_checked_payload_refuses_anything_but_a_plain_dict() -> None:
    with pytest.raises(TypeError):
        TaskSpec.with_checked_payload({"a": 1}.items(), id="t")


@pytest.mark.parametrize(
    ("field", "value"),
    [("priority", True), ("priority", INT32_MAX + 1), ("max_attempts", 0), ("max_attempts", False),
     ("workflow_id", 0), ("workflow_id", "a\x00"), ("task_class", ""), ("task_class", 1), ("timeout", math.inf)],
)  # fmt: skip
def test_task_spec_still_checks_every_field_when_it_skips_the_defaults(field: str, value: Any) -> None:
    with pytest.raises(SpecError) as info:
        TaskSpec(id="t", **{field: value})
    assert info.value.field == field


# -- once, counted -----------------------------------------------------------------------------


@pytest.fixture
def json_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every call of ``check_json_object``, from wherever it is imported."""
    calls: list[str] = []
    real = values.check_json_object

    def counting(value: Any, field: str, **kwargs: Any) -> Any:
        calls.append(field)
        return real(value, field, **kwargs)

    for module in (values, wire, models, cv):
        monkeypatch.setattr(module, "check_json_object", counting)
    yield calls


def test_a_json_task_document_walks_its_payload_once(json_checks: list[str]) -> None:
    wire.spec_from_doc(
        {"id": "t", "payload": {"handler": "noop", "n": 1, "deep": {"a": [1]}}}, generate_id=False
    )
    assert json_checks == ["payload"]


@pytest.mark.parametrize("field", ["payload_json", "payload"])
def test_a_submit_task_request_walks_its_payload_once(json_checks: list[str], field: str) -> None:
    value: Any = '{"handler": "noop", "n": 1}' if field == "payload_json" else {"handler": "noop"}
    req = orch_pb.SubmitTaskRequest(id="t", **{field: value})
    TaskSpec.with_checked_payload(cv.submit_request_payload(req), id=req.id)
    assert json_checks == [field]
