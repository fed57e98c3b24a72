"""``dspy-infra demo``: one section per component (tasks, services, workflows), drawn with
rich. The only package that imports rich besides the CLI's tables."""

from .tasks import SECTIONS, DemoFailed, main, run_demo, tasks_section

__all__ = ["SECTIONS", "DemoFailed", "main", "run_demo", "tasks_section"]
