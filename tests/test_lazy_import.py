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


#: What serving must not load: protobuf (only grpclib's own health service needed it),
#: pydantic (betterproto2 imports it when installed; our messages are not pydantic
#: dataclasses) and aiodocker (only a container engine needs it).
NOT_FOR_SERVING = ("google.protobuf", "pydantic", "pydantic_core", "aiodocker")

SERVE_PROBE = """
import json, sys
import dspy_infra.cli
from dspy_infra.rpc import import_betterproto2_without_pydantic
import_betterproto2_without_pydantic()  # what `dspy-infra`'s main does first
import dspy_infra.serve
from dspy_infra.plugins import build_plugin_manager
build_plugin_manager()
print(json.dumps(sorted(sys.modules)))
"""


def test_serving_loads_neither_protobuf_nor_pydantic_nor_aiodocker() -> None:
    loaded = _loaded_by(SERVE_PROBE)
    assert "grpclib.server" in loaded and "betterproto2" in loaded  # the probe did import the server
    found = [m for m in loaded if any(m == p or m.startswith(p + ".") for p in NOT_FOR_SERVING)]
    assert found == [], found


def test_pydantic_stays_importable_after_the_command_hid_it() -> None:
    pytest.importorskip("pydantic")
    code = """
import json, sys
from dspy_infra.cli import main
main(["config", "show"])
import betterproto2
hidden = betterproto2.pydantic is None
import pydantic
print(json.dumps([hidden, pydantic.BaseModel.__name__]))
"""
    assert _loaded_by(code) == [True, "BaseModel"]


def test_an_app_that_embeds_the_library_keeps_pydantic_in_betterproto2() -> None:
    # Hiding a module races any other thread's import of it: only the command does it.
    pytest.importorskip("pydantic")
    code = """
import json, dspy_infra.rpc.server, betterproto2
print(json.dumps([betterproto2.pydantic is not None]))
"""
    assert _loaded_by(code) == [True]


def test_a_process_that_imported_pydantic_first_keeps_it_in_betterproto2() -> None:
    pytest.importorskip("pydantic")
    code = """
import json, pydantic, dspy_infra.rpc.server, betterproto2
print(json.dumps([betterproto2.pydantic is pydantic]))
"""
    assert _loaded_by(code) == [True]
