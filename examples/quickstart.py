"""Quickstart: the task API in one screen. Run: python examples/quickstart.py"""

import asyncio
import tempfile
from typing import Any

from dspy_infra import AlreadyExists, TaskContext, use_infra


async def main() -> None:
    # Embedded infra on a throwaway state directory, removed at the end (drop state_dir= to
    # use the per-user one, which keeps tasks across runs).
    with tempfile.TemporaryDirectory(prefix="quickstart-") as state_dir:
        async with use_infra(state_dir=state_dir, mode="embedded") as infra:  # shut down on exit
            await tour(infra)


async def tour(infra: Any) -> None:
    @infra.handler("shout")  # your own handler: async, gets the task context, returns a JSON object
    async def shout(ctx: TaskContext) -> dict[str, str]:
        return {"text": ctx.payload["text"].upper()}

    await infra.submit_task(
        "id-1",
        task_class="cpu_short",
        payload={"handler": "exec", "cmd": "echo hi"},
        priority=0,
        timeout=30,
        max_attempts=3,
    )
    await infra.submit_task("id-2", payload={"handler": "shout", "text": "hello"})
    await infra.submit_task("id-3", task_class="cpu_long", payload={"handler": "sleep", "seconds": "60"})

    res = await infra.wait("id-1", timeout=10)  # TaskResult: status, result, error, duration_ms, ...
    print(res.status, res.result["stdout"].strip(), f"{res.duration_ms:.1f} ms")
    print((await infra.wait("id-2", timeout=10)).result)
    print("id-3 is", (await infra.get_task("id-3")).status, "-> cancel:", (await infra.cancel("id-3")).status)

    async for r in infra.stream_results(["id-1", "id-2", "id-3"], include_completed=True):
        print("result:", r.task_id, r.status)
    async for e in infra.events(types=["task_completed"], since=0):  # replay from the bounded history
        print("event:", e.type, e.resource_id)
        if e.resource_id == "id-2":
            break
    try:
        await infra.submit_task("id-1", payload={"handler": "exec", "cmd": "echo different"})
    except AlreadyExists as exc:  # same id, different content (same content = same task)
        print("refused:", exc)
    print({name: q.limit for name, q in (await infra.queue_status()).items()})


if __name__ == "__main__":
    asyncio.run(main())
