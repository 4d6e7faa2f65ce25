"""Failover with every node behind an HTTP proxy (Debian's tinyproxy on 127.0.0.1).

The demo cluster's nodes (real processes) reach the cloud only through ``CONNECT`` to tinyproxy
(``[tunnel] proxy``); the master is killed with SIGKILL under load and the shadow takes over
through the proxy, with the same checks as `test_drills.test_kill9_master_under_steady_load`.
"""

from __future__ import annotations

from pathlib import Path

from tests.failover.harness import Cluster, fast_spec, run_drill
from tests.support.tinyproxy import TinyProxy


async def test_kill9_master_with_every_node_behind_a_proxy(tmp_path: Path) -> None:
    proxy = TinyProxy(tmp_path)
    proxy.start()
    try:
        async with Cluster(fast_spec(tunnel_extra=f'proxy = "{proxy.url}"')) as cluster:
            for node in cluster.nodes:
                assert (await cluster.node_status(node))["proxy"] == proxy.url
            tunnel = f"CONNECT 127.0.0.1:{cluster.demo.ports['tunnel']} "
            before = proxy.log().count(tunnel)
            assert before >= len(cluster.nodes), proxy.log()  # every node's tunnel went through it

            result = await run_drill(cluster, "crash", "kill9-egress")

            assert result.problems == [], result.problems
            assert result.new_epoch is not None and result.new_epoch > result.old_epoch
            assert result.takeover is not None and result.takeover < 3.0, result
            # tinyproxy's relay adds tens of milliseconds per request (about half the direct rate)
            assert result.requests > 10
            status = await cluster.node_status(str(result.new_master))
            assert status["role"] == "master" and status["proxy"] == proxy.url, status
    finally:
        proxy.kill()
