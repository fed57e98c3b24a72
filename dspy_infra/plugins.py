"""Build the pluggy PluginManager: built-in default plugins first, then entry points."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import pluggy

from . import hookspecs

__all__ = ["DEFAULT_PLUGINS", "build_plugin_manager", "collect_mapping"]

#: Built-in modules registered as plugins, in order. Later registrations win on name clashes.
DEFAULT_PLUGINS = (
    "dspy_infra.handlers.basic",
    "dspy_infra.handlers.http",
    "dspy_infra.handlers.container",
    "dspy_infra.scheduler.classes",
    "dspy_infra.executors.slurm",
    "dspy_infra.executors.ray",
    "dspy_infra.services.catalog",
    "dspy_infra.backends.registry",
)


def build_plugin_manager(
    extra_plugins: Iterable[Any] = (), *, load_entry_points: bool = True
) -> pluggy.PluginManager:
    """A fresh manager (one per Infra, so tests and embedded apps never share state)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    for plugin in extra_plugins:
        pm.register(plugin)
    return pm


def collect_mapping(results: Iterable[Any]) -> dict[str, Any]:
    """Merge mapping results of a hook; pluggy calls later-registered plugins first, so the
    merge walks the results backwards to let later plugins win."""
    merged: dict[str, Any] = {}
    for result in reversed(list(results)):
        if result:
            merged.update(result)
    return merged
