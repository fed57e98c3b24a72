"""``SubmitTasks`` in process, without the gRPC transport: 40 requests of 1,000 tasks each
(the bulk JSON encoding), decoded from bytes and handed to ``OrchestratorService`` over a
durable embedded ``Infra``. ``--profile`` prints cProfile's top functions by own time."""

from __future__ import annotations

import asyncio
import cProfile
import json
import pstats
import sys
import tempfile
import time

from dspy_infra.config import load_settings
from dspy_infra.infra import Infra
from dspy_infra.rpc._gen.orchestrator import v1 as pb
from dspy_infra.rpc.server import OrchestratorService


async def main(profile: bool) -> None:
    with tempfile.TemporaryDirectory() as home:
        settings = load_settings(env={}, home=home, backend="process", durable=True, retention=200_000)
        async with Infra(settings) as infra:
            service = OrchestratorService(infra)
            raw = []
            for b in range(40):
                docs = [{"id": f"b{b}-{i}", "payload": {"handler": "noop", "n": str(i)}} for i in range(1000)]
                raw.append(bytes(pb.SubmitTasksRequest(tasks_json=json.dumps(docs).encode())))
            prof = cProfile.Profile()
            began = time.perf_counter()
            if profile:
                prof.enable()
            for data in raw:
                request = pb.SubmitTasksRequest.parse(data)
                accepted, _rejected = await service._submit_tasks(request.tasks, request.tasks_json)
                assert accepted == 1000
            prof.disable()
            print(f"{40_000 / (time.perf_counter() - began):.0f} tasks/s in process (no gRPC transport)")
            if profile:
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    asyncio.run(main("--profile" in sys.argv))
