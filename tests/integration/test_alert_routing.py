"""A rule that fires on a running demo reaches a webhook, through the shipped Alertmanager routing.

The chain operators rely on, each link real: the demo cluster (`connector.demo.Demo`: etcd, cloud
side, two nodes, internal host), Debian's ``prometheus`` scraping the cloud side every second with
grafana/alerts/connector-rules.yml loaded and sending to Debian's ``prometheus-alertmanager``
(tests/support/alertmanager.py), whose configuration is the shipped grafana/alerts/alertmanager.yml
with only the webhook URLs pointed at this test's own HTTP receiver (paths kept, so the receiver
sees which route was taken; routing, grouping and timings are the shipped ones).

The alert is ConnectorHeldRequestsTimingOut (critical, no `for`): it is the one a running cluster
can be made to raise in seconds, and it is what an outage looks like from the cloud. Both nodes
are stopped (SIGTERM), so the location has no master; the demo runs with a 1 s hold, so a request
is held and answered 503 with outcome "timeout". One is enough: the counter is exported at 0 from
the cloud's start, so `increase()` sees the first timeout (it once was created by it, and the first
timeout of a process never alerted).
The shipped route for critical alerts waits 10 s (group_wait) before it notifies: the webhook then
must receive the alert, firing, on the critical receiver's path, with the rule's labels (severity,
the cloud's job and instance) and its annotations. Bounded by SCENARIO_TIMEOUT.
Run it alone with `pytest tests/integration/test_alert_routing.py -q` (needs etcd, prometheus and
prometheus-alertmanager; skipped without the last two unless CI is set).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from connector.demo import Demo, DemoSpec
from tests.support.alertmanager import (
    Alertmanager,
    Notification,
    WebhookReceiver,
    find_alertmanager,
    with_webhooks,
)
from tests.support.httpclient import HttpClient
from tests.support.prometheus import Prometheus, find_prometheus, scrape_targets

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "grafana" / "alerts" / "connector-rules.yml"
ALERTMANAGER_CONFIG = ROOT / "grafana" / "alerts" / "alertmanager.yml"
ALERT = "ConnectorHeldRequestsTimingOut"
HOLD_SECONDS = 1.0  # the demo's failover hold: how long a request waits for a master
SCENARIO_TIMEOUT = 60.0
STEP_TIMEOUT = 15.0  # the nodes stopping
# The shipped route's group_wait for critical alerts (10 s) plus evaluation and delivery.
NOTIFY_TIMEOUT = 25.0


def _binaries() -> tuple[str, str]:
    prometheus, alertmanager = find_prometheus(), find_alertmanager()
    missing = [name for name, path in (("prometheus", prometheus), ("prometheus-alertmanager", alertmanager))
               if path is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{' and '.join(missing)} required under CI (Debian packages of the same names)")
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install {' '.join(missing)})")
    assert prometheus is not None and alertmanager is not None
    return prometheus, alertmanager


def _critical_path(config: dict[str, Any]) -> str:
    """The URL path of the shipped critical receiver's webhook."""
    (receiver,) = [r for r in config["receivers"] if r["name"] == "connector-critical"]
    url: str = receiver["webhook_configs"][0]["url"]
    return "/" + url.split("://", 1)[1].partition("/")[2]


async def _timed_out_request(state: dict[str, Any]) -> int:
    client = await HttpClient.connect(state["cloud"]["http_proxy_port"])
    try:
        response = await client.request("GET", "http://erp.virtual:8000/sap/opu/odata/held",
                                         [("Proxy-Authorization", f"Bearer {state['token']}")])
        return response.status
    finally:
        await client.aclose()


async def test_firing_rule_reaches_the_webhook_of_its_route(tmp_path: Path) -> None:
    prometheus_binary, alertmanager_binary = _binaries()
    shipped = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    critical_path = _critical_path(shipped)
    paths = sorted({"/" + w["url"].split("://", 1)[1].partition("/")[2]
                    for r in shipped["receivers"] for w in r.get("webhook_configs", [])})
    receiver = WebhookReceiver(paths)
    demo = Demo(tmp_path / "demo", DemoSpec(http_port=0, socks5_port=0, hold_seconds=HOLD_SECONDS))
    alertmanager: Alertmanager | None = None
    prometheus: Prometheus | None = None
    try:
        with trio.fail_after(SCENARIO_TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(receiver.run)
                (tmp_path / "demo").mkdir()
                state = await demo.start()
                alertmanager = Alertmanager(tmp_path / "alertmanager", with_webhooks(shipped, receiver.url),
                                            alertmanager_binary)
                await alertmanager.start()
                cloud = [t for t in scrape_targets(state) if t.job == "cloud"]  # the nodes are stopped below
                prometheus = Prometheus(tmp_path / "prometheus", cloud, [RULES], prometheus_binary,
                                        alertmanagers=[alertmanager.address])
                await prometheus.start()

                for node in state["nodes"]:
                    demo.processes[node].send_signal(signal.SIGTERM)
                with trio.fail_after(STEP_TIMEOUT):
                    for node in state["nodes"]:
                        await demo.processes[node].wait()
                # Prometheus has scraped the cloud (start() waits for it): the counter at 0, before any timeout
                assert await _timed_out_request(state) == 503

                def is_the_alert(notification: Notification, alert: dict[str, Any]) -> bool:
                    return alert["labels"].get("alertname") == ALERT

                try:
                    with trio.fail_after(NOTIFY_TIMEOUT):
                        notification, alert = await receiver.wait_alert(is_the_alert)
                except trio.TooSlowError:
                    pytest.fail(f"{ALERT} never reached the webhook; Alertmanager holds {await alertmanager.alerts()}, "
                                f"the webhook got {receiver.notifications}")
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if prometheus is not None:
                await prometheus.stop()
            if alertmanager is not None:
                await alertmanager.stop()
            await demo.stop()

    assert notification.path == critical_path, notification
    assert notification.payload["receiver"] == "connector-critical"
    assert notification.payload["status"] == "firing"
    assert notification.payload["groupLabels"] == {"alertname": ALERT}
    labels = alert["labels"]
    assert labels["severity"] == "critical"
    assert labels["job"] == "cloud"
    assert labels["instance"] == cloud[0].address
    assert alert["status"] == "firing"
    assert cloud[0].address in alert["annotations"]["summary"]
    assert alert["annotations"]["runbook_url"] == f"docs/runbook.md#{ALERT.lower()}"
