"""Tests of dspy_infra/rpc (and the gRPC side of serve.py): servers and clients are real
(``_rpc_support``: an in-process server or a ``dspy-infra serve`` process)."""

from __future__ import annotations
