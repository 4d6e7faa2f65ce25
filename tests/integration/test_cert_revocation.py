"""Revoked node certificates over the real cloud etcd: `connector cloud-revoke` (a real process)
puts a serial on the deny-list; every replica closes the live tunnels of that serial at once and
refuses it at the next handshake, telling the node why; other nodes are untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from prometheus_client import REGISTRY

from connector import pki
from connector.tunnel.types import ErrorCode
from tests.integration.test_cloud_shared import cli, dial, make_certs, open_store, start_replica

TIMEOUT = 5.0  # "within seconds": the watch's delay is milliseconds on loopback


def revoked_records(replica: Any) -> list[dict[str, Any]]:
    """The cloud audit's records of revoked certificates refused, on one replica."""
    return [r for r in replica.cloud.registry.audit.tunnel_records()
            if r.get("event") == "refused" and r.get("reason") == "revoked"]


def refused_revoked() -> float:
    return REGISTRY.get_sample_value("connector_tunnels_refused_total", {"reason": "revoked"}) or 0.0


async def etcd_revision(etcd: Any) -> int:
    store = open_store(etcd)
    try:
        return (await store.get_prefix("revoked/")).revision
    finally:
        await store.aclose()


async def test_a_revoked_serial_is_closed_on_every_replica_and_refused_at_the_handshake(
        nursery: trio.Nursery, tmp_path: Path, etcd: Any) -> None:
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    b = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    revoked_a, revoked_b = await dial(nursery, certs, a, "node-a"), await dial(nursery, certs, b, "node-a")
    other = await dial(nursery, certs, a, "node-b")
    serial = pki.load_certificate(certs["node_node-a_cert"]).serial_number

    added = await cli("cloud-revoke", "--config", str(a.config), "--cert", str(certs["node_node-a_cert"]),
                      "--reason", "laptop stolen")
    assert (added["serial"], added["revoked"]) == (serial, f"0x{serial:x}")
    with trio.fail_after(TIMEOUT):
        await revoked_a.wait_closed()
        await revoked_b.wait_closed()
    message = (f"certificate_revoked: the certificate of node node-a (serial 0x{serial:x}) is revoked "
               "(`connector cloud-revoke`): issue the node a new one")
    assert revoked_a.close_reason == revoked_b.close_reason == (ErrorCode.DENIED, message)
    assert not other.session.closed  # another certificate of the same subaccount: untouched
    for replica in (a, b):  # the cloud audit names the node, its serial, and that a live tunnel closed
        [record] = revoked_records(replica)
        assert (record["node"], record["serial"], record["tunnel_closed"]) == ("node-a", f"0x{serial:x}", True)

    before = refused_revoked()
    again = await dial(nursery, certs, b, "node-a")  # the handshake goes through to say why
    with trio.fail_after(TIMEOUT):
        await again.wait_closed()
    assert again.close_reason == (ErrorCode.DENIED, message)
    assert refused_revoked() == before + 1
    # refused again at its HELLO: the identical refusal within a minute is counted, not written again
    assert [r["tunnel_closed"] for r in revoked_records(b)] == [True]
    assert b.cloud.endpoint.refused >= 1

    listed = await cli("cloud-revoke", "list", "--config", str(b.config))
    assert (listed["serial"], listed["reason"]) == (serial, "laptop stolen")

    removed = await cli("cloud-revoke", "remove", "--config", str(a.config), "--serial", f"0x{serial:x}")
    assert removed["unrevoked"] == f"0x{serial:x}"
    revision = await etcd_revision(etcd)
    with trio.fail_after(TIMEOUT):
        await a.shared.revocations.wait_revision(revision)
    welcome = await dial(nursery, certs, a, "node-a")
    assert not welcome.session.closed and serial not in a.cloud.revoked


async def test_a_replica_started_after_a_revocation_refuses_the_serial(
        nursery: trio.Nursery, tmp_path: Path, etcd: Any) -> None:
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    await cli("cloud-revoke", "--config", str(a.config), "--serial", str(
        pki.load_certificate(certs["node_node-b_cert"]).serial_number))
    late = await start_replica(nursery, tmp_path, certs, etcd, "cloud-late")
    with trio.fail_after(TIMEOUT):
        await late.shared.revocations.wait_revision(await etcd_revision(etcd))
    refused = await dial(nursery, certs, late, "node-b")
    with trio.fail_after(TIMEOUT):
        await refused.wait_closed()
    assert refused.close_reason is not None
    assert refused.close_reason[1].startswith("certificate_revoked: the certificate of node node-b")
