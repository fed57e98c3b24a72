"""The docs and deployment files say what the code does: each check fails when they drift."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from engines import skip_or_fail

from dspy_infra.cli import command_tree
from dspy_infra.config import Settings
from dspy_infra.config_doc import render_settings_markdown
from dspy_infra.metrics import InfraMetrics

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_FILES = [*sorted(DOCS.glob("*.md")), ROOT / "deploy" / "README.md"]
UNIT = ROOT / "deploy" / "systemd" / "dspy-infra.service"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def test_every_doc_exists() -> None:
    names = {p.name for p in DOCS.glob("*.md")}
    assert {
        "getting-started.md",
        "configuration.md",
        "wire-contract.md",
        "operations.md",
        "architecture.md",
    } <= names


def test_settings_table_is_generated_from_the_code() -> None:
    text = (DOCS / "configuration.md").read_text()
    match = re.search(r"<!-- settings-table:begin -->\n(.*?)<!-- settings-table:end -->", text, re.S)
    assert match, "configuration.md lost its settings-table markers"
    assert match.group(1) == render_settings_markdown(), (
        "docs/configuration.md is out of date: paste the output of `dspy-infra config reference`"
    )
    for field in attrs.fields(Settings):
        assert f"| `{field.name}` |" in match.group(1), f"Settings.{field.name} missing from configuration.md"


def _proto_names() -> tuple[set[str], set[str]]:
    rpcs: set[str] = set()
    messages: set[str] = set()
    for proto in (ROOT / "proto").rglob("*.proto"):
        text = proto.read_text()
        rpcs |= set(re.findall(r"^\s*rpc\s+(\w+)\s*\(", text, re.M))
        messages |= set(re.findall(r"^\s*message\s+(\w+)\s*\{", text, re.M))
    return rpcs, messages


def test_wire_contract_names_every_rpc_and_message() -> None:
    rpcs, messages = _proto_names()
    assert len(rpcs) >= 25 and len(messages) >= 40  # the parse found the protos
    text = (DOCS / "wire-contract.md").read_text()
    assert [r for r in sorted(rpcs) if f"`{r}`" not in text] == []
    assert [m for m in sorted(messages) if f"`{m}`" not in text] == []


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_docs_mention_only_real_cli_commands(path: Path) -> None:
    commands = command_tree()
    # Only code counts (fenced blocks and inline spans); prose may say "dspy-infra does ...".
    raw = path.read_text()
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", raw, re.M | re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", raw, flags=re.M | re.S))
    text = "\n".join([*fenced, *inline])
    # `dspy-infra [GLOBAL OPTIONS] COMMAND [SUBCOMMAND]` on one line (not paths, units, users).
    uses = re.findall(
        r"(?:^|[\s`$/])dspy-infra((?:[ \t]+--?[a-z-]+(?:[ \t]+(?!-)[^\s`]+)?)*)[ \t]+([a-z]+)(?![-.\w])"
        r"(?:[ \t]+([a-z]+)(?![-.\w]))?",
        text,
        re.M,
    )
    assert uses or path.name in ("wire-contract.md", "architecture.md"), f"{path.name} shows no command"
    for _globals, command, sub in uses:
        if command == "serving":
            continue  # the "dspy-infra serving grpc=..." line that serve prints
        assert command in commands, f"{path.name}: `dspy-infra {command}` is not a command"
        if commands[command] and sub:
            assert sub in commands[command], f"{path.name}: `dspy-infra {command} {sub}` is not a subcommand"


def test_operations_lists_every_metric() -> None:
    text = (DOCS / "operations.md").read_text()
    names = InfraMetrics().metric_names()
    assert len(names) >= 12
    assert [n for n in sorted(names) if n not in text] == []


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


def test_systemd_unit_is_hardened_and_valid(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for directive in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/dspy-infra",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "Restart=on-failure",
        "RestartSec=",
        "ExecStartPost=",
    ):
        assert re.search(rf"^{re.escape(directive)}", text, re.M), directive
    assert "/health" in text and f":{Settings().http_port}/" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        skip_or_fail("systemd-analyze is not installed (apt-get install systemd)")
    # Point ExecStart at this checkout's entry point so `verify` can check the binary exists.
    cli = Path(sys.executable).parent / "dspy-infra"
    unit = tmp_path / "dspy-infra.service"
    unit.write_text(text.replace("/opt/dspy-infra/bin/dspy-infra", str(cli)))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "Unknown key" not in proc.stderr and "Unknown section" not in proc.stderr, proc.stderr


def test_prometheus_config_scrapes_the_http_port() -> None:
    text = PROMETHEUS.read_text()
    assert re.search(r"^\s+metrics_path: /metrics$", text, re.M)
    assert re.search(rf'^\s+- targets: \["127\.0\.0\.1:{Settings().http_port}"\]$', text, re.M)
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_or_fail("promtool is not installed (apt-get install prometheus)")
    proc = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
