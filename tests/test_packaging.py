"""The runtime dependencies in pyproject.toml are complete: everything the package imports,
directly or through its dependencies, is installed by `pip install dspy-infra` without
extras. (A wheel once crashed in `dspy-infra serve` with "No module named 'google'":
grpclib's health service needs protobuf, which only the dev extras brought.)

The wheel itself, in a clean venv, is exercised by the newcomer CI step
(scripts/newcomer.sh); this test is the fast check of the same rule."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dspy_infra"
#: Imported only when pytest loads the plugin, so pytest is there by definition.
ONLY_UNDER_PYTEST = {"pytest", "_pytest"}
#: Used only when already installed, never required: ours import them under
#: ``contextlib.suppress(ImportError)``, our dependencies import them when present
#: (betterproto2 loads pydantic validators if pydantic is there).
ONLY_WHEN_PRESENT = {"sniffio", "pydantic", "pydantic_core", "typing_inspection"}
#: Optional extras: imported only inside the code that needs them, once configured (the ray
#: executor, for a class with executor = "ray"); a start without them names the extra.
ONLY_WITH_EXTRA = {"ray": "ray"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_requirements() -> list[Requirement]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(r) for r in doc["project"]["dependencies"]]


def _closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution pip installs for ``requirements`` (extras followed, markers honoured)."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in requirements]
    while todo:
        req, extras = todo.pop()
        name = _norm(req.name)
        key = name + "[" + ",".join(sorted(extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        seen.add(name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # not installed here: nothing more to follow
        for text in dist.requires or ():
            sub = Requirement(text)
            env_extras = extras or {""}
            if sub.marker is not None and not any(
                sub.marker.evaluate({"extra": extra}) for extra in env_extras
            ):
                continue
            todo.append((sub, frozenset(sub.extras)))
    return {k for k in seen if "[" not in k}


def _providers() -> dict[str, set[str]]:
    return {top: {_norm(d) for d in dists} for top, dists in metadata.packages_distributions().items()}


def test_every_import_in_the_source_is_a_runtime_dependency() -> None:
    installed = _closure(_runtime_requirements())
    providers = _providers()
    missing: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if (
                    top in sys.stdlib_module_names
                    or top == "dspy_infra"
                    or top in ONLY_UNDER_PYTEST | ONLY_WHEN_PRESENT
                    or top in ONLY_WITH_EXTRA
                ):
                    continue
                if not providers.get(top, set()) & installed:
                    missing[top] = str(path.relative_to(ROOT))
    assert not missing, f"imported but not a runtime dependency (add to [project] dependencies): {missing}"


def test_what_serve_and_the_cli_load_is_installed_without_extras() -> None:
    # Import what `dspy-infra serve`, the CLI, the clients and HTTP load, in a fresh
    # interpreter, and list the distributions behind every module that got imported.
    code = (
        "import json, sys\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"  # what the interpreter loads (site)
        "import dspy_infra, dspy_infra.cli, dspy_infra.rpc.server, dspy_infra.rpc.client, dspy_infra.http\n"
        "import dspy_infra.infra, dspy_infra.serve, dspy_infra.demo, dspy_infra.handlers.http\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} - before)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, timeout=120
    )
    loaded = json.loads(done.stdout)
    installed = _closure(_runtime_requirements())
    providers = _providers()
    missing = {
        top: sorted(providers[top])
        for top in loaded
        if top in providers
        and top != "dspy_infra"
        and top not in ONLY_WHEN_PRESENT
        and not providers[top] & installed
    }
    assert not missing, f"loaded at run time but installed only by extras: {missing}"


def test_each_optional_import_is_installed_by_its_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for top, extra in ONLY_WITH_EXTRA.items():
        assert any(_norm(Requirement(r).name) == _norm(top) for r in extras[extra]), (top, extra)
