"""``dspy-infra serve`` sets its process's garbage collector for a server once it serves
(``serve.tune_gc_for_a_server``); an application that runs ``run_server`` among its own work
keeps its settings. Checked in real child processes, since the setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _rpc_support import ROOT, base_settings

from dspy_infra.serve import SERVER_GC_THRESHOLD

# Reports the collector's state from on_ready (after the server is up), then stops itself.
_CHILD = """
import asyncio, gc, json, os, signal, sys
from dspy_infra.config import load_settings
from dspy_infra.serve import run_server

before = gc.get_threshold()

def ready(server):
    print("GC " + json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

settings = load_settings(**json.loads(sys.argv[1]))
raise SystemExit(asyncio.run(run_server(settings, on_ready=ready, own_process=sys.argv[2] == "own")))
"""


# The command itself (``dspy-infra serve``): reports once the collector was set, then stops.
_CLI_CHILD = """
import gc, json, os, signal, sys, threading
import dspy_infra.serve as serve
from dspy_infra.cli import main

before = gc.get_threshold()
tune = serve.tune_gc_for_a_server

def tuned():
    tune()
    print("GC " + json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

serve.tune_gc_for_a_server = tuned
# Never tuned: stop anyway (no GC line, so the test fails) instead of running until killed.
timer = threading.Timer(60, os.kill, (os.getpid(), signal.SIGTERM))
timer.daemon = True
timer.start()
raise SystemExit(main(["--home", sys.argv[1], "serve", "--backend", "process",
                       "--grpc-port", "0", "--env-manager-port", "0", "--http-port", "0"]))
"""


def _gc_state(home: Path, mode: str) -> dict[str, list[int] | int]:
    if mode == "cli":
        args = [sys.executable, "-c", _CLI_CHILD, str(home)]
    else:
        args = [sys.executable, "-c", _CHILD, json.dumps(base_settings(home)), mode]
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("GC "))
    state: dict[str, list[int] | int] = json.loads(line[3:])
    return state


@pytest.mark.parametrize("mode", ["own", "embedded", "cli"])
def test_only_a_process_that_is_the_server_changes_its_collector(tmp_path: Path, mode: str) -> None:
    state = _gc_state(tmp_path / "home", mode)
    before, after = state["before"], state["after"]
    assert isinstance(before, list) and isinstance(after, list)
    if mode in ("own", "cli"):  # the command is a server's own process
        assert after == [max(before[0], SERVER_GC_THRESHOLD), *before[1:]]
        assert isinstance(state["frozen"], int) and state["frozen"] > 10_000  # the start's objects
    else:
        assert after == before and state["frozen"] == 0
