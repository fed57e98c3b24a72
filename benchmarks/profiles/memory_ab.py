"""Memory-only (and optionally durable) no-op throughput of source trees against the floor,
in alternating processes (each process: one tree, a few rounds of floor then scheduler, the
trees taking turns), so that load from other sessions falls on every tree alike.

``python benchmarks/profiles/memory_ab.py NAME=SRC_ROOT [NAME=SRC_ROOT ...] [--turns 6]
[--rounds 3] [--n 20000] [--durable]`` (a tree: e.g. ``/work/main``, or ``git archive main |
tar -x -C /tmp/main``). Each tree runs ``benchmarks/scheduler.py`` from its own root (which
puts that root first on ``sys.path``). Prints per tree the median of the round ratios
(tasks/s over the floor's in the same round) and of the CPU ratios (the floor's process CPU
per task over the scheduler's: less noisy than wall time on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

#: Runs inside each child: ``rounds`` x (floor, scheduler), one JSON line of ratios.
_CHILD = """
import asyncio, gc, json, sys, tempfile, time
from pathlib import Path
root, n, rounds, durable = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
sys.path.insert(0, root + "/benchmarks")
import scheduler as bench

async def main():
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        await bench.scheduler(2000, 16, durable=durable, home=Path(tmp) / "warm")
        for r in range(rounds):
            gc.collect()
            c0 = time.process_time()
            floor = await bench.floor(n, 16)
            c1 = time.process_time()
            gc.collect()
            c2 = time.process_time()
            sched = await bench.scheduler(n, 16, durable=durable, home=Path(tmp) / f"r{r}")
            c3 = time.process_time()
            out.append({
                "ratio": sched["tasks_per_s"] / floor["tasks_per_s"],
                "cpu_ratio": (c1 - c0) / (c3 - c2),
                "rate": sched["tasks_per_s"],
                "floor": floor["tasks_per_s"],
            })
    print("RESULT " + json.dumps(out))

asyncio.run(main())
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", help="NAME=SRC_ROOT")
    parser.add_argument("--turns", type=int, default=6, help="processes per tree (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per process (default 3)")
    parser.add_argument("--n", type=int, default=20000, help="tasks per run (default 20000)")
    parser.add_argument("--durable", action="store_true", help="the durable figure instead")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.trees)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for turn in range(args.turns):
        order = list(trees) if turn % 2 == 0 else list(reversed(trees))
        for name in order:
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _CHILD,
                    trees[name],
                    str(args.n),
                    str(args.rounds),
                    "1" if args.durable else "0",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            got = json.loads(line[len("RESULT ") :])
            rows[name].extend(got)
            shown = " ".join(f"{g['ratio']:.3f}/{g['cpu_ratio']:.3f}" for g in got)
            print(f"turn {turn} {name:>8}: ratio/cpu_ratio {shown}", flush=True)
    summary = {}
    for name, got in rows.items():
        summary[name] = {
            "ratio_median": round(statistics.median(g["ratio"] for g in got), 3),
            "cpu_ratio_median": round(statistics.median(g["cpu_ratio"] for g in got), 3),
            "ratio_min": round(min(g["ratio"] for g in got), 3),
            "ratio_max": round(max(g["ratio"] for g in got), 3),
        }
        print(f"{name:>8}: {summary[name]}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
