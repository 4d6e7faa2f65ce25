"""The Prometheus alert rules are valid, tested by promtool, and each has a runbook section; the
Alertmanager configuration next to them is valid and routes every alert by its severity.

`promtool check rules`, `promtool test rules`, `amtool check-config` and `amtool config routes test`
run as subprocesses on the shipped files. Without the tool the test is skipped on a workstation but
fails under CI (env CI set), so a CI image that lost Prometheus or Alertmanager cannot pass silently.
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
ALERTMANAGER = ALERTS / "alertmanager.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
SEVERITIES = {"critical", "warning", "info"}
# severity -> the receiver Alertmanager must pick (the routing table of alertmanager.yml)
RECEIVERS = {"critical": "connector-critical", "warning": "connector-default", "info": "connector-info"}
PROMTOOL_TIMEOUT = 60.0


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required under CI (install Debian's `prometheus` package)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def _amtool() -> str:
    path = shutil.which("amtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("amtool is required under CI (install Debian's `prometheus-alertmanager` package)")
        pytest.skip("amtool not installed (apt-get install prometheus-alertmanager)")
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


def test_amtool_check_config() -> None:
    result = subprocess.run(
        [_amtool(), "check-config", str(ALERTMANAGER)], capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_routes_to_the_receiver_of_its_severity(rule: dict) -> None:
    """What Alertmanager would do with this alert, asked of amtool (the shipped file's own routing)."""
    severity = rule["labels"]["severity"]
    result = subprocess.run(
        [_amtool(), "config", "routes", "test", f"--config.file={ALERTMANAGER}",
         f"--verify.receivers={RECEIVERS[severity]}", f"alertname={rule['alert']}", f"severity={severity}"],
        capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == RECEIVERS[severity]


def test_inhibit_rules_name_alerts_that_exist() -> None:
    """An inhibition naming a renamed alert silently mutes nothing."""
    names = {rule["alert"] for rule in _alert_rules()}
    named: set[str] = set()
    for inhibit in yaml.safe_load(ALERTMANAGER.read_text())["inhibit_rules"]:
        for matcher in inhibit.get("source_matchers", []) + inhibit.get("target_matchers", []):
            label, op, value = re.match(r'^(\w+)\s*(=~|!=|!~|=)\s*"(.*)"$', matcher).groups()  # type: ignore[union-attr]
            if label == "alertname":
                assert op in ("=", "=~"), matcher
                named |= set(value.split("|"))
            else:
                assert label == "severity" and value in SEVERITIES, matcher
    assert named and named <= names, named - names
