"""HTTP connectivity proxy over real loopback sockets, with a fake Router of in-memory streams.

The "node" at the far end of each stream is a tiny h11 server: it echoes the request (method,
target and headers in response headers, the body streamed back as it arrives), or resets the
stream with the code named in the path (/reset/<CODE>) to exercise the error mapping. A WebSocket
upgrade to /ws/... is answered with 101 and a greeting, then every raw byte is echoed until EOF;
one to /denied/... gets the 403 JSON a node's allow-list gives when the resource does not allow
WebSocket upgrades. /close-after and /park-then-close close the stream after the response
(at once, or when the test opens `close_gate`) to exercise idle-stream handling and the retry.
/early answers whole before it reads the request body.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
from collections.abc import AsyncIterator

import h11
import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from connector.cloud.auth import Authenticator, hash_token
from connector.cloud.proxy import (
    BadTargetError,
    HttpProxy,
    ProxySettings,
    forwarded_headers,
    is_websocket_upgrade,
    parse_proxy_target,
)
from connector.cloud.router import NoConnectorError
from connector.tunnel.streams import TunnelStream
from connector.tunnel.testing import memory_stream_pair
from connector.tunnel.types import ErrorCode, StreamResetError, Target

TOKEN = "app-token-sub1"
OTHER_TOKEN = "app-token-sub2"
AUTH = (b"proxy-authorization", b"Bearer " + TOKEN.encode())
TEST_TIMEOUT = 20.0


class FakeRouter:
    """Routes (subaccount, location_id) pairs it knows to an in-memory node; others get 503."""

    def __init__(self, nursery: trio.Nursery, locations: set[tuple[str, str]]) -> None:
        self.nursery = nursery
        self.locations = locations
        self.opened: list[tuple[str, str, Target]] = []
        self.gate = trio.Event()
        self.gate.set()
        self.node_saw_reset: list[ErrorCode] = []
        self.acceptors: list[TunnelStream] = []
        self.idle_closed = trio.Event()
        self.close_gate = trio.Event()
        self.websockets_finished: list[str] = []
        self.reset_once_seen: set[str] = set()

    async def open_stream(self, subaccount: str, location_id: str, target: Target) -> TunnelStream:
        self.opened.append((subaccount, location_id, target))
        if (subaccount, location_id) not in self.locations:
            raise NoConnectorError(f"no connector connected for location {location_id!r}")
        if target.virtual_host == "refused.virtual":
            raise StreamResetError(ErrorCode.TUNNEL_LOST, "master went away while opening")
        opener, acceptor = memory_stream_pair(target)
        self.acceptors.append(acceptor)
        self.nursery.start_soon(self.echo_node, acceptor)
        return opener

    async def echo_node(self, stream: TunnelStream) -> None:
        conn = h11.Connection(h11.SERVER)

        async def send(event: h11.Event) -> None:
            await stream.send_all(conn.send(event) or b"")

        async def next_event() -> h11.Event:
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event  # type: ignore[return-value]
                conn.receive_data(await stream.receive_some(65536))

        try:
            while True:
                request = await next_event()
                if not isinstance(request, h11.Request):
                    return
                path = request.target.decode()
                if path.startswith("/reset/"):
                    await stream.reset(ErrorCode[path.split("/")[2]], "test reset")
                    return
                if path.startswith("/reset-once/") and path not in self.reset_once_seen:
                    # the master dies under the first attempt; the next master answers
                    self.reset_once_seen.add(path)
                    await stream.reset(ErrorCode[path.split("/")[2]], "test reset, first attempt only")
                    return
                if path == "/gate":
                    await self.gate.wait()
                if path == "/with-trailers":  # a chunked answer whose trailers hold fields no trailer may carry
                    while not isinstance(await next_event(), h11.EndOfMessage):
                        pass
                    await send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
                    await send(h11.Data(data=b"hello"))
                    await send(h11.EndOfMessage(headers=[(b"x-checksum", b"5d41"), (b"set-cookie", b"admin=1"),
                                                         (b"content-length", b"999")]))
                    conn.start_next_cycle()
                    continue
                if path == "/early":
                    # a whole answer before reading the body (an echo of a small body can, an
                    # early error does); then the body, then the next request on the stream
                    await send(h11.Response(status_code=200, headers=[
                        (b"content-length", b"5"), (b"x-stream-id", str(id(stream)).encode())]))
                    await send(h11.Data(data=b"early"))
                    await send(h11.EndOfMessage())
                    while not isinstance(await next_event(), h11.EndOfMessage):
                        pass
                    conn.start_next_cycle()
                    continue
                if path.startswith(("/ws/", "/denied/")):
                    while not isinstance(await next_event(), h11.EndOfMessage):
                        pass
                    if path.startswith("/ws/"):
                        await self.websocket_echo(stream, conn, request)
                        return
                    body = json.dumps({"error": "websocket_not_allowed", "message": "denied"}).encode()
                    await send(h11.Response(status_code=403, headers=[
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"x-stream-id", str(id(stream)).encode()),
                    ]))
                    await send(h11.Data(data=body))
                    await send(h11.EndOfMessage())
                    conn.start_next_cycle()
                    continue
                headers = [
                    (b"x-echo-method", request.method),
                    (b"x-echo-target", request.target),
                    (b"x-echo-headers", json.dumps([[n.decode(), v.decode()] for n, v in request.headers]).encode()),
                    (b"x-stream-id", str(id(stream)).encode()),
                    (b"transfer-encoding", b"chunked"),
                    (b"connection", b"keep-alive"),
                ]
                await send(h11.Response(status_code=200, headers=headers))
                if path == "/half-then-reset":
                    await send(h11.Data(data=b"partial"))
                    await stream.reset(ErrorCode.BACKEND_RESET, "backend died")
                    return
                while True:
                    event = await next_event()
                    if isinstance(event, h11.Data):
                        await send(h11.Data(data=event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        await send(h11.EndOfMessage())
                        break
                    else:
                        return
                conn.start_next_cycle()
                if path == "/stop-reading":
                    # a node that no longer takes data on this stream (its FIN not yet sent): the
                    # proxy's next write fails at once. Reaches into the in-memory stream's channel.
                    await stream._receive.aclose()  # type: ignore[attr-defined]
                    await self.close_gate.wait()
                    return
                if path in ("/close-after", "/park-then-close"):
                    if path == "/park-then-close":
                        await self.close_gate.wait()  # reads nothing meanwhile
                    await stream.aclose()
                    self.idle_closed.set()
                    return
        except StreamResetError as exc:
            self.node_saw_reset.append(exc.code)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return


    async def websocket_echo(self, stream: TunnelStream, conn: h11.Connection, request: h11.Request) -> None:
        """Answer an upgrade with 101 plus a greeting, then echo raw bytes; half-close at EOF."""
        key = dict(request.headers)[b"sec-websocket-key"]
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        head = conn.send(h11.InformationalResponse(status_code=101, reason=b"Switching Protocols", headers=[
            (b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"sec-websocket-accept", accept),
            (b"sec-websocket-protocol", b"chat"), (b"keep-alive", b"timeout=5"),
            (b"x-echo-headers", json.dumps([[n.decode(), v.decode()] for n, v in request.headers]).encode()),
        ])) or b""
        await stream.send_all(head + NODE_GREETING)  # one write: the proxy gets both together
        if request.target == b"/ws/reset":
            await stream.reset(ErrorCode.BACKEND_RESET, "backend died")
            return
        leftover, _ = conn.trailing_data
        if leftover:
            await stream.send_all(bytes(leftover))
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()
        self.websockets_finished.append("clean")


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
NODE_GREETING = b"NODE-HELLO"


class Client:
    """A minimal HTTP/1.1 client on a real socket, keep-alive across requests."""

    def __init__(self, sock: trio.SocketStream) -> None:
        self.sock = sock
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, event: h11.Event) -> None:
        await self.sock.send_all(self.conn.send(event) or b"")

    async def next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            self.conn.receive_data(await self.sock.receive_some(65536))

    async def read_response(self) -> tuple[h11.Response, bytes]:
        response = await self.next_event()
        while isinstance(response, h11.InformationalResponse):
            response = await self.next_event()
        assert isinstance(response, h11.Response), response
        body = bytearray()
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        return response, bytes(body)

    async def request(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
    ) -> tuple[h11.Response, bytes]:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        if body and not any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in headers):
            headers = headers + [(b"content-length", str(len(body)).encode())]
        await self.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        return await self.read_response()


def header(response: h11.Response, name: bytes) -> bytes | None:
    return next((v for n, v in response.headers if n == name), None)


@pytest.fixture
async def proxy_env() -> AsyncIterator[tuple[int, FakeRouter]]:
    async with trio.open_nursery() as nursery:
        router = FakeRouter(nursery, {("sub1", ""), ("sub1", "loc2")})
        authenticator = Authenticator({"sub1": [hash_token(TOKEN)], "sub2": [hash_token(OTHER_TOKEN)]})
        proxy = HttpProxy(router, authenticator, settings=ProxySettings(linger_timeout=0.5))
        port = await nursery.start(proxy.run, "127.0.0.1", 0)
        with trio.fail_after(TEST_TIMEOUT):
            yield port, router
        nursery.cancel_scope.cancel()


def sample(status: str) -> float:
    return REGISTRY.get_sample_value("connector_proxy_requests_total", {"proxy": "http", "status": status}) or 0.0


async def test_get_is_forwarded_in_origin_form_without_proxy_headers(proxy_env: tuple[int, FakeRouter]) -> None:
    port, router = proxy_env
    before = sample("200")
    client = await Client.connect(port)
    response, body = await client.request(
        b"GET",
        b"http://ERP.virtual:8000/sap/opu?x=1",
        [
            (b"host", b"erp.virtual:8000"),
            AUTH,
            (b"SAP-Connectivity-SCC-Location_ID", b"loc2"),
            (b"proxy-connection", b"keep-alive"),
            (b"x-app", b"kept"),
        ],
    )
    assert response.status_code == 200
    assert body == b""
    assert header(response, b"x-echo-method") == b"GET"
    assert header(response, b"x-echo-target") == b"/sap/opu?x=1"
    forwarded = dict(json.loads(header(response, b"x-echo-headers") or b"[]"))
    assert forwarded["host"] == "erp.virtual:8000"
    assert forwarded["x-app"] == "kept"
    assert not {"proxy-authorization", "sap-connectivity-scc-location_id", "proxy-connection"} & set(forwarded)
    assert header(response, b"connection") is None  # hop-by-hop header of the node is not relayed
    assert router.opened == [("sub1", "loc2", Target("erp.virtual", 8000))]
    for _ in range(100):  # the proxy counts just after the last byte went out
        if sample("200") == before + 1:
            break
        await trio.sleep(0.01)
    assert sample("200") == before + 1


async def test_post_with_body_and_basic_auth(proxy_env: tuple[int, FakeRouter]) -> None:
    port, router = proxy_env
    import base64

    client = await Client.connect(port)
    basic = b"Basic " + base64.b64encode(f"sub1:{TOKEN}".encode())
    response, body = await client.request(
        b"POST", b"http://erp.virtual/orders", [(b"host", b"erp.virtual"), (b"proxy-authorization", basic)],
        body=b'{"order": 1}',
    )
    assert response.status_code == 200
    assert body == b'{"order": 1}'
    assert header(response, b"x-echo-method") == b"POST"
    assert router.opened[-1] == ("sub1", "", Target("erp.virtual", 80))


async def test_chunked_request_body(proxy_env: tuple[int, FakeRouter]) -> None:
    port, _ = proxy_env
    client = await Client.connect(port)
    await client.send(h11.Request(
        method=b"PUT", target=b"http://erp.virtual:8000/upload",
        headers=[(b"host", b"erp.virtual:8000"), AUTH, (b"transfer-encoding", b"chunked")],
    ))
    parts = [b"alpha-", b"beta-", b"gamma"]
    for part in parts:
        await client.send(h11.Data(data=part))
    await client.send(h11.EndOfMessage())
    response, body = await client.read_response()
    assert response.status_code == 200
    assert body == b"".join(parts)
    forwarded = dict(json.loads(header(response, b"x-echo-headers") or b"[]"))
    assert forwarded["transfer-encoding"] == "chunked"


async def test_large_body_streams_with_bounded_buffering(proxy_env: tuple[int, FakeRouter]) -> None:
    """64 MiB up while the node does not read: the proxy stalls the client instead of buffering."""
    port, router = proxy_env
    router.gate = trio.Event()
    total = 64 * 1024 * 1024
    piece = bytes(range(256)) * 256  # 64 KiB
    sent = 0
    client = await Client.connect(port)
    await client.send(h11.Request(
        method=b"POST", target=b"http://erp.virtual:8000/gate",
        headers=[(b"host", b"erp.virtual:8000"), AUTH, (b"content-length", str(total).encode())],
    ))
    digest_up = hashlib.sha256()
    digest_down = hashlib.sha256()
    received = 0

    async def upload() -> None:
        nonlocal sent
        while sent < total:
            await client.send(h11.Data(data=piece))
            digest_up.update(piece)
            sent += len(piece)
        await client.send(h11.EndOfMessage())

    async def download() -> None:
        nonlocal received
        response = await client.next_event()
        assert isinstance(response, h11.Response) and response.status_code == 200
        while True:
            event = await client.next_event()
            if isinstance(event, h11.EndOfMessage):
                return
            assert isinstance(event, h11.Data)
            digest_down.update(event.data)
            received += len(event.data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upload)
        # wait until the upload stalls (bounded number of polls)
        last = -1
        for _ in range(100):
            await trio.sleep(0.05)
            if sent == last and sent > 0:
                break
            last = sent
        stalled_at = sent
        # kernel socket buffers on both loopback hops plus a few chunks in the proxy; never the body
        assert 0 < stalled_at < 24 * 1024 * 1024, stalled_at
        nursery.start_soon(download)
        router.gate.set()
    assert received == total
    assert digest_down.digest() == digest_up.digest()


async def test_keep_alive_reuses_stream_and_switches_target(proxy_env: tuple[int, FakeRouter]) -> None:
    port, router = proxy_env
    client = await Client.connect(port)
    ids = []
    for url, host in [
        (b"http://erp.virtual:8000/a", b"erp.virtual:8000"),
        (b"http://erp.virtual:8000/b", b"erp.virtual:8000"),
        (b"http://crm.virtual:9000/c", b"crm.virtual:9000"),
        (b"http://crm.virtual:9000/d", b"crm.virtual:9000"),
    ]:
        response, _ = await client.request(b"GET", url, [(b"host", host), AUTH])
        assert response.status_code == 200
        ids.append(header(response, b"x-stream-id"))
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2]
    assert [t for _, _, t in router.opened] == [Target("erp.virtual", 8000), Target("crm.virtual", 9000)]


async def test_missing_and_bad_credentials_get_407(proxy_env: tuple[int, FakeRouter]) -> None:
    port, router = proxy_env
    client = await Client.connect(port)
    response, body = await client.request(b"GET", b"http://erp.virtual/", [(b"host", b"erp.virtual")])
    assert response.status_code == 407
    assert header(response, b"proxy-authenticate") == b'Bearer realm="connectivity-proxy"'
    assert json.loads(body)["error"] == "proxy_authentication_required"
    # the same connection continues (the request had no body)
    response, body = await client.request(
        b"GET", b"http://erp.virtual/", [(b"host", b"erp.virtual"), (b"proxy-authorization", b"Bearer nope")]
    )
    assert response.status_code == 407
    assert json.loads(body)["error"] == "invalid_proxy_credentials"
    assert router.opened == []


async def test_connect_is_refused_with_405(proxy_env: tuple[int, FakeRouter]) -> None:
    port, _ = proxy_env
    client = await Client.connect(port)
    await client.send(h11.Request(method=b"CONNECT", target=b"erp.virtual:443", headers=[(b"host", b"erp.virtual:443"), AUTH]))
    await client.send(h11.EndOfMessage())
    response, body = await client.read_response()
    assert response.status_code == 405
    assert "does not tunnel HTTPS" in json.loads(body)["message"]


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        (b"/path", "origin-form"),
        (b"https://erp.virtual/", "https://"),
        (b"ftp://erp.virtual/", "scheme"),
        (b"http:///nohost", "no host"),
        (b"http://erp.virtual:99999/", "port"),
        (b"http://user@erp.virtual/", "user information"),
    ],
)
async def test_bad_targets_get_400(proxy_env: tuple[int, FakeRouter], target: bytes, fragment: str) -> None:
    port, _ = proxy_env
    client = await Client.connect(port)
    response, body = await client.request(b"GET", target, [(b"host", b"erp.virtual"), AUTH])
    assert response.status_code == 400
    assert fragment in json.loads(body)["message"]


async def test_malformed_request_gets_400(proxy_env: tuple[int, FakeRouter]) -> None:
    port, _ = proxy_env
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(b"THIS IS NOT HTTP\r\n\r\n")
    data = b""
    while chunk := await sock.receive_some(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b'"malformed_request"' in data


async def test_tls_client_hello_is_refused(proxy_env: tuple[int, FakeRouter], caplog: pytest.LogCaptureFixture) -> None:
    port, _ = proxy_env
    caplog.set_level(logging.WARNING, logger="connector.cloud.proxy")
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(bytes([0x16, 0x03, 0x01, 0x00, 0x05]) + b"\x01\x00\x00\x01\x03")
    assert await sock.receive_some(100) == b""
    assert "HTTPS to the proxy itself is refused" in caplog.text


async def test_unknown_location_gets_503(proxy_env: tuple[int, FakeRouter]) -> None:
    port, _ = proxy_env
    client = await Client.connect(port)
    response, body = await client.request(
        b"GET", b"http://erp.virtual/", [(b"host", b"erp.virtual"), AUTH, (b"sap-connectivity-scc-location_id", b"nowhere")]
    )
    assert response.status_code == 503
    assert json.loads(body) == {"error": "no_connector", "message": "no connector connected for location 'nowhere'"}


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [
        ("CONNECT_FAILED", 502, "internal_host_unreachable"),
        ("BACKEND_RESET", 502, "backend_reset"),
        ("TUNNEL_LOST", 502, "connector_connection_lost"),
        ("INTERNAL_ERROR", 502, "internal_error"),
        ("NO_MAPPING", 403, "no_mapping"),
        ("DENIED", 403, "denied_by_allowlist"),
        ("CONNECT_TIMEOUT", 504, "internal_host_timeout"),
    ],
)
async def test_stream_resets_map_to_statuses(
    proxy_env: tuple[int, FakeRouter], code: str, status: int, reason: str
) -> None:
    port, _ = proxy_env
    client = await Client.connect(port)
    response, body = await client.request(b"GET", f"http://erp.virtual/reset/{code}".encode(), [(b"host", b"erp.virtual"), AUTH])
    assert response.status_code == status
    assert json.loads(body)["error"] == reason
    if code == "TUNNEL_LOST":
        assert json.loads(body)["message"].startswith("connector connection lost")
    # the connection stays usable and the next request gets a fresh stream
    response, _ = await client.request(b"GET", b"http://erp.virtual/ok", [(b"host", b"erp.virtual"), AUTH])
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("method", "code", "status"),
    [
        (b"GET", "TUNNEL_LOST", 200),  # idempotent: replayed once to the next master
        (b"DELETE", "TUNNEL_LOST", 200),
        (b"POST", "TUNNEL_LOST", 502),  # may have run on the dead master: never replayed
        (b"POST", "NOT_MASTER", 200),  # the node provably took nothing: replayed whatever the method
        (b"GET", "BACKEND_RESET", 502),  # not a failover: the internal host's answer stands
    ],
)
async def test_request_lost_with_its_master_is_replayed_when_safe(
    proxy_env: tuple[int, FakeRouter], method: bytes, code: str, status: int
) -> None:
    port, router = proxy_env
    client = await Client.connect(port)
    target = f"http://erp.virtual/reset-once/{code}/{method.decode()}".encode()
    headers = [(b"host", b"erp.virtual"), AUTH]
    if method == b"POST":
        headers.append((b"content-length", b"0"))
    response, body = await client.request(method, target, headers)
    assert response.status_code == status, body
    assert len(router.opened) == (2 if status == 200 else 1)


async def test_reset_while_opening_maps_to_502(proxy_env: tuple[int, FakeRouter]) -> None:
    port, _ = proxy_env
    client = await Client.connect(port)
    response, body = await client.request(b"GET", b"http://refused.virtual/", [(b"host", b"refused.virtual"), AUTH])
    assert response.status_code == 502
    assert json.loads(body)["error"] == "connector_connection_lost"


async def test_reset_after_response_started_breaks_the_connection(proxy_env: tuple[int, FakeRouter]) -> None:
    port, _ = proxy_env
    client = await Client.connect(port)
    await client.send(h11.Request(method=b"GET", target=b"http://erp.virtual/half-then-reset", headers=[(b"host", b"erp.virtual"), AUTH]))
    await client.send(h11.EndOfMessage())
    response = await client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 200
    with pytest.raises(h11.RemoteProtocolError):  # peer closed in the middle of a chunked body
        while True:
            event = await client.next_event()
            assert not isinstance(event, h11.EndOfMessage)


async def test_client_gone_mid_body_cancels_the_stream(proxy_env: tuple[int, FakeRouter]) -> None:
    port, router = proxy_env
    router.gate = trio.Event()
    client = await Client.connect(port)
    await client.send(h11.Request(
        method=b"POST", target=b"http://erp.virtual/gate",
        headers=[(b"host", b"erp.virtual"), AUTH, (b"content-length", b"1000")],
    ))
    await client.send(h11.Data(data=b"x" * 10))
    await client.sock.aclose()
    await trio.sleep(0.1)  # let the proxy notice; the node is parked on the gate
    router.gate.set()
    for _ in range(100):
        if router.node_saw_reset:
            break
        await trio.sleep(0.01)
    assert router.node_saw_reset == [ErrorCode.CANCEL]


def test_parse_proxy_target() -> None:
    assert parse_proxy_target(b"http://Erp.Virtual:8000") == ("erp.virtual", 8000, b"/")
    assert parse_proxy_target(b"http://erp.virtual?x=1#frag") == ("erp.virtual", 80, b"/?x=1")
    assert parse_proxy_target(b"http://[::1]:81/p") == ("[::1]", 81, b"/p")
    with pytest.raises(BadTargetError):
        parse_proxy_target(b"http://erp virtual/")


CURL = shutil.which("curl")


@pytest.mark.skipif(CURL is None, reason="curl not installed")
async def test_curl_through_the_proxy(proxy_env: tuple[int, FakeRouter]) -> None:
    port, router = proxy_env
    assert CURL is not None
    result = await trio.run_process(
        [CURL, "-sS", "-x", f"http://127.0.0.1:{port}", "--proxy-header", f"Proxy-Authorization: Bearer {TOKEN}",
         "--proxy-header", "SAP-Connectivity-SCC-Location_ID: loc2", "-d", "hello=world",
         "http://erp.virtual:8000/curl", "http://erp.virtual:8000/curl2"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello=worldhello=world"
    assert router.opened == [("sub1", "loc2", Target("erp.virtual", 8000))]  # one stream, keep-alive
    result = await trio.run_process(
        [CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{port}", "http://erp.virtual:8000/"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.stdout == b"407"


# --- WebSocket upgrades ---------------------------------------------------------------------------

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
WS_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def upgrade_headers(upgrade: bytes = b"websocket") -> list[tuple[bytes, bytes]]:
    return [
        (b"host", b"erp.virtual:8000"), AUTH, (b"connection", b"keep-alive, Upgrade"), (b"upgrade", upgrade),
        (b"sec-websocket-key", WS_KEY), (b"sec-websocket-version", b"13"), (b"sec-websocket-protocol", b"chat"),
    ]


async def receive_exactly(sock: trio.SocketStream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = await sock.receive_some(count - len(data))
        assert chunk, f"EOF after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


async def test_websocket_upgrade_relays_101_then_raw_bytes_both_ways(proxy_env: tuple[int, FakeRouter]) -> None:
    port, router = proxy_env
    client = await Client.connect(port)
    head = client.conn.send(h11.Request(method=b"GET", target=b"http://erp.virtual:8000/ws/chat",
                                        headers=upgrade_headers()))
    assert client.conn.send(h11.EndOfMessage()) == b""
    early = b"EARLY-FRAME-BYTES"  # sent in the same write as the head, before any 101
    await client.sock.send_all((head or b"") + early)
    response = await client.next_event()
    assert isinstance(response, h11.InformationalResponse) and response.status_code == 101
    assert client.conn.our_state is h11.SWITCHED_PROTOCOL
    assert header(response, b"upgrade") == b"websocket"
    assert header(response, b"connection") == b"upgrade"
    assert header(response, b"sec-websocket-accept") == WS_ACCEPT
    assert header(response, b"sec-websocket-protocol") == b"chat"
    assert header(response, b"keep-alive") is None  # hop-by-hop header of the node is not relayed
    forwarded = json.loads(header(response, b"x-echo-headers") or b"[]")
    names = [name for name, _ in forwarded]
    assert ["connection", "upgrade"] == [n for n, v in forwarded if (n, v) in
                                         (("connection", "upgrade"), ("upgrade", "websocket"))]
    assert {"sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "host"} <= set(names)
    assert "proxy-authorization" not in names and "keep-alive" not in names
    # bytes the proxy had already read past the 101 head, then the echo of the early bytes
    leftover, _ = client.conn.trailing_data
    expected = NODE_GREETING + early
    received = bytes(leftover) + await receive_exactly(client.sock, len(expected) - len(leftover))
    assert received == expected

    payload = bytes(range(256)) * 4096  # 1 MiB both ways at once
    echoed = bytearray()

    async def upload() -> None:
        for offset in range(0, len(payload), 65536):
            await client.sock.send_all(payload[offset:offset + 65536])
        await client.sock.send_eof()  # half-close: the echo still comes back

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upload)
        while chunk := await client.sock.receive_some(65536):
            echoed += chunk
    assert bytes(echoed) == payload  # and then EOF: the node's half-close was relayed
    for _ in range(100):
        if router.websockets_finished:
            break
        await trio.sleep(0.01)
    assert router.websockets_finished == ["clean"]
    assert router.node_saw_reset == []
    assert router.opened == [("sub1", "", Target("erp.virtual", 8000))]


async def test_websocket_reset_by_node_closes_the_application_connection(
    proxy_env: tuple[int, FakeRouter], caplog: pytest.LogCaptureFixture
) -> None:
    port, _ = proxy_env
    caplog.set_level(logging.INFO, logger="connector.cloud.proxy")
    client = await Client.connect(port)
    await client.send(h11.Request(method=b"GET", target=b"http://erp.virtual:8000/ws/reset",
                                  headers=upgrade_headers()))
    await client.send(h11.EndOfMessage())
    response = await client.next_event()
    assert isinstance(response, h11.InformationalResponse) and response.status_code == 101
    leftover, _ = client.conn.trailing_data
    received = bytes(leftover)
    while chunk := await client.sock.receive_some(65536):  # the greeting, then the proxy closes
        received += chunk
    assert received == NODE_GREETING
    assert "WebSocket of" in caplog.text and "ended abruptly" in caplog.text


async def test_websocket_upgrade_denied_by_node_is_relayed_and_connection_continues(
    proxy_env: tuple[int, FakeRouter],
) -> None:
    port, router = proxy_env
    client = await Client.connect(port)
    response, body = await client.request(b"GET", b"http://erp.virtual:8000/denied/ws", upgrade_headers())
    assert response.status_code == 403
    assert json.loads(body)["error"] == "websocket_not_allowed"
    assert header(response, b"upgrade") is None
    denied_stream = header(response, b"x-stream-id")
    response, body = await client.request(
        b"POST", b"http://erp.virtual:8000/after", [(b"host", b"erp.virtual:8000"), AUTH], body=b"plain"
    )
    assert response.status_code == 200 and body == b"plain"
    assert header(response, b"x-stream-id") == denied_stream  # the kept-alive stream served on
    assert len(router.opened) == 1


async def test_h2c_upgrade_is_stripped(proxy_env: tuple[int, FakeRouter]) -> None:
    port, _ = proxy_env
    client = await Client.connect(port)
    headers = [
        (b"host", b"erp.virtual:8000"), AUTH, (b"connection", b"Upgrade, HTTP2-Settings"),
        (b"upgrade", b"h2c"), (b"http2-settings", b"AAMAAABkAARAAAAAAAIAAAAA"),
    ]
    response, _ = await client.request(b"GET", b"http://erp.virtual:8000/h2c", headers)
    assert response.status_code == 200
    forwarded = dict(json.loads(header(response, b"x-echo-headers") or b"[]"))
    assert not {"connection", "upgrade", "http2-settings"} & set(forwarded)
    response, _ = await client.request(b"GET", b"http://erp.virtual:8000/next", [(b"host", b"erp.virtual:8000"), AUTH])
    assert response.status_code == 200


def test_only_websocket_upgrades_of_http11_get_are_forwarded() -> None:
    def request(method: bytes, headers: list[tuple[bytes, bytes]], version: bytes = b"1.1") -> h11.Request:
        return h11.Request(method=method, target=b"/", headers=[(b"host", b"h"), *headers], http_version=version)

    websocket = [(b"connection", b"Upgrade"), (b"upgrade", b"WebSocket")]
    assert is_websocket_upgrade(request(b"GET", websocket))
    assert not is_websocket_upgrade(request(b"POST", websocket))
    assert not is_websocket_upgrade(request(b"GET", websocket, b"1.0"))
    assert not is_websocket_upgrade(request(b"GET", [(b"upgrade", b"websocket")]))  # no Connection: upgrade
    assert not is_websocket_upgrade(request(b"GET", [(b"connection", b"upgrade"), (b"upgrade", b"h2c")]))
    listed = [(b"connection", b"upgrade, sec-websocket-protocol"), (b"upgrade", b"websocket"),
              (b"sec-websocket-protocol", b"chat")]
    assert forwarded_headers(listed, "h", 80, websocket=True) == [
        (b"host", b"h"), (b"sec-websocket-protocol", b"chat"), (b"connection", b"upgrade"), (b"upgrade", b"websocket"),
    ]
    assert forwarded_headers(listed, "h", 80) == [(b"host", b"h")]


# --- kept-alive streams the node closes -----------------------------------------------------------


async def test_stream_the_node_closed_while_idle_is_replaced(
    proxy_env: tuple[int, FakeRouter], caplog: pytest.LogCaptureFixture
) -> None:
    port, router = proxy_env
    caplog.set_level(logging.INFO, logger="connector.cloud.proxy")
    client = await Client.connect(port)
    headers = [(b"host", b"erp.virtual:8000"), AUTH]
    response, _ = await client.request(b"GET", b"http://erp.virtual:8000/park-then-close", headers)
    assert response.status_code == 200
    router.close_gate.set()
    await router.idle_closed.wait()
    await trio.testing.wait_all_tasks_blocked()  # the proxy (same trio run) is idle again
    response, body = await client.request(b"POST", b"http://erp.virtual:8000/next", headers, body=b"data")
    assert response.status_code == 200 and body == b"data"
    assert len(router.opened) == 2
    assert "once more" not in caplog.text  # seen while idle: nothing was sent on the closed stream


async def test_reused_stream_closed_before_the_node_read_the_request_is_retried_once(
    proxy_env: tuple[int, FakeRouter], caplog: pytest.LogCaptureFixture
) -> None:
    port, router = proxy_env
    caplog.set_level(logging.INFO, logger="connector.cloud.proxy")
    client = await Client.connect(port)
    headers = [(b"host", b"erp.virtual:8000"), AUTH]
    response, _ = await client.request(b"GET", b"http://erp.virtual:8000/park-then-close", headers)
    assert response.status_code == 200
    client.conn.start_next_cycle()
    await client.send(h11.Request(method=b"GET", target=b"http://erp.virtual:8000/second", headers=headers))
    await client.send(h11.EndOfMessage())
    await trio.testing.wait_all_tasks_blocked()  # the head went out on the parked stream
    router.close_gate.set()  # the node closes the stream without reading it
    response, _ = await client.read_response()
    assert response.status_code == 200
    assert header(response, b"x-echo-target") == b"/second"
    assert header(response, b"x-stream-id") == str(id(router.acceptors[1])).encode()
    assert len(router.opened) == 2
    assert "sending it once more on a fresh stream" in caplog.text


async def test_reused_stream_closed_after_the_body_was_read_is_not_retried(
    proxy_env: tuple[int, FakeRouter], caplog: pytest.LogCaptureFixture
) -> None:
    port, router = proxy_env
    caplog.set_level(logging.INFO, logger="connector.cloud.proxy")
    client = await Client.connect(port)
    headers = [(b"host", b"erp.virtual:8000"), AUTH]
    response, _ = await client.request(b"GET", b"http://erp.virtual:8000/park-then-close", headers)
    assert response.status_code == 200
    client.conn.start_next_cycle()
    await client.send(h11.Request(method=b"POST", target=b"http://erp.virtual:8000/second",
                                  headers=[*headers, (b"content-length", b"4")]))
    await client.send(h11.Data(data=b"body"))
    await client.send(h11.EndOfMessage())
    await trio.testing.wait_all_tasks_blocked()
    router.close_gate.set()
    response, body = await client.read_response()
    assert response.status_code == 502
    assert json.loads(body)["error"] == "no_response"
    assert len(router.opened) == 1  # the body had been taken from the application: not replayable
    assert "once more" not in caplog.text
    response, _ = await client.request(b"GET", b"http://erp.virtual:8000/third", headers)
    assert response.status_code == 200


async def test_pipelined_request_after_the_node_closed_the_stream_is_retried(
    proxy_env: tuple[int, FakeRouter],
) -> None:
    """The second request is already buffered when the first ends, so no idle watch can run."""
    port, router = proxy_env
    client = await Client.connect(port)
    headers = [(b"host", b"erp.virtual:8000"), AUTH]
    first = client.conn.send(h11.Request(method=b"GET", target=b"http://erp.virtual:8000/close-after", headers=headers))
    first = (first or b"") + (client.conn.send(h11.EndOfMessage()) or b"")
    second = h11.Connection(h11.CLIENT)  # only to serialise the pipelined request
    pipelined = (second.send(h11.Request(method=b"GET", target=b"http://erp.virtual:8000/second", headers=headers))
                 or b"") + (second.send(h11.EndOfMessage()) or b"")
    await client.sock.send_all(first + pipelined)
    response, _ = await client.read_response()
    assert response.status_code == 200
    client.conn.start_next_cycle()
    client.conn.send(h11.Request(method=b"GET", target=b"/second", headers=headers))  # track the state
    client.conn.send(h11.EndOfMessage())
    response, _ = await client.read_response()
    assert response.status_code == 200
    assert header(response, b"x-echo-target") == b"/second"
    assert len(router.opened) == 2


async def test_reused_stream_refusing_the_request_head_is_retried(proxy_env: tuple[int, FakeRouter]) -> None:
    port, router = proxy_env
    client = await Client.connect(port)
    headers = [(b"host", b"erp.virtual:8000"), AUTH]
    response, _ = await client.request(b"GET", b"http://erp.virtual:8000/stop-reading", headers)
    assert response.status_code == 200
    response, body = await client.request(b"PUT", b"http://erp.virtual:8000/second", headers, body=b"kept")
    assert response.status_code == 200 and body == b"kept"  # the body was read only for the retry
    assert len(router.opened) == 2


async def _post_head_then_answer(port: int) -> Client:
    client = await Client.connect(port)
    await client.send(h11.Request(method=b"POST", target=b"http://erp.virtual:8000/early",
                                  headers=[AUTH, (b"host", b"erp.virtual:8000"), (b"content-length", b"5")]))
    response, body = await client.read_response()  # answered before the body was sent
    assert (response.status_code, body) == (200, b"early")
    return client


async def test_answer_before_the_body_keeps_the_connection_when_the_body_follows(proxy_env) -> None:
    port, router = proxy_env
    client = await _post_head_then_answer(port)
    await client.send(h11.Data(data=b"hello"))
    await client.send(h11.EndOfMessage())
    response, _ = await client.request(b"GET", b"http://erp.virtual:8000/after",
                                       [AUTH, (b"host", b"erp.virtual:8000")])
    assert response.status_code == 200
    assert len(router.opened) == 1  # one stream carried both requests
    await client.sock.aclose()


async def test_answer_before_the_body_and_no_body_closes_after_the_linger(proxy_env) -> None:
    port, router = proxy_env
    client = await _post_head_then_answer(port)
    with trio.fail_after(3):  # linger_timeout is 0.5 s in this fixture
        assert await client.sock.receive_some(1024) == b""
    assert len(router.opened) == 1


class _RawNode:
    """Records every byte the proxy sends on its stream; answers 204 once the request ended."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery, self.raw = nursery, bytearray()

    async def open_stream(self, subaccount: str, location_id: str, target: Target) -> TunnelStream:
        opener, acceptor = memory_stream_pair(target)
        self.nursery.start_soon(self.serve, acceptor)
        return opener

    async def serve(self, stream: TunnelStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while data := await stream.receive_some(65536):
            self.raw += data
            conn.receive_data(data)
            while (event := conn.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.EndOfMessage):
                    await stream.send_all(conn.send(h11.Response(status_code=204, headers=[]))
                                          + (conn.send(h11.EndOfMessage()) or b""))
                    return


async def test_proxy_headers_in_request_trailers_do_not_reach_the_node() -> None:
    """Trailers are headers too: the location header and the proxy credentials stay at the proxy."""
    async with trio.open_nursery() as nursery:
        node = _RawNode(nursery)
        proxy = HttpProxy(node, Authenticator({"sub1": [hash_token(TOKEN)]}))  # type: ignore[arg-type]
        port = await nursery.start(proxy.run, "127.0.0.1", 0)
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        await sock.send_all(
            b"POST http://erp.virtual:8000/x HTTP/1.1\r\nhost: erp.virtual:8000\r\n"
            b"proxy-authorization: Bearer " + TOKEN.encode() + b"\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nSAP-Connectivity-SCC-Location_ID: loc9\r\n"
            b"proxy-authorization: Bearer " + TOKEN.encode() + b"\r\nx-checksum: 1\r\n\r\n")
        answer = b""
        with trio.fail_after(5):
            while b"204" not in answer:
                answer += await sock.receive_some(65536)
        sent = bytes(node.raw).lower()
        assert b"x-checksum: 1" in sent  # other trailers pass
        assert b"location_id" not in sent and TOKEN.encode().lower() not in sent
        await sock.aclose()
        nursery.cancel_scope.cancel()


async def test_response_trailers_reach_the_application_through_the_one_trailer_rule(
    proxy_env: tuple[int, FakeRouter],
) -> None:
    """Before: the proxy ended every response with no trailer fields at all (checksums lost)."""
    port, _ = proxy_env
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(b"GET http://erp.virtual:8000/with-trailers HTTP/1.1\r\nhost: erp.virtual:8000\r\n"
                        b"proxy-authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    answer = b""
    while not answer.endswith(b"\r\n\r\n") or b"\r\n0\r\n" not in answer:
        answer += await sock.receive_some(65536)
    trailers = answer.split(b"\r\n0\r\n", 1)[1].lower()
    assert b"x-checksum: 5d41" in trailers
    assert b"set-cookie" not in trailers and b"content-length" not in trailers
    await sock.aclose()
