"""Build the connector's Grafana dashboards (grafana/dashboards/*.json) from one short description.

Theory of operation: each dashboard is a list of rows of panels, each panel a title, a unit and
one or more PromQL queries. This script lays them out on Grafana's 24-column grid, numbers the
panels, attaches the shared template variables (datasource, cluster, location, instance) and
writes plain dashboard JSON (schemaVersion 39) that Grafana's file provisioning loads as is.
The JSON files are the artefact (committed, provisioned, read by tests); this script is how they
are kept consistent. Edit here, then run `python grafana/build_dashboards.py`;
tests/unit/test_dashboards.py fails if the committed JSON differs from what this script writes.

Query conventions, so that every query returns a series on a healthy demo cluster:
- all label filters use `=~"$var"`; variables are multi-value with "All" = `.*`;
- counters that only exist once something goes wrong end in `or on() vector(0)`: the 0 is shown
  only while the left side has no series at all (a bare `or vector(0)` would add a label-less
  0 series next to every real one, since `or` matches on all labels);
- rates use `$__rate_interval`. To evaluate an expr outside Grafana, substitute
  `$cluster`, `$location` and `$instance` with `.*` and `$__rate_interval` with e.g. `1m`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39

NODE = 'cluster=~"$cluster", location=~"$location"'
LOC = 'location=~"$location"'
INST = 'instance=~"$instance"'
RI = "$__rate_interval"

Query = tuple[str, str]  # (expr, legend)
Panel = dict[str, Any]


def q(expr: str, legend: str = "") -> Query:
    return (expr, legend)


def panel(title: str, queries: list[Query], *, unit: str = "short", kind: str = "timeseries",
          description: str = "", width: int = 12, height: int | None = None, **extra: Any) -> Panel:
    if height is None:
        height = 5 if kind == "stat" else 8
    return {"title": title, "queries": queries, "unit": unit, "kind": kind, "description": description,
            "width": width, "height": height, **extra}


def quantiles(metric: str, by: str = "", selector: str = "") -> list[Query]:
    """p50, p90 and p99 of a histogram, per value of label `by` (or overall)."""
    sel = "{" + selector + "}" if selector else ""
    group = f"le, {by}" if by else "le"
    return [
        q(f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket{sel}[{RI}])))",
          f"p{int(p * 100)} {{{{{by}}}}}" if by else f"p{int(p * 100)}")
        for p in (0.5, 0.9, 0.99)
    ]


ROLE_MAPPINGS = [{"type": "value", "options": {
    "0": {"text": "starting", "color": "yellow", "index": 0},
    "1": {"text": "shadow", "color": "blue", "index": 1},
    "2": {"text": "master", "color": "green", "index": 2},
}}]
# Unlabelled gauges exist in every process (at 0 on the nodes), and so does the info metric, but only
# a cloud replica's has an `id`: this join keeps the replicas.
ON_REPLICAS = '* on (job, instance) group_left () connector_cloud_replica_info{id!=""}'
READY_MAPPINGS = [{"type": "value", "options": {
    "0": {"text": "not ready", "color": "orange", "index": 0},
    "1": {"text": "ready", "color": "green", "index": 1},
}}]
UP_MAPPINGS = [{"type": "value", "options": {
    "0": {"text": "down", "color": "red", "index": 0},
    "1": {"text": "up", "color": "green", "index": 1},
}}]


# --- the four dashboards ---------------------------------------------------------------------

CLUSTER = {
    "uid": "connector-cluster",
    "title": "Connector: cluster overview",
    "description": "Roles, epochs and failovers of connector clusters, as the nodes and the cloud see them.",
    "annotations": [{
        "name": "Failovers",
        "expr": f"max by (cluster, location) (increase(connector_leader_changes_total{{{NODE}}}[{RI}])) > 0",
        "titleFormat": "Master changed",
        "textFormat": "cluster {{cluster}}, location {{location}}",
        "iconColor": "red",
    }],
    "rows": [
        [
            panel("Masters per cluster and location", [q(
                f'sum by (cluster, location) (connector_node_role{{role="master", {NODE}}})',
                "{{cluster}} / {{location}}")], kind="stat", width=6,
                description="Exactly one is healthy; 0 means no master, more than 1 see ConnectorMultipleMasters."),
            panel("Locations without master (cloud)", [q(
                f"count(connector_cloud_location_has_master{{{LOC}}} == 0) or on() vector(0)", "locations")],
                kind="stat", width=6),
            panel("Epoch accepted by the cloud", [q(
                f"max by (subaccount, location) (connector_cloud_master_epoch{{{LOC}}})",
                "{{subaccount}} / {{location}}")], kind="stat", width=6),
            panel("Connector versions", [q("count by (version, python) (connector_build_info)",
                                           "{{version}} (Python {{python}})")], kind="stat", width=6),
        ],
        [
            panel("Role of each node", [q(
                f'max by (cluster, location, node) (connector_node_role{{role="master", {NODE}}}) * 2'
                f' + max by (cluster, location, node) (connector_node_role{{role="shadow", {NODE}}})',
                "{{node}}")], kind="state-timeline", width=24, mappings=ROLE_MAPPINGS,
                description="master, shadow or starting over time; failovers are marked as annotations."),
        ],
        [
            panel("Nodes per role", [q(f"sum by (role) (connector_node_role{{{NODE}}})", "{{role}}")]),
            panel("Epoch per node", [
                q(f"max by (cluster, location, node) (connector_node_epoch{{{NODE}}})", "{{node}}"),
                q(f"max by (location) (connector_cloud_master_epoch{{{LOC}}})", "cloud {{location}}"),
            ], description="The fencing epoch the master registered; 0 when not master."),
        ],
        [
            panel("Master changes", [q(
                f"max by (cluster, location) (increase(connector_leader_changes_total{{{NODE}}}[{RI}]))",
                "{{cluster}} / {{location}}")]),
            panel("Time without master (cloud)", [q(
                f"sum by (subaccount, location) (increase(connector_cloud_no_master_seconds_total{{{LOC}}}[{RI}])) or on() vector(0)",
                "{{subaccount}} / {{location}}")], unit="s"),
        ],
        [
            panel("Cloud replicas", [
                q('count(connector_cloud_replica_info{id!=""})', "replicas"),
                q(f"sum(connector_cloud_ready {ON_REPLICAS})", "ready"),
            ], kind="stat", width=6,
                description="Replicas exporting metrics, and how many of them are ready (in the load balancer's rotation)."),
            panel("Cloud replicas ready", [q(f"max by (replica) (connector_cloud_ready {ON_REPLICAS})", "{{replica}}")],
                  kind="state-timeline", width=6, mappings=READY_MAPPINGS,
                  description="A replica is not ready while it drains (SIGTERM) or cannot load the shared state."),
            panel("Cloud tunnels per replica", [q(
                f"sum by (replica, location) (connector_cloud_tunnels{{{LOC}}})", "{{replica}} {{location}}")],
                width=6, description="Every replica should hold the same tunnels: see ConnectorReplicaMissingTunnels."),
            panel("Application connections per replica", [q(
                f"sum by (replica) (connector_cloud_drain_connections {ON_REPLICAS})", "{{replica}}")], width=6,
                description="HTTP proxy and SOCKS5 connections served; a draining replica exits once at 0."),
        ],
        [
            panel("Cloud tunnels by role", [q(
                f"sum by (location, role) (connector_cloud_tunnels{{{LOC}}})", "{{location}} {{role}}")]),
            panel("Master registrations (cloud)", [q(
                f"sum by (location, result) (increase(connector_cloud_registrations_total{{{LOC}}}[{RI}]))",
                "{{location}} {{result}}")]),
        ],
        [
            panel("etcd reachable", [q(f"min by (instance) (connector_etcd_up{{{INST}}})", "{{instance}}")],
                  kind="state-timeline", mappings=UP_MAPPINGS),
            panel("Lease renewal failures", [q(
                f"sum by (instance) (increase(connector_lease_renewal_failures_total{{{INST}}}[{RI}]))",
                "{{instance}}")]),
        ],
    ],
}

TUNNEL = {
    "uid": "connector-tunnel",
    "title": "Connector: tunnel traffic and latency",
    "description": "Bytes and requests per mapping, request and ping latency, streams and reconnects.",
    "rows": [
        [
            panel("Bytes per mapping", [q(
                f"sum by (mapping, direction) (rate(connector_bytes_total{{{INST}}}[{RI}]))",
                "{{mapping}} {{direction}}")], unit="Bps"),
            panel("Requests per mapping", [q(
                f"sum by (mapping) (rate(connector_requests_total{{{INST}}}[{RI}]))", "{{mapping}}")],
                unit="reqps"),
        ],
        [
            panel("Request duration per mapping (node)",
                  quantiles("connector_request_duration_seconds", "mapping", INST), unit="s"),
            panel("Request duration as applications see it (proxy)",
                  quantiles("connector_proxy_request_duration_seconds", "proxy"), unit="s"),
        ],
        [
            panel("Proxy requests by status", [q(
                f"sum by (proxy, status) (rate(connector_proxy_requests_total[{RI}]))", "{{proxy}} {{status}}")],
                unit="reqps"),
            panel("Streams open", [q("sum by (instance, side) (connector_streams_open)", "{{instance}} {{side}}")]),
        ],
        [
            panel("Streams opened by protocol", [q(
                f"sum by (side, protocol) (rate(connector_streams_opened_total[{RI}]))", "{{side}} {{protocol}}")],
                unit="ops"),
            panel("Tunnel ping round-trip time", [
                *quantiles("connector_tunnel_ping_rtt_seconds", "side")[::2],
                q(f"sum by (side) (rate(connector_tunnel_ping_rtt_seconds_sum[{RI}]))"
                  f" / sum by (side) (rate(connector_tunnel_ping_rtt_seconds_count[{RI}]))", "mean {{side}}"),
            ], unit="s"),
        ],
        [
            panel("Tunnel connected", [q(
                f"max by (location, node) (connector_tunnel_connected{{{LOC}}})", "{{node}} ({{location}})")],
                kind="state-timeline", mappings=UP_MAPPINGS),
            panel("Tunnel reconnects", [q(
                f"sum by (location, node) (increase(connector_tunnel_reconnects_total{{{LOC}}}[{RI}])) or on() vector(0)",
                "{{node}} ({{location}})")]),
        ],
    ],
}

SECURITY = {
    "uid": "connector-security",
    "title": "Connector: access control and security",
    "description": "Allow-list decisions and denials, internal host errors, certificate expiry, audit.",
    "rows": [
        [
            panel("Denials by reason", [q(
                f"sum by (reason) (rate(connector_denials_total{{{INST}}}[{RI}])) or on() vector(0)", "{{reason}}")],
                unit="reqps"),
            panel("Requests by decision", [q(
                f"sum by (mapping, decision) (rate(connector_requests_total{{{INST}}}[{RI}]))",
                "{{mapping}} {{decision}}")], unit="reqps"),
        ],
        [
            panel("Share of requests denied", [q(
                f"(sum(rate(connector_denials_total{{{INST}}}[{RI}])) or on() vector(0))"
                f" / sum(rate(connector_requests_total{{{INST}}}[{RI}]))", "denied")],
                unit="percentunit", kind="stat", width=6),
            panel("Internal host errors", [q(
                f"sum by (mapping, reason) (rate(connector_internal_host_errors_total{{{INST}}}[{RI}])) or on() vector(0)",
                "{{mapping}} {{reason}}")], unit="ops", width=18),
        ],
        [
            panel("Internal-host connections: new, reused, given up", [q(
                f"sum by (mapping, outcome) (rate(connector_origin_connections_total{{{INST}}}[{RI}]))",
                "{{mapping}} {{outcome}}")], unit="ops", width=12),
            panel("Idle pooled internal-host connections", [q(
                f"sum by (mapping) (connector_origin_pool_idle_connections{{{INST}}})",
                "{{mapping}}")], width=12),
        ],
        [
            panel("Days until certificate expiry", [q(
                "min by (instance, certificate) (connector_certificate_expiry_timestamp_seconds - time()) / 86400",
                "{{instance}} {{certificate}}")], kind="bargauge", unit="d",
                thresholds=[("red", None), ("orange", 7), ("green", 30)]),
            panel("Audit lines not written", [q(
                f"sum by (instance) (increase(connector_audit_write_errors_total{{{INST}}}[{RI}]))",
                "{{instance}}")]),
        ],
        [
            panel("Certificate files that failed to reload", [q(
                f"sum by (instance, what) (increase(connector_certificate_reload_failures_total[{RI}])) or on() vector(0)",
                "{{instance}} {{what}}")]),
            panel("Tunnels refused for their certificate (cloud)", [q(
                f"sum by (reason) (rate(connector_tunnels_refused_total[{RI}])) or on() vector(0)",
                "{{reason}}")], unit="ops"),
        ],
        [
            panel("Identity providers' key fetches (cloud)", [q(
                f"sum by (uri, result) (increase(connector_trusted_issuer_key_fetches_total[{RI}])) or on() vector(0)",
                "{{uri}} {{result}}")], width=24),
        ],
        [
            panel("Refused application credentials (cloud)", [
                q(f"sum(rate(connector_proxy_auth_failures_total[{RI}]))", "refused"),
                q(f"sum(rate(connector_proxy_auth_failures_delayed_total[{RI}]))", "answered late")], unit="reqps"),
            panel("Client addresses failing authentication (cloud)", [q(
                "sum(connector_proxy_auth_failing_addresses)", "addresses")]),
        ],
        [
            panel("Application connections held (cloud)", [q(
                "sum by (instance) (connector_proxy_connections)", "{{instance}}")]),
            panel("Connections closed at a limit (cloud)", [q(
                f"sum by (reason) (rate(connector_proxy_connections_refused_total[{RI}])) or on() vector(0)",
                "{{reason}}")], unit="ops"),
        ],
        [
            panel("Streams held by applications (cloud)", [
                q("sum by (subaccount) (connector_proxy_streams_admitted)", "{{subaccount}}"),
                q("sum(connector_proxy_stream_waiting)", "waiting for a free stream")], width=8),
            panel("Tokens and client addresses holding streams (cloud)", [q(
                "sum by (kind) (connector_proxy_stream_holders)", "{{kind}}")], width=8),
            panel("Requests given no stream (cloud)", [q(
                f"sum by (subaccount, reason) (rate(connector_proxy_stream_refusals_total[{RI}])) or on() vector(0)",
                "{{subaccount}} {{reason}}")], unit="reqps", width=8),
        ],
    ],
}

ETCD = {
    "uid": "connector-etcd",
    "title": "Connector: etcd and lease health",
    "description": "etcd latency and errors as the nodes see them, lease renewals, and requests held during failover.",
    "rows": [
        [
            panel("etcd reachable", [q(f"min by (instance) (connector_etcd_up{{{INST}}})", "{{instance}}")],
                  kind="state-timeline", mappings=UP_MAPPINGS),
            panel("Lease renewal failures", [q(
                f"sum by (instance) (increase(connector_lease_renewal_failures_total{{{INST}}}[{RI}]))",
                "{{instance}}")]),
        ],
        [
            panel("etcd operation latency",
                  quantiles("connector_etcd_operation_duration_seconds", "operation", INST), unit="s"),
            panel("etcd errors by operation", [q(
                f"sum by (operation) (rate(connector_etcd_errors_total{{{INST}}}[{RI}])) or on() vector(0)",
                "{{operation}}")], unit="ops"),
        ],
        [
            panel("etcd operations", [q(
                f"sum by (operation) (rate(connector_etcd_operation_duration_seconds_count{{{INST}}}[{RI}]))",
                "{{operation}}")], unit="ops"),
            panel("Held requests waiting (cloud)", [q("sum(connector_held_requests_waiting)", "waiting")]),
        ],
        [
            panel("Held requests by outcome (cloud)", [q(
                f"sum by (outcome) (increase(connector_held_requests_total[{RI}])) or on() vector(0)", "{{outcome}}")]),
            panel("Hold duration (cloud)",
                  quantiles("connector_held_request_duration_seconds"), unit="s"),
        ],
    ],
}

ALL = {"cluster-overview": CLUSTER, "tunnel-traffic": TUNNEL, "access-control": SECURITY, "etcd-lease-health": ETCD}


# --- rendering -------------------------------------------------------------------------------

def _variables() -> list[dict[str, Any]]:
    def query_variable(name: str, label: str, definition: str) -> dict[str, Any]:
        return {
            "name": name, "label": label, "type": "query", "datasource": DS,
            "definition": definition,
            "query": {"qryType": 1, "query": definition, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [], "hide": 0, "regex": "", "skipUrlSync": False,
        }

    return [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
         "regex": "", "skipUrlSync": False},
        query_variable("cluster", "Cluster", "label_values(connector_node_role, cluster)"),
        query_variable("location", "Location", 'label_values(connector_node_role{cluster=~"$cluster"}, location)'),
        query_variable("instance", "Node instance",
                       'label_values(connector_node_role{cluster=~"$cluster", location=~"$location"}, instance)'),
    ]


def _panel_json(spec: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": spec["unit"]}
    if "mappings" in spec:
        defaults["mappings"] = spec["mappings"]
    steps = [{"color": color, "value": value} for color, value in spec.get("thresholds", [("green", None)])]
    defaults["thresholds"] = {"mode": "absolute", "steps": steps}
    body: dict[str, Any] = {
        "id": panel_id, "type": spec["kind"], "title": spec["title"], "description": spec["description"],
        "datasource": DS, "gridPos": {"h": spec["height"], "w": spec["width"], "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend or "__auto",
             "range": True, "instant": False, "editorMode": "code"}
            for i, (expr, legend) in enumerate(spec["queries"])
        ],
    }
    if spec["kind"] == "timeseries":
        body["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                           "tooltip": {"mode": "multi", "sort": "desc"}}
    elif spec["kind"] in ("stat", "bargauge"):
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return body


def render(dashboard: dict[str, Any]) -> dict[str, Any]:
    panels, panel_id, y = [], 1, 0
    for row in dashboard["rows"]:
        x = 0
        for spec in row:
            panels.append(_panel_json(spec, panel_id, x, y))
            panel_id += 1
            x += spec["width"]
        if x > 24:
            raise ValueError(f"{dashboard['uid']}: a row is {x} columns wide, the grid has 24")
        y += max(spec["height"] for spec in row)
    annotations = [
        {"name": a["name"], "datasource": DS, "enable": True, "hide": False, "iconColor": a["iconColor"],
         "expr": a["expr"], "step": "15s", "titleFormat": a["titleFormat"], "textFormat": a["textFormat"],
         "useValueForTime": False}
        for a in dashboard.get("annotations", [])
    ]
    return {
        "uid": dashboard["uid"], "title": dashboard["title"], "description": dashboard["description"],
        "tags": ["connector"], "timezone": "browser", "editable": True, "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION, "version": 1, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "links": [{"title": "Connector dashboards", "type": "dashboards", "tags": ["connector"],
                   "asDropdown": True, "includeVars": True, "keepTime": True}],
        "annotations": {"list": annotations},
        "templating": {"list": _variables()},
        "panels": panels,
    }


def rendered() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{name}.json": json.dumps(render(spec), indent=2) + "\n" for name, spec in ALL.items()}


def main() -> None:
    DASHBOARDS.mkdir(exist_ok=True)
    for name, text in rendered().items():
        (DASHBOARDS / name).write_text(text)
        print(f"wrote {DASHBOARDS / name}")


if __name__ == "__main__":
    main()
