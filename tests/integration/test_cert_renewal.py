"""Certificate renewal through the tunnel, end to end: a node whose certificate is valid for
minutes renews it with the cloud holding its subaccount's CA key, keeps its tunnel, and dials
with the new certificate; a cloud without the key, or a CSR that is not one, is refused.

Real TLS and sockets, an in-process cloud and node (tests/support/stack.py), bare tunnel
sessions for the refusals.
"""

from __future__ import annotations

import datetime
import stat
from pathlib import Path
from typing import Any

import trio
import trio_websocket
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connector import pki
from connector.cloud.replicas import REPLICAS_OP
from connector.tunnel.session import TunnelSession
from tests.support.stack import SUBACCOUNT, node_toml, start_node, start_stack

TIMEOUT = 20.0
LIFETIME = datetime.timedelta(minutes=6)  # 1 minute ahead: pki backdates 5
RENEW_AT = 0.85  # 5.1 of the 6 minutes: 6 s after issue


def subaccount_ca(tmp_path: Path) -> pki.Issued:
    return pki.Issued(tmp_path / "certs" / f"{SUBACCOUNT}-ca.pem", tmp_path / "certs" / f"{SUBACCOUNT}-ca.key")


def short_lived(tmp_path: Path, cert_path: Path, key_path: Path) -> None:
    """Replace a node certificate with one of the same names valid for LIFETIME in all."""
    old = pki.load_certificate(cert_path)
    key_pem, csr_pem = pki.new_key_and_csr(old)
    cert_pem = pki.sign_client_csr(subaccount_ca(tmp_path), pki.load_csr(csr_pem), old.subject, lifetime=LIFETIME)
    pki.install_key_pair(cert_path, key_path, cert_pem, key_pem)


async def test_a_node_renews_its_short_lived_certificate_keeps_its_tunnel_and_dials_with_the_new_one(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    stack = await start_stack(nursery, tmp_path, with_node=False,
                              extra=f'ca_key = "{subaccount_ca(tmp_path).key_path}"')
    cert_path, key_path = stack.certs["node_node-a_cert"], stack.certs["node_node-a_key"]
    short_lived(tmp_path, cert_path, key_path)
    old = pki.load_certificate(cert_path)
    config = node_toml(tmp_path, stack.certs, stack.ports.tunnel, stack.backend_http, stack.backend_tcp)
    config.write_text(config.read_text().replace("[tunnel]\n", f"[tunnel]\nrenew_at = {RENEW_AT}\n"))
    node = await start_node(nursery, stack, config)
    with trio.fail_after(TIMEOUT):
        await stack.wait_registered()
        held = node.session
        await node.tls.wait_version(1)  # renewed, written and loaded
    new = pki.load_certificate(cert_path)
    assert new.serial_number != old.serial_number
    assert new.subject == old.subject
    assert new.not_valid_after_utc > old.not_valid_after_utc
    assert (new.not_valid_after_utc - new.not_valid_before_utc) == LIFETIME  # as long as the one renewed
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    pki.check_key_pair(cert_path, key_path)
    assert node.session is held and held is not None and not held.closed  # renewal dropped no tunnel

    stack.cloud.revoked.replace([old.serial_number])  # the old certificate's tunnel closes...
    with trio.fail_after(TIMEOUT):
        await held.wait_closed()
        await node.wait_session(other_than=held)
    assert node.cloud_refusal is None  # ...and the node is back at once, with the new one
    assert stack.cloud.registry.master_of(SUBACCOUNT, "").node == "node-a"


async def renew_over_bare_tunnel(nursery: trio.Nursery, stack: Any, csr: str) -> tuple[str, dict[str, Any]]:
    ctx = pki.client_context(stack.certs["cloud_ca"], stack.certs["node_node-b_cert"], stack.certs["node_node-b_key"])
    ws = await trio_websocket.connect_websocket_url(nursery, f"wss://127.0.0.1:{stack.ports.tunnel}/tunnel",
                                                    ssl_context=ctx)
    session = TunnelSession(ws, client=True, hello_info={"location_id": "", "node": "node-b"})
    send, receive = trio.open_memory_channel[tuple[str, dict[str, Any]]](10)

    async def on_control(op: str, body: dict[str, Any]) -> None:
        if op != REPLICAS_OP:  # the replica set the endpoint announces: not an answer
            send.send_nowait((op, body))

    with trio.fail_after(TIMEOUT):
        await session.handshake()
        await nursery.start(lambda task_status: session.run(control_handler=on_control, task_status=task_status))
        await session.send_control("renew", {"csr": csr})
        answer = await receive.receive()
    await session.aclose()
    return answer


def csr_naming(common_name: str, organization: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_the_cloud_signs_only_the_names_of_the_tunnels_certificate(nursery: trio.Nursery, tmp_path: Path) -> None:
    stack = await start_stack(nursery, tmp_path, with_node=False,
                              extra=f'ca_key = "{subaccount_ca(tmp_path).key_path}"')
    op, body = await renew_over_bare_tunnel(nursery, stack, csr_naming("node-a", "other-subaccount"))
    assert op == "renewed", body
    cert = x509.load_pem_x509_certificate(body["cert"].encode())
    assert cert.subject == pki.load_certificate(stack.certs["node_node-b_cert"]).subject  # node-b of acme, not node-a
    pki.verify_issued_by(cert, pki.load_certificate(stack.certs["subaccount_ca"]))

    op, body = await renew_over_bare_tunnel(nursery, stack, "-----BEGIN CERTIFICATE REQUEST-----\nnope\n")
    assert (op, body["reason"]) == ("renew_refused", "bad_csr")
    assert body["message"].startswith("not a PEM certificate signing request")


async def test_a_cloud_without_the_ca_key_refuses_renewal_naming_the_offline_procedure(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    stack = await start_stack(nursery, tmp_path, with_node=False)
    op, body = await renew_over_bare_tunnel(nursery, stack, csr_naming("node-b", SUBACCOUNT))
    assert (op, body["reason"]) == ("renew_refused", "offline_ca")
    assert "an operator renews this node's certificate" in body["message"]
