"""Workflow spec classes: ``WorkflowSpec`` and its ``StepSpec`` steps (checked at
construction against what a task can hold), ``Workflow``, and the run and step states a run
reports (``RunState``, ``StepState``, ``RunUpdate``). See ``engine.py`` for the rules."""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import attrs

from ..errors import NotFound, SpecError
from ..models import TaskSpec, TaskStatus, validate_name
from ..values import (
    INT32_MAX,
    INT32_MIN,
    JsonObject,
    check_finite,
    check_int,
    check_json_object,
    check_text,
    preview,
)
from .template import template_refs

__all__ = [
    "MAX_INPUT_BYTES",
    "MAX_SPEC_BYTES",
    "MAX_STEPS",
    "SPEC_KEYS",
    "STEP_ALIASES",
    "STEP_KEYS",
    "WORKFLOW_ID_RE",
    "RunState",
    "RunStatus",
    "RunUpdate",
    "StepSpec",
    "StepState",
    "StepStatus",
    "Workflow",
    "WorkflowSpec",
    "step_input_keys",
    "string_leaves",
]


T = TypeVar("T")
log = logging.getLogger(__name__)

WORKFLOW_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
SPEC_KEYS = ("steps", "continue_on_failure", "output")
STEP_KEYS = ("name", "task_class", "payload", "depends_on", "priority", "timeout", "max_attempts")
STEP_ALIASES = {"class": "task_class"}
#: Most steps a workflow may have.
MAX_STEPS = 2000
#: Largest workflow spec, as JSON text (UTF-8 bytes).
MAX_SPEC_BYTES = 1 << 20
#: Largest run input, as JSON.
MAX_INPUT_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------
# Spec classes


def _depends_on(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable):
        raise SpecError(
            f"expected a list of step names, got {type(value).__name__}",
            field="depends_on",
            fix='e.g. depends_on=["fetch"]',
        )
    return tuple(value)


def _step_tuple(value: Iterable[StepSpec]) -> tuple[StepSpec, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise SpecError(
            f"expected a list of steps, got {type(value).__name__}",
            field="steps",
            fix="pass a list of StepSpec (or the whole spec as a dict / JSON to parse_workflow_spec)",
        )
    return tuple(value)


def _plain_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else value


def string_leaves(value: Any, path: str) -> Iterable[tuple[str, str]]:
    """Every string inside a JSON value with its path, iteratively (depth is bounded by
    ``check_json_object`` before this runs)."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            yield where, item
        elif isinstance(item, Mapping):
            stack.extend((v, f"{where}.{k}") for k, v in reversed(list(item.items())))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(item))))


@attrs.frozen
class StepSpec:
    """One step: a scheduler task (class, payload with ``handler``) plus its dependencies."""

    name: str
    task_class: str = "cpu_short"
    payload: JsonObject = attrs.field(factory=dict, converter=_plain_dict)
    depends_on: tuple[str, ...] = attrs.field(default=(), converter=_depends_on)
    priority: int = 0
    timeout: float | None = None
    max_attempts: int = 1

    def __attrs_post_init__(self) -> None:
        validate_name(self.name, "steps[].name")
        where = f"steps.{self.name}"
        if ".result." in f"{self.name}.":
            raise SpecError(
                "a step name may not have 'result' after a dot",
                field=f"{where}.name",
                fix="rename the step (templates read results as steps.NAME.result.KEY)",
            )
        # Frozen class: the checked payload (a plain JSON object) replaces the raw one once.
        object.__setattr__(self, "payload", check_json_object(self.payload, f"{where}.payload"))
        if not isinstance(self.task_class, str) or not self.task_class:
            raise SpecError(
                f"expected a class name, got {preview(self.task_class)}",
                field=f"{where}.task_class",
                fix="name a task class such as cpu_short",
            )
        check_text(self.task_class, f"{where}.task_class")
        for dep in self.depends_on:
            if not isinstance(dep, str):
                raise SpecError(
                    f"expected step names, got {preview(dep)}",
                    field=f"{where}.depends_on",
                    fix="list the names of the steps this one waits for",
                )
        if len(set(self.depends_on)) != len(self.depends_on):
            raise SpecError(
                "a dependency is listed twice", field=f"{where}.depends_on", fix="list each step once"
            )
        # The bounds a task (and so the scheduler's store and the wire) holds.
        check_int(self.priority, f"{where}.priority", lo=INT32_MIN, hi=INT32_MAX)
        if self.timeout is not None:
            # 5 and 5.0 are the same spec (and the same spec hash).
            timeout = check_finite(self.timeout, f"{where}.timeout", lo=0, lo_open=True)
            object.__setattr__(self, "timeout", timeout)
        check_int(self.max_attempts, f"{where}.max_attempts", lo=1, hi=100)
        # Whatever else TaskSpec refuses is refused now, not when the step runs.
        try:
            TaskSpec(
                id="workflow-step-check",
                task_class=self.task_class,
                payload=self.payload,
                priority=self.priority,
                timeout=self.timeout,
                max_attempts=self.max_attempts,
            )
        except SpecError as exc:
            field = exc.field or ""
            raise SpecError(exc.message, field=f"{where}.{field}" if field else where, fix=exc.fix) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task_class": self.task_class,
            "payload": dict(self.payload),
            "depends_on": list(self.depends_on),
            "priority": self.priority,
            "timeout": self.timeout,
            "max_attempts": self.max_attempts,
        }


def step_input_keys(step: StepSpec) -> set[str]:
    """The ``{{ input.KEY }}`` keys one step's payload refers to."""
    return {
        ref[1]
        for where, text in string_leaves(step.payload, f"steps.{step.name}.payload")
        for ref in template_refs(text, where)
        if ref[0] == "input"
    }


@attrs.frozen
class WorkflowSpec:
    """A DAG of steps. ``output`` optionally maps run-output keys to templates; without it the
    run's output is the results of the sink steps, keyed ``"STEP.KEY"``."""

    steps: tuple[StepSpec, ...] = attrs.field(converter=_step_tuple)
    continue_on_failure: bool = False
    output: JsonObject = attrs.field(factory=dict, converter=_plain_dict)

    def __attrs_post_init__(self) -> None:
        for i, step in enumerate(self.steps):
            if not isinstance(step, StepSpec):
                raise SpecError(
                    f"expected a StepSpec, got {type(step).__name__}",
                    field=f"steps[{i}]",
                    fix="build steps with StepSpec(...) or pass the spec as a dict / JSON",
                )
        if not isinstance(self.continue_on_failure, bool):
            raise SpecError(
                f"must be true or false, got {self.continue_on_failure!r}", field="continue_on_failure"
            )
        object.__setattr__(self, "output", check_json_object(self.output, "output"))

    def step(self, name: str) -> StepSpec:
        for step in self.steps:
            if step.name == name:
                return step
        raise NotFound(f"no step {name!r} in this workflow", field="step")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def sinks(self) -> list[str]:
        """Steps nothing depends on, in declaration order."""
        used = {dep for s in self.steps for dep in s.depends_on}
        return [s.name for s in self.steps if s.name not in used]

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [s.to_dict() for s in self.steps],
            "continue_on_failure": self.continue_on_failure,
            "output": dict(self.output),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def input_keys(self) -> set[str]:
        """Every ``{{ input.KEY }}`` the payloads and the output mapping refer to."""
        keys: set[str] = set()
        sources = [*((s.payload, f"steps.{s.name}.payload") for s in self.steps), (self.output, "output")]
        for value, path in sources:
            for where, text in string_leaves(value, path):
                for ref in template_refs(text, where):
                    if ref[0] == "input":
                        keys.add(ref[1])
        return keys


@attrs.frozen
class Workflow:
    """A created workflow: its id, display name and description, and its validated spec."""

    id: str
    name: str
    description: str
    spec: WorkflowSpec
    created_at: float = 0.0

    @property
    def spec_hash(self) -> str:
        return self.spec.spec_hash


class StepStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (StepStatus.PENDING, StepStatus.RUNNING)


#: A run goes through exactly a task's lifecycle (pending, running, then completed, failed
#: or cancelled), so it shares the enum rather than repeating it.
RunStatus = TaskStatus


@attrs.frozen
class StepState:
    """One step of one run. ``task_id`` is set once the step was submitted."""

    name: str
    status: StepStatus = StepStatus.PENDING
    task_id: str = ""
    attempts: int = 0
    result: JsonObject = attrs.field(factory=dict)
    error: str = ""
    started_at: float = 0.0
    completed_at: float = 0.0


@attrs.frozen
class RunUpdate:
    """One change of a run, shaped like the wire's ``WorkflowStatusUpdate``.

    ``current_step`` is the step whose change produced this update ("" for run-level changes;
    in the first update of a stream, a running step if any).
    """

    run_id: str
    status: RunStatus
    current_step: str = ""
    steps_completed: int = 0
    total_steps: int = 0
    output: JsonObject = attrs.field(factory=dict)
    error: str = ""


@attrs.frozen
class RunState:
    """Everything known about one run right now; ``steps`` are in declaration order."""

    run_id: str
    workflow_id: str
    status: RunStatus
    steps: dict[str, StepState]
    input: JsonObject = attrs.field(factory=dict)
    output: JsonObject = attrs.field(factory=dict)
    error: str = ""
    idempotency_key: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def steps_completed(self) -> int:
        return sum(1 for s in self.steps.values() if s.status is StepStatus.COMPLETED)

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    @property
    def current_step(self) -> str:
        """A running step's name ("" when none runs), as the wire's ``current_step``."""
        return next((s.name for s in self.steps.values() if s.status is StepStatus.RUNNING), "")

    def to_update(self, current_step: str = "", *, steps_completed: int | None = None) -> RunUpdate:
        """This state as a stream update (``steps_completed`` when the caller keeps the count)."""
        return RunUpdate(
            run_id=self.run_id,
            status=self.status,
            current_step=current_step,
            steps_completed=self.steps_completed if steps_completed is None else steps_completed,
            total_steps=len(self.steps),
            output=dict(self.output),
            error=self.error,
        )
