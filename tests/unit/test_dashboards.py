"""The Grafana dashboards are well-formed, speak only of metrics that exist, and show data.

Structure is checked on the JSON as Grafana loads it. Metric names are checked against the
prometheus-client registry that `connector.metrics` fills (families expanded to the sample names
Prometheus stores: `_total`, `_bucket`, `_count`, `_sum`, `_created`, `_info`), for the dashboards
and the alert rules alike. Every expression is then handed to promtool twice: `check rules`
proves it parses, and `test rules` evaluates it against the series a healthy demo cluster exports
(one master, one shadow, one cloud process, a few requests), proving each panel returns a series.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import connector.metrics as metrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
RULES = GRAFANA / "alerts" / "connector-rules.yml"
PROMTOOL_TIMEOUT = 60.0
METRIC_NAME = re.compile(r"\bconnector_[a-zA-Z0-9_]*")
# Grafana substitutes these before a query reaches Prometheus; outside Grafana we do.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$cluster": ".*", "$location": ".*", "$instance": ".*"}


# --- helpers ---------------------------------------------------------------------------------

def registry_names() -> set[str]:
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith(metrics.NS + "_"):
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def dashboards() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, json.loads(path.read_text())) for path in DASHBOARD_FILES]


def panel_exprs() -> Iterator[tuple[str, str]]:
    """(where, expr) of every panel target of every dashboard."""
    for name, board in dashboards():
        for panel in board["panels"]:
            for target in panel["targets"]:
                yield f"{name}: {panel['title']} [{target['refId']}]", target["expr"]


def all_exprs() -> Iterator[tuple[str, str]]:
    """Panel targets, annotations, variable queries and alert rules."""
    yield from panel_exprs()
    for name, board in dashboards():
        for annotation in board["annotations"]["list"]:
            yield f"{name}: annotation {annotation['name']}", annotation["expr"]
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                yield f"{name}: variable {variable['name']}", variable["definition"]
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule.get('alert', rule.get('record'))}", rule["expr"]


def substitute(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required under CI (install Debian's `prometheus` package)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


# --- structure -------------------------------------------------------------------------------

def test_four_dashboards_with_unique_uids() -> None:
    boards = dashboards()
    assert {name for name, _ in boards} == {
        "cluster-overview.json", "tunnel-traffic.json", "access-control.json", "etcd-lease-health.json"}
    uids = [board["uid"] for _, board in boards]
    assert len(uids) == len(set(uids))


def test_committed_json_is_what_the_builder_writes() -> None:
    sys.path.insert(0, str(GRAFANA))
    try:
        import build_dashboards
    finally:
        sys.path.remove(str(GRAFANA))
    for name, text in build_dashboards.rendered().items():
        assert (GRAFANA / "dashboards" / name).read_text() == text, f"run python grafana/build_dashboards.py ({name})"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_dashboard_structure(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids {ids}"
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_template_variables(path: Path) -> None:
    variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("cluster", "location", "instance"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["definition"].startswith("label_values(connector_node_role")
        assert variable["definition"].endswith(f", {name})")
        assert variable["query"]["query"] == variable["definition"]
        assert variable["includeAll"] and variable["allValue"] == ".*"


def test_failovers_are_annotated_from_leader_changes() -> None:
    board = json.loads((GRAFANA / "dashboards" / "cluster-overview.json").read_text())
    (annotation,) = board["annotations"]["list"]
    assert "connector_leader_changes_total" in annotation["expr"]
    assert annotation["datasource"]["uid"] == "${datasource}"


# --- metric names ----------------------------------------------------------------------------

def test_registry_names_are_derived_with_suffixes() -> None:
    names = registry_names()
    assert {"connector_build_info", "connector_leader_changes_total", "connector_etcd_up",
            "connector_request_duration_seconds_bucket", "connector_request_duration_seconds_count",
            "connector_request_duration_seconds_sum"} <= names
    assert "connector_leader_changes" not in names


def test_every_referenced_metric_exists() -> None:
    known = registry_names()
    unknown = [(where, name) for where, expr in all_exprs() for name in METRIC_NAME.findall(expr) if name not in known]
    assert unknown == []


def test_every_metric_is_shown_or_alerted_on() -> None:
    used = {name for _, expr in all_exprs() for name in METRIC_NAME.findall(expr)}
    families = {name.removesuffix(suffix) for name in used
                for suffix in ("_total", "_bucket", "_count", "_sum", "_info", "") if name.endswith(suffix)}
    unused = [f.name for f in REGISTRY.collect() if f.name.startswith("connector_") and f.name not in families]
    assert unused == []


# --- evaluated by promtool -------------------------------------------------------------------

def test_every_expr_parses(tmp_path: Path) -> None:
    exprs = [substitute(expr) for _, expr in all_exprs() if not expr.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool(), "check", "rules", str(path)],
                            capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr


STEPS = 40  # samples 15 s apart: 10 minutes of a healthy demo


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    body = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def counter(name: str, labels: dict[str, str], per_step: float = 0) -> list[dict[str, str]]:
    return [series(name, labels, f"0+{per_step}x{STEPS}")]


def gauge(name: str, labels: dict[str, str], value: float) -> list[dict[str, str]]:
    return [series(name, labels, f"{value}x{STEPS}")]


def histogram(name: str, labels: dict[str, str], buckets: tuple[float, ...], per_step: int = 0,
              at: float = 0.01) -> list[dict[str, str]]:
    """A histogram observing `per_step` values of `at` seconds every step."""
    out = [series(f"{name}_bucket", {**labels, "le": str(le)}, f"0+{per_step if le >= at else 0}x{STEPS}")
           for le in buckets]
    out.append(series(f"{name}_bucket", {**labels, "le": "+Inf"}, f"0+{per_step}x{STEPS}"))
    out.append(series(f"{name}_count", labels, f"0+{per_step}x{STEPS}"))
    out.append(series(f"{name}_sum", labels, f"0+{per_step * at}x{STEPS}"))
    return out


def healthy_demo() -> list[dict[str, str]]:
    """What one master (a), one shadow (b) and the cloud side export after a few requests."""
    lat, fail = metrics.LATENCY_BUCKETS, metrics.FAILOVER_BUCKETS
    cluster = {"cluster": "demo", "location": "loc1"}
    cloud_location = {"subaccount": "demo", "location": "loc1"}
    out: list[dict[str, str]] = []
    everywhere = (
        ("a:9100", "node"), ("b:9100", "node"), ("cloud:8081", "cloud"))
    for instance, job in everywhere:  # the unlabelled metrics every process exports
        at = {"job": job, "instance": instance}
        out += gauge("connector_build_info", {**at, "version": "0.1.0", "python": "3.11.2"}, 1)
        out += gauge("connector_etcd_up", at, 0 if job == "cloud" else 1)
        out += counter("connector_lease_renewal_failures_total", at)
        out += counter("connector_audit_write_errors_total", at)
        out += gauge("connector_held_requests_waiting", at, 0)
        out += gauge("connector_cloud_ready", at, 1 if job == "cloud" else 0)  # unlabelled: everywhere
        out += gauge("connector_cloud_drain_connections", at, 0)
        if job != "cloud":  # an info metric without labels is exported by every process, without `id`
            out += gauge("connector_cloud_replica_info", at, 1)
        out += histogram("connector_held_request_duration_seconds", at, fail)
        out += gauge("connector_certificate_expiry_timestamp_seconds",
                     {**at, "certificate": "tunnel-server" if job == "cloud" else "tunnel-client"}, 2e9)
    for node, role, epoch, tunnel in (("a", "master", 7, 1), ("b", "shadow", 0, 1)):
        at = {"job": "node", "instance": f"{node}:9100"}
        for candidate in ("master", "shadow", "starting"):
            out += gauge("connector_node_role", {**at, **cluster, "node": node, "role": candidate},
                         1 if candidate == role else 0)
        out += gauge("connector_node_epoch", {**at, **cluster, "node": node}, epoch)
        out += gauge("connector_leader_changes_total", {**at, **cluster}, 1)
        out += histogram("connector_etcd_operation_duration_seconds", {**at, "operation": "keepalive"}, lat, 3, 0.002)
        out += gauge("connector_tunnel_connected", {**at, "location": "loc1", "node": node}, tunnel)
        out += histogram("connector_tunnel_ping_rtt_seconds", {**at, "side": "node"}, lat, 15, 0.0005)
    master = {"job": "node", "instance": "a:9100"}
    mapping = {"mapping": "backend.demo:80"}
    out += gauge("connector_streams_open", {**master, "side": "node"}, 0)
    out += counter("connector_streams_opened_total", {**master, "side": "node", "protocol": "http"}, 2)
    out += counter("connector_bytes_total", {**master, **mapping, "direction": "in"}, 300)
    out += counter("connector_bytes_total", {**master, **mapping, "direction": "out"}, 900)
    out += histogram("connector_request_duration_seconds", {**master, **mapping, "protocol": "http"}, lat, 2)
    out += counter("connector_requests_total", {**master, **mapping, "decision": "allowed"}, 2)
    out += counter("connector_origin_connections_total", {**master, **mapping, "outcome": "reused"}, 2)
    out += gauge("connector_origin_pool_idle_connections", {**master, **mapping}, 1)
    cloud = {"job": "cloud", "instance": "cloud:8081"}
    for replica, instance in (("cloud-1", "cloud:8081"), ("cloud-2", "cloud-2:8081")):
        # every cloud replica's series carry the scrape's `replica` label (docs/metrics.md)
        at = {"job": "cloud", "instance": instance, "replica": replica}
        out += gauge("connector_cloud_replica_info", {**at, "id": replica}, 1)
        if instance != "cloud:8081":  # the first one's unlabelled gauges come with the other processes'
            out += gauge("connector_cloud_ready", at, 1)
            out += gauge("connector_cloud_drain_connections", at, 3)
        out += gauge("connector_cloud_tunnels", {**at, **cloud_location, "role": "master"}, 1)
        out += gauge("connector_cloud_tunnels", {**at, **cloud_location, "role": "standby"}, 1)
    out += gauge("connector_cloud_master_epoch", {**cloud, **cloud_location}, 7)
    out += gauge("connector_cloud_registrations_total", {**cloud, **cloud_location, "result": "accepted"}, 1)
    out += gauge("connector_cloud_location_has_master", {**cloud, **cloud_location}, 1)
    out += counter("connector_proxy_requests_total", {**cloud, "proxy": "http", "status": "200"}, 2)
    out += histogram("connector_proxy_request_duration_seconds", {**cloud, "proxy": "http"}, lat, 2, 0.02)
    out += gauge("connector_streams_open", {**cloud, "side": "cloud"}, 0)
    out += counter("connector_streams_opened_total", {**cloud, "side": "cloud", "protocol": "http"}, 2)
    out += histogram("connector_tunnel_ping_rtt_seconds", {**cloud, "side": "cloud"}, lat, 15, 0.0005)
    out += counter("connector_proxy_auth_failures_total", cloud)
    out += counter("connector_proxy_auth_failures_delayed_total", cloud)
    out += gauge("connector_proxy_auth_failing_addresses", cloud, 0)
    out += gauge("connector_proxy_connections", cloud, 0)
    out += gauge("connector_proxy_stream_waiting", cloud, 0)
    out += gauge("connector_proxy_streams_admitted", {**cloud, "subaccount": "demo"}, 0)
    out += gauge("connector_proxy_stream_holders", {**cloud, "kind": "token"}, 0)
    out += gauge("connector_proxy_stream_holders", {**cloud, "kind": "client_address"}, 0)
    return out


def test_every_panel_shows_data_on_a_healthy_demo(tmp_path: Path) -> None:
    """Each panel expr, wrapped as `clamp_max(count(expr), 1)`, must evaluate to 1 (a series exists)."""
    cases = [
        {"expr": f"clamp_max(count({substitute(expr)}), 1)", "eval_time": "5m",
         "exp_samples": [{"labels": "{}", "value": 1}]}
        for _, expr in panel_exprs()
    ]
    test_file = {"evaluation_interval": "15s", "tests": [
        {"name": "healthy demo", "interval": "15s", "input_series": healthy_demo(), "promql_expr_test": cases}]}
    path = tmp_path / "healthy.test.yml"
    path.write_text(yaml.safe_dump(test_file, width=1000))
    result = subprocess.run([promtool(), "test", "rules", str(path)],
                            capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT)
    assert result.returncode == 0, "panels without data on a healthy demo:\n" + result.stderr[-6000:]


def test_no_alert_fires_on_a_healthy_demo(tmp_path: Path) -> None:
    rules = tmp_path / RULES.name
    shutil.copy(RULES, rules)
    alerts = [rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    test_file = {"rule_files": [rules.name], "evaluation_interval": "15s", "tests": [
        {"name": "healthy demo", "interval": "15s", "input_series": healthy_demo(),
         "alert_rule_test": [{"eval_time": "9m", "alertname": name, "exp_alerts": []} for name in alerts]}]}
    path = tmp_path / "healthy-alerts.test.yml"
    path.write_text(yaml.safe_dump(test_file, width=1000))
    result = subprocess.run([promtool(), "test", "rules", path.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
