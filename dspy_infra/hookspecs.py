"""Every hook a plugin can implement. Entry-point group: ``dspy_infra``.

Hooks are for registration and lifecycle only, never on the scheduling hot path. Built-in
backends, services and handlers are registered through these same hooks as default plugins
(see ``plugins.DEFAULT_PLUGINS``), exactly like third-party ones. Each hook's docstring is
its contract; a test fails when one is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    # Types only (no import at run time, so this module stays at the bottom of the layers).
    from collections.abc import Iterable, Mapping

    from .backends.base import Backend
    from .infra import Infra
    from .models import ServiceSpec, TaskClass
    from .scheduler.context import ExecutorFactory, Handler

__all__ = ["PROJECT", "hookimpl", "hookspec"]

PROJECT = "dspy_infra"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dspy_infra_backends() -> Mapping[str, type[Backend]]:
    """Return ``{name: Backend subclass}`` for service backends this plugin provides."""


@hookspec
def dspy_infra_services() -> Iterable[ServiceSpec]:
    """Return service specs to add to the catalog (a later plugin overrides by name)."""


@hookspec
def dspy_infra_task_classes() -> Iterable[TaskClass]:
    """Return task classes to declare (a later plugin or the config overrides by name)."""


@hookspec
def dspy_infra_handlers() -> Mapping[str, Handler]:
    """Return ``{name: async handler(ctx) -> dict}`` task handlers (the result is a JSON object)."""


@hookspec
def dspy_infra_executors() -> Mapping[str, ExecutorFactory]:
    """Return ``{name: factory(settings)}`` for classes that run elsewhere (slurm); a factory returns None when unconfigured."""


@hookspec
def dspy_infra_started(infra: Infra) -> None:
    """Called once an Infra has started (services up, scheduler running)."""


@hookspec
def dspy_infra_stopping(infra: Infra) -> None:
    """Called when an Infra begins to shut down, before anything is stopped."""
