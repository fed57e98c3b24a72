"""pytest plugin (entry point ``pytest11``): fixtures that spin infra up and tear it down."""

from __future__ import annotations

__all__: list[str] = []
