"""Parsing and validating a workflow spec: JSON text or a mapping to ``WorkflowSpec``
(size and step-count limits first), then names, dependencies, cycles, classes, handlers
and template references (only to upstream steps). See ``engine.py`` for the rules."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import CycleError, SpecError
from ..graph import find_cycle, ordered
from ..models import TaskClass
from ..values import (
    MAX_JSON_DEPTH,
    check_json_object,
    preview,
)
from .spec import (
    MAX_SPEC_BYTES,
    MAX_STEPS,
    SPEC_KEYS,
    STEP_ALIASES,
    STEP_KEYS,
    StepSpec,
    WorkflowSpec,
    string_leaves,
)
from .template import template_refs

__all__ = [
    "check_step_count",
    "parse_workflow_spec",
    "validate_workflow",
]

# ---------------------------------------------------------------------------------------
# Parsing and validation


def parse_workflow_spec(spec: Any, *, limits: bool = True) -> WorkflowSpec:
    """A ``WorkflowSpec`` from JSON (``bytes``/``str``), a dict, a list of steps, or itself.

    Only the shape and the values are checked here (with ``limits``, also ``MAX_SPEC_BYTES``
    and ``MAX_STEPS``); ``validate_workflow`` checks the graph and references.
    """
    max_bytes = MAX_SPEC_BYTES if limits else 1 << 62
    if isinstance(spec, WorkflowSpec):
        return spec
    if spec is None:
        raise SpecError("a workflow needs a spec", field="spec", fix='pass {"steps": [...]}')
    if isinstance(spec, (bytes, bytearray, memoryview)):
        _check_spec_size(len(spec), max_bytes)
        try:
            spec = bytes(spec).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(
                f"not UTF-8 (byte {exc.start})", field="spec", fix="send the JSON spec as UTF-8"
            ) from None
    if isinstance(spec, str):
        _check_spec_size(len(spec), max_bytes)
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise SpecError(
                f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                field="spec",
                fix="fix the JSON syntax at that position",
            ) from None
        except RecursionError:
            raise SpecError(
                f"is nested more than {MAX_JSON_DEPTH} levels deep", field="spec", fix="flatten the spec"
            ) from None
        # Depth, lone surrogates, 64-bit integers, finite numbers: the bounded walk refuses
        # them naming the path; it also bounds the work the rest of parsing does.
        check_json_object({"spec": spec}, "workflow", max_bytes=max_bytes + 16, max_depth=MAX_JSON_DEPTH + 4)
    if isinstance(spec, (list, tuple)):
        spec = {"steps": spec}
    if not isinstance(spec, Mapping):
        raise SpecError(
            f"expected a JSON object, got {type(spec).__name__}",
            field="spec",
            fix='pass {"steps": [...], "continue_on_failure": false}',
        )
    _refuse_unknown_keys(spec, SPEC_KEYS, "")
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
    if limits:
        check_step_count(len(raw_steps))
    steps = [_parse_step(raw, i) for i, raw in enumerate(raw_steps)]
    cof = spec.get("continue_on_failure", False)
    if not isinstance(cof, bool):
        raise SpecError(f"must be true or false, got {preview(cof)}", field="continue_on_failure")
    return WorkflowSpec(steps=steps, continue_on_failure=cof, output=spec.get("output") or {})


def check_step_count(count: int) -> None:
    if count > MAX_STEPS:
        raise SpecError(
            f"has {count} steps, the limit is {MAX_STEPS}",
            field="steps",
            fix=f"split the work into workflows of at most {MAX_STEPS} steps (or batch items into one step)",
        )


def _check_spec_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise SpecError(
            f"is {size} bytes, the limit is {max_bytes}",
            field="spec",
            fix=f"split the work into smaller workflows (at most {MAX_STEPS} steps, {MAX_SPEC_BYTES} bytes)",
        )


def _parse_step(raw: Any, index: int) -> StepSpec:
    if isinstance(raw, StepSpec):
        return raw
    if not isinstance(raw, Mapping):
        raise SpecError(f"expected an object, got {type(raw).__name__}", field=f"steps[{index}]")
    name = raw.get("name")
    where = f"steps.{name}" if isinstance(name, str) and name and len(name) <= 64 else f"steps[{index}]"
    if not isinstance(name, str) or not name:
        raise SpecError("every step needs a name", field=f"{where}.name", fix='add "name": "fetch"')
    body: dict[str, Any] = {STEP_ALIASES.get(str(k), str(k)): v for k, v in raw.items()}
    if "class" in raw and "task_class" in raw:
        raise SpecError("both class and task_class are set", field=f"{where}.task_class", fix="keep one")
    _refuse_unknown_keys(body, STEP_KEYS, f"{where}.")
    if body.get("task_class") is None:
        body.pop("task_class", None)
    if "depends_on" in body and not isinstance(body["depends_on"], (str, list, tuple, type(None))):
        raise SpecError(
            f"expected a list of step names, got {type(body['depends_on']).__name__}",
            field=f"{where}.depends_on",
        )
    if "payload" in body and not isinstance(body["payload"], (Mapping, type(None))):
        raise SpecError(
            f"expected a JSON object, got {type(body['payload']).__name__}", field=f"{where}.payload"
        )
    if body.get("payload") is None:
        body.pop("payload", None)
    return StepSpec(**body)


def _refuse_unknown_keys(doc: Mapping[str, Any], known: Sequence[str], prefix: str) -> None:
    for key in doc:
        if key in known:
            continue
        shown = str(key)[:64]
        close = difflib.get_close_matches(shown, list(known), n=1)
        fix = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(known)
        raise SpecError(f"unknown key {preview(key)}", field=f"{prefix}{shown}", fix=fix)


def _topological_order(spec: WorkflowSpec) -> list[str]:
    """Steps after their dependencies, stable in declaration order; steps on a cycle (or
    downstream of one) are left out."""
    return ordered({s.name: s.depends_on for s in spec.steps})


def _upstream_bits(spec: WorkflowSpec, order: list[str]) -> dict[str, int]:
    """Every step's transitive dependencies as a bit set (bit i = the i-th declared step).
    One integer OR per edge in topological order: at ``MAX_STEPS`` steps a set is 250 bytes,
    where sets of names took 1.4 GiB and 10 s for an 8,000-step chain."""
    index = {s.name: i for i, s in enumerate(spec.steps)}
    deps = {s.name: s.depends_on for s in spec.steps}
    bits: dict[str, int] = {}
    for name in order:
        acc = 0
        for dep in deps[name]:
            acc |= bits[dep] | (1 << index[dep])
        bits[name] = acc
    return bits


def validate_workflow(
    spec: WorkflowSpec,
    classes: Mapping[str, TaskClass] | Iterable[str] | None = None,
    handlers: Iterable[str] | None = None,
) -> None:
    """Refuse duplicate names, unknown dependencies, cycles, templates that refer to unknown or
    non-upstream steps and, when given, unknown classes and unknown ``payload.handler`` names
    (checked only for classes run by the local executor, which is what reads the handler).

    Linear in the spec's size (the upstream check adds one bit-set OR per edge)."""
    seen: set[str] = set()
    for step in spec.steps:
        if step.name in seen:
            raise SpecError(
                f"duplicate step name {preview(step.name)}",
                field=f"steps.{step.name}",
                fix="give each step its own name",
            )
        seen.add(step.name)
    for step in spec.steps:
        for dep in step.depends_on:
            if dep not in seen:
                close = difflib.get_close_matches(dep[:64], sorted(seen), n=1) if len(seen) <= 200 else []
                raise SpecError(
                    f"unknown step {preview(dep)}",
                    field=f"steps.{step.name}.depends_on",
                    fix=f"did you mean {close[0]!r}?" if close else "depend only on steps of this workflow",
                )
    order = _topological_order(spec)
    if len(order) < len(spec.steps):
        # Kahn's order stopped short: the steps it did not reach hold a cycle; name one
        # (an iterative depth-first search over just those steps).
        placed = set(order)
        rest = {
            s.name: [d for d in s.depends_on if d not in placed] for s in spec.steps if s.name not in placed
        }
        cycle = find_cycle(rest) or sorted(rest)[:2]
        raise CycleError(cycle, field=f"steps.{cycle[0]}.depends_on")
    if classes is not None:
        known = sorted(classes)
        known_set = set(known)
        for step in spec.steps:
            if step.task_class not in known_set:
                close = difflib.get_close_matches(step.task_class, known, n=1)
                raise SpecError(
                    f"unknown task class {preview(step.task_class)}",
                    field=f"steps.{step.name}.task_class",
                    fix=(f"did you mean {close[0]!r}? " if close else "") + "known: " + ", ".join(known),
                )
    if handlers is not None:
        _check_handlers(spec, classes, sorted(handlers))
    index = {s.name: i for i, s in enumerate(spec.steps)}
    upstream: dict[str, int] | None = None  # built only if some step reads another's result
    for step in spec.steps:
        for field, text in string_leaves(step.payload, f"steps.{step.name}.payload"):
            for ref in template_refs(text, field):
                if ref[0] != "steps":
                    continue
                target = ref[1]
                if target not in seen:
                    raise SpecError(
                        f"refers to unknown step {preview(target)}",
                        field=field,
                        fix="name a step of this workflow",
                    )
                if upstream is None:
                    upstream = _upstream_bits(spec, order)
                if not upstream[step.name] >> index[target] & 1:
                    raise SpecError(
                        f"refers to step {target!r}, which is not upstream of {step.name!r}",
                        field=field,
                        fix=f"add {target!r} to the depends_on of {step.name!r}",
                    )
    for field, text in string_leaves(spec.output, "output"):
        for ref in template_refs(text, field):
            if ref[0] == "steps" and ref[1] not in seen:
                raise SpecError(
                    f"refers to unknown step {preview(ref[1])}",
                    field=field,
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
        if not isinstance(name, str):
            raise SpecError(f"must be a handler name, got {preview(name)}", field=field)
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
