"""Tests of dspy_infra/executors: the Slurm executor against the single-node Slurm CI runs."""

from __future__ import annotations
