"""Workflows: DAGs of scheduler tasks, idempotent runs and a live status stream.

A *workflow* is a named ``WorkflowSpec``: steps, each an ordinary scheduler task (class,
payload, priority, timeout, attempts) with ``depends_on`` edges. A *run* executes it once for
an input mapping::

    {"steps": [
        {"name": "fetch", "task_class": "cpu_short",
         "payload": {"handler": "exec", "cmd": "printf /data/%s.bin '{{ input.model }}'"}},
        {"name": "train", "depends_on": ["fetch"],
         "payload": {"handler": "exec", "cmd": "train '{{ steps.fetch.result.stdout }}'"}}],
     "continue_on_failure": false,
     "output": {"model": "{{ steps.train.result.stdout }}"}}

Rules (each enforced in exactly one place below):

- Validation at ``create_workflow``: duplicate step names, unknown dependencies, cycles (the
  cycle is named), unknown task classes and handlers, malformed JSON (line and column), and
  templates that refer to unknown steps or to steps that are not upstream. A refused spec
  leaves no trace.
- Templating: ``{{ input.KEY }}`` and ``{{ steps.NAME.result.KEY }}``. Missing input keys
  are refused by ``start_run``; a missing result key fails the step (before its task exists).
  Values are substituted verbatim: inside an ``exec`` command, quote them, and do not feed
  untrusted input to a shell.
- Output: the declared ``output`` mapping (templates, filled when the run ends; one that
  cannot be filled fails the run, naming ``output.KEY``), else the results of the sink steps
  keyed ``"STEP.KEY"``.
- Steps become scheduler tasks with deterministic ids ``f"{run_id}.{step}"`` carrying the
  workflow id, so the scheduler's idempotent submit makes re-driving a run after a crash safe.
  A step is submitted only after all its dependencies completed.
- Failure policy: by default the first failed step fails the run, no new step starts (steps
  already running finish) and everything not started is ``skipped``. With
  ``continue_on_failure`` only the failed step's dependents are skipped; independent branches
  run to the end. Either way a run with a failed step ends ``failed``. ``cancel_run`` cancels
  running tasks on the scheduler and marks every unfinished step ``cancelled``; a step whose
  task is cancelled from outside the run counts as failed for the policy and the run.
- Events on the bus: ``workflow_created`` (resource: workflow id), ``workflow_started``,
  ``workflow_step_completed`` (every step that ends, its ``status`` in the data),
  ``workflow_completed``, ``workflow_failed``, ``workflow_cancelled`` (resource: run id).
- Idempotent runs: a non-empty ``idempotency_key`` maps to one run id per workflow (a hash of
  both, inserted once in SQLite), so repeated or concurrent ``start_run`` calls never start a
  second run.
- Durability: workflows, runs and step states live in ``<home>/workflows.db`` (WAL; every
  SQLite call runs in a worker thread). On start the engine re-drives unfinished runs:
  completed steps keep their results, interrupted steps are re-submitted (the scheduler
  returns the task it recovered, or runs it again).
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import json
import logging
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import anyio
import anyio.abc
import attrs
from anyio.abc import AsyncResource

from ..config import Settings
from ..errors import AlreadyExists, CycleError, InfraError, NotFound, SpecError, Unavailable
from ..events import EventBus
from ..models import TaskClass, TaskSpec, TaskStatus, coerce_str_map, validate_name
from ..services.graph import find_cycle
from .store import translate_sqlite_error

if TYPE_CHECKING:
    from .scheduler import Scheduler

__all__ = [
    "RunState",
    "RunStatus",
    "RunUpdate",
    "StepSpec",
    "StepState",
    "StepStatus",
    "Workflow",
    "WorkflowEngine",
    "WorkflowSpec",
    "parse_workflow_spec",
    "validate_workflow",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

_WORKFLOW_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_TEMPLATE_RE = re.compile(r"\{\{(.*?)\}\}")
_INPUT_REF_RE = re.compile(r"^input\.(?P<key>[^\s{}]+)$")
# Step names may contain dots, so the *first* ".result." ends the name (StepSpec refuses
# names with a ".result" segment, which this could not read back).
_STEP_REF_RE = re.compile(r"^steps\.(?P<step>[a-z0-9][a-z0-9_.-]*?)\.result\.(?P<key>[^\s{}]+)$")
_TEMPLATE_FIX = "write {{ input.KEY }} or {{ steps.NAME.result.KEY }}"
_SPEC_KEYS = ("steps", "continue_on_failure", "output")
_STEP_KEYS = ("name", "task_class", "payload", "depends_on", "priority", "timeout", "max_attempts")
_STEP_ALIASES = {"class": "task_class"}


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


@attrs.frozen
class StepSpec:
    """One step: a scheduler task (class, payload with ``handler``) plus its dependencies."""

    name: str
    task_class: str = "cpu_short"
    payload: dict[str, str] = attrs.field(factory=dict, converter=_plain_dict)
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
        # Frozen class: the coerced payload replaces the raw one once, here.
        object.__setattr__(self, "payload", coerce_str_map(self.payload, f"{where}.payload"))
        if not isinstance(self.task_class, str) or not self.task_class:
            raise SpecError(
                f"expected a class name, got {self.task_class!r}",
                field=f"{where}.task_class",
                fix="name a task class such as cpu_short",
            )
        for dep in self.depends_on:
            if not isinstance(dep, str):
                raise SpecError(
                    f"expected step names, got {dep!r}",
                    field=f"{where}.depends_on",
                    fix="list the names of the steps this one waits for",
                )
        if len(set(self.depends_on)) != len(self.depends_on):
            raise SpecError(
                "a dependency is listed twice", field=f"{where}.depends_on", fix="list each step once"
            )
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise SpecError(f"must be an integer, got {self.priority!r}", field=f"{where}.priority")
        if self.timeout is not None and (
            isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or self.timeout <= 0
        ):
            raise SpecError(
                f"must be a number of seconds > 0 or null, got {self.timeout!r}", field=f"{where}.timeout"
            )
        if self.timeout is not None:
            # 5 and 5.0 are the same spec (and the same spec hash).
            object.__setattr__(self, "timeout", float(self.timeout))
        if (
            not isinstance(self.max_attempts, int)
            or isinstance(self.max_attempts, bool)
            or not 1 <= self.max_attempts <= 100
        ):
            raise SpecError(
                f"must be an integer from 1 to 100, got {self.max_attempts!r}", field=f"{where}.max_attempts"
            )

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


@attrs.frozen
class WorkflowSpec:
    """A DAG of steps. ``output`` optionally maps run-output keys to templates; without it the
    run's output is the results of the sink steps, keyed ``"STEP.KEY"``."""

    steps: tuple[StepSpec, ...] = attrs.field(converter=_step_tuple)
    continue_on_failure: bool = False
    output: dict[str, str] = attrs.field(factory=dict, converter=_plain_dict)

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
        object.__setattr__(self, "output", coerce_str_map(self.output, "output"))

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
        for text in [*(v for s in self.steps for v in s.payload.values()), *self.output.values()]:
            for ref in _template_refs(text, "payload"):
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
    result: dict[str, str] = attrs.field(factory=dict)
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
    output: dict[str, str] = attrs.field(factory=dict)
    error: str = ""


@attrs.frozen
class RunState:
    """Everything known about one run right now; ``steps`` are in declaration order."""

    run_id: str
    workflow_id: str
    status: RunStatus
    steps: dict[str, StepState]
    input: dict[str, str] = attrs.field(factory=dict)
    output: dict[str, str] = attrs.field(factory=dict)
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


# ---------------------------------------------------------------------------------------
# Parsing and validation


def parse_workflow_spec(spec: Any) -> WorkflowSpec:
    """A ``WorkflowSpec`` from JSON (``bytes``/``str``), a dict, a list of steps, or itself.

    Only the shape is checked here; ``validate_workflow`` checks the graph and references.
    """
    if isinstance(spec, WorkflowSpec):
        return spec
    if spec is None:
        raise SpecError("a workflow needs a spec", field="spec", fix='pass {"steps": [...]}')
    if isinstance(spec, (bytes, bytearray, memoryview)):
        try:
            spec = bytes(spec).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(
                f"not UTF-8 (byte {exc.start})", field="spec", fix="send the JSON spec as UTF-8"
            ) from None
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise SpecError(
                f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                field="spec",
                fix="fix the JSON syntax at that position",
            ) from None
    if isinstance(spec, (list, tuple)):
        spec = {"steps": spec}
    if not isinstance(spec, Mapping):
        raise SpecError(
            f"expected a JSON object, got {type(spec).__name__}",
            field="spec",
            fix='pass {"steps": [...], "continue_on_failure": false}',
        )
    _refuse_unknown_keys(spec, _SPEC_KEYS, "")
    raw_steps = spec.get("steps")
    if isinstance(raw_steps, Mapping):
        # {"steps": {"fetch": {...}, "train": {...}}}: the key is the name.
        items = []
        for name, body in raw_steps.items():
            if not isinstance(body, Mapping):
                raise SpecError(f"expected an object, got {type(body).__name__}", field=f"steps.{name}")
            if "name" in body and body["name"] != name:
                raise SpecError(
                    f"name {body['name']!r} differs from its key {name!r}",
                    field=f"steps.{name}.name",
                    fix="drop the name field or make it match the key",
                )
            items.append({**body, "name": name})
        raw_steps = items
    if not isinstance(raw_steps, (list, tuple)) or not raw_steps:
        raise SpecError(
            "a workflow needs a non-empty list of steps",
            field="steps",
            fix='add "steps": [{"name": ..., "task_class": ..., "payload": {...}}]',
        )
    steps = [_parse_step(raw, i) for i, raw in enumerate(raw_steps)]
    cof = spec.get("continue_on_failure", False)
    if not isinstance(cof, bool):
        raise SpecError(f"must be true or false, got {cof!r}", field="continue_on_failure")
    return WorkflowSpec(steps=steps, continue_on_failure=cof, output=spec.get("output") or {})


def _parse_step(raw: Any, index: int) -> StepSpec:
    if isinstance(raw, StepSpec):
        return raw
    if not isinstance(raw, Mapping):
        raise SpecError(f"expected an object, got {type(raw).__name__}", field=f"steps[{index}]")
    name = raw.get("name")
    where = f"steps.{name}" if isinstance(name, str) and name else f"steps[{index}]"
    if not isinstance(name, str) or not name:
        raise SpecError("every step needs a name", field=f"{where}.name", fix='add "name": "fetch"')
    body: dict[str, Any] = {_STEP_ALIASES.get(str(k), str(k)): v for k, v in raw.items()}
    if "class" in raw and "task_class" in raw:
        raise SpecError("both class and task_class are set", field=f"{where}.task_class", fix="keep one")
    _refuse_unknown_keys(body, _STEP_KEYS, f"{where}.")
    if body.get("task_class") is None:
        body.pop("task_class", None)
    if "depends_on" in body and not isinstance(body["depends_on"], (str, list, tuple, type(None))):
        raise SpecError(
            f"expected a list of step names, got {type(body['depends_on']).__name__}",
            field=f"{where}.depends_on",
        )
    if "payload" in body and not isinstance(body["payload"], (Mapping, type(None))):
        raise SpecError(
            f"expected an object of strings, got {type(body['payload']).__name__}", field=f"{where}.payload"
        )
    if body.get("payload") is None:
        body.pop("payload", None)
    return StepSpec(**body)


def _refuse_unknown_keys(doc: Mapping[str, Any], known: Sequence[str], prefix: str) -> None:
    for key in doc:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), list(known), n=1)
        fix = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(known)
        raise SpecError(f"unknown key {key!r}", field=f"{prefix}{key}", fix=fix)


def _ancestors(spec: WorkflowSpec) -> dict[str, set[str]]:
    """Every step's transitive dependencies (the spec must be acyclic)."""
    deps = {s.name: s.depends_on for s in spec.steps}
    memo: dict[str, set[str]] = {}
    for name in _topological_order(spec):
        acc: set[str] = set()
        for dep in deps[name]:
            acc.add(dep)
            acc |= memo[dep]
        memo[name] = acc
    return memo


def _topological_order(spec: WorkflowSpec) -> list[str]:
    """Kahn's algorithm, stable in declaration order (the spec must be acyclic)."""
    remaining = {s.name: set(s.depends_on) for s in spec.steps}
    order: list[str] = []
    while remaining:
        ready = [n for n, deps in remaining.items() if not deps]
        for name in ready:
            del remaining[name]
            order.append(name)
        for deps in remaining.values():
            deps.difference_update(ready)
    return order


def _template_refs(text: str, field: str) -> list[tuple[str, ...]]:
    """The references in one payload value: ``("input", key)`` or ``("steps", step, key)``."""
    refs: list[tuple[str, ...]] = []
    for match in _TEMPLATE_RE.finditer(text):
        expr = match.group(1).strip()
        if m := _INPUT_REF_RE.match(expr):
            refs.append(("input", m["key"]))
        elif m := _STEP_REF_RE.match(expr):
            refs.append(("steps", m["step"], m["key"]))
        else:
            raise SpecError(f"unknown template {match.group(0)!r}", field=field, fix=_TEMPLATE_FIX)
    return refs


def validate_workflow(
    spec: WorkflowSpec,
    classes: Mapping[str, TaskClass] | Iterable[str] | None = None,
    handlers: Iterable[str] | None = None,
) -> None:
    """Refuse duplicate names, unknown dependencies, cycles, templates that refer to unknown or
    non-upstream steps and, when given, unknown classes and unknown ``payload.handler`` names
    (checked only for classes run by the local executor, which is what reads the handler)."""
    seen: set[str] = set()
    for step in spec.steps:
        if step.name in seen:
            raise SpecError(
                f"duplicate step name {step.name!r}",
                field=f"steps.{step.name}",
                fix="give each step its own name",
            )
        seen.add(step.name)
    for step in spec.steps:
        for dep in step.depends_on:
            if dep not in seen:
                close = difflib.get_close_matches(dep, sorted(seen), n=1)
                raise SpecError(
                    f"unknown step {dep!r}",
                    field=f"steps.{step.name}.depends_on",
                    fix=f"did you mean {close[0]!r}?" if close else "depend only on steps of this workflow",
                )
    cycle = find_cycle({s.name: s.depends_on for s in spec.steps})
    if cycle is not None:
        raise CycleError(cycle, field=f"steps.{cycle[0]}.depends_on")
    if classes is not None:
        known = sorted(classes)
        for step in spec.steps:
            if step.task_class not in known:
                close = difflib.get_close_matches(step.task_class, known, n=1)
                raise SpecError(
                    f"unknown task class {step.task_class!r}",
                    field=f"steps.{step.name}.task_class",
                    fix=(f"did you mean {close[0]!r}? " if close else "") + "known: " + ", ".join(known),
                )
    if handlers is not None:
        _check_handlers(spec, classes, sorted(handlers))
    upstream = _ancestors(spec)
    for step in spec.steps:
        for key, text in step.payload.items():
            field = f"steps.{step.name}.payload.{key}"
            for ref in _template_refs(text, field):
                if ref[0] != "steps":
                    continue
                target = ref[1]
                if target not in seen:
                    raise SpecError(
                        f"refers to unknown step {target!r}", field=field, fix="name a step of this workflow"
                    )
                if target not in upstream[step.name]:
                    raise SpecError(
                        f"refers to step {target!r}, which is not upstream of {step.name!r}",
                        field=field,
                        fix=f"add {target!r} to the depends_on of {step.name!r}",
                    )
    for key, text in spec.output.items():
        for ref in _template_refs(text, f"output.{key}"):
            if ref[0] == "steps" and ref[1] not in seen:
                raise SpecError(
                    f"refers to unknown step {ref[1]!r}",
                    field=f"output.{key}",
                    fix="name a step of this workflow",
                )


def _check_handlers(
    spec: WorkflowSpec, classes: Mapping[str, TaskClass] | Iterable[str] | None, known: list[str]
) -> None:
    for step in spec.steps:
        cls = classes.get(step.task_class) if isinstance(classes, Mapping) else None
        if cls is not None and cls.executor != "local":
            continue  # e.g. gpu_slurm: its executor runs the payload, no handler involved
        field = f"steps.{step.name}.payload.handler"
        name = step.payload.get("handler", "")
        if "{{" in name:
            continue  # chosen at run time; the scheduler refuses an unknown one then
        if not name:
            raise SpecError(
                "missing", field=field, fix="name the handler that runs this step: " + ", ".join(known)
            )
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise SpecError(
                f"no handler named {name!r}",
                field=field,
                fix=(f"did you mean {close[0]!r}? " if close else "")
                + "known: "
                + ", ".join(known)
                + " (register a new one with @infra.handler(NAME) before creating the workflow)",
            )


class _RenderError(Exception):
    """A template could not be filled at run time (missing result key)."""


def _render(text: str, field: str, input: Mapping[str, str], results: Mapping[str, Mapping[str, str]]) -> str:
    def fill(match: re.Match[str]) -> str:
        ref = _template_refs(match.group(0), field)[0]
        if ref[0] == "input":
            if ref[1] not in input:
                raise _RenderError(f"{field}: input has no key {ref[1]!r}")
            return input[ref[1]]
        step, key = ref[1], ref[2]
        result = results.get(step)
        if result is None:
            raise _RenderError(f"{field}: step {step!r} has no result (it did not complete)")
        if key not in result:
            have = ", ".join(sorted(result)) or "none"
            raise _RenderError(f"{field}: step {step!r} has no result key {key!r} (its keys: {have})")
        return result[key]

    return _TEMPLATE_RE.sub(fill, text)


# ---------------------------------------------------------------------------------------
# Storage


_SCHEMA = """
CREATE TABLE IF NOT EXISTS workflows (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT NOT NULL,
    spec TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, workflow_id TEXT NOT NULL, idempotency_key TEXT NOT NULL,
    input TEXT NOT NULL, status TEXT NOT NULL, output TEXT NOT NULL, error TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL, task_id TEXT NOT NULL,
    attempts INTEGER NOT NULL, result TEXT NOT NULL, error TEXT NOT NULL,
    started_at REAL NOT NULL, completed_at REAL NOT NULL, PRIMARY KEY (run_id, name));
"""


@attrs.define
class _Batch:
    """Step rows waiting for one transaction; ``done`` is set once it committed or failed."""

    rows: dict[tuple[str, str], tuple[Any, ...]] = attrs.field(factory=dict)
    done: anyio.Event = attrs.field(factory=anyio.Event)
    error: InfraError | None = None


class _Store:
    """SQLite persistence. Every public method is a coroutine that runs its statements in a
    worker thread; a capacity limiter of one keeps them in submission order. Step rows, the
    frequent writes, are group-committed."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._batch = _Batch()
        self._writing = False

    async def open(self) -> None:
        await self._call(self._open_sync)

    def _open_sync(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self._path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await self._call(db.close)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except (sqlite3.Error, OSError) as exc:
            raise translate_sqlite_error(exc, self._path) from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise Unavailable("the workflow store is closed", fix="start the infra first")
        return self._db

    # -- workflows

    async def insert_workflow(self, wf: Workflow) -> Workflow | None:
        """Insert ``wf`` unless the id exists; returns the existing workflow if it does."""

        def run() -> Workflow | None:
            db = self._conn()
            with db:
                row = db.execute("SELECT * FROM workflows WHERE id = ?", (wf.id,)).fetchone()
                if row is not None:
                    return _workflow_from_row(row)
                db.execute(
                    "INSERT INTO workflows VALUES (?, ?, ?, ?, ?)",
                    (wf.id, wf.name, wf.description, wf.spec.to_json(), wf.created_at),
                )
                return None

        return await self._call(run)

    async def workflows(self) -> list[Workflow]:
        rows = await self._call(
            lambda: self._conn().execute("SELECT * FROM workflows ORDER BY created_at, id").fetchall()
        )
        return [_workflow_from_row(r) for r in rows]

    # -- runs

    async def insert_run(self, run: RunState) -> bool:
        """Insert ``run`` and its steps; False (and nothing written) if the id exists."""

        def go() -> bool:
            db = self._conn()
            with db:
                cur = db.execute(
                    "INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                    (
                        run.run_id,
                        run.workflow_id,
                        run.idempotency_key,
                        json.dumps(run.input),
                        str(run.status),
                        json.dumps(run.output),
                        run.error,
                        run.created_at,
                        run.updated_at,
                    ),
                )
                if cur.rowcount == 0:
                    return False
                db.executemany(
                    "INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_step_row(run.run_id, s) for s in run.steps.values()],
                )
                return True

        return await self._call(go)

    async def save_run(self, run: RunState, *, cancel_requested: bool) -> None:
        def go() -> None:
            with self._conn() as db:
                db.execute(
                    "UPDATE runs SET status = ?, output = ?, error = ?, cancel_requested = ?, updated_at = ?"
                    " WHERE id = ?",
                    (
                        str(run.status),
                        json.dumps(run.output),
                        run.error,
                        int(cancel_requested),
                        run.updated_at,
                        run.run_id,
                    ),
                )

        await self._call(go)

    async def save_step(self, run_id: str, step: StepState) -> None:
        """Returns once the row is committed. Group commit: rows saved while a write is in
        flight go together in the next transaction (the first caller writes for everyone)."""
        mine = self._batch
        mine.rows[(run_id, step.name)] = _step_row(run_id, step)
        if not self._writing:
            self._writing = True
            try:
                while self._batch.rows:
                    batch, self._batch = self._batch, _Batch()
                    try:
                        await self._call(self._write_steps, list(batch.rows.values()))
                    except InfraError as exc:
                        batch.error = exc
                    finally:
                        batch.done.set()
            finally:
                self._writing = False
                if self._batch.rows:
                    # The writer was cancelled (shutdown): fail the rows it would have written
                    # rather than leave their callers waiting.
                    batch, self._batch = self._batch, _Batch()
                    batch.error = Unavailable("the workflow store stopped before this write")
                    batch.done.set()
        await mine.done.wait()
        if mine.error is not None:
            raise mine.error

    def _write_steps(self, rows: list[tuple[Any, ...]]) -> None:
        with self._conn() as db:
            db.executemany("INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    async def load_run(self, run_id: str) -> tuple[RunState, bool] | None:
        def go() -> tuple[RunState, bool] | None:
            db = self._conn()
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            steps = db.execute("SELECT * FROM steps WHERE run_id = ?", (run_id,)).fetchall()
            return _run_from_rows(row, steps)

        return await self._call(go)

    async def unfinished_run_ids(self) -> list[str]:
        rows = await self._call(
            lambda: (
                self._conn()
                .execute("SELECT id FROM runs WHERE status IN ('pending', 'running') ORDER BY created_at")
                .fetchall()
            )
        )
        return [r[0] for r in rows]

    async def run_ids(self, workflow_id: str | None, limit: int) -> list[str]:
        def go() -> list[Any]:
            db = self._conn()
            if workflow_id is None:
                return db.execute("SELECT id FROM runs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
            return db.execute(
                "SELECT id FROM runs WHERE workflow_id = ? ORDER BY created_at DESC LIMIT ?",
                (workflow_id, limit),
            ).fetchall()

        return [r[0] for r in await self._call(go)]


class _MemoryStore:
    """``_Store``'s interface over plain dicts, for ``settings.durable = False``: nothing to
    write, so nothing leaves the event loop."""

    def __init__(self) -> None:
        self._workflows: dict[str, Workflow] = {}
        #: run id -> (state, cancel requested); insertion order is creation order.
        self._runs: dict[str, tuple[RunState, bool]] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def insert_workflow(self, wf: Workflow) -> Workflow | None:
        existing = self._workflows.get(wf.id)
        if existing is None:
            self._workflows[wf.id] = wf
        return existing

    async def workflows(self) -> list[Workflow]:
        return list(self._workflows.values())

    async def insert_run(self, run: RunState) -> bool:
        if run.run_id in self._runs:
            return False
        self._runs[run.run_id] = (run, False)
        return True

    async def save_run(self, run: RunState, *, cancel_requested: bool) -> None:
        stored = self._runs[run.run_id][0]
        self._runs[run.run_id] = (
            attrs.evolve(
                stored, status=run.status, output=run.output, error=run.error, updated_at=run.updated_at
            ),
            cancel_requested,
        )

    async def save_step(self, run_id: str, step: StepState) -> None:
        stored, cancel_requested = self._runs[run_id]
        self._runs[run_id] = (attrs.evolve(stored, steps={**stored.steps, step.name: step}), cancel_requested)

    async def load_run(self, run_id: str) -> tuple[RunState, bool] | None:
        return self._runs.get(run_id)

    async def unfinished_run_ids(self) -> list[str]:
        return [rid for rid, (run, _) in self._runs.items() if not run.status.terminal]

    async def run_ids(self, workflow_id: str | None, limit: int) -> list[str]:
        ids = [rid for rid, (run, _) in self._runs.items() if workflow_id in (None, run.workflow_id)]
        return ids[::-1][:limit]


def _step_row(run_id: str, s: StepState) -> tuple[Any, ...]:
    return (
        run_id,
        s.name,
        str(s.status),
        s.task_id,
        s.attempts,
        json.dumps(s.result),
        s.error,
        s.started_at,
        s.completed_at,
    )


def _workflow_from_row(row: Sequence[Any]) -> Workflow:
    wf_id, name, description, spec, created_at = row
    return Workflow(
        id=wf_id, name=name, description=description, spec=parse_workflow_spec(spec), created_at=created_at
    )


def _run_from_rows(row: Sequence[Any], step_rows: Sequence[Sequence[Any]]) -> tuple[RunState, bool]:
    run_id, wf_id, key, input_json, status, output, error, cancel_requested, created_at, updated_at = row
    steps = {
        r[1]: StepState(
            name=r[1],
            status=StepStatus(r[2]),
            task_id=r[3],
            attempts=r[4],
            result=json.loads(r[5]),
            error=r[6],
            started_at=r[7],
            completed_at=r[8],
        )
        for r in step_rows
    }
    run = RunState(
        run_id=run_id,
        workflow_id=wf_id,
        status=RunStatus(status),
        steps=steps,
        input=json.loads(input_json),
        output=json.loads(output),
        error=error,
        idempotency_key=key,
        created_at=created_at,
        updated_at=updated_at,
    )
    return run, bool(cancel_requested)


# ---------------------------------------------------------------------------------------
# The engine


def _run_id_for_key(workflow_id: str, key: str) -> str:
    # Deterministic, so the store's primary key makes one key = one run even across processes.
    return "run-" + hashlib.sha256(f"{workflow_id}\0{key}".encode()).hexdigest()[:20]


class _LiveRun:
    """The engine's in-memory record of an active run: current state, the update history
    subscribers read with their own cursor, and the events steps wait on."""

    def __init__(self, state: RunState, workflow: Workflow, cancel_requested: bool = False) -> None:
        self.state = state
        self.workflow = workflow
        self.cancel_requested = cancel_requested
        #: Set when the default policy stops new steps after a failure.
        self.stop_new = False
        #: Set when the engine stops driving this run (shutdown); wakes status readers.
        self.closed = False
        self.completed = state.steps_completed
        self.updates: list[RunUpdate] = [state.to_update()]
        self.wakeup = anyio.Event()
        self.finished = anyio.Event()
        self.step_done = {name: anyio.Event() for name in state.steps}

    def publish(self, current_step: str = "") -> None:
        # The count is kept incrementally: recounting every step on every change would make
        # a run quadratic in its number of steps.
        self.updates.append(self.state.to_update(current_step, steps_completed=self.completed))
        self._wake()

    def set_step(self, step: StepState) -> None:
        """Replace one step's state (and keep the completed count)."""
        state = self.state
        old = state.steps[step.name]
        self.completed += (step.status is StepStatus.COMPLETED) - (old.status is StepStatus.COMPLETED)
        self.state = attrs.evolve(state, steps={**state.steps, step.name: step}, updated_at=time.time())

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        # Readers check for new updates right before waiting (no await in between), so with
        # nobody waiting there is nothing to wake and the event can stay.
        if self.wakeup.statistics().tasks_waiting:
            wakeup, self.wakeup = self.wakeup, anyio.Event()
            wakeup.set()


class WorkflowEngine(AsyncResource):
    """Creates workflows and drives their runs on the scheduler.

    An async context manager: entering opens the store and re-drives unfinished runs;
    leaving cancels the drivers (their runs stay durable and resume on the next start).
    """

    def __init__(self, settings: Settings, *, scheduler: Scheduler, bus: EventBus) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.bus = bus
        self._store: _Store | _MemoryStore = (
            _Store(settings.resolved_home() / "workflows.db") if settings.durable else _MemoryStore()
        )
        self._tg: anyio.abc.TaskGroup | None = None
        self._live: dict[str, _LiveRun] = {}
        self._workflows: dict[str, Workflow] = {}
        self._create_lock = anyio.Lock()
        self._start_lock = anyio.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._store.open()
        try:
            for wf in await self._store.workflows():
                self._workflows[wf.id] = wf
            tg = anyio.create_task_group()
            await tg.__aenter__()
            self._tg = tg
            for run_id in await self._store.unfinished_run_ids():
                loaded = await self._load_run(run_id)
                if loaded is not None:
                    self._drive(*loaded)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        """Stop driving runs (they stay durable) and close the store. Safe to call twice."""
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        for live in self._live.values():
            live.close()
        self._live.clear()
        await self._store.close()

    def _need_tg(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise Unavailable("the workflow engine is not running", fix="use it inside `async with`")
        return self._tg

    # -- workflows -------------------------------------------------------------------------

    async def create_workflow(
        self, id: str, name: str = "", description: str = "", spec: Any = None
    ) -> Workflow:
        """Validate and store a workflow. Same id and spec again returns the stored one; the
        same id with a different spec raises ``AlreadyExists``."""
        self._need_tg()
        if not isinstance(id, str) or not _WORKFLOW_ID_RE.match(id):
            raise SpecError(
                f"invalid workflow id {id!r}",
                field="id",
                fix="use 1-128 letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
            )
        parsed = parse_workflow_spec(spec)
        validate_workflow(parsed, self.scheduler.classes, self.scheduler.handler_names())
        wf = Workflow(id=id, name=name or id, description=description, spec=parsed, created_at=time.time())
        async with self._create_lock:
            existing = await self._store.insert_workflow(wf)
            if existing is not None:
                if existing.spec_hash != wf.spec_hash:
                    raise AlreadyExists(
                        f"workflow {id!r} exists with a different spec",
                        field="id",
                        fix="use a new workflow id for the changed spec",
                    )
                return existing
            self._workflows[id] = wf
        self.bus.publish("workflow_created", id, {"name": wf.name, "steps": len(parsed.steps)})
        return wf

    async def get_workflow(self, workflow_id: str) -> Workflow:
        try:
            return self._workflows[workflow_id]
        except KeyError:
            raise NotFound(
                f"no workflow {workflow_id!r}", field="workflow_id", fix="create it with create_workflow"
            ) from None

    async def list_workflows(self) -> list[Workflow]:
        return sorted(self._workflows.values(), key=lambda w: (w.created_at, w.id))

    # -- runs ------------------------------------------------------------------------------

    async def start_run(
        self, workflow_id: str, *, input: Mapping[str, Any] | None = None, idempotency_key: str = ""
    ) -> str:
        """Start a run and return its id. With a non-empty ``idempotency_key`` the same key for
        the same workflow returns the same run id and never starts a second run (a different
        input under a used key raises ``AlreadyExists``)."""
        self._need_tg()
        wf = await self.get_workflow(workflow_id)
        values = coerce_str_map(input, "input")
        missing = sorted(wf.spec.input_keys() - set(values))
        if missing:
            raise SpecError(
                "missing input key" + ("s " if len(missing) > 1 else " ") + ", ".join(map(repr, missing)),
                field=f"input.{missing[0]}",
                fix="pass input={" + ", ".join(f"{k!r}: ..." for k in missing) + "}",
            )
        if not isinstance(idempotency_key, str):
            raise SpecError("must be a string", field="idempotency_key")
        run_id = (
            _run_id_for_key(workflow_id, idempotency_key)
            if idempotency_key
            else "run-" + uuid.uuid4().hex[:20]
        )
        now = time.time()
        state = RunState(
            run_id=run_id,
            workflow_id=workflow_id,
            status=RunStatus.RUNNING,
            steps={s.name: StepState(name=s.name) for s in wf.spec.steps},
            input=values,
            idempotency_key=idempotency_key,
            created_at=now,
            updated_at=now,
        )
        # The lock makes check-then-insert atomic within this process; the primary key makes
        # it atomic against anything else sharing the database file.
        async with self._start_lock:
            if not await self._store.insert_run(state):
                existing = await self.get_run(run_id)
                if existing.workflow_id != workflow_id or existing.input != values:
                    raise AlreadyExists(
                        f"idempotency key {idempotency_key!r} was used for a run with a different input",
                        field="idempotency_key",
                        fix="use a new idempotency key for a new run",
                    )
                return run_id
            self._drive(state, False)
        self.bus.publish("workflow_started", run_id, {"workflow_id": workflow_id, "key": idempotency_key})
        return run_id

    async def get_run(self, run_id: str) -> RunState:
        live = self._live.get(run_id)
        if live is not None:
            return live.state
        loaded = await self._load_run(run_id)
        if loaded is None:
            raise NotFound(f"no run {run_id!r}", field="run_id", fix="use the id start_run returned")
        return loaded[0]

    async def _load_run(self, run_id: str) -> tuple[RunState, bool] | None:
        """A stored run with its steps in declaration order (the store keeps no order)."""
        loaded = await self._store.load_run(run_id)
        if loaded is None:
            return None
        run, cancel_requested = loaded
        wf = self._workflows.get(run.workflow_id)
        if wf is not None and set(wf.spec.names) == set(run.steps):
            run = attrs.evolve(run, steps={name: run.steps[name] for name in wf.spec.names})
        return run, cancel_requested

    async def list_runs(self, workflow_id: str | None = None, *, limit: int = 100) -> list[RunState]:
        """Most recent first."""
        return [await self.get_run(rid) for rid in await self._store.run_ids(workflow_id, limit)]

    async def run_status(self, run_id: str) -> AsyncIterator[RunUpdate]:
        """The run's current state, then every change; ends after the terminal update."""
        live = self._live.get(run_id)
        if live is None:
            run = await self.get_run(run_id)
            live = self._live.get(run_id)
            if live is None:
                yield run.to_update()
                return
        first = live.state.to_update(live.state.current_step)
        yield first
        if first.status.terminal:
            return
        cursor = len(live.updates)
        while True:
            while cursor < len(live.updates):
                update = live.updates[cursor]
                cursor += 1
                yield update
                if update.status.terminal:
                    return
            if live.closed:
                raise Unavailable(
                    f"run {run_id!r} stopped being driven (the engine stopped or its store failed)",
                    fix="the run resumes when the infra starts again; follow it then",
                )
            await live.wakeup.wait()

    async def cancel_run(self, run_id: str) -> RunState:
        """Cancel a run: steps not started are cancelled, running tasks are cancelled on the
        scheduler. Returns the final state (a finished run is returned unchanged)."""
        live = self._live.get(run_id)
        if live is None:
            return await self.get_run(run_id)
        if not live.cancel_requested:
            live.cancel_requested = True
            await self._store.save_run(live.state, cancel_requested=True)
            await self._cancel_running_tasks(live)
        await live.finished.wait()
        return live.state

    async def _cancel_running_tasks(self, live: _LiveRun) -> None:
        for step in list(live.state.steps.values()):
            if step.status is StepStatus.RUNNING and step.task_id:
                try:
                    await self.scheduler.cancel(step.task_id)
                except NotFound:
                    pass  # not accepted yet: the step sees cancel_requested before submitting

    # -- driving ---------------------------------------------------------------------------

    def _drive(self, state: RunState, cancel_requested: bool) -> None:
        wf = self._workflows.get(state.workflow_id)
        if wf is None:
            return  # the store holds a run of an unknown workflow: nothing to drive it with
        live = _LiveRun(state, wf, cancel_requested)
        self._live[state.run_id] = live
        self._need_tg().start_soon(self._drive_run, live, name=f"workflow-run {state.run_id}")

    async def _drive_run(self, live: _LiveRun) -> None:
        for name, state in live.state.steps.items():
            if state.status.terminal:
                live.step_done[name].set()
        if live.cancel_requested:
            await self._cancel_running_tasks(live)
        if not live.workflow.spec.continue_on_failure and any(
            s.status is StepStatus.FAILED for s in live.state.steps.values()
        ):
            live.stop_new = True  # resumed after a failure: the default policy still holds
        try:
            async with anyio.create_task_group() as tg:
                for step in live.workflow.spec.steps:
                    if not live.state.steps[step.name].status.terminal:
                        tg.start_soon(self._drive_step, live, step)
            await self._finish_run(live)
        except* InfraError:
            # The store failed (disk full, file gone): this run stops here, stays recorded as
            # unfinished and resumes on the next start; other runs and the infra carry on.
            log.exception("workflow run %s stopped", live.state.run_id)
            live.close()
        finally:
            live.finished.set()
            if live.state.status.terminal:
                self._live.pop(live.state.run_id, None)

    async def _drive_step(self, live: _LiveRun, step: StepSpec) -> None:
        try:
            for dep in step.depends_on:
                await live.step_done[dep].wait()
            await self._execute_step(live, step)
        finally:
            live.step_done[step.name].set()

    async def _execute_step(self, live: _LiveRun, step: StepSpec) -> None:
        steps = live.state.steps
        if live.cancel_requested:
            await self._set_step(live, step.name, status=StepStatus.CANCELLED, error="run cancelled")
            return
        failed_deps = [d for d in step.depends_on if steps[d].status is not StepStatus.COMPLETED]
        if failed_deps:
            reason = f"dependency {failed_deps[0]!r} ended {steps[failed_deps[0]].status}"
            await self._set_step(live, step.name, status=StepStatus.SKIPPED, error=reason)
            return
        if live.stop_new and steps[step.name].status is StepStatus.PENDING:
            await self._set_step(live, step.name, status=StepStatus.SKIPPED, error="run failed")
            return
        task_id = f"{live.state.run_id}.{step.name}"
        try:
            payload = {
                k: _render(
                    v, f"payload.{k}", live.state.input, {d: steps[d].result for d in _upstream_results(step)}
                )
                for k, v in step.payload.items()
            }
        except _RenderError as exc:
            await self._step_failed(live, step.name, str(exc))
            return
        try:
            spec = TaskSpec(
                id=task_id,
                task_class=step.task_class,
                payload=payload,
                priority=step.priority,
                timeout=step.timeout,
                max_attempts=step.max_attempts,
                workflow_id=live.state.workflow_id,
            )
        except SpecError as exc:  # e.g. a rendered value no store can hold: the step fails, named
            await self._step_failed(live, step.name, str(exc))
            return
        if steps[step.name].status is not StepStatus.RUNNING:
            # Recorded before submitting: after a crash in between, re-submitting is idempotent.
            await self._set_step(
                live, step.name, status=StepStatus.RUNNING, task_id=task_id, started_at=time.time()
            )
        try:
            await self.scheduler.submit(spec)
            if live.cancel_requested:
                # cancel_run looked for running tasks before this one was accepted.
                await self.scheduler.cancel(task_id)
            result = await self.scheduler.wait(task_id)
            attempts = (await self.scheduler.get(task_id)).attempts
        except InfraError as exc:
            await self._step_failed(live, step.name, f"task {task_id!r}: {exc}")
            return
        status = {
            TaskStatus.COMPLETED: StepStatus.COMPLETED,
            TaskStatus.CANCELLED: StepStatus.CANCELLED,
        }.get(result.status, StepStatus.FAILED)
        if status is StepStatus.FAILED:
            await self._step_failed(
                live, step.name, result.error or f"task ended {result.status}", attempts, result.result
            )
            return
        if status is StepStatus.CANCELLED and not live.cancel_requested:
            # Cancelled from outside the run (e.g. infra.cancel(task_id)): the step did not
            # do its work, so the failure policy applies as for a failure.
            if not live.workflow.spec.continue_on_failure:
                live.stop_new = True
        await self._set_step(
            live,
            step.name,
            status=status,
            attempts=attempts,
            result=dict(result.result),
            error=result.error,
            completed_at=time.time(),
        )

    async def _step_failed(
        self,
        live: _LiveRun,
        name: str,
        error: str,
        attempts: int | None = None,
        result: Mapping[str, str] | None = None,
    ) -> None:
        if not live.workflow.spec.continue_on_failure:
            live.stop_new = True
        changes: dict[str, Any] = {"status": StepStatus.FAILED, "error": error, "completed_at": time.time()}
        if attempts is not None:
            changes["attempts"] = attempts
        if result is not None:
            changes["result"] = dict(result)
        await self._set_step(live, name, **changes)

    async def _set_step(self, live: _LiveRun, name: str, **changes: Any) -> None:
        step = attrs.evolve(live.state.steps[name], **changes)
        live.set_step(step)
        # Published with the change itself (so each update counts exactly the steps done by
        # then); dependents start only after the save below, which is what durability needs.
        live.publish(name)
        await self._store.save_step(live.state.run_id, step)
        if step.status.terminal:
            self.bus.publish(
                "workflow_step_completed",
                live.state.run_id,
                {
                    "workflow_id": live.state.workflow_id,
                    "step": name,
                    "status": str(step.status),
                    "task_id": step.task_id,
                    "error": step.error,
                },
            )

    async def _finish_run(self, live: _LiveRun) -> None:
        state = live.state
        steps = state.steps.values()
        failed = [s for s in steps if s.status in (StepStatus.FAILED, StepStatus.CANCELLED)]
        if live.cancel_requested:
            status, error = RunStatus.CANCELLED, "run cancelled"
        elif failed:
            how = "failed" if failed[0].status is StepStatus.FAILED else "was cancelled"
            status, error = RunStatus.FAILED, f"step {failed[0].name!r} {how}: {failed[0].error}"
        else:
            status, error = RunStatus.COMPLETED, ""
        output, output_error = _run_output(live.workflow.spec, state)
        if output_error and status is RunStatus.COMPLETED:
            status, error = RunStatus.FAILED, output_error
        final = attrs.evolve(state, status=status, error=error, output=output, updated_at=time.time())
        # Saved first: whoever sees the terminal state (stream, get_run, event) can rely on it.
        await self._store.save_run(final, cancel_requested=live.cancel_requested)
        live.state = final
        live.publish()
        event = {
            RunStatus.COMPLETED: "workflow_completed",
            RunStatus.FAILED: "workflow_failed",
            RunStatus.CANCELLED: "workflow_cancelled",
        }[status]
        self.bus.publish(event, state.run_id, {"workflow_id": state.workflow_id, "error": error})


def _upstream_results(step: StepSpec) -> list[str]:
    """The steps whose results ``step``'s payload reads (validated to be upstream)."""
    names: list[str] = []
    for key, text in step.payload.items():
        for ref in _template_refs(text, f"payload.{key}"):
            if ref[0] == "steps" and ref[1] not in names:
                names.append(ref[1])
    return names


def _run_output(spec: WorkflowSpec, run: RunState) -> tuple[dict[str, str], str]:
    """The run's output and, if a declared output could not be filled, the error."""
    results = {n: s.result for n, s in run.steps.items() if s.status is StepStatus.COMPLETED}
    if spec.output:
        out: dict[str, str] = {}
        for key, text in spec.output.items():
            try:
                out[key] = _render(text, f"output.{key}", run.input, results)
            except _RenderError as exc:
                return out, str(exc)
        return out, ""
    return {
        f"{name}.{k}": v for name in spec.sinks() if name in results for k, v in results[name].items()
    }, ""
