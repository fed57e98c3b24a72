"""``import dspy_infra`` is cheap (issue 11): the public names load when first used, so a CLI
call or a process that needs one corner of the package does not pay for gRPC, HTTP and
SQLite. Checked as behaviour (which modules an import loads), never as a timing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Modules that only whoever serves, calls or stores may import.
HEAVY = ("grpclib", "aiohttp", "betterproto2", "sqlite3", "prometheus_client", "dspy_infra.infra")

PROBE = """
import json, sys
before = set(sys.modules)
import dspy_infra
loaded = sorted(m for m in set(sys.modules) - before)
print(json.dumps(loaded))
"""


def _loaded_by(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return list(json.loads(out.stdout.splitlines()[-1]))


def test_import_loads_none_of_the_heavy_parts() -> None:
    loaded = _loaded_by(PROBE)
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY]
    assert heavy == [], heavy


def test_every_public_name_resolves_and_is_the_defining_modules_object() -> None:
    import importlib

    import dspy_infra

    for name in dspy_infra.__all__:
        value = getattr(dspy_infra, name)
        if name == "__version__":
            continue
        module = importlib.import_module(dspy_infra._LAZY[name], "dspy_infra")
        assert getattr(module, name) is value, name
    assert set(dspy_infra.__all__) <= set(dir(dspy_infra))


def test_from_import_of_a_public_name_works_in_a_fresh_process() -> None:
    code = "from dspy_infra import TaskSpec, ensure_infra, Infra, __version__; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "ok"


def test_an_unknown_name_is_an_attribute_error_naming_it() -> None:
    import dspy_infra

    with pytest.raises(AttributeError, match="no_such_name"):
        dspy_infra.no_such_name  # noqa: B018


def test_all_lists_exactly_the_lazy_names_and_the_version() -> None:
    import dspy_infra

    assert sorted(dspy_infra.__all__) == sorted([*dspy_infra._LAZY, "__version__"])
