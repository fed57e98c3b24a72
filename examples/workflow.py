"""A workflow on the embedded infra: fan-out / fan-in with templates and an idempotent run.

    python examples/workflow.py

``prepare`` reads the run's input, three ``score-N`` steps run in parallel on its result,
``pick`` joins them. Starting the run twice with one idempotency key gives one run. State
lives in a temporary directory, so the example leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import tempfile

from dspy_infra import use_infra

SPEC = {
    "steps": [
        {
            "name": "prepare",
            "payload": {"handler": "exec", "cmd": "printf '%s' '{{ input.prompt }}' | tr a-z A-Z"},
        },
        *(
            {
                "name": f"score-{i}",
                "depends_on": ["prepare"],
                "payload": {
                    "handler": "exec",
                    "cmd": f"printf '{i}:%s' '{{{{ steps.prepare.result.stdout }}}}'",
                },
            }
            for i in (1, 2, 3)
        ),
        {
            "name": "pick",
            "depends_on": ["score-1", "score-2", "score-3"],
            "payload": {
                "handler": "exec",
                "cmd": "printf '%s\\n' '{{ steps.score-1.result.stdout }}' '{{ steps.score-2.result.stdout }}'"
                " '{{ steps.score-3.result.stdout }}' | sort | tail -n 1 | tr -d '\\n'",
            },
        },
    ],
    "output": {"best": "{{ steps.pick.result.stdout }}"},
}


async def main() -> None:
    with tempfile.TemporaryDirectory() as state_dir:
        async with use_infra(state_dir=state_dir, mode="embedded", backend="process") as infra:
            await infra.create_workflow("fan-in", "fan-out / fan-in", "example", SPEC)
            run_id = await infra.start_run("fan-in", input={"prompt": "hello"}, idempotency_key="example-1")
            again = await infra.start_run("fan-in", input={"prompt": "hello"}, idempotency_key="example-1")
            assert again == run_id, "one key, one run"
            async for update in infra.run_status(run_id):
                step = f" ({update.current_step})" if update.current_step else ""
                print(f"{update.status:<9} {update.steps_completed}/{update.total_steps}{step}")
            run = await infra.get_run(run_id)
            print("output:", run.output)


if __name__ == "__main__":
    asyncio.run(main())
