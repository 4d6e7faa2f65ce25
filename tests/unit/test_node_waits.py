"""The node's `wait_*` methods: each returns once its state is reached (at once if it already
is), and not before. The state is changed through the node's own handlers, without a cloud."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from connector.agent.node import Node, ReplicaTunnel
from connector.cli import init_certs
from connector.config import load_node_config
from connector.tunnel.dial import DialTarget
from connector.tunnel.types import StreamProtocol, Target

ERP = Target("erp.virtual", 8000, StreamProtocol.HTTP)
AT_ONCE = 1.0  # bounds a wait whose state is reached already (virtual time: a hang fails fast)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return init_certs(tmp_path_factory.mktemp("certs"), "acme", ["node-a"], ["127.0.0.1"])


@pytest.fixture
def node(tmp_path: Path, certs: dict[str, Path]) -> Node:
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
id = "node-a"
subaccount = "acme"
[tunnel]
url = "wss://127.0.0.1:8443/tunnel"
ca = "{certs['cloud_ca']}"
cert = "{certs['node_node-a_cert']}"
key = "{certs['node_node-a_key']}"
[[mappings]]
virtual_host = "erp.virtual"
virtual_port = 8000
internal_host = "127.0.0.1"
internal_port = 1
protocol = "HTTP"
resources = [{{ path = "/", prefix = true }}]
""")
    return Node(load_node_config(path))


def tunnel(node: Node, replica: str) -> ReplicaTunnel:
    """A tunnel as the node holds it once the HELLO passed (its session is not used here)."""
    held = ReplicaTunnel(DialTarget(f"wss://{replica}:8443/tunnel"), None, replica)  # type: ignore[arg-type]
    node.tunnels[replica] = held
    return held


class Returned:
    """When (virtual time) each started wait returned, and with what."""

    def __init__(self) -> None:
        self.at: list[tuple[object, float]] = []

    def start(self, nursery: trio.Nursery, wait, *args, **kwargs) -> None:
        async def run() -> None:
            self.at.append((await wait(*args, **kwargs), trio.current_time()))

        nursery.start_soon(run)


async def test_wait_registered(node, nursery, autojump_clock):
    returned = Returned()
    returned.start(nursery, node.wait_registered)
    cloud_a = tunnel(node, "cloud-a")
    node.poke()  # a tunnel came up, as a standby: not registered
    await trio.sleep(1.0)
    assert returned.at == []
    await node._on_control(cloud_a, "registered", {"epoch": 7})
    await trio.testing.wait_all_tasks_blocked()
    assert returned.at == [(7, 1.0)]
    with trio.fail_after(AT_ONCE):
        assert await node.wait_registered() == 7  # already registered: at once
    assert trio.current_time() == 1.0


async def test_wait_refused(node, nursery, autojump_clock):
    returned = Returned()
    returned.start(nursery, node.wait_refused)
    cloud_a = tunnel(node, "cloud-a")
    await node._on_control(cloud_a, "registered", {"epoch": 1})
    await trio.sleep(1.0)
    assert returned.at == []
    await node._on_control(cloud_a, "refused", {"reason": "wrong_cluster", "message": "served by 'beta'"})
    await trio.testing.wait_all_tasks_blocked()
    assert returned.at == [("wrong_cluster: served by 'beta'", 1.0)]
    with trio.fail_after(AT_ONCE):
        assert await node.wait_refused() == "wrong_cluster: served by 'beta'"


async def test_wait_mapping(node, nursery, autojump_clock):
    mappings = node.acl.mappings
    with trio.fail_after(AT_ONCE):
        await node.wait_mapping(ERP)  # configured: at once
    returned = Returned()
    returned.start(nursery, node.wait_mapping, ERP, present=False)
    await trio.sleep(1.0)
    assert returned.at == []
    node._apply_mappings([], revision=2)
    await trio.testing.wait_all_tasks_blocked()
    assert returned.at == [(None, 1.0)]

    returned.start(nursery, node.wait_mapping, ERP)
    node._apply_mappings([], revision=3)  # another change that does not bring it back
    await trio.sleep(1.0)
    assert returned.at == [(None, 1.0)]
    node._apply_mappings(mappings, revision=4)
    await trio.testing.wait_all_tasks_blocked()
    assert returned.at == [(None, 1.0), (None, 2.0)]


async def test_wait_tunnel_failures_counts_from_start(node, nursery, autojump_clock):
    target = DialTarget("wss://127.0.0.1:8443/tunnel")
    returned = Returned()
    returned.start(nursery, node.wait_tunnel_failures, 2)
    node._tunnel_failed_because(target, "first")
    await trio.sleep(1.0)
    assert returned.at == []  # one failure is not two
    node._tunnel_failed_because(target, "second")
    await trio.testing.wait_all_tasks_blocked()
    assert returned.at == [("second", 1.0)]
    with trio.fail_after(AT_ONCE):
        assert await node.wait_tunnel_failures(1) == "second"  # happened already: at once


async def test_wait_master_lost_reports(node, nursery, autojump_clock):
    cloud_a, cloud_b = tunnel(node, "cloud-a"), tunnel(node, "cloud-b")
    returned = Returned()
    returned.start(nursery, node.wait_master_lost_reports, 2)
    await node._on_control(cloud_a, "master_lost", {"epoch": 5, "node": "node-b"})
    await trio.sleep(1.0)
    assert returned.at == []
    # the second report makes the hint and is forgotten as a report: it still counts as heard
    await node._on_control(cloud_b, "master_lost", {"epoch": 5, "node": "node-b"})
    await trio.testing.wait_all_tasks_blocked()
    assert returned.at == [(None, 1.0)]
    assert node._lost_reports.reports == {}
    with trio.fail_after(AT_ONCE):
        await node.wait_master_lost_reports(1)
