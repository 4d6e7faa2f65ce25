"""Certificates replaced on disk while tunnels are up: the cloud and the node read them again.

Real TLS, real sockets: an in-process cloud and node (tests/support/stack.py) and bare tunnel
clients; the SIGHUP test runs `connector cloud` as a process. The files are replaced the way a
deployment does (write aside, rename), and the reload is driven by `check()`, the call the
timer makes every few seconds (the timer itself: tests/unit/test_tlsreload.py).
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio_websocket

from connector import pki
from connector.admin import http_request
from connector.cli import init_certs
from connector.cloud.auth import hash_token, new_token
from connector.demo import DemoSpec, cloud_toml, free_port
from connector.tunnel.session import TunnelSession
from tests.support.httpclient import HttpClient
from tests.support.stack import SUBACCOUNT, Stack, start_stack

TIMEOUT = 10.0
ERP = "http://erp.virtual:8000"


def replace(target: Path, source: Path) -> None:
    tmp = target.with_name(target.name + ".new")
    tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)


def new_cloud_ca(tmp_path: Path) -> tuple[pki.Issued, pki.Issued]:
    """Another cloud CA and a server certificate for 127.0.0.1 it signed."""
    ca = pki.create_ca(tmp_path / "new-ca", "cloud-ca", "the new cloud CA")
    return ca, pki.issue(ca, tmp_path / "new-ca", "tunnel-server", common_name="127.0.0.1",
                         server_names=["127.0.0.1"])


async def bare_tunnel(nursery: trio.Nursery, port: int, trusted_ca: Path, certs: dict[str, Path],
                      node: str = "node-b") -> TunnelSession:
    """A tunnel of `node` trusting only `trusted_ca`, through the HELLO."""
    ctx = pki.client_context(trusted_ca, certs[f"node_{node}_cert"], certs[f"node_{node}_key"])
    with trio.fail_after(TIMEOUT):  # a refused certificate: trio-websocket waits for ever (see tunnel.dial)
        ws = await trio_websocket.connect_websocket_url(nursery, f"wss://127.0.0.1:{port}/tunnel", ssl_context=ctx)
        session = TunnelSession(ws, client=True, hello_info={"location_id": "", "node": node})
        await session.handshake()
    return session


async def refused_handshake(port: int, trusted_ca: Path, certs: dict[str, Path]) -> str:
    """Why a TLS handshake trusting only `trusted_ca` fails (it must)."""
    ctx = pki.client_context(trusted_ca, certs["node_node-b_cert"], certs["node_node-b_key"])
    tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="127.0.0.1")
    try:
        with pytest.raises(trio.BrokenResourceError) as failed:
            await tls.do_handshake()
    finally:
        await trio.aclose_forcefully(tls)
    cause = failed.value.__cause__
    assert isinstance(cause, ssl.SSLCertVerificationError)
    return str(cause.verify_message)


async def test_a_server_certificate_of_a_new_ca_is_used_for_new_tunnels_and_the_old_tunnel_stays(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    stack = await start_stack(nursery, tmp_path)
    assert stack.node is not None
    held = stack.node.session
    assert held is not None
    client = await HttpClient.connect(stack.ports.http_proxy)  # an application's connection, kept throughout
    assert (await client.request("GET", f"{ERP}/sap/opu/odata/before", [stack.proxy_auth])).status == 200
    _, server = new_cloud_ca(tmp_path)
    new_ca = tmp_path / "new-ca" / "cloud-ca.pem"
    assert await refused_handshake(stack.ports.tunnel, new_ca, stack.certs)  # before: the old CA's certificate

    replace(stack.certs["server_key"], server.key_path)
    replace(stack.certs["server_cert"], server.cert_path)
    assert stack.cloud.endpoint.tls.check()

    session = await bare_tunnel(nursery, stack.ports.tunnel, new_ca, stack.certs)  # trusts only the new CA
    await session.aclose()
    assert "unable to get local issuer certificate" in await refused_handshake(
        stack.ports.tunnel, stack.certs["cloud_ca"], stack.certs)  # the old CA's nodes no longer trust it
    assert stack.node.session is held and not held.closed  # the tunnel up before stays up...
    assert stack.node.registered_epoch is not None
    with trio.fail_after(TIMEOUT):  # ...and carries the requests of connections made before
        assert (await client.request("GET", f"{ERP}/sap/opu/odata/after", [stack.proxy_auth])).status == 200
    await client.aclose()


async def test_a_broken_new_file_keeps_the_old_certificate_with_a_clear_log_line(
        nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stack = await start_stack(nursery, tmp_path, with_node=False)
    _, server = new_cloud_ca(tmp_path)
    caplog.set_level(logging.INFO)
    replace(stack.certs["server_cert"], server.cert_path)  # the new certificate, the old key: no pair
    assert not stack.cloud.endpoint.tls.check()
    assert (f"tunnel endpoint: not reloading the certificates, the files are unusable ({stack.certs['server_key']} "
            f"is not the private key of {stack.certs['server_cert']}") in caplog.text
    session = await bare_tunnel(nursery, stack.ports.tunnel, stack.certs["cloud_ca"], stack.certs)  # old: still
    await session.aclose()

    stack.certs["server_key"].write_text("-----BEGIN PRIVATE KEY-----\ntruncated")
    assert not stack.cloud.endpoint.tls.check()
    assert f"{stack.certs['server_key']}: not an unencrypted PEM private key" in caplog.text
    session = await bare_tunnel(nursery, stack.ports.tunnel, stack.certs["cloud_ca"], stack.certs)
    await session.aclose()
    assert stack.cloud.endpoint.tls.version == 0


async def test_the_node_dials_with_its_replaced_certificate_and_keeps_its_tunnel_until_then(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    stack: Stack = await start_stack(nursery, tmp_path)
    node = stack.node
    assert node is not None
    held = node.session
    assert held is not None
    old_serial = pki.load_certificate(stack.certs["node_node-a_cert"]).serial_number
    ca = pki.Issued(tmp_path / "certs" / f"{SUBACCOUNT}-ca.pem", tmp_path / "certs" / f"{SUBACCOUNT}-ca.key")
    renewed = pki.issue(ca, tmp_path / "renewed", "node-node-a", common_name="node-a", organization=SUBACCOUNT,
                        client=True)
    replace(stack.certs["node_node-a_key"], renewed.key_path)
    replace(stack.certs["node_node-a_cert"], renewed.cert_path)
    assert node.tls.check()
    assert node.session is held and not held.closed and node.registered_epoch is not None

    # the old certificate revoked: the tunnel made with it closes, the node dials with the new one
    stack.cloud.revoked.replace([old_serial])
    with trio.fail_after(TIMEOUT):
        await held.wait_closed()
        await node.wait_session(other_than=held)
    assert held.close_reason is not None and held.close_reason[1].startswith("certificate_revoked: ")
    assert stack.cloud.registry.master_of(SUBACCOUNT, "").node == "node-a"


async def test_sighup_makes_connector_cloud_read_its_certificates_again(tmp_path: Path) -> None:
    certs = init_certs(tmp_path / "certs", "demo", ["node-b"], ["127.0.0.1"])
    ports = {name: free_port() for name in ("tunnel", "http", "socks5", "admin", "destinations")}
    (tmp_path / "state").mkdir()
    config = tmp_path / "cloud.toml"
    config.write_text(cloud_toml(certs, hash_token(new_token()), DemoSpec(), [], **ports))
    log = open(tmp_path / "cloud.log", "wb")  # noqa: SIM115, ASYNC230 - owned by the child
    process = await trio.lowlevel.open_process([sys.executable, "-m", "connector", "cloud", "--config", str(config)],
                                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        with trio.fail_after(30):
            while True:
                try:
                    await http_request("127.0.0.1", ports["admin"], "/readyz", timeout=1.0)
                    break
                except OSError:
                    await trio.sleep(0.05)  # another process: its port is all there is to poll
            new_ca, server = new_cloud_ca(tmp_path)
            # written in place, same sizes possible, within the timer's interval: only SIGHUP reads them now
            certs["server_key"].write_bytes(server.key_path.read_bytes())
            certs["server_cert"].write_bytes(server.cert_path.read_bytes())
            process.send_signal(signal.SIGHUP)
            while "certificates reloaded" not in (tmp_path / "cloud.log").read_text():  # noqa: ASYNC110 - another process: its log is all there is to watch
                await trio.sleep(0.05)
            async with trio.open_nursery() as nursery:
                session = await bare_tunnel(nursery, ports["tunnel"], new_ca.cert_path, certs)
                await session.aclose()
        assert process.poll() is None  # SIGHUP does not stop it
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await process.wait()
    finally:
        if process.poll() is None:
            process.kill()


async def test_a_subaccount_moves_to_a_new_ca_through_a_bundle_without_dropping_tunnels(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    stack = await start_stack(nursery, tmp_path, with_node=False)
    certs = stack.certs
    old_ca = certs["subaccount_ca"].read_bytes()
    held = await bare_tunnel(nursery, stack.ports.tunnel, certs["cloud_ca"], certs, node="node-a")
    await nursery.start(lambda task_status: held.run(task_status=task_status))  # answers the pings
    new_ca = pki.create_ca(tmp_path / "new-sub", f"{SUBACCOUNT}-ca", "acme's new CA")
    reissued = pki.issue(new_ca, tmp_path / "new-sub", "node-node-b", common_name="node-b", organization=SUBACCOUNT,
                         client=True)
    moved = {**certs, "node_node-b_cert": reissued.cert_path, "node_node-b_key": reissued.key_path}

    tmp = certs["subaccount_ca"].with_name("bundle.new")  # the new CA first (it signs renewals), the old one kept
    tmp.write_bytes(new_ca.cert_path.read_bytes() + old_ca)
    os.replace(tmp, certs["subaccount_ca"])
    assert stack.cloud.endpoint.tls.check()
    for node_certs in (moved, certs):  # re-issued and not yet re-issued nodes both get in
        session = await bare_tunnel(nursery, stack.ports.tunnel, certs["cloud_ca"], node_certs)
        await session.aclose()

    replace(certs["subaccount_ca"], new_ca.cert_path)  # every node re-issued: the old CA goes
    assert stack.cloud.endpoint.tls.check()
    refused_before = stack.cloud.endpoint.refused
    ctx = pki.client_context(certs["cloud_ca"], certs["node_node-b_cert"], certs["node_node-b_key"])
    tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", stack.ports.tunnel), ctx, server_hostname="127.0.0.1")
    with trio.fail_after(TIMEOUT):
        await tls.do_handshake()
        try:  # TLS 1.3: the server's verdict on our certificate follows the handshake
            answer = await tls.receive_some()
        except trio.BrokenResourceError:
            answer = b""
    await trio.aclose_forcefully(tls)
    assert answer == b""  # closed on us, nothing said
    with trio.fail_after(TIMEOUT):
        await stack.cloud.endpoint.wait_connections(1)  # the refused one is gone; the held one stays
    assert stack.cloud.endpoint.refused == refused_before + 1
    assert not held.closed  # reloading refuses new handshakes only: revoke to close a tunnel
