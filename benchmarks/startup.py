"""Start-up costs (issue 11): ``import dspy_infra`` and ``dspy-infra serve`` to its
"serving" line, against ``python -c pass`` measured in the same rounds.

Each round runs, in a fresh interpreter each: ``python -c pass`` (the floor),
``python -c "import dspy_infra"``, the *library floor* of a server (importing only the
third-party libraries ``serve`` cannot do without: asyncio, sqlite3, aiohttp's web server,
grpclib, betterproto2 (without pydantic, as ``dspy_infra.rpc`` imports it), attrs,
prometheus_client, pluggy, anyio's asyncio backend, tomllib), and
``dspy-infra --home <fresh dir> serve`` (process backend, ports 0) until it prints
``dspy-infra serving``; the server is then stopped with SIGTERM. Medians over ``--rounds``;
``serve / library floor`` is the median of the per-round ratios. The package's bytecode is compiled first, as a wheel
install has it (a checkout run with PYTHONDONTWRITEBYTECODE would compile every module on
every start). Targets: import <= 0.1 s, serve <= 0.3 s. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _rpc_support import stop_process as stop  # noqa: E402

__all__ = ["main"]

#: What any ``dspy-infra serve`` imports from its dependencies before it can serve.
LIBRARY_FLOOR = (
    "import sys; sys.modules['pydantic'] = None; "
    "import asyncio, sqlite3, tomllib, aiohttp.web, grpclib.server, betterproto2, attrs, "
    "prometheus_client, pluggy, anyio._backends._asyncio"
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["DSPY_INFRA_BACKEND"] = "process"
    env["DSPY_INFRA_GRPC_PORT"] = env["DSPY_INFRA_HTTP_PORT"] = env["DSPY_INFRA_ENV_MANAGER_PORT"] = "0"
    return env


def _timed(argv: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(argv, check=True, env=_env(), stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def _serve(cli: str) -> float:
    with tempfile.TemporaryDirectory(prefix="dspy-startup-") as home:
        began = time.perf_counter()
        proc = subprocess.Popen(
            [cli, "--home", home, "serve"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        elapsed = time.perf_counter() - began
        stop(proc)
        if "dspy-infra serving" not in line:
            raise SystemExit(f"serve did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    compileall.compile_dir(str(ROOT / "dspy_infra"), quiet=1)
    cli = str(Path(sys.executable).parent / "dspy-infra")
    runs: dict[str, list[float]] = {"pass": [], "import": [], "floor": [], "serve": []}
    for _ in range(args.rounds):
        runs["pass"].append(_timed([sys.executable, "-c", "pass"]))
        runs["import"].append(_timed([sys.executable, "-c", "import dspy_infra"]))
        runs["floor"].append(_timed([sys.executable, "-c", LIBRARY_FLOOR]))
        runs["serve"].append(_serve(cli))
    med = {k: statistics.median(v) for k, v in runs.items()}
    over_floor = statistics.median(s / f for s, f in zip(runs["serve"], runs["floor"], strict=True))
    print(f"python -c pass: {med['pass'] * 1000:7.1f} ms (the floor)")
    print(
        f"import dspy_infra: {med['import'] * 1000:7.1f} ms  ({med['import'] / med['pass']:.2f}x the floor; target <= 100 ms)"
    )
    print(f"library floor of a server: {med['floor'] * 1000:7.1f} ms  (imports only, nothing of dspy_infra)")
    print(
        f"dspy-infra serve to 'serving': {med['serve'] * 1000:7.1f} ms  ({med['serve'] / med['pass']:.2f}x the floor,"
        f" {over_floor:.2f}x the library floor; target <= 300 ms)"
    )
    out = {
        "rounds": args.rounds,
        "pass_ms": round(med["pass"] * 1000, 1),
        "import_ms": round(med["import"] * 1000, 1),
        "library_floor_ms": round(med["floor"] * 1000, 1),
        "serve_ms": round(med["serve"] * 1000, 1),
        "import_vs_pass": round(med["import"] / med["pass"], 2),
        "serve_vs_pass": round(med["serve"] / med["pass"], 2),
        "serve_vs_library_floor": round(over_floor, 2),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
