"""SOCKS5 connectivity proxy over real loopback sockets, a real tunnel session pair and the real node.

The node (`tests.support.socksrouter.Node`: `connector.agent.forward.serve_stream`) maps TCP
targets onto real servers on 127.0.0.1: an echo server (it says "bye" after the client's EOF, to
show half-close), a small HTTP server for web.virtual (for curl), a closed port
(refused.virtual), a server that resets the connection after its first echo (dies.virtual).
A few targets get a specific reset from a small handler in front of it (`RESETS`), or no answer
at all (silent.virtual). `SessionRouter` routes over session pairs and can hand over to a next
master, for the replay tests.
"""

from __future__ import annotations

import base64
import functools
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import attrs
import pytest
import trio
from prometheus_client import REGISTRY

from connector.cloud.auth import Authenticator, hash_token
from connector.cloud.replay import MAX_ATTEMPTS
from connector.cloud.socks5 import Socks5Proxy, Socks5Settings
from connector.tunnel.session import SessionStream
from connector.tunnel.types import ErrorCode, StreamProtocol, Target
from tests.support.socksrouter import Node, SessionRouter, StreamHandler, refuse, reset_code

TOKEN = "socks-token-sub1"
OTHER_TOKEN = "socks-token-sub2"
HANDSHAKE_TIMEOUT = 0.3
CONNECT_TIMEOUT = 0.3
TEST_TIMEOUT = 20.0
LOCATIONS = frozenset({("sub1", ""), ("sub1", "loc2")})

RESETS = {
    "denied.virtual": ErrorCode.DENIED,
    "timeout.virtual": ErrorCode.CONNECT_TIMEOUT,
    "broken.virtual": ErrorCode.INTERNAL_ERROR,
}


async def echo_server(sock: trio.SocketStream) -> None:
    try:
        while data := await sock.receive_some(65536):
            await sock.send_all(data)
        await sock.send_all(b"bye")
        await sock.send_eof()
    except trio.BrokenResourceError:
        pass


async def web_server(sock: trio.SocketStream) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
        data = await sock.receive_some(65536)
        if not data:
            return
        head += data
    await sock.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")


async def echo_then_reset(sock: trio.SocketStream) -> None:
    await sock.send_all(await sock.receive_some(65536))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await sock.aclose()  # linger 0: RST


async def serve(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@attrs.define
class Seen:
    """The streams the handler in front of the node got, in order."""

    streams: list[SessionStream] = attrs.Factory(list)
    arrived: trio.Event = attrs.Factory(trio.Event)  # set at the first

    async def first(self) -> SessionStream:
        await self.arrived.wait()
        return self.streams[0]


@attrs.define
class Env:
    port: int
    router: SessionRouter
    node: Node


async def start_node(nursery: trio.Nursery) -> Node:
    node = Node()
    echo = await serve(nursery, echo_server)
    for host, port in [("db.virtual", 5432), ("db.virtual", 3300), ("db.virtual", 1),
                       ("10.1.2.3", 8080), ("::1", 8080)]:
        node.tcp(host, port, echo)
    node.tcp("web.virtual", 8000, await serve(nursery, web_server))
    node.tcp("dies.virtual", 3300, await serve(nursery, echo_then_reset))
    node.tcp("refused.virtual", 3300, closed_port())
    return node


def front(node: Node, seen: Seen | None = None) -> StreamHandler:
    """The node, with specific resets (`RESETS`) and a target it never answers in front of it."""

    async def handler(stream: SessionStream) -> None:
        if seen is not None:
            seen.streams.append(stream)
            seen.arrived.set()
        host = stream.target.virtual_host
        if host in RESETS:
            await stream.reset(RESETS[host], "test")
        elif host == "silent.virtual":
            await stream.wait_reset()
        else:
            await node.serve(stream)

    return handler


@pytest.fixture
async def socks_env() -> AsyncIterator[Env]:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        node = await start_node(nursery)
        router = SessionRouter(stack, LOCATIONS)
        await router.add_master(front(node))
        authenticator = Authenticator({"sub1": [hash_token(TOKEN)], "sub2": [hash_token(OTHER_TOKEN)]})
        settings = Socks5Settings(handshake_timeout=HANDSHAKE_TIMEOUT, connect_timeout=CONNECT_TIMEOUT)
        port = await nursery.start(Socks5Proxy(router, authenticator, settings=settings).run, "127.0.0.1", 0)
        with trio.fail_after(TEST_TIMEOUT):
            yield Env(port, router, node)
        nursery.cancel_scope.cancel()


async def read_exactly(sock: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await sock.receive_some(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {data!r}")
        data += chunk
    return data


def sap_auth(token: str, location_id: str) -> bytes:
    encoded = base64.b64encode(location_id.encode()) if location_id else b""
    return b"\x01" + struct.pack("!I", len(token)) + token.encode() + bytes([len(encoded)]) + encoded


def user_auth(user: str, password: str) -> bytes:
    return b"\x01" + bytes([len(user)]) + user.encode() + bytes([len(password)]) + password.encode()


def connect_request(host: str, port: int, command: int = 1) -> bytes:
    return b"\x05" + bytes([command, 0, 3, len(host)]) + host.encode() + struct.pack("!H", port)


async def handshake(port: int, method: int, auth: bytes) -> trio.SocketStream:
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(bytes([5, 2, 0x00, method]))
    assert await read_exactly(sock, 2) == bytes([5, method])
    await sock.send_all(auth)
    return sock


async def connect(port: int, method: int, auth: bytes, host: str, dport: int = 3300) -> tuple[trio.SocketStream, int]:
    sock = await handshake(port, method, auth)
    assert await read_exactly(sock, 2) == b"\x01\x00"
    await sock.send_all(connect_request(host, dport))
    response = await read_exactly(sock, 10)
    assert response[0] == 5 and response[2:4] == b"\x00\x01"
    return sock, response[1]


async def echo_round_trip(sock: trio.SocketStream) -> None:
    await sock.send_all(b"ping")
    assert await read_exactly(sock, 4) == b"ping"
    await sock.send_eof()  # half-close: the node still answers after our EOF
    rest = b""
    while chunk := await sock.receive_some(100):
        rest += chunk
    assert rest == b"bye"


def sample(status: str) -> float:
    return REGISTRY.get_sample_value("connector_proxy_requests_total", {"proxy": "socks5", "status": status}) or 0.0


async def wait_for_sample(status: str, value: float) -> None:
    for _ in range(100):
        if sample(status) == value:
            return
        await trio.sleep(0.01)
    assert sample(status) == value


async def test_sap_token_method_with_location(socks_env: Env) -> None:
    port, router = socks_env.port, socks_env.router
    before = sample("succeeded")
    sock, code = await connect(port, 0x80, sap_auth(TOKEN, "loc2"), "DB.virtual", 5432)
    assert code == 0
    await echo_round_trip(sock)
    assert router.opened == [("sub1", "loc2", Target("db.virtual", 5432, StreamProtocol.TCP))]
    await wait_for_sample("succeeded", before + 1)


async def test_sap_token_method_default_location(socks_env: Env) -> None:
    port, router = socks_env.port, socks_env.router
    sock, code = await connect(port, 0x80, sap_auth(TOKEN, ""), "db.virtual")
    assert code == 0
    await echo_round_trip(sock)
    assert router.opened[0][:2] == ("sub1", "")


@pytest.mark.parametrize(("user", "location"), [("sub1", ""), ("sub1;loc2", "loc2")])
async def test_username_password_method(socks_env: Env, user: str, location: str) -> None:
    port, router = socks_env.port, socks_env.router
    sock, code = await connect(port, 0x02, user_auth(user, TOKEN), "db.virtual")
    assert code == 0
    await echo_round_trip(sock)
    assert router.opened[0][:2] == ("sub1", location)


@pytest.mark.parametrize(
    ("method", "auth"),
    [
        (0x80, sap_auth("wrong-token", "")),
        (0x02, user_auth("sub1", "wrong-token")),
        (0x02, user_auth("sub2", TOKEN)),  # a valid token of another subaccount
        (0x80, b"\x02" + sap_auth(TOKEN, "")[1:]),  # unknown sub-negotiation version
        (0x80, sap_auth(TOKEN, "")[:-1] + b"\x03abc"),  # location id not base64
    ],
)
async def test_bad_credentials_are_refused(socks_env: Env, method: int, auth: bytes) -> None:
    port, router = socks_env.port, socks_env.router
    sock = await handshake(port, method, auth)
    data = b""
    while chunk := await sock.receive_some(100):
        data += chunk
    assert data in (b"\x01\x01", b"")  # failure status, or closed on a malformed sub-negotiation
    assert router.opened == []


async def test_unknown_location_is_network_unreachable(socks_env: Env) -> None:
    port, router = socks_env.port, socks_env.router
    sock, code = await connect(port, 0x80, sap_auth(TOKEN, "elsewhere"), "db.virtual")
    assert code == 0x03
    assert await sock.receive_some(10) == b""
    assert router.opened[0][:2] == ("sub1", "elsewhere")


async def test_no_acceptable_method(socks_env: Env) -> None:
    port = socks_env.port
    before = sample("no_acceptable_method")
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(b"\x05\x02\x00\x01")  # no-auth and GSSAPI only
    assert await read_exactly(sock, 2) == b"\x05\xff"
    assert await sock.receive_some(10) == b""
    await wait_for_sample("no_acceptable_method", before + 1)


@pytest.mark.parametrize("command", [0x02, 0x03])
async def test_bind_and_udp_are_not_supported(socks_env: Env, command: int) -> None:
    port, router = socks_env.port, socks_env.router
    sock = await handshake(port, 0x80, sap_auth(TOKEN, ""))
    assert await read_exactly(sock, 2) == b"\x01\x00"
    await sock.send_all(connect_request("db.virtual", 3300, command))
    assert (await read_exactly(sock, 10))[1] == 0x07
    assert router.opened == []


async def test_unknown_address_type(socks_env: Env) -> None:
    port = socks_env.port
    sock = await handshake(port, 0x80, sap_auth(TOKEN, ""))
    assert await read_exactly(sock, 2) == b"\x01\x00"
    await sock.send_all(b"\x05\x01\x00\x09")
    assert (await read_exactly(sock, 10))[1] == 0x08


@pytest.mark.parametrize(
    ("address", "host"),
    [(b"\x01" + bytes([10, 1, 2, 3]), "10.1.2.3"), (b"\x04" + bytes(15) + b"\x01", "::1")],
)
async def test_ip_address_types_name_virtual_hosts(
    socks_env: Env, address: bytes, host: str
) -> None:
    port, router = socks_env.port, socks_env.router
    sock = await handshake(port, 0x80, sap_auth(TOKEN, ""))
    assert await read_exactly(sock, 2) == b"\x01\x00"
    await sock.send_all(b"\x05\x01\x00" + address + struct.pack("!H", 8080))
    assert (await read_exactly(sock, 10))[1] == 0x00
    await echo_round_trip(sock)
    assert router.opened[0][2] == Target(host, 8080, StreamProtocol.TCP)


async def test_truncated_handshake_is_closed(socks_env: Env) -> None:
    port, router = socks_env.port, socks_env.router
    before = sample("truncated_handshake")
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(b"\x05\x01\x80\x01\x00\x00")  # greeting, then half a token length
    assert await read_exactly(sock, 2) == b"\x05\x80"
    await sock.send_eof()
    assert await sock.receive_some(10) == b""
    await wait_for_sample("truncated_handshake", before + 1)
    assert router.opened == []


async def test_silent_client_times_out(socks_env: Env) -> None:
    port = socks_env.port
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    started = trio.current_time()
    assert await sock.receive_some(10) == b""
    elapsed = trio.current_time() - started
    assert HANDSHAKE_TIMEOUT * 0.9 <= elapsed < HANDSHAKE_TIMEOUT + 2.0


@pytest.mark.parametrize(
    ("host", "code"),
    [
        ("denied.virtual", 0x02),
        ("nomapping.virtual", 0x02),  # the real node: no mapping
        ("refused.virtual", 0x05),  # the real node: the internal host's port is closed
        ("timeout.virtual", 0x04),
        ("broken.virtual", 0x01),
        ("silent.virtual", 0x04),  # the node never accepts: connect_timeout
    ],
)
async def test_connect_errors_map_to_replies(socks_env: Env, host: str, code: int) -> None:
    port = socks_env.port
    sock, reply = await connect(port, 0x80, sap_auth(TOKEN, ""), host)
    assert reply == code
    assert await sock.receive_some(10) == b""


async def test_stream_reset_mid_session_resets_the_client(socks_env: Env) -> None:
    port = socks_env.port
    sock, code = await connect(port, 0x80, sap_auth(TOKEN, ""), "dies.virtual")
    assert code == 0
    await sock.send_all(b"ping")
    assert await read_exactly(sock, 4) == b"ping"
    with pytest.raises(trio.BrokenResourceError) as info:
        while await sock.receive_some(10):
            pass
    assert isinstance(info.value.__cause__, ConnectionResetError)


async def test_data_sent_with_the_request_is_not_lost(socks_env: Env) -> None:
    """A client that pipelines its first bytes right after CONNECT (no wait for the reply)."""
    port = socks_env.port
    sock = await handshake(port, 0x80, sap_auth(TOKEN, ""))
    assert await read_exactly(sock, 2) == b"\x01\x00"
    await sock.send_all(connect_request("db.virtual", 1) + b"early")
    assert (await read_exactly(sock, 10))[1] == 0
    assert await read_exactly(sock, 5) == b"early"


async def test_connect_abandoned_by_cancellation_resets_the_stream(nursery: trio.Nursery) -> None:
    """The proxy is cancelled while the node has not yet answered: the stream is not left open."""
    async with AsyncExitStack() as stack:
        router = SessionRouter(stack)
        seen = Seen()
        await router.add_master(front(Node(), seen))
        authenticator = Authenticator({"sub1": [hash_token(TOKEN)]})
        # connect_timeout far beyond the test: the reset can only come from the cancellation
        proxy = Socks5Proxy(router, authenticator, settings=Socks5Settings(connect_timeout=10 * TEST_TIMEOUT))
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await proxy.run("127.0.0.1", 0, task_status=task_status)

        port = await nursery.start(run)
        sock = await handshake(port, 0x80, sap_auth(TOKEN, ""))
        assert await read_exactly(sock, 2) == b"\x01\x00"
        await sock.send_all(connect_request("silent.virtual", 3300))
        with trio.fail_after(TEST_TIMEOUT):
            await router.stream_opened.wait()
            scope.cancel()
            assert await reset_code(await seen.first()) is ErrorCode.CANCEL


# --- replay of connects the node did not process ---------------------------------------------------


@pytest.fixture
async def handover() -> AsyncIterator[tuple[Node, trio.Nursery]]:
    """The node and a nursery for the proxy; each test makes its masters in its own task (a
    session pair's nursery is entered and left there)."""
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery)
        with trio.fail_after(TEST_TIMEOUT):
            yield node, nursery
        nursery.cancel_scope.cancel()


async def start_proxy(nursery: trio.Nursery, router: SessionRouter, connect_timeout: float = 5.0) -> int:
    authenticator = Authenticator({"sub1": [hash_token(TOKEN)]})
    settings = Socks5Settings(handshake_timeout=5.0, connect_timeout=connect_timeout)
    return int(await nursery.start(Socks5Proxy(router, authenticator, settings=settings).run, "127.0.0.1", 0))


async def test_connect_refused_by_a_handing_over_master_is_replayed_on_the_next(
    handover: tuple[Node, trio.Nursery],
) -> None:
    """REFUSED (not the master): opened again avoiding that tunnel; the bytes the client sent
    behind its request (read with it, held until success) reach the internal host once."""
    node, nursery = handover
    async with AsyncExitStack() as stack:
        router = SessionRouter(stack)
        await router.add_master(refuse)
        await router.add_master(node.serve)
        port = await start_proxy(nursery, router)
        before = sample("succeeded")
        sock = await handshake(port, 0x80, sap_auth(TOKEN, ""))
        assert await read_exactly(sock, 2) == b"\x01\x00"
        await sock.send_all(connect_request("db.virtual", 3300) + b"early")
        assert (await read_exactly(sock, 10))[1] == 0x00
        assert await read_exactly(sock, 5) == b"early"
        await echo_round_trip(sock)
        first, second = router.streams
        assert router.avoided == [None, first]
        assert first.session is router.masters[0] and second.session is router.masters[1]  # type: ignore[attr-defined]
        assert await reset_code(first) is ErrorCode.REFUSED
        await wait_for_sample("succeeded", before + 1)


async def test_connect_lost_with_its_tunnel_before_accept_is_replayed(
    handover: tuple[Node, trio.Nursery],
) -> None:
    """The first master's tunnel dies while the connect is unanswered: opened on the next one."""
    node, nursery = handover
    async with AsyncExitStack() as stack:
        router = SessionRouter(stack)

        async def crash(stream: SessionStream) -> None:
            await stream.session.aclose(ErrorCode.INTERNAL_ERROR, "node crashed")

        await router.add_master(crash)
        await router.add_master(node.serve)
        port = await start_proxy(nursery, router)
        sock, code = await connect(port, 0x80, sap_auth(TOKEN, ""), "db.virtual")
        assert code == 0x00
        await echo_round_trip(sock)
        assert len(router.streams) == 2 and router.avoided == [None, router.streams[0]]
        # the GOAWAY named this stream as handed to the node: lost with its tunnel, not refused
        assert await reset_code(router.streams[0]) is ErrorCode.TUNNEL_LOST


async def test_connect_failed_is_not_replayed(
    handover: tuple[Node, trio.Nursery],
) -> None:
    """The node tried: the internal host refused. That is the answer (0x05), not a replay."""
    node, nursery = handover
    async with AsyncExitStack() as stack:
        router = SessionRouter(stack)
        await router.add_master(node.serve)
        await router.add_master(node.serve)
        port = await start_proxy(nursery, router)
        sock, code = await connect(port, 0x80, sap_auth(TOKEN, ""), "refused.virtual")
        assert code == 0x05
        assert await sock.receive_some(10) == b""
        assert len(router.streams) == 1
        assert await reset_code(router.streams[0]) is ErrorCode.CONNECT_FAILED


async def test_replays_stop_at_the_bound(
    handover: tuple[Node, trio.Nursery],
) -> None:
    """Every master refuses: the connect is sent MAX_ATTEMPTS times, then answered 0x03."""
    _, nursery = handover
    async with AsyncExitStack() as stack:
        router = SessionRouter(stack)
        for _ in range(MAX_ATTEMPTS + 2):
            await router.add_master(refuse)
        port = await start_proxy(nursery, router)
        sock, code = await connect(port, 0x80, sap_auth(TOKEN, ""), "db.virtual")
        assert code == 0x03  # SAP's "Cloud Connector not connected"
        assert await sock.receive_some(10) == b""
        assert len(router.streams) == MAX_ATTEMPTS
        assert [stream.session for stream in router.streams] == router.masters[:MAX_ATTEMPTS]  # type: ignore[attr-defined]


async def test_replays_stay_within_the_connect_deadline(
    handover: tuple[Node, trio.Nursery],
) -> None:
    """The next master never answers: the whole connect, replay included, ends at connect_timeout."""
    _, nursery = handover
    async with AsyncExitStack() as stack:
        router = SessionRouter(stack)
        seen = Seen()
        await router.add_master(refuse)
        await router.add_master(front(Node(), seen))
        port = await start_proxy(nursery, router, connect_timeout=CONNECT_TIMEOUT)
        sock = await handshake(port, 0x80, sap_auth(TOKEN, ""))
        assert await read_exactly(sock, 2) == b"\x01\x00"
        started = trio.current_time()
        await sock.send_all(connect_request("silent.virtual", 3300))
        assert (await read_exactly(sock, 10))[1] == 0x04
        assert CONNECT_TIMEOUT * 0.9 <= trio.current_time() - started < CONNECT_TIMEOUT + 2.0
        assert len(router.streams) == 2
        assert await reset_code(await seen.first()) is ErrorCode.CONNECT_TIMEOUT


CURL = shutil.which("curl")


@pytest.mark.skipif(CURL is None, reason="curl not installed")
async def test_curl_socks5_hostname(socks_env: Env) -> None:
    port, router = socks_env.port, socks_env.router
    assert CURL is not None
    result = await trio.run_process(
        [CURL, "-sS", "--socks5-hostname", f"127.0.0.1:{port}", "--proxy-user", f"sub1;loc2:{TOKEN}",
         "http://web.virtual:8000/"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello"
    assert router.opened == [("sub1", "loc2", Target("web.virtual", 8000, StreamProtocol.TCP))]
    result = await trio.run_process(
        [CURL, "-sS", "--socks5-hostname", f"127.0.0.1:{port}", "--proxy-user", "sub1:wrong",
         "http://web.virtual:8000/"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode != 0
    assert len(router.opened) == 1

