"""Every way an operator can get the node's tunnel wrong is logged with its real cause.

A real node dials a real server on 127.0.0.1 (the cloud's own tunnel endpoint, or a plain HTTP
server, a silent one, a closed port), with certificates from `connector.pki`; each test waits for
the node's first failed attempt and asserts that its log line names the cause, not `TooSlowError`.
"""

from __future__ import annotations

import logging
import socket
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

from connector import pki
from connector.agent.node import Node
from connector.cli import init_certs
from connector.cloud.endpoint import TunnelEndpoint
from connector.cloud.registry import Registry
from connector.config import load_node_config
from connector.listen import serve_tcp

TEST_DEADLINE = 20.0
CONNECT_TIMEOUT = 2.0  # tunnel.connect_timeout of the node under test


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    init_certs(directory, "acme", ["node-a"], ["127.0.0.1", "localhost"])
    return directory


def node_toml(tmp_path: Path, port: int, *, ca: Path, cert: Path, key: Path, host: str = "127.0.0.1") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
id = "node-a"
subaccount = "acme"
[tunnel]
url = "wss://{host}:{port}/tunnel"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
connect_timeout = {CONNECT_TIMEOUT}
[admin]
listen = "127.0.0.1:0"
""")
    return path


async def endpoint(nursery: trio.Nursery, *, cert: Path, key: Path, cas: dict[str, Path]) -> int:
    registry = Registry()
    await nursery.start(registry.run)
    return int(await nursery.start(TunnelEndpoint(registry, cert=cert, key=key, subaccount_cas=cas).run,
                                   "127.0.0.1", 0))


async def first_failure(config_path: Path, caplog: pytest.LogCaptureFixture) -> str:
    """Run a node until its first failed tunnel attempt; return the warning it logged."""
    node = Node(load_node_config(config_path))
    with caplog.at_level(logging.WARNING, logger="connector.agent.node"), trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            reason = await node.wait_tunnel_failure()
            nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tunnel to ")]
    assert lines and reason in lines[0], lines
    assert "TooSlowError" not in lines[0]
    return lines[0]


async def test_node_trusting_the_wrong_ca_names_issuer_and_trusted_ca(tmp_path, certs, caplog):
    other = pki.create_ca(tmp_path / "other", "other-ca", "some other CA")
    async with trio.open_nursery() as nursery:
        port = await endpoint(nursery, cert=certs / "tunnel-server.pem", key=certs / "tunnel-server.key",
                              cas={"acme": certs / "acme-ca.pem"})
        line = await first_failure(node_toml(tmp_path, port, ca=other.cert_path, cert=certs / "node-node-a.pem",
                                             key=certs / "node-node-a.key"), caplog)
        nursery.cancel_scope.cancel()
    assert "certificate at 127.0.0.1:" in line and "failed verification" in line
    assert "unable to get local issuer certificate" in line
    assert "issued by 'CN=cloud tunnel endpoint CA,O=cloud-ca'" in line
    assert "trusts 'CN=some other CA,O=other-ca'" in line


async def test_cloud_certificate_not_naming_the_dialled_host(tmp_path, certs, caplog):
    """The README's `--host cloud.example.com` certificate, dialled by IP address."""
    server = pki.issue(pki.Issued(certs / "cloud-ca.pem", certs / "cloud-ca.key"), tmp_path / "named", "server",
                       common_name="cloud.example.com", server_names=["cloud.example.com"])
    async with trio.open_nursery() as nursery:
        port = await endpoint(nursery, cert=server.cert_path, key=server.key_path, cas={"acme": certs / "acme-ca.pem"})
        line = await first_failure(node_toml(tmp_path, port, ca=certs / "cloud-ca.pem", cert=certs / "node-node-a.pem",
                                             key=certs / "node-node-a.key"), caplog)
        nursery.cancel_scope.cancel()
    assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in line
    assert "the node dialled '127.0.0.1', the certificate names 'cloud.example.com'" in line


async def test_node_certificate_from_another_ca_is_reported_as_refused_by_the_cloud(tmp_path, certs, caplog):
    rogue_ca = pki.create_ca(tmp_path / "rogue", "acme-ca", "rogue acme CA")
    rogue = pki.issue(rogue_ca, tmp_path / "rogue", "node-node-a", common_name="node-a", organization="acme", client=True)
    async with trio.open_nursery() as nursery:
        port = await endpoint(nursery, cert=certs / "tunnel-server.pem", key=certs / "tunnel-server.key",
                              cas={"acme": certs / "acme-ca.pem"})
        line = await first_failure(node_toml(tmp_path, port, ca=certs / "cloud-ca.pem", cert=rogue.cert_path,
                                             key=rogue.key_path), caplog)
        nursery.cancel_scope.cancel()
    assert "refused this node's certificate" in line
    assert "issued by 'CN=rogue acme CA,O=acme-ca'" in line


async def test_node_certificate_of_the_wrong_subaccount_ca_is_reported_as_refused(tmp_path, certs, caplog):
    """Chains to a CA the cloud trusts (beta's) but names acme: refused right after the handshake."""
    beta_ca = pki.create_ca(tmp_path / "beta", "beta-ca", "beta connector CA")
    crossed = pki.issue(beta_ca, tmp_path / "beta", "node-x", common_name="node-a", organization="acme", client=True)
    async with trio.open_nursery() as nursery:
        port = await endpoint(nursery, cert=certs / "tunnel-server.pem", key=certs / "tunnel-server.key",
                              cas={"acme": certs / "acme-ca.pem", "beta": beta_ca.cert_path})
        line = await first_failure(node_toml(tmp_path, port, ca=certs / "cloud-ca.pem", cert=crossed.cert_path,
                                             key=crossed.key_path), caplog)
        nursery.cancel_scope.cancel()
    assert "closed the connection right after the TLS handshake" in line
    assert "refused this node's certificate" in line


async def plain_http_server(stream: trio.SocketStream) -> None:
    """An ordinary HTTP/1.1 server (as nginx or a load balancer's HTTP port): 400 to what it cannot parse."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(await stream.receive_some(65536))
    try:
        conn.next_event()
    except h11.RemoteProtocolError:
        await stream.send_all(conn.send(h11.Response(status_code=400, headers=[("Content-Length", "0")])))
    await stream.aclose()


async def test_plain_http_port_is_named_as_such(tmp_path, certs, caplog):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_tcp, plain_http_server, "127.0.0.1", 0, name="http"))
        line = await first_failure(node_toml(tmp_path, port, ca=certs / "cloud-ca.pem", cert=certs / "node-node-a.pem",
                                             key=certs / "node-node-a.key"), caplog)
        nursery.cancel_scope.cancel()
    assert f"127.0.0.1:{port} answered plain HTTP ('HTTP/1.1 400" in line


async def test_connection_refused_names_host_and_port(tmp_path, certs, caplog):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    line = await first_failure(node_toml(tmp_path, port, ca=certs / "cloud-ca.pem", cert=certs / "node-node-a.pem",
                                         key=certs / "node-node-a.key"), caplog)
    assert f"cannot connect to 127.0.0.1:{port}" in line and "refused" in line.lower()


async def test_silent_port_names_the_tls_step_and_the_deadline(tmp_path, certs, caplog):
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_tcp, silent, "127.0.0.1", 0, name="silent"))
        line = await first_failure(node_toml(tmp_path, port, ca=certs / "cloud-ca.pem", cert=certs / "node-node-a.pem",
                                             key=certs / "node-node-a.key"), caplog)
        nursery.cancel_scope.cancel()
    assert f"no TLS handshake with 127.0.0.1:{port} within {CONNECT_TIMEOUT:g} s" in line


async def test_working_tunnel_still_comes_up(tmp_path, certs):
    """The dialling steps did not break the good path: the tunnel opens and registers."""
    async with trio.open_nursery() as nursery:
        port = await endpoint(nursery, cert=certs / "tunnel-server.pem", key=certs / "tunnel-server.key",
                              cas={"acme": certs / "acme-ca.pem"})
        node = Node(load_node_config(node_toml(tmp_path, port, ca=certs / "cloud-ca.pem",
                                               cert=certs / "node-node-a.pem", key=certs / "node-node-a.key",
                                               host="localhost")))
        with trio.fail_after(TEST_DEADLINE):
            await nursery.start(node.run)
            while node.registered_epoch is None:
                await node._changed.wait()
        assert node.status()["tunnel"] == "registered"
        nursery.cancel_scope.cancel()


async def test_wrong_url_path_names_the_refused_upgrade(tmp_path, certs, caplog):
    async with trio.open_nursery() as nursery:
        port = await endpoint(nursery, cert=certs / "tunnel-server.pem", key=certs / "tunnel-server.key",
                              cas={"acme": certs / "acme-ca.pem"})
        config = node_toml(tmp_path, port, ca=certs / "cloud-ca.pem", cert=certs / "node-node-a.pem",
                           key=certs / "node-node-a.key")
        config.write_text(config.read_text().replace("/tunnel", "/tunel"))
        line = await first_failure(config, caplog)
        nursery.cancel_scope.cancel()
    assert "refused the WebSocket upgrade to /tunel with HTTP 404 (unknown path)" in line
