"""The whole path on loopback: application -> proxy -> tunnel (mTLS WebSocket) -> node -> internal host.

One in-process stack per test (`tests/support/stack.py`): real TLS, real sockets, the real TOML
loaders. What each test checks is what a cloud application or an operator would see.
"""

from __future__ import annotations

import json
import resource

import pytest
import trio

from connector import pki
from connector.cli import init_certs
from connector.demo import free_port
from connector.tunnel.types import ErrorCode
from tests.support.httpclient import HttpClient, chunks, expected_sha256
from tests.support.socks import socks5_connect
from tests.support.stack import SUBACCOUNT, TOKEN, node_toml, start_cloud, start_node, start_stack

ERP = "http://erp.virtual:8000"
MiB = 1 << 20


@pytest.fixture
async def stack(nursery, tmp_path):
    return await start_stack(nursery, tmp_path)


async def proxy_client(stack) -> HttpClient:
    return await HttpClient.connect(stack.ports.http_proxy)


async def test_get_reaches_internal_host_with_virtual_host_header(stack):
    client = await proxy_client(stack)
    response = await client.request("GET", f"{ERP}/sap/opu/odata/x?$top=1", [stack.proxy_auth])
    assert response.status == 200
    body = response.json()
    assert body["path"] == "/sap/opu/odata/x?$top=1"
    assert body["host"] == "erp.virtual:8000"


@pytest.mark.parametrize("size", [0, 1, 64 * 1024 + 1, 1 * MiB])
async def test_post_bodies_are_echoed(stack, size):
    client = await proxy_client(stack)
    response = await client.request("POST", f"{ERP}/sap/opu/odata/echo", [stack.proxy_auth], b"x" * size)
    assert (response.status, response.length) == (200, size)
    assert response.body == b"x" * size


async def test_100_mib_streams_through_in_constant_memory(stack):
    total = 100 * MiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    client = await proxy_client(stack)
    with trio.fail_after(120):
        response = await client.request(
            "POST", f"{ERP}/sap/opu/odata/echo", [stack.proxy_auth, ("content-length", str(total))],
            chunks(total), keep_body=False,
        )
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert response.status == 200
    assert response.length == total
    assert response.sha256 == expected_sha256(total)
    # Proxy, tunnel, node and backend all live in this process: buffering the body anywhere
    # would add at least 100 MiB to the peak resident size.
    assert grown_mib < 48, f"peak RSS grew by {grown_mib:.0f} MiB while streaming 100 MiB"


async def test_chunked_upload(stack):
    client = await proxy_client(stack)
    response = await client.request("POST", f"{ERP}/sap/opu/odata/echo", [stack.proxy_auth], chunks(300_000, 7000))
    assert response.status == 200
    assert response.length == 300_000


async def test_keep_alive_allowed_then_denied_writes_an_audit_line(stack):
    client = await proxy_client(stack)
    ok = await client.request("GET", f"{ERP}/sap/opu/odata/a", [stack.proxy_auth])
    denied = await client.request("GET", f"{ERP}/secret/salaries", [stack.proxy_auth])
    again = await client.request("GET", f"{ERP}/sap/opu/odata/b", [stack.proxy_auth])
    assert (ok.status, denied.status, again.status) == (200, 403, 200)
    assert denied.headers["content-type"] == "application/json"
    assert denied.json()["error"]
    lines = [json.loads(line) for line in (stack.workdir / "node-a-audit.jsonl").read_text().splitlines()]
    denials = [line for line in lines if line.get("decision") == "denied"]
    assert any(line.get("path") == "/secret/salaries" for line in denials), lines


async def test_hostile_path_refused(stack):
    client = await proxy_client(stack)
    response = await client.request("GET", f"{ERP}/sap/opu/odata/..%2f..%2fetc/passwd", [stack.proxy_auth])
    assert response.status in (400, 403)


async def _upgrade(stack, path: str) -> tuple[bytes, trio.SocketStream]:
    sock = await trio.open_tcp_stream("127.0.0.1", stack.ports.http_proxy)
    await sock.send_all(
        f"GET {ERP}{path} HTTP/1.1\r\nHost: erp.virtual:8000\r\nProxy-Authorization: Bearer {TOKEN}\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
    )
    head = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in head:
            head += await sock.receive_some(4096)
    return head, sock


async def test_websocket_upgrade_allowed(stack):
    head, sock = await _upgrade(stack, "/ws")
    assert head.startswith(b"HTTP/1.1 101"), head
    await sock.send_all(b"ping over the tunnel")
    received = b""
    with trio.fail_after(5):
        while len(received) < 20:
            received += await sock.receive_some(4096)
    assert received == b"ping over the tunnel"


async def test_websocket_upgrade_denied(stack):
    head, _ = await _upgrade(stack, "/nows")
    assert head.startswith(b"HTTP/1.1 403"), head


@pytest.mark.parametrize("method", [0x02, 0x80])
async def test_socks5_tcp_echo(stack, method):
    sock, code = await socks5_connect(
        stack.ports.socks5_proxy, "echo.virtual", 7000, token=TOKEN, subaccount=SUBACCOUNT, method=method
    )
    assert code == 0
    await sock.send_all(b"hello internal host")
    await sock.send_eof()
    received = b""
    with trio.fail_after(5):
        while chunk := await sock.receive_some(4096):
            received += chunk
    assert received == b"hello internal host"


async def test_socks5_unmapped_target_not_allowed(stack):
    _, code = await socks5_connect(stack.ports.socks5_proxy, "nowhere.virtual", 1, token=TOKEN, subaccount=SUBACCOUNT)
    assert code == 0x02


async def test_internal_host_refused_is_502(stack):
    client = await proxy_client(stack)
    response = await client.request("GET", "http://dead.virtual:8000/x", [stack.proxy_auth])
    assert response.status == 502
    assert response.json()["error"]


async def test_missing_credentials_407_and_unknown_location_503(stack):
    client = await proxy_client(stack)
    assert (await client.request("GET", f"{ERP}/sap/opu/odata/x")).status == 407
    client = await proxy_client(stack)
    with trio.fail_after(1):  # an unknown location is not held
        response = await client.request(
            "GET", f"{ERP}/sap/opu/odata/x", [stack.proxy_auth, ("SAP-Connectivity-SCC-Location_ID", "mars")]
        )
    assert response.status == 503


async def test_thousand_concurrent_streams_on_one_tunnel(stack):
    results: list[int] = []
    limit = trio.CapacityLimiter(1000)

    async def one(i: int) -> None:
        async with limit:
            client = await proxy_client(stack)
            response = await client.request("GET", f"{ERP}/sap/opu/odata/{i}", [stack.proxy_auth])
            results.append(response.status)
            await client.aclose()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
    assert results.count(200) == 1000
    assert stack.cloud.registry.snapshot()[0]["routing"][-1]["streams"] >= 1000


async def test_slow_reader_does_not_grow_the_senders_buffers(stack):
    """A SOCKS5 client pushes into the echo service but never reads: back-pressure must stop it
    after a bounded amount (socket buffers + one stream window at each hop), not after all of it."""
    sock, code = await socks5_connect(stack.ports.socks5_proxy, "echo.virtual", 7000, token=TOKEN, subaccount=SUBACCOUNT)
    assert code == 0
    sent = 0
    block = b"z" * 65536
    with trio.move_on_after(3):
        while sent < 256 * MiB:
            await sock.send_all(block)
            sent += len(block)
    assert sent < 64 * MiB, f"{sent / MiB:.0f} MiB accepted without being read"
    # and the tunnel still serves others meanwhile
    client = await proxy_client(stack)
    with trio.fail_after(5):
        assert (await client.request("GET", f"{ERP}/sap/opu/odata/x", [stack.proxy_auth])).status == 200


async def test_certificate_from_another_ca_is_refused(nursery, tmp_path):
    stack = await start_stack(nursery, tmp_path, with_node=False)
    rogue = init_certs(tmp_path / "rogue", SUBACCOUNT, ["node-a"], ["127.0.0.1"])
    stack.certs.update({"node_rogue_cert": rogue["node_node-a_cert"], "node_rogue_key": rogue["node_node-a_key"]})
    # same subaccount name in O=, but issued by a CA the cloud does not trust for it
    assert pki.subaccount_of(pki.load_certificate(rogue["node_node-a_cert"])) == SUBACCOUNT
    path = node_toml(tmp_path, stack.certs, stack.ports.tunnel, stack.backend_http, stack.backend_tcp,
                     node="rogue", cert_name="rogue")
    node = await start_node(nursery, stack, path)
    with trio.fail_after(10):
        await node.wait_tunnel_failures(2)  # refused, and refused again after backoff
    # the endpoint counts a refusal before it closes the connection the node saw fail
    assert stack.cloud.endpoint.refused >= 2
    assert node.session is None and node.registered_epoch is None
    assert stack.cloud.registry.master_of(SUBACCOUNT, "") is None


async def test_endpoint_restart_does_not_need_a_node_restart(nursery, tmp_path):
    tunnel_port = free_port()
    stack = await start_stack(nursery, tmp_path, tunnel_port=tunnel_port)
    node = stack.node
    stack.cloud_scope.cancel()  # the cloud side goes away: listener and every tunnel
    with trio.fail_after(10):
        await node.wait_tunnels(0)
    cloud, ports, _ = await start_cloud(nursery, tmp_path, stack.certs, tunnel_port=tunnel_port)
    with trio.fail_after(15):  # the node's backoff is capped at 5 s
        await cloud.registry.wait_master(SUBACCOUNT, "")
    client = await HttpClient.connect(ports.http_proxy)
    response = await client.request("GET", f"{ERP}/sap/opu/odata/x", [stack.proxy_auth])
    assert response.status == 200


async def _raw_tunnel(nursery, stack, node: str, cluster: str = "it"):
    """A bare tunnel client with a node's real certificate: speaks the protocol, serves nothing."""
    import trio_websocket

    from connector.tunnel.session import TunnelSession

    ctx = pki.client_context(stack.certs["cloud_ca"], stack.certs[f"node_{node}_cert"], stack.certs[f"node_{node}_key"])
    ws = await trio_websocket.connect_websocket_url(nursery, f"wss://127.0.0.1:{stack.ports.tunnel}/tunnel", ssl_context=ctx)
    session = TunnelSession(ws, client=True, hello_info={"node": node, "cluster": cluster, "location_id": ""})
    await session.handshake()
    controls: list[tuple[str, dict]] = []
    changed = trio.Event()

    async def on_control(op, body):
        nonlocal changed
        controls.append((op, body))
        changed.set()
        changed = trio.Event()

    async def wait_for(op, nth=1):
        with trio.fail_after(5):
            while sum(c[0] == op for c in controls) < nth:
                await changed.wait()
        return [body for name, body in controls if name == op][nth - 1]

    await nursery.start(lambda task_status: session.run(control_handler=on_control, task_status=task_status))
    return session, wait_for


async def test_lower_epoch_is_refused_and_higher_epoch_fences_through_the_endpoint(nursery, tmp_path):
    stack = await start_stack(nursery, tmp_path, with_node=False)
    first, first_wait = await _raw_tunnel(nursery, stack, "node-a")
    second, second_wait = await _raw_tunnel(nursery, stack, "node-b")

    await first.send_control("register", {"epoch": 10})
    assert (await first_wait("registered"))["epoch"] == 10
    await second.send_control("register", {"epoch": 9})
    refused = await second_wait("refused")
    assert (refused["reason"], refused["highest_epoch"]) == ("stale_epoch", 10)
    assert stack.cloud.registry.master_of(SUBACCOUNT, "").node == "node-a"

    await second.send_control("register", {"epoch": 11})
    assert (await second_wait("registered"))["epoch"] == 11
    assert (await first_wait("fenced"))["epoch"] == 11
    with trio.fail_after(5):
        await first.wait_closed()  # the replaced master's tunnel is closed at once
    assert first.close_reason[0] == ErrorCode.STALE_EPOCH
    await second.send_control("register", {"epoch": "eleven"})
    assert (await second_wait("refused", nth=2))["reason"] == "bad_epoch"
