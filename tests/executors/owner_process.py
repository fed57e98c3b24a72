"""A scheduler process that owns one remote task, for the SIGKILL adoption tests.

    python owner_process.py submit SETTINGS_JSON TASK_JSON   # submit, print "submitted", wait
    python owner_process.py resume SETTINGS_JSON TASK_ID     # restart: print the task's end

``submit`` never returns by itself: the test SIGKILLs it mid-task (no clean-up runs, as in
a crash). ``resume`` opens the same durable state directory, lets recovery re-queue the
task and prints ``{"status", "attempts", "result", "error"}`` as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from dspy_infra.config import load_settings
from dspy_infra.events import EventBus
from dspy_infra.metrics import InfraMetrics
from dspy_infra.models import TaskSpec
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.scheduler import Scheduler


async def main(mode: str, settings_json: str, what: str) -> None:
    settings = load_settings(env={}, **json.loads(settings_json))
    plugins = build_plugin_manager(load_entry_points=False)
    async with Scheduler(settings, bus=EventBus(), metrics=InfraMetrics(), plugins=plugins) as sched:
        if mode == "submit":
            doc: dict[str, Any] = json.loads(what)
            await sched.submit(TaskSpec(**doc))
            print("submitted", flush=True)
            await asyncio.Event().wait()
        result = await sched.wait(what, timeout=240)
        state = await sched.get(what)
        print(
            json.dumps(
                {
                    "status": result.status.value,
                    "attempts": state.attempts,
                    "result": result.result,
                    "error": result.error,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
