"""Issue 11's table from one ``make bench`` run: each row, its figure, its floor or peer,
the ratio and the target, and whether this run reached it.

``make bench`` keeps each script's output in a directory (``BENCH_OUT``, default ``.bench/``)
and runs this last: ``python benchmarks/summary.py .bench``. Every script ends with one JSON
line; a row whose script did not run, or that the script skipped (no engine, a peer not
installed), is printed as "not measured". Nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import attrs

__all__ = ["ROWS", "Row", "main", "render"]

Figures = dict[str, dict[str, object]]


@attrs.frozen
class Row:
    """One row of the table: where its figures are and what it must reach."""

    path: str
    script: str
    figure: str  # key of the measured figure
    unit: str
    versus: str  # what it is compared with (a floor, a peer), for the reader
    ratio: str  # key of the ratio (or of the figure itself when the target is absolute)
    target: float
    at_most: bool  # True: the ratio must be <= target; False: >= target
    against: str = ""  # key of the floor's or peer's figure, printed beside


ROWS = (
    Row("no-op tasks in process, memory", "scheduler", "memory_tasks_per_s", "/s",
        "asyncio + Semaphore", "memory_ratio", 0.5, False, "floor_tasks_per_s"),
    Row("same, durable (SQLite)", "scheduler", "durable_tasks_per_s", "/s",
        "asyncio + Semaphore", "durable_ratio", 0.4, False, "floor_tasks_per_s"),
    Row("one task at a time, durable", "scheduler", "sequential_tasks_per_s", "/s",
        "asyncio + Semaphore", "sequential_ratio", 0.2, False, "floor_tasks_per_s"),
    Row("SubmitAndWait p50", "rpc", "sw_p50_ms", "ms", "Ray f.remote()+get p50",
        "sw_p50_vs_ray", 0.8, True, "ray_p50_ms"),
    Row("SubmitAndWait p99", "rpc", "sw_p99_ms", "ms", "Ray p99", "sw_p99_vs_ray", 1.0, True, "ray_p99_ms"),
    Row("32 clients, durable", "rpc", "many_clients_per_s", "/s", "Ray, 32 callers",
        "many_clients_vs_ray", 8.0, False, "ray_per_s"),
    Row("batch submit over gRPC, durable", "rpc", "batch_tasks_per_s", "/s", "memory-only server",
        "batch_tasks_per_s", 30_000, False, "memory_batch_tasks_per_s"),
    Row("import dspy_infra", "startup", "import_ms", "ms", "python -c pass", "import_ms", 100, True, "pass_ms"),
    Row("dspy-infra serve to 'serving'", "startup", "serve_ms", "ms", "library floor", "serve_ms", 300, True,
        "library_floor_ms"),
    Row("Docker start -> Redis answers", "services", "docker_start_dspy_ms", "ms", "raw aiodocker",
        "docker_start_ratio", 1.05, True, "docker_start_raw_ms"),
    Row("same, against testcontainers", "services", "docker_start_dspy_ms", "ms", "testcontainers",
        "docker_start_dspy_over_testcontainers", 1.0, True, "docker_start_testcontainers_ms"),
    Row("same, network_mode=bridge vs testcontainers", "services", "docker_start_dspy_bridge_ms", "ms",
        "testcontainers", "docker_start_dspy_bridge_over_testcontainers", 1.0, True,
        "docker_start_testcontainers_ms"),
    Row("Podman start -> Redis answers", "services", "podman_start_dspy_ms", "ms", "raw aiodocker",
        "podman_start_ratio", 1.05, True, "podman_start_raw_ms"),
    Row("graph to all healthy, Docker", "services", "docker_graph_wall_ms", "ms", "critical path",
        "docker_graph_ratio", 1.1, True, "docker_graph_critical_path_ms"),
    Row("graph to all healthy, Podman", "services", "podman_graph_wall_ms", "ms", "critical path",
        "podman_graph_ratio", 1.1, True, "podman_graph_critical_path_ms"),
    Row("container task, Docker", "services", "docker_container_task_ms", "ms", "raw one-shot",
        "docker_container_task_over_raw", 1.1, True, "docker_container_raw_ms"),
    Row("container task, Podman", "services", "podman_container_task_ms", "ms", "raw one-shot",
        "podman_container_task_over_raw", 1.1, True, "podman_container_raw_ms"),
)  # fmt: skip

#: Reported, no target.
REPORTS: tuple[tuple[str, str, str, str], ...] = (
    ("RSS per 100k queued tasks", "memory", "mib_per_100k_queued", "MiB"),
    ("RSS per 10k retained finished tasks", "memory", "mib_per_10k_retained", "MiB"),
    ("exec handler p50 / subprocess.run", "exec_handler", "handler_memory_ratio", "x"),
)


def last_json(text: str) -> dict[str, object] | None:
    """The last line of ``text`` that is a JSON object."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                found = json.loads(line)
            except ValueError:
                continue
            if isinstance(found, dict):
                return found
    return None


def read_figures(directory: Path) -> Figures:
    """Script name -> its JSON figures, for each ``<script>.out`` in ``directory``."""
    figures: Figures = {}
    for path in sorted(directory.glob("*.out")):
        found = last_json(path.read_text(errors="replace"))
        if found is not None:
            figures[path.stem] = found
    return figures


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _fmt(value: float, unit: str) -> str:
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:,.1f} ms" if value >= 10 else f"{value:.2f} ms"
    return f"{value:.3g} {unit}"


def render(figures: Figures, out: Callable[[str], None] = print) -> int:
    """Print the table; return how many rows with a target were measured and missed it."""
    missed = 0
    out(f"{'path':36s} {'dspy_infra':>12s} {'floor / peer':>32s} {'ratio':>8s} {'target':>9s}  reached")
    for row in ROWS:
        found = figures.get(row.script, {})
        figure, ratio = _number(found.get(row.figure)), _number(found.get(row.ratio))
        if figure is None or ratio is None:
            out(f"{row.path:36s} {'not measured':>12s}  ({row.script}.py did not give it in this run)")
            continue
        against = _number(found.get(row.against)) if row.against else None
        versus = f"{row.versus} {_fmt(against, row.unit)}" if against is not None else row.versus
        reached = ratio <= row.target if row.at_most else ratio >= row.target
        missed += not reached
        sign = "<=" if row.at_most else ">="
        shown = _fmt(ratio, row.unit) if row.ratio == row.figure else f"{ratio:.3f}"
        target = f"{sign} {row.target:g}"
        out(
            f"{row.path:36s} {_fmt(figure, row.unit):>12s} {versus:>32s} {shown:>8s} {target:>9s}"
            f"  {'yes' if reached else 'NO'}"
        )
    for label, script, key, unit in REPORTS:
        value = _number(figures.get(script, {}).get(key))
        out(f"{label:36s} {_fmt(value, unit) if value is not None else 'not measured':>12s}  (reported)")
    return missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where make bench kept each script's output")
    args = parser.parse_args(argv)
    figures = read_figures(args.directory)
    if not figures:
        print(f"no benchmark output in {args.directory} (run make bench)", file=sys.stderr)
        return 2
    missed = render(figures)
    print(json.dumps({"missed": missed, "scripts": sorted(figures)}))
    return 0  # a missed target is a figure to report, not a failed run


if __name__ == "__main__":
    raise SystemExit(main())
