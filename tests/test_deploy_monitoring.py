"""deploy/: the Prometheus alert rules (promtool check + promtool unit tests) and the Grafana
dashboard, both checked against the metric names the code exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from engines import skip_or_fail

from dspy_infra.metrics import InfraMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dspy-infra-dashboard.json"
#: Series Prometheus itself adds to every scrape.
PROMETHEUS_SERIES = {"up"}
_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
}


def exported_series() -> dict[str, str]:
    """Every series name ``GET /metrics`` can carry -> its metric family."""
    out: dict[str, str] = {}
    for family in InfraMetrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        for suffix in suffixes:
            out[family.name + suffix] = family.name
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in _PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # part of a number (1e3)
        names.add(match.group())
    return names


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, task_class) (rate(gpu_wait_seconds_bucket{job="x"}[5m]))) > 300'
    )
    assert metric_names(expr) == {"gpu_wait_seconds_bucket"}
    assert metric_names("env_queue_depth > 100 and deriv(env_queue_depth[15m]) > 0") == {"env_queue_depth"}


def _alert_rules() -> list[dict[str, Any]]:
    try:
        import yaml
    except ImportError:
        skip_or_fail("PyYAML is not installed (pip install -e '.[dev]')")
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] if p["type"] != "row" for t in p["targets"]]


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    if shutil.which("promtool") is None:
        skip_or_fail("promtool is not installed (apt-get install prometheus)")
    for args in (["check", "rules", RULES.name], ["test", "rules", RULE_TESTS.name]):
        done = subprocess.run(
            ["promtool", *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_cover_the_planned_alerts_with_exported_metrics() -> None:
    rules = _alert_rules()
    names = {r["alert"] for r in rules}
    assert names == {
        "DspyInfraDown",
        "DspyInfraServiceDown",
        "DspyInfraServiceStartFailing",
        "DspyInfraServiceRestartLoop",
        "DspyInfraTaskErrorRate",
        "DspyInfraQueueGrowing",
        "DspyInfraGpuWait",
    }
    known = set(exported_series()) | PROMETHEUS_SERIES
    for rule in rules:
        used = metric_names(rule["expr"])
        assert used and used <= known, (rule["alert"], used - known)
        assert rule["labels"]["severity"] in ("critical", "warning")
    # Every alert has a promtool unit test.
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == names


def test_grafana_dashboard_is_valid_and_shows_every_exported_metric() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    assert [v["name"] for v in doc["templating"]["list"]] == ["datasource", "job"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    series = exported_series()
    shown: set[str] = set()
    for panel in doc["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = metric_names(target["expr"])
            assert used and used <= set(series) | PROMETHEUS_SERIES, (panel["title"], used)
            assert "$job" in target["expr"], (panel["title"], "selects no job")
            shown |= {series[name] for name in used if name in series}
    assert shown == set(series.values())


@pytest.mark.parametrize("path", [RULES, RULE_TESTS, DASHBOARD])
def test_deploy_files_are_documented(path: Path) -> None:
    assert path.relative_to(DEPLOY).as_posix() in (DEPLOY / "README.md").read_text()
