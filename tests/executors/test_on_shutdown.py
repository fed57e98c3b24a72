"""``[task_classes.NAME] on_shutdown``: what a graceful stop does to running attempts of a
class ("leave" them to the next start, or "cancel" them), refused where it cannot hold.
The leave/cancel behaviour itself is tested on the real engines (test_slurm.py, test_ray.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from harness import open_scheduler
from hypothesis import given
from hypothesis import strategies as st
from strategies import on_shutdown_classes

from dspy_infra.errors import ConfigError
from dspy_infra.models import TaskClass
from dspy_infra.scheduler.context import classes_left_running


@pytest.mark.parametrize(
    ("table", "fix"),
    [
        ({"executor": "slurm", "on_shutdown": "keep"}, 'on_shutdown = "leave"'),
        ({"executor": "slurm", "on_shutdown": True}, 'e.g. "leave" or "cancel"'),
    ],
)
async def test_a_bad_value_is_refused_naming_the_field(
    tmp_path: Path, table: dict[str, Any], fix: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        async with open_scheduler(tmp_path, task_classes={"gpu_slurm": table}):
            pass
    assert caught.value.field == "task_classes.gpu_slurm.on_shutdown" and fix in str(caught.value)


async def test_leave_on_a_local_class_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        async with open_scheduler(tmp_path, task_classes={"cpu_long": {"on_shutdown": "leave"}}):
            pass
    assert caught.value.field == "task_classes.cpu_long.on_shutdown"
    assert "local attempt ends with its owner" in str(caught.value)


async def test_leave_on_a_memory_only_slurm_class_is_refused(tmp_path: Path) -> None:
    if shutil.which("sbatch") is None:
        pytest.skip("the Slurm executor needs sbatch on PATH to start")
    with pytest.raises(ConfigError) as caught:
        async with open_scheduler(
            tmp_path, durable=False, slurm="cli", task_classes={"gpu_slurm": {"on_shutdown": "leave"}}
        ):
            pass
    assert caught.value.field == "task_classes.gpu_slurm.on_shutdown"
    assert "durable = true" in str(caught.value)


def test_classes_left_running_by_default_are_those_of_detachable_executors() -> None:
    classes = [
        TaskClass("train", executor="ray"),
        TaskClass("ci", executor="ray", on_shutdown="cancel"),
        TaskClass("gpu_slurm", executor="slurm", on_shutdown="leave"),
        TaskClass("cpu_long"),
        TaskClass("cpu_short", on_shutdown="cancel"),
        # An executor not configured here: its class refuses tasks, its setting is kept.
        TaskClass("k8s", executor="kubernetes", on_shutdown="leave"),
    ]
    left = classes_left_running(classes, {"ray", "slurm"}, {"ray", "slurm"})
    assert left == {"train", "gpu_slurm"}


@given(
    on_shutdown_classes,
    st.sets(st.sampled_from(["slurm", "ray"])),
    st.sets(st.sampled_from(["slurm", "ray", "kubernetes"])),
)
def test_only_classes_that_can_be_adopted_are_left_running(
    classes: list[TaskClass], detachable: set[str], configured: set[str]
) -> None:
    configured |= detachable
    try:
        left = classes_left_running(classes, detachable, configured)
    except ConfigError as exc:
        # Refused only for an explicit "leave" that nothing could adopt, naming that class.
        assert any(
            f"task_classes.{c.name}.on_shutdown" == exc.field
            and c.on_shutdown == "leave"
            and c.executor not in detachable
            and (c.executor == "local" or c.executor in configured)
            for c in classes
        )
        return
    for cls in classes:
        # Left running exactly when its executor can adopt it and it does not ask to cancel.
        assert (cls.name in left) == (cls.executor in detachable and cls.on_shutdown != "cancel")
