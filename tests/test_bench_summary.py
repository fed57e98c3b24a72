"""``benchmarks/summary.py``: the table ``make bench`` ends with is read from each script's
last JSON line; a target is judged in its own direction, and a row no script gave is shown as
not measured, never as reached."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import summary


def test_rows_are_judged_in_their_direction_and_missing_rows_are_not_reached(tmp_path: Path) -> None:
    (tmp_path / "scheduler.out").write_text(
        "memory: 10 tasks/s\n"
        '{"memory_tasks_per_s": 50, "floor_tasks_per_s": 100, "memory_ratio": 0.5,'
        ' "durable_tasks_per_s": 30, "durable_ratio": 0.3, "sequential_tasks_per_s": 1}\n'
    )
    (tmp_path / "startup.out").write_text(
        '{"not": "this one"}\nnoise\n{"import_ms": 99.0, "serve_ms": 301.0}\n'
    )
    (tmp_path / "rpc.out").write_text("crashed before its JSON line\n")
    lines: list[str] = []
    missed = summary.render(summary.read_figures(tmp_path), lines.append)
    by_path = {line[:36].strip(): line for line in lines[1:]}
    assert by_path["no-op tasks in process, memory"].endswith("yes"), ">= 0.5 reached at 0.5"
    assert by_path["same, durable (SQLite)"].endswith("NO")
    assert "not measured" in by_path["one task at a time, durable"], "no ratio: not judged"
    assert by_path["import dspy_infra"].endswith("yes"), "<= 100 ms reached at 99"
    assert by_path["dspy-infra serve to 'serving'"].endswith("NO")
    assert "not measured" in by_path["SubmitAndWait p50"]
    assert missed == 2
    assert summary.main([str(tmp_path / "empty")]) == 2
