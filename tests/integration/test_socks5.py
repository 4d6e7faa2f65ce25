"""SOCKS5 connectivity proxy over real loopback sockets, with a fake Router of in-memory streams.

The node behind each stream accepts and echoes (then says "bye" after the client's EOF, to show
half-close), answers HTTP for web.virtual (for curl), or resets / never accepts, by host name.
"""

from __future__ import annotations

import base64
import shutil
import struct
from collections.abc import AsyncIterator

import pytest
import trio
from prometheus_client import REGISTRY

from connector.cloud.auth import Authenticator, hash_token
from connector.cloud.router import NoConnectorError
from connector.cloud.socks5 import Socks5Proxy, Socks5Settings
from connector.tunnel.streams import TunnelStream
from connector.tunnel.testing import memory_stream_pair
from connector.tunnel.types import ErrorCode, StreamProtocol, StreamResetError, Target

TOKEN = "socks-token-sub1"
OTHER_TOKEN = "socks-token-sub2"
HANDSHAKE_TIMEOUT = 0.3
CONNECT_TIMEOUT = 0.3
TEST_TIMEOUT = 20.0

RESETS = {
    "denied.virtual": ErrorCode.DENIED,
    "nomapping.virtual": ErrorCode.NO_MAPPING,
    "refused.virtual": ErrorCode.CONNECT_FAILED,
    "timeout.virtual": ErrorCode.CONNECT_TIMEOUT,
    "broken.virtual": ErrorCode.INTERNAL_ERROR,
}


class FakeRouter:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.opened: list[tuple[str, str, Target]] = []
        self.acceptors: list[TunnelStream] = []  # the node's end of each stream, in order
        self.stream_opened = trio.Event()  # set at the first open_stream

    async def open_stream(self, subaccount: str, location_id: str, target: Target) -> TunnelStream:
        self.opened.append((subaccount, location_id, target))
        if (subaccount, location_id) not in {("sub1", ""), ("sub1", "loc2")}:
            raise NoConnectorError("no connector connected")
        opener, acceptor = memory_stream_pair(target)
        self.acceptors.append(acceptor)
        self.stream_opened.set()
        self.nursery.start_soon(self.node, acceptor)
        return opener

    async def node(self, stream: TunnelStream) -> None:
        host = stream.target.virtual_host
        try:
            if host in RESETS:
                await stream.reset(RESETS[host], "test")
                return
            if host == "silent.virtual":
                await trio.sleep_forever()
            await stream.accept()
            if host == "web.virtual":
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(65536)
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
                await stream.send_eof()
                return
            if host == "dies.virtual":
                await stream.send_all(await stream.receive_some(65536))
                await stream.reset(ErrorCode.TUNNEL_LOST, "master crashed")
                return
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_all(b"bye")
            await stream.send_eof()
        except (StreamResetError, trio.BrokenResourceError, trio.ClosedResourceError):
            return


@pytest.fixture
async def socks_env() -> AsyncIterator[tuple[int, FakeRouter]]:
    async with trio.open_nursery() as nursery:
        router = FakeRouter(nursery)
        authenticator = Authenticator({"sub1": [hash_token(TOKEN)], "sub2": [hash_token(OTHER_TOKEN)]})
        settings = Socks5Settings(handshake_timeout=HANDSHAKE_TIMEOUT, connect_timeout=CONNECT_TIMEOUT)
        port = await nursery.start(Socks5Proxy(router, authenticator, settings=settings).run, "127.0.0.1", 0)
        with trio.fail_after(TEST_TIMEOUT):
            yield port, router
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


async def test_sap_token_method_with_location(socks_env: tuple[int, FakeRouter]) -> None:
    port, router = socks_env
    before = sample("succeeded")
    sock, code = await connect(port, 0x80, sap_auth(TOKEN, "loc2"), "DB.virtual", 5432)
    assert code == 0
    await echo_round_trip(sock)
    assert router.opened == [("sub1", "loc2", Target("db.virtual", 5432, StreamProtocol.TCP))]
    await wait_for_sample("succeeded", before + 1)


async def test_sap_token_method_default_location(socks_env: tuple[int, FakeRouter]) -> None:
    port, router = socks_env
    sock, code = await connect(port, 0x80, sap_auth(TOKEN, ""), "db.virtual")
    assert code == 0
    await echo_round_trip(sock)
    assert router.opened[0][:2] == ("sub1", "")


@pytest.mark.parametrize(("user", "location"), [("sub1", ""), ("sub1;loc2", "loc2")])
async def test_username_password_method(socks_env: tuple[int, FakeRouter], user: str, location: str) -> None:
    port, router = socks_env
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
async def test_bad_credentials_are_refused(socks_env: tuple[int, FakeRouter], method: int, auth: bytes) -> None:
    port, router = socks_env
    sock = await handshake(port, method, auth)
    data = b""
    while chunk := await sock.receive_some(100):
        data += chunk
    assert data in (b"\x01\x01", b"")  # failure status, or closed on a malformed sub-negotiation
    assert router.opened == []


async def test_unknown_location_is_network_unreachable(socks_env: tuple[int, FakeRouter]) -> None:
    port, router = socks_env
    sock, code = await connect(port, 0x80, sap_auth(TOKEN, "elsewhere"), "db.virtual")
    assert code == 0x03
    assert await sock.receive_some(10) == b""
    assert router.opened[0][:2] == ("sub1", "elsewhere")


async def test_no_acceptable_method(socks_env: tuple[int, FakeRouter]) -> None:
    port, _ = socks_env
    before = sample("no_acceptable_method")
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(b"\x05\x02\x00\x01")  # no-auth and GSSAPI only
    assert await read_exactly(sock, 2) == b"\x05\xff"
    assert await sock.receive_some(10) == b""
    await wait_for_sample("no_acceptable_method", before + 1)


@pytest.mark.parametrize("command", [0x02, 0x03])
async def test_bind_and_udp_are_not_supported(socks_env: tuple[int, FakeRouter], command: int) -> None:
    port, router = socks_env
    sock = await handshake(port, 0x80, sap_auth(TOKEN, ""))
    assert await read_exactly(sock, 2) == b"\x01\x00"
    await sock.send_all(connect_request("db.virtual", 3300, command))
    assert (await read_exactly(sock, 10))[1] == 0x07
    assert router.opened == []


async def test_unknown_address_type(socks_env: tuple[int, FakeRouter]) -> None:
    port, _ = socks_env
    sock = await handshake(port, 0x80, sap_auth(TOKEN, ""))
    assert await read_exactly(sock, 2) == b"\x01\x00"
    await sock.send_all(b"\x05\x01\x00\x09")
    assert (await read_exactly(sock, 10))[1] == 0x08


@pytest.mark.parametrize(
    ("address", "host"),
    [(b"\x01" + bytes([10, 1, 2, 3]), "10.1.2.3"), (b"\x04" + bytes(15) + b"\x01", "::1")],
)
async def test_ip_address_types_name_virtual_hosts(
    socks_env: tuple[int, FakeRouter], address: bytes, host: str
) -> None:
    port, router = socks_env
    sock = await handshake(port, 0x80, sap_auth(TOKEN, ""))
    assert await read_exactly(sock, 2) == b"\x01\x00"
    await sock.send_all(b"\x05\x01\x00" + address + struct.pack("!H", 8080))
    assert (await read_exactly(sock, 10))[1] == 0x00
    await echo_round_trip(sock)
    assert router.opened[0][2] == Target(host, 8080, StreamProtocol.TCP)


async def test_truncated_handshake_is_closed(socks_env: tuple[int, FakeRouter]) -> None:
    port, router = socks_env
    before = sample("truncated_handshake")
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(b"\x05\x01\x80\x01\x00\x00")  # greeting, then half a token length
    assert await read_exactly(sock, 2) == b"\x05\x80"
    await sock.send_eof()
    assert await sock.receive_some(10) == b""
    await wait_for_sample("truncated_handshake", before + 1)
    assert router.opened == []


async def test_silent_client_times_out(socks_env: tuple[int, FakeRouter]) -> None:
    port, _ = socks_env
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    started = trio.current_time()
    assert await sock.receive_some(10) == b""
    elapsed = trio.current_time() - started
    assert HANDSHAKE_TIMEOUT * 0.9 <= elapsed < HANDSHAKE_TIMEOUT + 2.0


@pytest.mark.parametrize(
    ("host", "code"),
    [
        ("denied.virtual", 0x02),
        ("nomapping.virtual", 0x02),
        ("refused.virtual", 0x05),
        ("timeout.virtual", 0x04),
        ("broken.virtual", 0x01),
        ("silent.virtual", 0x04),  # the node never accepts: connect_timeout
    ],
)
async def test_connect_errors_map_to_replies(socks_env: tuple[int, FakeRouter], host: str, code: int) -> None:
    port, _ = socks_env
    sock, reply = await connect(port, 0x80, sap_auth(TOKEN, ""), host)
    assert reply == code
    assert await sock.receive_some(10) == b""


async def test_stream_reset_mid_session_resets_the_client(socks_env: tuple[int, FakeRouter]) -> None:
    port, _ = socks_env
    sock, code = await connect(port, 0x80, sap_auth(TOKEN, ""), "dies.virtual")
    assert code == 0
    await sock.send_all(b"ping")
    assert await read_exactly(sock, 4) == b"ping"
    with pytest.raises(trio.BrokenResourceError) as info:
        while await sock.receive_some(10):
            pass
    assert isinstance(info.value.__cause__, ConnectionResetError)


async def test_data_sent_with_the_request_is_not_lost(socks_env: tuple[int, FakeRouter]) -> None:
    """A client that pipelines its first bytes right after CONNECT (no wait for the reply)."""
    port, _ = socks_env
    sock = await handshake(port, 0x80, sap_auth(TOKEN, ""))
    assert await read_exactly(sock, 2) == b"\x01\x00"
    await sock.send_all(connect_request("db.virtual", 1) + b"early")
    assert (await read_exactly(sock, 10))[1] == 0
    assert await read_exactly(sock, 5) == b"early"


async def test_connect_abandoned_by_cancellation_resets_the_stream(nursery: trio.Nursery) -> None:
    """The proxy is cancelled while the node has not yet answered: the stream is not left open."""
    router = FakeRouter(nursery)
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
        await router.acceptors[0].wait_reset()
    with pytest.raises(StreamResetError) as info:
        await router.acceptors[0].receive_some()
    assert info.value.code is ErrorCode.CANCEL


CURL = shutil.which("curl")


@pytest.mark.skipif(CURL is None, reason="curl not installed")
async def test_curl_socks5_hostname(socks_env: tuple[int, FakeRouter]) -> None:
    port, router = socks_env
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

