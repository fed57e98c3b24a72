"""Task classes: the built-in ones (sized from the hardware) and those declared in config.

Resolution order, later wins by name: built-ins (``dspy_infra_task_classes`` of this module)
< other plugins' ``dspy_infra_task_classes`` < ``[task_classes.NAME]`` tables of the config.
A config table may override some fields of an existing class or declare a new class.

Submit-time refusals (``check_runnable``): a class that needs a GPU on a machine without one,
unless the config sets its limits explicitly; a class whose executor is not registered (e.g.
``gpu_slurm`` with no ``slurm`` executor).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import attrs
import pluggy

from ..config import Settings
from ..errors import ConfigError, ResourceUnavailable, SpecError
from ..hardware import detect_hardware
from ..hookspecs import hookimpl
from ..models import HardwareInfo, TaskClass

__all__ = ["CLASS_FIELDS", "builtin_classes", "check_runnable", "dspy_infra_task_classes", "resolve_classes"]

#: Fields a ``[task_classes.NAME]`` table may set.
CLASS_FIELDS = tuple(a.name for a in attrs.fields(TaskClass) if a.name != "name")
_LIMIT_FIELDS = ("min_concurrency", "base_concurrency", "max_concurrency")
_FIELD_TYPES: dict[str, type] = {
    "min_concurrency": int,
    "base_concurrency": int,
    "max_concurrency": int,
    "adaptive": bool,
    "needs_gpu": bool,
    "executor": str,
    "on_shutdown": str,
}
_STR_EXAMPLES = {"executor": 'e.g. "local"', "on_shutdown": 'e.g. "leave" or "cancel"'}


def builtin_classes(hardware: HardwareInfo) -> list[TaskClass]:
    """cpu_short, cpu_long, gpu and gpu_slurm, sized for ``hardware``."""
    cores = max(1, hardware.cpu_cores)
    gpus = len(hardware.gpus)
    return [
        TaskClass("cpu_short", min_concurrency=1, base_concurrency=cores, max_concurrency=4 * cores),
        TaskClass("cpu_long", min_concurrency=1, base_concurrency=max(1, cores // 2), max_concurrency=cores),
        # One task per GPU; with no GPU the class exists (limits 1) but refuses tasks.
        TaskClass(
            "gpu",
            min_concurrency=1,
            base_concurrency=max(1, gpus),
            max_concurrency=max(1, gpus),
            needs_gpu=True,
        ),
        TaskClass("gpu_slurm", min_concurrency=1, base_concurrency=4, max_concurrency=64, executor="slurm"),
    ]


@hookimpl
def dspy_infra_task_classes() -> Iterable[TaskClass]:
    """The built-in classes, sized for this machine."""
    return builtin_classes(detect_hardware())


def _field_value(cls_name: str, key: str, value: Any) -> Any:
    field = f"task_classes.{cls_name}.{key}"
    if key not in _FIELD_TYPES:
        close = difflib.get_close_matches(key, CLASS_FIELDS, n=1)
        fix = f"did you mean {close[0]!r}?" if close else "use one of " + ", ".join(CLASS_FIELDS)
        raise ConfigError(f"unknown task class field {key!r}", field=field, fix=fix)
    kind = _FIELD_TYPES[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"must be an integer, got {value!r}", field=field, fix="e.g. 4")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"must be true or false, got {value!r}", field=field)
    if kind is str and (not isinstance(value, str) or not value):
        raise ConfigError(f"must be a non-empty string, got {value!r}", field=field, fix=_STR_EXAMPLES[key])
    return value


def _apply_table(name: str, table: Mapping[str, Any], base: TaskClass | None) -> TaskClass:
    if not isinstance(table, Mapping):
        raise ConfigError("must be a table", field=f"task_classes.{name}")
    changes = {key: _field_value(name, key, value) for key, value in table.items()}
    try:
        if base is not None:
            merged = {**attrs.asdict(base), **changes}
            # Raising only max (or only min) of a built-in must not trip min <= base <= max.
            if "base_concurrency" not in changes:
                merged["base_concurrency"] = max(
                    merged["min_concurrency"], min(merged["base_concurrency"], merged["max_concurrency"])
                )
            return TaskClass(**merged)
        if "max_concurrency" not in changes:
            raise ConfigError(
                "a new task class needs max_concurrency",
                field=f"task_classes.{name}.max_concurrency",
                fix="set max_concurrency (and optionally min_concurrency, base_concurrency)",
            )
        changes.setdefault("min_concurrency", 1)
        changes.setdefault("base_concurrency", changes["min_concurrency"])
        return TaskClass(name=name, **changes)
    except ConfigError:
        raise
    except SpecError as exc:
        raise ConfigError(exc.message, field=exc.field or f"task_classes.{name}", fix=exc.fix) from None


def resolve_classes(
    settings: Settings, plugins: pluggy.PluginManager, hardware: HardwareInfo | None = None
) -> dict[str, TaskClass]:
    """Classes from every plugin's hook (later plugins win), then the config tables.

    ``hardware`` given: the built-ins are sized for it (the hook's own sizing is replaced),
    which is how tests and remote planners describe a machine other than this one.
    """
    classes: dict[str, TaskClass] = {}
    for result in reversed(plugins.hook.dspy_infra_task_classes()):
        for cls in result or ():
            if not isinstance(cls, TaskClass):
                raise ConfigError(
                    f"a plugin returned {cls!r}, not a TaskClass", field="dspy_infra_task_classes"
                )
            classes[cls.name] = cls
    if hardware is not None:
        for cls in builtin_classes(hardware):
            classes[cls.name] = cls
    for name, table in settings.task_classes.items():
        try:
            TaskClass(name=name)
        except SpecError as exc:
            raise ConfigError(exc.message, field=f"task_classes.{name}", fix=exc.fix) from None
        classes[name] = _apply_table(name, table, classes.get(name))
    return classes


def check_runnable(
    cls: TaskClass, *, hardware: HardwareInfo, settings: Settings, executors: Collection[str]
) -> None:
    """Raise ``ResourceUnavailable`` if tasks of ``cls`` cannot run here."""
    if cls.needs_gpu and not hardware.gpus:
        explicit = any(k in settings.task_classes.get(cls.name, {}) for k in _LIMIT_FIELDS)
        if not explicit:
            raise ResourceUnavailable(
                f"class {cls.name!r} needs a GPU and this machine has none (nvidia-smi found no GPU)",
                field="task_class",
                fix=f"use task_class='gpu_slurm' or 'cpu_long', or set [task_classes.{cls.name}]"
                " max_concurrency in dspy-infra.toml to run it anyway",
            )
    if cls.executor != "local" and cls.executor not in executors:
        what = {"slurm": "Slurm", "ray": "Ray"}.get(cls.executor, repr(cls.executor))
        setup = {
            "slurm": 'set slurm = "cli" (Slurm\'s tools on PATH)',
            "ray": 'set ray_address to the Ray cluster\'s head, e.g. "10.0.0.5:6379"'
            " (with pip install 'dspy-infra[ray]')",
        }.get(
            cls.executor,
            f"install a plugin providing the {cls.executor!r} executor (dspy_infra_executors hook)",
        )
        raise ResourceUnavailable(
            f"no {what} executor configured for class {cls.name!r}",
            field="task_class",
            fix=f"{setup}, or submit to a local class such as cpu_long",
        )
