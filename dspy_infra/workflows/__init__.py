"""Workflows: DAGs of scheduler tasks with idempotent runs (a layer above the scheduler).

``spec`` holds the value classes, ``validate`` parses and checks a spec, ``template`` fills
templates, ``store`` keeps workflows and runs, ``engine`` runs them. See ``engine.py`` for
the rules.
"""

from .engine import WorkflowEngine
from .spec import (
    MAX_SPEC_BYTES,
    MAX_STEPS,
    RunState,
    RunStatus,
    RunUpdate,
    StepSpec,
    StepState,
    StepStatus,
    Workflow,
    WorkflowSpec,
    step_input_keys,
)
from .validate import parse_workflow_spec, validate_workflow

__all__ = [
    "MAX_SPEC_BYTES",
    "MAX_STEPS",
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
    "step_input_keys",
    "validate_workflow",
]
