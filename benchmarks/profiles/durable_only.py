"""Three durable runs of ``benchmarks/scheduler.py``'s scheduler figure (20,000 no-op tasks,
width 16), nothing else: what the durable profiles here sample. ``--memory``: the same,
memory-only (what the memory-only profile samples)."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import scheduler as bench


async def main(durable: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(3):
            await bench.scheduler(20000, 16, durable=durable, home=Path(tmp) / f"d{i}")


if __name__ == "__main__":
    asyncio.run(main(durable="--memory" not in sys.argv[1:]))
