"""A sequential loop of ``exec`` handler calls (``/bin/sh -c true``), what the profiles of the
handler's own cost sample. ``--durable``: a durable scheduler's context (attempt records);
default memory-only with a scheduler's settings, as on a Ray worker.

    py-spy record -f speedscope -r 500 --threads -o exec-memory-after.speedscope.json -- \\
        python benchmarks/profiles/exec_loop.py --n 2000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dspy_infra.config import Settings  # noqa: E402
from dspy_infra.handlers.basic import exec_handler  # noqa: E402
from dspy_infra.models import TaskSpec  # noqa: E402
from dspy_infra.scheduler.context import TaskContext  # noqa: E402


async def main(n: int, durable: bool) -> None:
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), durable=durable)
        for i in range(n):
            spec = TaskSpec(f"t{i}", payload={"handler": "exec", "cmd": "true"})
            await exec_handler(TaskContext(spec, 1, settings))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--durable", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.durable))
