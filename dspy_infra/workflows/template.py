"""Filling ``{{ input.KEY }}`` and ``{{ steps.NAME.result.KEY }}`` templates at run time:
a whole-string template keeps its value's JSON type, a template inside a longer string is
substituted as text."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import SpecError
from ..values import json_text, preview

__all__ = [
    "RenderError",
    "render",
    "template_refs",
]

# No braces inside: each "{{" scans only to the next brace, so a string full of "{{" costs
# linear time (".*?" rescanned to the end of the string from every "{{").
_TEMPLATE_RE = re.compile(r"\{\{([^{}]*)\}\}")
_WHOLE_TEMPLATE_RE = re.compile(r"^\{\{([^{}]*)\}\}$")
_INPUT_REF_RE = re.compile(r"^input\.(?P<key>[^\s{}]+)$")
# Step names may contain dots, so the *first* ".result." ends the name (StepSpec refuses
# names with a ".result" segment, which this could not read back).
_STEP_REF_RE = re.compile(r"^steps\.(?P<step>[a-z0-9][a-z0-9_.-]*?)\.result\.(?P<key>[^\s{}]+)$")
_TEMPLATE_FIX = "write {{ input.KEY }} or {{ steps.NAME.result.KEY }}"


def template_refs(text: str, field: str) -> list[tuple[str, ...]]:
    """The references in one payload value: ``("input", key)`` or ``("steps", step, key)``."""
    refs: list[tuple[str, ...]] = []
    for match in _TEMPLATE_RE.finditer(text):
        expr = match.group(1).strip()
        if m := _INPUT_REF_RE.match(expr):
            refs.append(("input", m["key"]))
        elif m := _STEP_REF_RE.match(expr):
            refs.append(("steps", m["step"], m["key"]))
        else:
            raise SpecError(f"unknown template {preview(match.group(0))}", field=field, fix=_TEMPLATE_FIX)
    return refs


class RenderError(Exception):
    """A template could not be filled at run time (missing result key)."""


def _lookup(
    ref: tuple[str, ...], field: str, input: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]]
) -> Any:
    if ref[0] == "input":
        if ref[1] not in input:
            raise RenderError(f"{field}: input has no key {ref[1]!r}")
        return input[ref[1]]
    step, key = ref[1], ref[2]
    result = results.get(step)
    if result is None:
        raise RenderError(f"{field}: step {step!r} has no result (it did not complete)")
    if key not in result:
        have = ", ".join(sorted(result)[:20]) or "none"
        raise RenderError(f"{field}: step {step!r} has no result key {key!r} (its keys: {have})")
    return result[key]


def _render_text(
    text: str, field: str, input: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]]
) -> Any:
    """One string: a whole-value template becomes the value itself (its JSON type kept);
    templates inside a longer string are substituted as text."""
    whole = _WHOLE_TEMPLATE_RE.match(text)
    if whole is not None:
        return _lookup(template_refs(text, field)[0], field, input, results)

    def fill(match: re.Match[str]) -> str:
        value = _lookup(template_refs(match.group(0), field)[0], field, input, results)
        return value if isinstance(value, str) else json_text(value)

    return _TEMPLATE_RE.sub(fill, text)


def render(value: Any, field: str, input: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]]) -> Any:
    """A JSON value with every template in its strings filled (see ``_render_text``)."""
    if isinstance(value, str):
        return _render_text(value, field, input, results) if "{{" in value else value
    if isinstance(value, Mapping):
        return {k: render(v, f"{field}.{k}", input, results) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [render(v, f"{field}[{i}]", input, results) for i, v in enumerate(value)]
    return value
