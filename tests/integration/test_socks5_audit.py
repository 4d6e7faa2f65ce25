"""SOCKS5 refusals leave an audit record on the cloud side (real sockets, a real session pair and node)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest
import trio

from connector.agent.audit import REQUEST_FIELDS
from connector.cloud.audit import CloudAudit
from connector.cloud.auth import Authenticator, hash_token
from connector.cloud.socks5 import (
    METHOD_SAP_TOKEN,
    METHOD_USERNAME_PASSWORD,
    Socks5Proxy,
    Socks5Settings,
)
from tests.integration.test_socks5 import (
    LOCATIONS,
    OTHER_TOKEN,
    TOKEN,
    connect,
    front,
    read_exactly,
    sap_auth,
    start_node,
    user_auth,
)
from tests.support.socksrouter import SessionRouter

TEST_TIMEOUT = 10.0


@pytest.fixture
async def audited() -> AsyncIterator[tuple[int, CloudAudit]]:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        router = SessionRouter(stack, LOCATIONS)
        await router.add_master(front(await start_node(nursery)))
        audit = CloudAudit()
        authenticator = Authenticator({"sub1": [hash_token(TOKEN)], "sub2": [hash_token(OTHER_TOKEN)]})
        proxy = Socks5Proxy(router, authenticator, settings=Socks5Settings(handshake_timeout=0.3,
                            connect_timeout=0.3), audit=audit)
        port = await nursery.start(proxy.run, "127.0.0.1", 0)
        with trio.fail_after(TEST_TIMEOUT):
            yield port, audit
        nursery.cancel_scope.cancel()


async def test_auth_failure_no_connector_and_not_allowed_are_audited(audited: tuple[int, CloudAudit]) -> None:
    port, audit = audited
    # wrong password for sub1 (the token of sub2): refused at authentication
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(bytes([5, 1, METHOD_USERNAME_PASSWORD]))
    assert await read_exactly(sock, 2) == bytes([5, METHOD_USERNAME_PASSWORD])
    await sock.send_all(user_auth("sub1", OTHER_TOKEN))
    assert await read_exactly(sock, 2) == b"\x01\x01"
    await audit.wait_records(1)
    # a location without a connector (no master)
    _, reply = await connect(port, METHOD_SAP_TOKEN, sap_auth(TOKEN, "nowhere"), "erp.virtual")
    assert reply == 0x03
    await audit.wait_records(2)
    # the node's allow-list refuses the target
    _, reply = await connect(port, METHOD_SAP_TOKEN, sap_auth(TOKEN, ""), "denied.virtual", 3300)
    assert reply == 0x02
    records = await audit.wait_records(3)
    for record in records:
        assert list(record)[: 2 + len(REQUEST_FIELDS)] == ["ts", "kind", *REQUEST_FIELDS]
        assert record["proxy"] == "socks5" and record["decision"] == "denied"
        assert str(record["client"]).startswith("127.0.0.1:")
    assert [(r["reason"], r["reply"], r["subaccount"], r["location"], r["virtual_target"]) for r in records] == [
        ("auth_failed", None, None, None, None),
        ("no_connector", "network_unreachable", "sub1", "nowhere", "tcp://erp.virtual:3300"),
        ("denied_by_allowlist", "not_allowed", "sub1", "", "tcp://denied.virtual:3300"),  # the HTTP side's word
    ]
    assert OTHER_TOKEN not in json.dumps(records) and TOKEN not in json.dumps(records)


async def test_handshake_timeout_is_audited_and_a_bare_connect_is_not(audited: tuple[int, CloudAudit]) -> None:
    port, audit = audited
    probe = await trio.open_tcp_stream("127.0.0.1", port)  # a TCP health check: connect, close
    await probe.aclose()
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    await silent.send_all(bytes([5, 1]))  # a greeting that never completes
    (record,) = await audit.wait_records(1)
    assert record["reason"] == "handshake_timeout"
    assert await silent.receive_some(10) == b""
    assert audit.written == 1
