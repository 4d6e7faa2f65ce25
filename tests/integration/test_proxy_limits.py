"""One token cannot starve a location, waits for a stream are bounded, token guessing is slowed.

The real stack on loopback (cloud, one node, demo backend), with the node's tunnel allowing only
`MAX_STREAMS` streams so that "every stream of the tunnel in use" takes a handful of application
connections instead of 1,024. Each request has its own stream for as long as it runs (a kept-alive
connection holds none between requests), so an application holds streams with exchanges that last:
WebSocket connections to the demo backend's echo. Two tokens of one subaccount play two applications.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import attrs
import pytest
import trio

from connector.agent.runtime import build_node
from connector.cli import init_certs
from connector.cloud.auth import hash_token
from connector.cloud.server import CloudServer
from connector.config import load_cloud_config, load_node_config
from connector.demo_backend import run_backend
from tests.support.httpclient import HttpClient
from tests.support.socks import socks5_connect
from tests.support.stack import SUBACCOUNT, TOKEN, Stack, cloud_toml, node_toml

OTHER_TOKEN = "second-application-token-42"
MAX_STREAMS = 8  # the node's tunnel takes this many streams at once
STREAM_WAIT = 0.5  # [proxy] stream_wait_seconds in these tests
URL = "http://erp.virtual:8000/sap/opu/odata/x"
WS_URL = "http://erp.virtual:8000/ws"  # the demo backend echoes WebSocket bytes
OTHER_ADDRESS = "127.0.0.2"  # a second client host on loopback
TEST_TIMEOUT = 30.0


async def limited_stack(nursery: trio.Nursery, workdir: Path, proxy_settings: str) -> Stack:
    """The stack of tests/support/stack.py with two tokens, `proxy_settings` and a small tunnel."""
    certs = init_certs(workdir / "certs", SUBACCOUNT, ["node-a"], ["127.0.0.1", "localhost"])
    backend_http, backend_tcp = await nursery.start(run_backend, "127.0.0.1", 0, 0)
    path = cloud_toml(workdir, certs)
    text = path.read_text().replace("[proxy]\n", f"[proxy]\n{proxy_settings}\n", 1)
    tokens = f'token_sha256 = ["{hash_token(TOKEN)}"]'
    assert tokens in text
    path.write_text(text.replace(tokens, f'token_sha256 = ["{hash_token(TOKEN)}", "{hash_token(OTHER_TOKEN)}"]'))
    cloud = CloudServer(load_cloud_config(path))
    ports = await nursery.start(cloud.run)
    stack = Stack(workdir, certs, backend_http, backend_tcp, cloud, ports)
    node = build_node(load_node_config(node_toml(workdir, certs, ports.tunnel, backend_http, backend_tcp)))
    node.tunnel_settings = attrs.evolve(node.tunnel_settings, max_streams=MAX_STREAMS)
    await nursery.start(node.run)
    stack.node = node
    with trio.fail_after(10):
        await stack.wait_registered()
    return stack


async def connect_from(address: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((address, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


def auth(token: str) -> list[tuple[str, str]]:
    return [("Proxy-Authorization", f"Bearer {token}")]


async def hold_streams(stack: Stack, token: str, count: int) -> tuple[list[trio.SocketStream], list[int]]:
    """`count` WebSocket connections of `token`, each holding its stream until it is closed;
    returns them and the status each upgrade got."""
    sockets, statuses = [], []
    for _ in range(count):
        sock = await trio.open_tcp_stream("127.0.0.1", stack.ports.http_proxy)
        sockets.append(sock)
        await sock.send_all(
            f"GET {WS_URL} HTTP/1.1\r\nHost: erp.virtual:8000\r\nProxy-Authorization: Bearer {token}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = await sock.receive_some(65536)
            assert data, head
            head += data
        statuses.append(int(head.split(b" ", 2)[1]))
    return sockets, statuses


def streams_open(stack: Stack) -> int:
    master = stack.cloud.registry.master_of(SUBACCOUNT, "")
    assert master is not None
    return master.session.statistics().streams_open


async def test_one_token_cannot_take_every_stream_of_a_location(nursery, tmp_path) -> None:
    """With max_streams_per_token = 4, a token's fifth concurrent stream is refused at once
    (503 stream_limit_token, HTTP and SOCKS5), and another token of the same location is served."""
    with trio.fail_after(TEST_TIMEOUT):
        stack = await limited_stack(nursery, tmp_path, "max_streams_per_token = 4\nmax_streams_per_client_address = 0")
        hog, statuses = await hold_streams(stack, TOKEN, 4)
        assert statuses == [101] * 4 and streams_open(stack) == 4
        started = trio.current_time()
        extra = await HttpClient.connect(stack.ports.http_proxy)
        refused = await extra.request("GET", URL, auth(TOKEN))
        assert refused.status == 503 and refused.json()["error"] == "stream_limit_token"
        assert refused.headers["x-connector-error"] == "stream_limit_token"
        sock, code = await socks5_connect(
            stack.ports.socks5_proxy, "echo.virtual", 7000, token=TOKEN, subaccount=SUBACCOUNT
        )
        assert code == 0x03  # network unreachable: no stream for this request
        await sock.aclose()
        assert trio.current_time() - started < 2.0  # at once, not after stream_wait_seconds (5 s)
        other = await HttpClient.connect(stack.ports.http_proxy)
        assert (await other.request("GET", URL, auth(OTHER_TOKEN))).status == 200
        sock, code = await socks5_connect(
            stack.ports.socks5_proxy, "echo.virtual", 7000, token=OTHER_TOKEN, subaccount=SUBACCOUNT
        )
        assert code == 0
        await sock.send_all(b"hello")
        assert await sock.receive_some(5) == b"hello"
        for client in [*hog, extra, other]:
            await client.aclose()
        await sock.aclose()
        await stack.cloud.registry.admission.wait_streams(0)


async def test_one_client_address_cannot_take_every_stream(nursery, tmp_path) -> None:
    """With max_streams_per_client_address = 4, a fifth stream from the address is refused
    whatever its token; the same token from another address is served."""
    with trio.fail_after(TEST_TIMEOUT):
        stack = await limited_stack(nursery, tmp_path, "max_streams_per_token = 0\nmax_streams_per_client_address = 4")
        hog, statuses = await hold_streams(stack, TOKEN, 4)
        assert statuses == [101] * 4
        extra = await HttpClient.connect(stack.ports.http_proxy)
        refused = await extra.request("GET", URL, auth(OTHER_TOKEN))
        assert refused.status == 503 and refused.json()["error"] == "stream_limit_client"
        elsewhere = HttpClient(await connect_from(OTHER_ADDRESS, stack.ports.http_proxy))
        assert (await elsewhere.request("GET", URL, auth(OTHER_TOKEN))).status == 200
        for client in [*hog, extra, elsewhere]:
            await client.aclose()


async def test_waiting_for_a_stream_ends_with_503_after_stream_wait_seconds(nursery, tmp_path) -> None:
    """Limits off: one token holds every stream of the tunnel. Another request waits at most
    stream_wait_seconds, then gets 503 tunnel_busy (HTTP) / reply 0x03 (SOCKS5); once streams are
    free again, requests are served."""
    with trio.fail_after(TEST_TIMEOUT):
        stack = await limited_stack(
            nursery, tmp_path,
            f"max_streams_per_token = 0\nmax_streams_per_client_address = 0\nstream_wait_seconds = {STREAM_WAIT}",
        )
        hog, statuses = await hold_streams(stack, TOKEN, MAX_STREAMS)
        assert statuses == [101] * MAX_STREAMS and streams_open(stack) == MAX_STREAMS
        waiting = await HttpClient.connect(stack.ports.http_proxy)
        started = trio.current_time()
        busy = await waiting.request("GET", URL, auth(OTHER_TOKEN))
        waited = trio.current_time() - started
        assert busy.status == 503 and busy.json()["error"] == "tunnel_busy"
        assert STREAM_WAIT <= waited < STREAM_WAIT + 1.0
        started = trio.current_time()
        sock, code = await socks5_connect(
            stack.ports.socks5_proxy, "echo.virtual", 7000, token=OTHER_TOKEN, subaccount=SUBACCOUNT
        )
        waited = trio.current_time() - started
        assert code == 0x03 and STREAM_WAIT <= waited < STREAM_WAIT + 1.0
        await sock.aclose()
        await hog.pop().aclose()  # one stream is given back
        assert (await waiting.request("GET", URL, auth(OTHER_TOKEN))).status == 200
        for client in [*hog, waiting]:
            await client.aclose()


@pytest.mark.parametrize("proxy", ["http", "socks5"])
async def test_a_client_that_gives_up_waiting_leaves_nothing_behind(nursery, tmp_path, proxy) -> None:
    """Limits off, every stream in use, a long stream wait: applications that close their
    connection while waiting leave no waiter, no count and no stream behind, at once."""
    with trio.fail_after(TEST_TIMEOUT):
        stack = await limited_stack(
            nursery, tmp_path, "max_streams_per_token = 0\nmax_streams_per_client_address = 0\nstream_wait_seconds = 60",
        )
        registry = stack.cloud.registry
        hog, _ = await hold_streams(stack, TOKEN, MAX_STREAMS)
        assert registry.admission.statistics().streams == MAX_STREAMS
        master = registry.master_of(SUBACCOUNT, "")
        assert master is not None
        opened_before = master.session.statistics().streams_opened
        quitters = []
        for _ in range(5):
            if proxy == "http":
                sock = await trio.open_tcp_stream("127.0.0.1", stack.ports.http_proxy)
                await sock.send_all(
                    f"GET {URL} HTTP/1.1\r\nHost: erp.virtual:8000\r\nProxy-Authorization: Bearer {OTHER_TOKEN}\r\n\r\n"
                    .encode()
                )
            else:
                sock = await start_socks5_connect(stack.ports.socks5_proxy, OTHER_TOKEN)
            quitters.append(sock)
        await registry.wait_waiting(5)
        assert registry.admission.statistics().streams == MAX_STREAMS + 5
        started = trio.current_time()
        for sock in quitters:
            await sock.aclose()
        await registry.wait_waiting(0)
        await registry.admission.wait_streams(MAX_STREAMS)
        assert trio.current_time() - started < 5.0  # at once, not after the 60 s of the wait
        for client in hog:
            await client.aclose()
        await registry.admission.wait_streams(0)
        assert master.session.statistics().streams_opened == opened_before  # none for the quitters
        await master.session.wait_no_streams()  # and the tunnel's streams are all given back


async def start_socks5_connect(port: int, token: str) -> trio.SocketStream:
    """A SOCKS5 client that sends CONNECT and does not wait for the reply."""
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    user = SUBACCOUNT.encode()
    await sock.send_all(bytes([5, 1, 2]))
    assert await sock.receive_some(2) == bytes([5, 2])
    await sock.send_all(bytes([1, len(user)]) + user + bytes([len(token)]) + token.encode())
    assert await sock.receive_some(2) == bytes([1, 0])
    name = b"echo.virtual"
    await sock.send_all(bytes([5, 1, 0, 3, len(name)]) + name + struct.pack(">H", 7000))
    return sock


async def test_a_flood_of_wrong_tokens_is_slowed_and_others_are_served(nursery, tmp_path) -> None:
    """One connection sends wrong tokens back to back: past auth_failures_before_delay its 407s
    come one per auth_failure_delay; a correct token from another address is served at once,
    meanwhile. (Before the throttle: thousands of answers per second.)"""
    threshold, delay, flood_seconds = 5, 0.5, 2.0
    with trio.fail_after(TEST_TIMEOUT):
        stack = await limited_stack(
            nursery, tmp_path,
            f"auth_failures_before_delay = {threshold}\nauth_failure_delay = {delay}\nauth_failure_max_delay = 2.0",
        )
        answers = 0
        flooding = trio.Event()

        async def flood() -> None:
            nonlocal answers
            client = await HttpClient.connect(stack.ports.http_proxy)
            with trio.move_on_after(flood_seconds):
                while True:
                    response = await client.request("GET", URL, auth("wrong-token"))
                    assert response.status == 407
                    answers += 1
                    if answers > threshold:
                        flooding.set()
            await client.aclose()

        async with trio.open_nursery() as inner:
            inner.start_soon(flood)
            await flooding.wait()
            good = HttpClient(await connect_from(OTHER_ADDRESS, stack.ports.http_proxy))
            started = trio.current_time()
            assert (await good.request("GET", URL, auth(OTHER_TOKEN))).status == 200
            assert trio.current_time() - started < delay  # not queued behind the flood
            await good.aclose()
        assert answers <= threshold + math.ceil(flood_seconds / delay) + 1

        # SOCKS5 shares the count: the same address's next failure waits its turn too
        started = trio.current_time()
        _, code = await socks5_connect(stack.ports.socks5_proxy, "echo.virtual", 7000, token="wrong", subaccount=SUBACCOUNT)
        assert code == -1 and trio.current_time() - started >= delay * 0.9


async def test_one_address_cannot_take_every_connection_of_the_proxies(nursery, tmp_path) -> None:
    """Before: no bound on connections, which hold a descriptor and a task from their first byte;
    one address could leave the cloud process no descriptor for a node's reconnect. HTTP and
    SOCKS5 share the count."""
    stack = await limited_stack(nursery, tmp_path, "max_connections_per_client_address = 3")
    held = [await connect_from("127.0.0.1", stack.ports.http_proxy) for _ in range(2)]
    held.append(await connect_from("127.0.0.1", stack.ports.socks5_proxy))
    with trio.fail_after(TEST_TIMEOUT):
        await stack.cloud.connections.wait_held("127.0.0.1", 3)  # accepted in the background
        for port in (stack.ports.http_proxy, stack.ports.socks5_proxy):
            extra = await connect_from("127.0.0.1", port)
            assert await extra.receive_some(1) == b""  # closed at once, nothing read or answered
            await extra.aclose()
        other = HttpClient(await connect_from(OTHER_ADDRESS, stack.ports.http_proxy))  # another address is served
        assert (await other.request("GET", URL, auth(OTHER_TOKEN))).status == 200
        await held.pop().aclose()
        await stack.cloud.connections.wait_held("127.0.0.1", 2)
        again = HttpClient(await connect_from("127.0.0.1", stack.ports.http_proxy))
        assert (await again.request("GET", URL, auth(TOKEN))).status == 200
    for sock in held:
        await sock.aclose()
