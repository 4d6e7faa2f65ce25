"""Every dashboard query and alert rule, evaluated by a real Prometheus scraping a real demo cluster.

The proof against the real thing (the unit tests use promtool on synthetic series): one
module-scoped scenario starts `connector.demo.Demo` (etcd, cloud side, two nodes, internal host,
all real processes on 127.0.0.1), checks that the state names every component's metrics URL
(keys ending in ``metrics_url``) and that each serves the text exposition format, starts
Debian's ``prometheus`` (tests/support/prometheus.py) scraping every URL each second with
grafana/alerts/connector-rules.yml loaded, and generates representative traffic:

- a graceful handover: SIGTERM to the master node while three clients send requests (some are
  held by the cloud until the new master registers; repeated, at most 3 times, until one was),
  then the old node is restarted as shadow;
- allowed GETs and a POST, a denied path (403), an unmapped virtual host (403), a SOCKS5
  session to the TCP echo mapping;
- last, the internal host is killed and one more request fails (an internal host error).

After two more scrapes it evaluates, at now, with `$cluster`/`$location`/`$instance` as `.*` and
`$__rate_interval` as 1m (what Grafana uses with its default 15 s scrape interval):

- panel targets must parse and return at least one series with a finite value: a dashboard
  panel that shows nothing is a failing test (and a label-less `vector(0)` fallback must not
  appear next to real series);
- the failover annotation must return a series (we caused a failover);
- template variable queries (Grafana's ``label_values``) must list values, through the same
  ``/api/v1/label/<name>/values?match[]=`` call Grafana makes (the demo's default location id
  "" is stored as no label: that list is empty, and the All value `.*` is checked instead);
- alert rules are the other way round: on a healthy cluster they should NOT fire, so an empty
  result is the expected answer and proves nothing about the expression. For them we assert that
  the expr parses, that Prometheus loaded and evaluates the rule without error (health "ok"), that
  every metric the expr names has series (so the rule watches something real), and that it
  returns nothing now, except ConnectorFailover, which must fire after the handover.

The scenario runs once (sync fixture driving `trio.run`); each query is then its own test, so a
failure names the dashboard, panel and target. Everything is bounded by SCENARIO_TIMEOUT.
Run it alone with `pytest tests/integration/test_prometheus_live.py -q` (needs etcd and prometheus).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from connector.admin import http_request
from connector.demo import Demo, DemoSpec
from tests.support.httpclient import HttpClient
from tests.support.prometheus import Prometheus, PrometheusError, find_prometheus, scrape_targets
from tests.support.socks import socks5_connect

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
RULES = GRAFANA / "alerts" / "connector-rules.yml"
SCENARIO_TIMEOUT = 50.0
HANDOVER_TIMEOUT = 15.0
HANDOVER_ATTEMPTS = 3
LOAD_WORKERS = 3
LOAD_MAX_REQUESTS = 300  # per worker; the handover normally takes one to two seconds
METRIC_NAME = re.compile(r"\bconnector_[a-zA-Z0-9_]*")
LABEL_VALUES = re.compile(r"^label_values\((?P<match>.*),\s*(?P<label>\w+)\)$", re.S)
# What Grafana substitutes before a query reaches Prometheus. `$__rate_interval` is
# max($__interval + scrape interval, 4 x scrape interval): 1m with Grafana's default 15 s.
SUBSTITUTIONS = {
    "__rate_interval": "1m", "__interval": "15s", "__range": "1m", "__range_s": "60", "__range_ms": "60000",
    "__interval_ms": "15000", "cluster": ".*", "location": ".*", "instance": ".*",
}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
ALERT_EXPECTED_FIRING = {"ConnectorFailover"}  # the scenario hands over on purpose
ALL_LOCATIONS = 'count(connector_node_role{location=~".*"})'

# Components of the demo state that are not connector processes and export no metrics.
NOT_EXPORTING = {"backend": "the internal host stands for the customer's system; it is not part of the connector"}
# Known gaps in product code (not in the dashboards or this test): component -> reason.
KNOWN_GAPS: dict[str, str] = {}


# --- what is evaluated (read at collection time) ----------------------------------------------

def substitute(expr: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in SUBSTITUTIONS:
            raise KeyError(f"no substitution for ${name} in {expr}")
        return SUBSTITUTIONS[name]

    return VARIABLE.sub(replace, expr)


def _dashboards() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, json.loads(path.read_text())) for path in DASHBOARD_FILES]


def panel_targets() -> Iterator[tuple[str, str]]:
    for name, board in _dashboards():
        for panel in board["panels"]:
            for target in panel["targets"]:
                yield f"{name}: {panel['title']} [{target['refId']}]", target["expr"]


def annotation_exprs() -> Iterator[tuple[str, str]]:
    for name, board in _dashboards():
        for annotation in board["annotations"]["list"]:
            yield f"{name}: annotation {annotation['name']}", annotation["expr"]


def variables() -> Iterator[tuple[str, str]]:
    for name, board in _dashboards():
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                yield f"{name}: variable {variable['name']}", variable["definition"]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


PANELS = dict(panel_targets())
ANNOTATIONS = dict(annotation_exprs())
VARIABLES = dict(variables())
RULE_EXPRS = {rule.get("alert") or rule["record"]: rule["expr"] for rule in alert_rules()}
COMPONENTS = ["cloud", *(f"nodes.{node}" for node in DemoSpec().nodes), "etcd"]


# --- the scenario --------------------------------------------------------------------------

@attrs.define
class Observations:
    """Everything the scenario saw; the tests below only read it."""

    state: dict[str, Any]
    expositions: dict[str, str] = attrs.Factory(dict)  # component -> "" if fine, else what is wrong
    traffic: dict[str, Any] = attrs.Factory(dict)
    results: dict[str, list[dict[str, Any]] | PrometheusError] = attrs.Factory(dict)  # substituted expr -> result
    label_values: dict[str, list[str] | PrometheusError] = attrs.Factory(dict)
    rules: dict[str, dict[str, Any]] = attrs.Factory(dict)  # name -> /api/v1/rules entry


def _component(state: dict[str, Any], path: str) -> dict[str, Any] | None:
    node: Any = state
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


async def _check_exposition(url: str, family: str | None) -> str:
    """'' if `url` serves Prometheus text exposition (with metric `family`, if named), else the problem."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.rpartition(":")
    client = await HttpClient.connect(int(port), host)
    try:
        response = await client.request("GET", "/" + path, [("host", host_port)])
    finally:
        await client.aclose()
    if response.status != 200:
        return f"HTTP {response.status}"
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/plain"):
        return f"content-type {content_type!r}"
    names = {family.name for family in text_string_to_metric_families(response.body.decode())}
    if not names:
        return "no metrics"
    if family is not None and not names & {family, family.removesuffix("_info")}:
        return f"no {family} among {sorted(names)[:5]}..."
    return ""


async def _proxy_get(state: dict[str, Any], url: str, method: str = "GET", body: bytes | None = None) -> int:
    client = await HttpClient.connect(state["cloud"]["http_proxy_port"])
    try:
        response = await client.request(method, url, [("Proxy-Authorization", f"Bearer {state['token']}")], body)
        return response.status
    finally:
        await client.aclose()


async def _cloud_status(state: dict[str, Any]) -> dict[str, Any]:
    status, body = await http_request("127.0.0.1", state["cloud"]["admin_port"], "/status", timeout=2.0)
    assert status == 200, body
    (location,) = json.loads(body)["locations"]
    return dict(location)


async def _wait_location(state: dict[str, Any], predicate: Any) -> dict[str, Any]:
    with trio.fail_after(HANDOVER_TIMEOUT):
        while True:
            location = await _cloud_status(state)
            if predicate(location):
                return location
            await trio.sleep(0.02)  # other processes (the demo's cloud): its admin API is all there is to poll


async def _held_requests(state: dict[str, Any]) -> float:
    """connector_held_requests_total summed over outcomes, read from the cloud's /metrics."""
    status, body = await http_request("127.0.0.1", state["cloud"]["admin_port"], "/metrics", timeout=2.0)
    assert status == 200, body
    return sum(sample.value for family in text_string_to_metric_families(body.decode())
               for sample in family.samples if sample.name == "connector_held_requests_total")


async def _handover(demo: Demo, state: dict[str, Any], observed: Observations) -> None:
    """SIGTERM the master under load; wait for the new master; restart the old one as shadow.

    The cloud holds requests that arrive between the old master draining and the new one
    registering (the failover metrics and alerts watch them). That window is a few milliseconds,
    so the load is three back-to-back clients; if none of their requests fell into it, hand over
    again (at most HANDOVER_ATTEMPTS times) rather than report the hold metrics as missing.
    """
    handovers = observed.traffic.setdefault("handovers", [])
    for _ in range(HANDOVER_ATTEMPTS):
        old = (await _cloud_status(state))["master"]
        statuses: list[int | str] = []

        async def load(stop: trio.Event, statuses: list[int | str] = statuses) -> None:
            for _ in range(LOAD_MAX_REQUESTS):
                if stop.is_set():
                    return
                try:
                    statuses.append(await _proxy_get(state, "http://erp.virtual:8000/sap/opu/odata/handover"))
                except OSError as exc:
                    statuses.append(repr(exc))

        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(LOAD_WORKERS):
                nursery.start_soon(load, stop)
            await trio.sleep(0.2)  # the scenario: traffic under way before the handover
            demo.processes[old].send_signal(signal.SIGTERM)
            new = await _wait_location(state, lambda loc, old=old: loc["master"] not in (None, old))
            await trio.sleep(0.2)  # ... and after it
            stop.set()
        with trio.fail_after(HANDOVER_TIMEOUT):
            await demo.processes[old].wait()
        await demo.start_node(old)
        await _wait_location(state, lambda loc: len(loc["tunnels"]) == len(demo.spec.nodes))
        held = await _held_requests(state)
        handovers.append({"old": old, "new": new["master"], "statuses": statuses, "held": held})
        if held:
            return


async def _requests(state: dict[str, Any], observed: Observations, round_: int) -> None:
    """One round of every kind of request; each round is a separate dict in traffic["rounds"]."""
    odata = "http://erp.virtual:8000/sap/opu/odata/"
    seen: dict[str, Any] = {}
    seen["allowed"] = [await _proxy_get(state, odata + f"Products({round_}{i})") for i in range(5)]
    seen["post"] = await _proxy_get(state, odata + "Orders", "POST", b'{"qty": 1}')
    seen["denied_path"] = await _proxy_get(state, "http://erp.virtual:8000/forbidden")
    seen["unmapped_host"] = await _proxy_get(state, "http://nowhere.virtual:8000/")
    stream, code = await socks5_connect(state["cloud"]["socks5_port"], "echo.virtual", 7000,
                                        token=state["token"], subaccount=state["subaccount"])
    echoed = b""
    if code == 0:
        await stream.send_all(b"ping over socks5")
        with trio.fail_after(5.0):
            while len(echoed) < len(b"ping over socks5"):
                chunk = await stream.receive_some(1024)
                if not chunk:
                    break
                echoed += chunk
    await stream.aclose()
    seen["socks5"] = (code, echoed)
    observed.traffic.setdefault("rounds", []).append(seen)


async def _traffic(demo: Demo, prometheus: Prometheus, state: dict[str, Any], observed: Observations) -> None:
    """Two rounds of requests with a scrape between them, so that rates at now are not zero (as on a
    cluster in use); then the internal host goes away and one request fails."""
    await _requests(state, observed, 1)
    await prometheus.wait_scraped_since(time.time())
    await _requests(state, observed, 2)
    backend = demo.processes["backend"]
    backend.kill()
    await backend.wait()
    observed.traffic["internal_host_down"] = await _proxy_get(state, "http://erp.virtual:8000/sap/opu/odata/X")


async def _evaluate(prometheus: Prometheus, observed: Observations) -> None:
    exprs = {*PANELS.values(), *ANNOTATIONS.values(), *RULE_EXPRS.values()}
    names = {name for expr in RULE_EXPRS.values() for name in METRIC_NAME.findall(expr)}
    for expr in sorted({substitute(e) for e in exprs} | names | {ALL_LOCATIONS}):
        try:
            observed.results[expr] = await prometheus.query(expr)
        except PrometheusError as exc:
            observed.results[expr] = exc
    for definition in VARIABLES.values():
        match = LABEL_VALUES.match(definition)
        assert match, f"not a label_values() query: {definition}"
        try:
            observed.label_values[definition] = await prometheus.label_values(
                match["label"], substitute(match["match"]))
        except PrometheusError as exc:
            observed.label_values[definition] = exc
    for group in await prometheus.rule_groups():
        for rule in group["rules"]:
            observed.rules[rule["name"]] = rule


async def _scenario(workdir: Path, prometheus_binary: str) -> Observations:
    demo = Demo(workdir / "demo", DemoSpec(http_port=0, socks5_port=0))
    prometheus: Prometheus | None = None
    try:
        with trio.fail_after(SCENARIO_TIMEOUT):
            (workdir / "demo").mkdir()
            state = await demo.start()
            observed = Observations(state=state)
            for component in COMPONENTS:
                info = _component(state, component) or {}
                urls = [value for key, value in info.items() if key.endswith("metrics_url")]
                observed.expositions[component] = (
                    "no key ending in metrics_url" if not urls
                    else await _check_exposition(urls[0], None if component == "etcd" else "connector_build_info"))
            prometheus = Prometheus(workdir / "prometheus", scrape_targets(state), [RULES], prometheus_binary)
            await prometheus.start()
            await _handover(demo, state, observed)
            await _traffic(demo, prometheus, state, observed)
            await prometheus.wait_two_scrapes()
            await _evaluate(prometheus, observed)
            return observed
    finally:
        with trio.CancelScope(shield=True):
            if prometheus is not None:
                await prometheus.stop()
            await demo.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Observations:
    binary = find_prometheus()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is required under CI (install Debian's `prometheus` package)")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    started = time.monotonic()
    observed = trio.run(_scenario, tmp_path_factory.mktemp("prometheus-live"), binary)
    observed.traffic["seconds"] = round(time.monotonic() - started, 1)
    return observed


def _result(observed: Observations, expr: str) -> list[dict[str, Any]]:
    result = observed.results[expr]
    if isinstance(result, PrometheusError):
        pytest.fail(f"Prometheus rejected {expr}: {result}")
    return result


def _finite(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in samples if math.isfinite(float(s["value"][1]))]


# --- the tests -----------------------------------------------------------------------------

def _component_param(component: str) -> Any:
    marks = [pytest.mark.xfail(reason=KNOWN_GAPS[component], strict=False)] if component in KNOWN_GAPS else []
    return pytest.param(component, marks=marks, id=component)


@pytest.mark.parametrize("component", [_component_param(c) for c in COMPONENTS])
def test_component_names_its_metrics_url_serving_text_exposition(live: Observations, component: str) -> None:
    assert live.expositions[component] == "", f"{component}: {live.expositions[component]}"


def test_state_components_are_all_checked(live: Observations) -> None:
    """A component added to the demo state must be added to COMPONENTS (or NOT_EXPORTING)."""
    processes = {key for key, value in live.state.items() if isinstance(value, dict) and "pid" in value}
    processes |= {f"nodes.{name}" for name in live.state["nodes"]}
    assert processes == set(COMPONENTS) | set(NOT_EXPORTING)


def test_traffic_was_representative(live: Observations) -> None:
    traffic = live.traffic
    for handover in traffic["handovers"]:
        assert handover["new"] != handover["old"], handover
        assert handover["statuses"], "no request was sent during the handover"
    assert traffic["handovers"][-1]["held"] > 0, "no request was held during any handover"
    for seen in traffic["rounds"]:
        assert seen["allowed"] == [200] * 5 and seen["post"] == 200, seen
        assert seen["denied_path"] == 403 and seen["unmapped_host"] == 403, seen
        assert seen["socks5"] == (0, b"ping over socks5"), seen
    assert traffic["internal_host_down"] in (502, 503, 504), traffic
    assert traffic["seconds"] < 60, traffic


@pytest.mark.parametrize("where", list(PANELS))
def test_panel_shows_data(live: Observations, where: str) -> None:
    expr = substitute(PANELS[where])
    samples = _result(live, expr)
    assert samples, f"{where}: no series for {expr}"
    assert _finite(samples), f"{where}: only NaN/Inf for {expr}: {samples}"
    # A fallback (`or on() vector(0)`) shows only when there is nothing else to show.
    fallbacks = [s for s in samples if not s["metric"]]
    assert not (fallbacks and len(samples) > 1), f"{where}: a label-less series next to real ones: {samples}"


@pytest.mark.parametrize("where", list(ANNOTATIONS))
def test_annotation_marks_the_failover(live: Observations, where: str) -> None:
    expr = substitute(ANNOTATIONS[where])
    assert _result(live, expr), f"{where}: the handover is not annotated ({expr})"


@pytest.mark.parametrize("where", list(VARIABLES))
def test_variable_lists_values(live: Observations, where: str) -> None:
    definition = VARIABLES[where]
    values = live.label_values[definition]
    if isinstance(values, PrometheusError):
        pytest.fail(f"Prometheus rejected {definition}: {values}")
    label = LABEL_VALUES.match(definition)["label"]  # type: ignore[index]
    if label == "location" and live.state["location_id"] == "":
        # The demo uses the default location, id "": Prometheus does not store empty labels, so
        # the list is empty; the variable's All value (.*) still selects every series.
        assert values == []
        assert _result(live, ALL_LOCATIONS)
        return
    assert values, f"{where}: {definition} lists nothing"


@pytest.mark.parametrize("name", list(RULE_EXPRS))
def test_rule_parses_and_prometheus_evaluates_it(live: Observations, name: str) -> None:
    _result(live, RULE_EXPRS[name])
    rule = live.rules[name]
    assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"


@pytest.mark.parametrize("name", list(RULE_EXPRS))
def test_rule_watches_metrics_that_exist(live: Observations, name: str) -> None:
    names = sorted(set(METRIC_NAME.findall(RULE_EXPRS[name])))
    assert names, f"{name} names no connector metric"
    empty = [metric for metric in names if not _result(live, metric)]
    assert empty == [], f"{name}: no series for {empty}"


@pytest.mark.parametrize("name", list(RULE_EXPRS))
def test_rule_is_quiet_on_a_healthy_cluster(live: Observations, name: str) -> None:
    samples = _result(live, RULE_EXPRS[name])
    if name in ALERT_EXPECTED_FIRING:
        assert samples, f"{name} should fire after the handover"
    else:
        assert samples == [], f"{name} fires on a healthy cluster: {samples}"
