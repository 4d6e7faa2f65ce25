"""A host name dialled at one of its addresses: a failure is described from that address."""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from connector.agent.node import Node
from connector.cli import init_certs
from connector.config import load_node_config
from tests.integration.test_tunnel_dial_errors import endpoint, node_toml


async def test_a_certificate_not_for_the_name_is_described_from_the_address_dialled(tmp_path: Path, caplog):
    certs = tmp_path / "certs"
    init_certs(certs, "acme", ["node-a"], ["127.0.0.1", "localhost"])  # not for cloud.invalid

    async def resolver(host: str, port: int) -> list[str]:
        assert host == "cloud.invalid"  # a name no DNS answers: only the injected resolver knows it
        return ["127.0.0.1"]

    async with trio.open_nursery() as nursery:
        port = await endpoint(nursery, cert=certs / "tunnel-server.pem", key=certs / "tunnel-server.key",
                              cas={"acme": certs / "acme-ca.pem"})
        path = node_toml(tmp_path, port, ca=certs / "cloud-ca.pem", cert=certs / "node-node-a.pem",
                         key=certs / "node-node-a.key", host="cloud.invalid")
        node = Node(load_node_config(path), resolver=resolver)
        with caplog.at_level(logging.WARNING, logger="connector.agent.node"), trio.fail_after(10):
            await nursery.start(node.run)
            reason = await node.wait_tunnel_failure()
        nursery.cancel_scope.cancel()
    assert f"cloud.invalid:{port} (at 127.0.0.1) failed verification" in reason
    assert "the node dialled 'cloud.invalid', the certificate names '127.0.0.1', 'localhost'" in reason
