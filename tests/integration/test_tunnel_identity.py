"""Who a node is, as the cloud sees it: the certificate speaks, the HELLO does not.

Bare tunnel clients with real certificates against the real endpoint (real TLS, real sockets).
"""

from __future__ import annotations

import trio
import trio_websocket

from connector import pki
from connector.tunnel.session import TunnelSession
from connector.tunnel.types import ErrorCode
from tests.support.stack import SUBACCOUNT, start_stack


async def connect(nursery, stack, cert: str, key: str, hello: dict) -> TunnelSession:
    ctx = pki.client_context(stack.certs["cloud_ca"], stack.certs[cert], stack.certs[key])
    ws = await trio_websocket.connect_websocket_url(nursery, f"wss://127.0.0.1:{stack.ports.tunnel}/tunnel",
                                                    ssl_context=ctx)
    session = TunnelSession(ws, client=True, hello_info={"location_id": "", **hello})
    await session.handshake()
    await nursery.start(lambda task_status: session.run(task_status=task_status))
    return session


async def test_node_id_is_the_certificates_common_name(nursery, tmp_path):
    stack = await start_stack(nursery, tmp_path, with_node=False)
    session = await connect(nursery, stack, "node_node-a_cert", "node_node-a_key",
                            {"node": "node-b", "cluster": "it"})  # node-a's certificate, claiming node-b
    await session.send_control("register", {"epoch": 3})
    with trio.fail_after(5):
        await stack.cloud.registry.wait_master(SUBACCOUNT, "")
    master = stack.cloud.registry.master_of(SUBACCOUNT, "")
    assert master.node == "node-a"
    assert master.cluster == "it"
    assert [t["node"] for t in stack.cloud.registry.snapshot()[0]["tunnels"]] == ["node-a"]


async def test_a_cluster_named_in_the_certificate_is_the_only_one_a_node_may_claim(nursery, tmp_path):
    stack = await start_stack(nursery, tmp_path, with_node=False)
    directory = tmp_path / "certs"
    ca = pki.Issued(directory / f"{SUBACCOUNT}-ca.pem", directory / f"{SUBACCOUNT}-ca.key")
    bound = pki.issue(ca, directory, "node-node-c", common_name="node-c", organization=SUBACCOUNT,
                      cluster="alpha", client=True)
    stack.certs.update({"node_node-c_cert": bound.cert_path, "node_node-c_key": bound.key_path})

    liar = await connect(nursery, stack, "node_node-c_cert", "node_node-c_key", {"node": "node-c", "cluster": "beta"})
    with trio.fail_after(5):
        await liar.wait_closed()
    assert liar.close_reason == (
        ErrorCode.DENIED, "certificate_cluster: node node-c claims cluster 'beta' but its certificate binds it to 'alpha'")
    assert stack.cloud.registry.snapshot() == [] or not stack.cloud.registry.snapshot()[0]["tunnels"]

    honest = await connect(nursery, stack, "node_node-c_cert", "node_node-c_key", {"node": "node-c", "cluster": "alpha"})
    await honest.send_control("register", {"epoch": 1})
    with trio.fail_after(5):
        await stack.cloud.registry.wait_master(SUBACCOUNT, "")
    assert stack.cloud.registry.master_of(SUBACCOUNT, "").cluster == "alpha"


async def test_two_standalone_nodes_on_one_location_do_not_fence_each_other(nursery, tmp_path):
    stack = await start_stack(nursery, tmp_path, with_node=False)
    first = await connect(nursery, stack, "node_node-a_cert", "node_node-a_key", {"node": "node-a"})
    await first.send_control("register", {"epoch": 0})
    with trio.fail_after(5):
        await stack.cloud.registry.wait_master(SUBACCOUNT, "")
    second = await connect(nursery, stack, "node_node-b_cert", "node_node-b_key", {"node": "node-b"})
    with trio.fail_after(5):
        await second.wait_closed()
    assert second.close_reason == (ErrorCode.DENIED, "wrong_cluster: this location is served by cluster 'node:node-a'")
    assert not first.closed and stack.cloud.registry.master_of(SUBACCOUNT, "").node == "node-a"
