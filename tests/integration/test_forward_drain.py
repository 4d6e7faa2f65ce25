"""Which streams a node serves around a handover (`Node._serve_stream`), through a real tunnel
session pair and a real backend: a node the cloud has not registered as master refuses a stream
with REFUSED before reading anything (the cloud may replay it on the master), and a node handing
over still serves a stream the cloud routed to it before it processed the drain.

(With tunnel protocol 2 there is no kept-alive stream to end between requests: each request has
its own stream, so protocol 1's drain-between-requests tests are gone.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from test_forward_support import HttpBackend, serve

from connector.agent.node import Node, ReplicaTunnel
from connector.cli import init_certs
from connector.config import load_node_config
from connector.tunnel.session import TunnelSession
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, StreamResetError, Target
from tests.support.exchangeclient import request, request_head, start_pair

TARGET = Target("erp.virtual", 8000)


def make_node(tmp_path: Path, port: int) -> Node:
    certs = init_certs(tmp_path / "certs", "acme", ["node-a"], ["127.0.0.1"])  # the node dials no tunnel here
    (tmp_path / "node.pem").symlink_to(certs["node_node-a_cert"])
    (tmp_path / "node.key").symlink_to(certs["node_node-a_key"])
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
id = "node-a"
subaccount = "acme"
[tunnel]
url = "wss://127.0.0.1:8443/tunnel"
cert = "node.pem"
key = "node.key"
[[mappings]]
virtual_host = "erp.virtual"
virtual_port = 8000
internal_host = "127.0.0.1"
internal_port = {port}
resources = [{{ path = "/sap", prefix = true }}]
""")
    return Node(load_node_config(path))


async def start(nursery: trio.Nursery, tmp_path: Path, *, epoch: int | None,
                draining: bool = False) -> tuple[HttpBackend, Node, TunnelSession, trio.Event]:
    """A backend, a node with one mapping to it, and a session pair whose node end serves
    streams with `Node._serve_stream` (as the node's tunnel does); `done` once one stream ended."""
    backend = HttpBackend()
    port = await serve(nursery, backend.handle)
    node = make_node(tmp_path, port)
    node._draining = draining
    # _serve_stream reads only the registration of the tunnel a stream came on
    tunnel = ReplicaTunnel(target=None, session=None, replica="r1", registered_epoch=epoch)  # type: ignore[arg-type]
    done = trio.Event()

    async def handler(stream: TunnelStream) -> None:
        try:
            await node._serve_stream(tunnel, stream)
        finally:
            done.set()

    cloud = await start_pair(nursery, handler)
    return backend, node, cloud, done


async def test_a_node_not_registered_as_master_refuses_before_reading(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend, node, cloud, done = await start(nursery, tmp_path, epoch=None)
    stream = await cloud.open_stream(TARGET)
    await stream.send_head(request_head(b"POST", b"/sap/a", [(b"content-length", b"5")]))
    await stream.send_all(b"hello")
    with pytest.raises(StreamResetError) as caught, trio.fail_after(5):
        await stream.receive_head()
    assert caught.value.code == ErrorCode.REFUSED
    assert "not the master" in caught.value.reason
    assert not stream.peer_started  # the cloud's replay rule: the node processed nothing
    assert backend.connections == 0
    with trio.fail_after(5):
        await done.wait()
    assert node.audit.records("request") == []


@pytest.mark.parametrize("draining", [False, True], ids=["master", "handing_over"])
async def test_a_stream_routed_to_the_master_is_served_even_while_it_hands_over(
    nursery: trio.Nursery, tmp_path: Path, draining: bool,
) -> None:
    """`_begin_drain` clears the registration; a stream the cloud routed here before it took the
    drain is still this node's to serve (the cloud's fence, not this check, stops a replaced master)."""
    backend, node, cloud, done = await start(nursery, tmp_path, epoch=None if draining else 3,
                                                 draining=draining)
    reply = await request(cloud, TARGET, request_head(b"POST", b"/sap/a", body=b"hello"), b"hello")
    assert (reply.status, reply.json()["body_len"]) == (200, 5)
    assert backend.requests[0]["target"] == "/sap/a"
    with trio.fail_after(5):
        await done.wait()
    (line,) = node.audit.records("request")
    assert (line["decision"], line["status"], line["subaccount"]) == ("allowed", 200, "acme")
