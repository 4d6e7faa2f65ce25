"""Two clusters claiming one location: the first keeps serving, the second is refused, clearly.

Real etcd (one server, two cluster prefixes: what a typo in `[cluster] name` produces), the real
cloud side and real nodes in process, real TLS and sockets. Before the fix, the second cluster's
master registered with its own (higher) etcd revision and fenced the first, whose next
registration fenced the second, and so on, with requests failing meanwhile.
"""

from __future__ import annotations

import json
import logging
import os

import trio
from prometheus_client import REGISTRY

from connector.admin import http_request
from connector.agent.runtime import build_node
from connector.config import load_node_config
from connector.tunnel.session import TunnelSession
from tests.integration.test_cluster_admin import cli
from tests.support.httpclient import HttpClient
from tests.support.stack import SUBACCOUNT, node_toml, start_stack

LOAD_CLIENTS = 3
REQUESTS_AFTER_REFUSAL = 15  # per client, once the second cluster has been refused
BODY = os.urandom(64 * 1024)


def cluster_section(etcd, name: str) -> str:
    return f"""
[cluster]
name = "{name}"
etcd = ["{etcd.url}"]
ttl = 2
loop_wait = 0.2
retry_timeout = 0.5
"""


def registrations(result: str) -> float:
    value = REGISTRY.get_sample_value(
        "connector_cloud_registrations_total", {"subaccount": SUBACCOUNT, "location": "", "result": result})
    return value or 0.0


async def start(nursery, stack, tmp_path, etcd, node: str, cluster: str):
    path = node_toml(tmp_path, stack.certs, stack.ports.tunnel, stack.backend_http, stack.backend_tcp,
                     node=node, cluster=cluster_section(etcd, cluster))
    started = build_node(load_node_config(path))
    await nursery.start(started.run)
    return started, path


async def test_second_cluster_is_refused_and_the_first_keeps_serving(nursery, tmp_path, etcd, caplog):
    caplog.set_level(logging.INFO, logger="connector")
    stack = await start_stack(nursery, tmp_path, with_node=False)
    alpha, _ = await start(nursery, stack, tmp_path, etcd, "node-a", "alpha")
    with trio.fail_after(10):
        await alpha.wait_registered()
    alpha_session: TunnelSession | None = alpha.session
    alpha_epoch = alpha.registered_epoch
    accepted_before, refused_before = registrations("accepted"), registrations("wrong_cluster")

    results: list[tuple[int, bool]] = []
    refused = trio.Event()

    async def load() -> None:
        client = await HttpClient.connect(stack.ports.http_proxy)
        after = 0
        while after < REQUESTS_AFTER_REFUSAL:
            response = await client.request("POST", "http://erp.virtual:8000/sap/opu/odata/echo",
                                             [stack.proxy_auth, ("content-type", "application/octet-stream")], BODY)
            results.append((response.status, response.body == BODY))
            after += refused.is_set()

    with trio.fail_after(30):
        async with trio.open_nursery() as load_nursery:
            for _ in range(LOAD_CLIENTS):
                load_nursery.start_soon(load)
            beta, beta_path = await start(nursery, stack, tmp_path, etcd, "node-b", "beta")
            await beta.wait_refused()
            refused.set()

    # the first cluster served throughout: one registration, no fence, no reconnect, bodies intact
    assert results and all(status == 200 and intact for status, intact in results)
    assert registrations("accepted") == accepted_before
    assert alpha.session is alpha_session and alpha.registered_epoch == alpha_epoch
    master = stack.cloud.registry.master_of(SUBACCOUNT, "")
    assert master is not None and master.node == "node-a" and master.cluster == "alpha"
    assert beta.role == "master" and beta.registered_epoch is None  # master of beta, served nowhere

    # the cloud: a metric and a clear log line naming both clusters
    assert registrations("wrong_cluster") >= refused_before + 1
    assert any("of cluster 'beta'" in r.getMessage() and "belongs to cluster 'alpha'" in r.getMessage()
               for r in caplog.records if r.name == "connector.cloud.registry")
    # the refused node: a log line, /status and /readyz say why
    assert beta.cloud_refusal == "wrong_cluster: this location is served by cluster 'alpha'"
    assert any(r.levelno == logging.ERROR and "cloud refuses this node" in r.getMessage()
               for r in caplog.records if r.name == "connector.agent.node")
    code, body = await http_request("127.0.0.1", beta.admin_port, "/readyz")
    assert code == 503 and "served by cluster 'alpha'" in json.loads(body)["reason"]
    token = stack.certs["admin_token"].read_text().strip()
    code, body = await http_request("127.0.0.1", beta.admin_port, "/status", token=token)
    status = json.loads(body)
    assert code == 200 and status["tunnel"] == "refused" and "'alpha'" in status["cloud_refusal"]
    code, _ = await http_request("127.0.0.1", alpha.admin_port, "/readyz")
    assert code == 200
    shown = await trio.to_thread.run_sync(cli, "status", "--config", str(beta_path))
    assert shown.returncode == 1, shown.stderr  # a master the cloud refuses serves nothing
    assert b"master node-b (epoch " in shown.stdout and b"REFUSED BY THE CLOUD" in shown.stdout
    assert b"node-b: the cloud refuses this node: wrong_cluster: this location is served by cluster 'alpha'" in shown.stdout
