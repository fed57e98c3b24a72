"""Tests of dspy_infra/scheduler: the ``scheduler`` fixture (root conftest) and
``harness.open_scheduler`` build the real scheduler; nothing here needs an engine."""

from __future__ import annotations
