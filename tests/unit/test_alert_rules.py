"""The Prometheus alert rules are valid, tested by promtool, and each has a runbook section.

`promtool check rules` and `promtool test rules` run as subprocesses on the shipped files. Without
promtool the test is skipped on a workstation but fails under CI (env CI set), so a CI image that
lost Prometheus cannot pass silently.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "grafana" / "alerts"
RULES = ALERTS / "connector-rules.yml"
RULE_TESTS = ALERTS / "connector-rules.test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
SEVERITIES = {"critical", "warning", "info"}
PROMTOOL_TIMEOUT = 60.0


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required under CI (install Debian's `prometheus` package)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def _alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _runbook_anchors() -> set[str]:
    """GitHub-style anchors of the runbook's headings (lower case, spaces to dashes)."""
    anchors = set()
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)],
        capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = subprocess.run(
        [_promtool(), "test", "rules", RULE_TESTS.name],
        cwd=ALERTS, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_names_unique() -> None:
    names = [rule["alert"] for rule in _alert_rules()]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda rule: rule["alert"])
def test_rule_has_severity_annotations_and_runbook_section(rule: dict) -> None:
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook_url"}
    assert all(annotations[key].strip() for key in ("summary", "description"))
    page, _, anchor = annotations["runbook_url"].partition("#")
    assert page == "docs/runbook.md"
    assert anchor == rule["alert"].lower()
    assert anchor in _runbook_anchors(), f"docs/runbook.md has no section for {rule['alert']}"


def test_runbook_has_no_section_without_alert() -> None:
    alert_anchors = {rule["alert"].lower() for rule in _alert_rules()}
    sections = {a for a in _runbook_anchors() if a.startswith("connector") and a != "connector-runbook"}
    assert sections == alert_anchors


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in tests:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in _alert_rules()}
    assert names - firing == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown not firing"
