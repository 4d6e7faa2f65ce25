"""HTTP connectivity proxy over real loopback sockets, routed through real in-memory tunnels.

The router (`tests.support.tunnelrouter`) opens each request's exchange stream on a real tunnel
session pair. Behind `erp.virtual` (ports 8000 and 80) and `crm.virtual:9000` is the real node
(`serve_stream`) in front of `EchoBackend`, an internal host on 127.0.0.1 that echoes the request
(method, target and headers in response headers, the body streamed back as it arrives, trailers
as the answer's). Behind `odd.virtual` is `OddNode`, a few lines speaking typed heads where a test
needs the node to misbehave or to see exactly what the proxy put on the stream: it resets with
the code named in the path (/reset/<CODE>), breaks off a started answer, sends trailers, a 101
nobody asked for, or records the request head and trailers it got.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import h11
import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from connector.agent.acl import Mapping, Resource
from connector.cloud.auth import Authenticator, hash_token
from connector.cloud.proxy import HttpProxy, ProxySettings
from connector.cloud.replay import MAX_ATTEMPTS
from connector.cloud.target import (
    BadTargetError,
    forwarded_headers,
    is_websocket_upgrade,
    parse_proxy_target,
)
from connector.tunnel.heads import RequestHead, ResponseHead
from connector.tunnel.session import SessionStream
from connector.tunnel.types import ErrorCode, StreamResetError, Target
from tests.support.tunnelrouter import (
    WS_GREETING,
    EchoBackend,
    Handler,
    RealNode,
    TunnelRouter,
    by_virtual_host,
    open_router,
    real_node,
)

TOKEN = "app-token-sub1"
OTHER_TOKEN = "app-token-sub2"
AUTH = (b"proxy-authorization", b"Bearer " + TOKEN.encode())
CREDENTIALS = b"proxy-authorization: Bearer " + TOKEN.encode() + b"\r\n"
TEST_TIMEOUT = 20.0
ODD = "odd.virtual"
SECRET = "10.20.30.40:8443 refused the connection"  # on-premise detail in a reset's reason text
LINGER = 0.5


def mappings(port: int, dead_port: int) -> list[Mapping]:
    resources = (Resource("/"), Resource("/ws", websocket_upgrade=True))
    return [
        Mapping("erp.virtual", 8000, "127.0.0.1", port, resources=resources),
        Mapping("erp.virtual", 80, "127.0.0.1", port, resources=resources),
        Mapping("crm.virtual", 9000, "127.0.0.1", port, resources=resources),
        Mapping("dead.virtual", 8000, "127.0.0.1", dead_port, resources=resources),
    ]


async def free_port() -> int:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


@attrs.define(eq=False)
class OddNode:
    """A node speaking typed heads, by path (see the module docstring); records what it saw."""

    heads: list[RequestHead] = attrs.Factory(list)
    trailers: list[list[tuple[bytes, bytes]] | None] = attrs.Factory(list)
    resets: list[ErrorCode] = attrs.Factory(list)
    reset_seen: trio.Event = attrs.Factory(trio.Event)

    async def __call__(self, stream: SessionStream) -> None:
        try:
            await self._serve(stream)
        except StreamResetError as exc:
            self.resets.append(exc.code)
            self.reset_seen.set()

    async def _read_body(self, stream: SessionStream) -> bytes:
        body = b""
        while data := await stream.receive_some(65536):
            body += data
        self.trailers.append(stream.trailers)
        return body

    async def _serve(self, stream: SessionStream) -> None:
        head = await stream.receive_head()
        assert isinstance(head, RequestHead)
        self.heads.append(head)
        path = head.target.decode()
        if path.startswith("/reset/"):
            await stream.reset(ErrorCode[path.split("/")[2]], SECRET)
        elif path == "/half-then-reset":
            await stream.send_head(ResponseHead(200, b"OK", [(b"transfer-encoding", b"chunked")]))
            await stream.send_all(b"partial")
            await stream.reset(ErrorCode.BACKEND_RESET, SECRET)
        elif path == "/trailers":  # its trailers hold fields no trailer may carry
            await self._read_body(stream)
            await stream.send_head(ResponseHead(200, b"OK", [(b"transfer-encoding", b"chunked")]))
            await stream.send_all(b"hello")
            await stream.send_eof([(b"x-checksum", b"5d41"), (b"set-cookie", b"admin=1"), (b"content-length", b"999")])
        elif path in ("/short-body", "/long-body"):  # Content-Length 10, then 5 or 20 bytes
            await stream.send_head(ResponseHead(200, b"OK", [(b"content-length", b"10")]))
            await stream.send_all(b"x" * (5 if path == "/short-body" else 20))
            await stream.send_eof()
        elif path == "/early-hints":  # a 103 with hop-by-hop headers, then the answer
            await stream.send_head(ResponseHead(103, b"Early Hints", [
                (b"link", b"</style.css>; rel=preload"), (b"connection", b"x-hint-hop"), (b"x-hint-hop", b"1"),
                (b"keep-alive", b"timeout=5"), (b"proxy-authenticate", b"Basic")]))
            await stream.send_head(ResponseHead(204, b"No Content", []), end_stream=True)
        elif path == "/switch":  # a 101 to a request that asked for no upgrade
            await self._read_body(stream)
            await stream.send_head(ResponseHead(101, b"Switching Protocols", [(b"upgrade", b"h2c")]))
            await stream.send_all(b"raw bytes nobody asked for")
        elif path == "/ws-reset":  # a WebSocket whose internal host dies after a message each way
            await stream.send_head(ResponseHead(101, b"Switching Protocols", [
                (b"connection", b"upgrade"), (b"upgrade", b"websocket")]))
            await stream.send_all(WS_GREETING)
            await stream.receive_some(65536)
            await stream.reset(ErrorCode.BACKEND_RESET, SECRET)
        else:  # /record...: 204 with hop-by-hop headers once the request ended
            await self._read_body(stream)
            await stream.send_head(ResponseHead(204, b"No Content", [
                (b"connection", b"keep-alive, x-node-hop"), (b"keep-alive", b"timeout=5"), (b"x-node-hop", b"1"),
                (b"proxy-authenticate", b"Basic"), (b"x-kept", b"yes")]), end_stream=True)


@attrs.define(eq=False)
class Env:
    port: int
    router: TunnelRouter
    backend: EchoBackend
    node: RealNode
    odd: OddNode


def authenticator() -> Authenticator:
    return Authenticator({"sub1": [hash_token(TOKEN)], "sub2": [hash_token(OTHER_TOKEN)]})


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with trio.open_nursery() as nursery:
        backend = EchoBackend()
        node = real_node(mappings(await backend.start(nursery), await free_port()))
        odd = OddNode()
        async with open_router(by_virtual_host(node, {ODD: odd}), locations={("sub1", ""), ("sub1", "loc2")}) as router:
            proxy = HttpProxy(router, authenticator(), settings=ProxySettings(linger_timeout=LINGER))
            port = await nursery.start(proxy.run, "127.0.0.1", 0)
            with trio.fail_after(TEST_TIMEOUT):
                yield Env(port, router, backend, node, odd)
            nursery.cancel_scope.cancel()


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
                self.trailers = list(event.headers)
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


def header(response: h11.Response | h11.InformationalResponse, name: bytes) -> bytes | None:
    return next((v for n, v in response.headers if n == name), None)


def echoed_headers(response: h11.Response | h11.InformationalResponse) -> dict[str, str]:
    return dict(json.loads(header(response, b"x-echo-headers") or b"[]"))


def sample(status: str) -> float:
    return REGISTRY.get_sample_value("connector_proxy_requests_total", {"proxy": "http", "status": status}) or 0.0


async def test_get_is_forwarded_in_origin_form_without_proxy_headers(env: Env) -> None:
    before = sample("200")
    client = await Client.connect(env.port)
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
    forwarded = echoed_headers(response)
    assert forwarded["host"] == "erp.virtual:8000"
    assert forwarded["x-app"] == "kept"
    assert not {"proxy-authorization", "sap-connectivity-scc-location_id", "proxy-connection"} & set(forwarded)
    assert header(response, b"connection") is None  # hop-by-hop header of the internal host is not relayed
    assert env.router.opened == [("sub1", "loc2", Target("erp.virtual", 8000))]
    await trio.testing.wait_all_tasks_blocked()  # the proxy counts just after the last byte went out
    assert sample("200") == before + 1


async def test_the_request_head_on_the_stream_holds_no_proxy_header(env: Env) -> None:
    """What the proxy itself sends (the node strips hop-by-hop headers too, so the internal
    host's view alone would not show it)."""
    client = await Client.connect(env.port)
    response, _ = await client.request(b"GET", b"http://odd.virtual/record?q=1", [
        (b"host", b"odd.virtual"), AUTH, (b"sap-connectivity-scc-location_id", b""),
        (b"proxy-connection", b"keep-alive"), (b"connection", b"x-app-hop"), (b"x-app-hop", b"1"), (b"x-app", b"kept")])
    assert response.status_code == 204
    (head,) = env.odd.heads
    assert (head.method, head.target) == (b"GET", b"/record?q=1")
    assert head.headers == [(b"host", b"odd.virtual"), (b"x-app", b"kept")]


async def test_hop_by_hop_headers_of_the_answer_are_not_relayed(env: Env) -> None:
    client = await Client.connect(env.port)
    response, _ = await client.request(b"GET", b"http://odd.virtual/record", [(b"host", b"odd.virtual"), AUTH])
    assert response.status_code == 204
    names = {name for name, _ in response.headers}
    assert b"x-kept" in names
    assert not {b"keep-alive", b"x-node-hop", b"proxy-authenticate"} & names
    assert header(response, b"connection") is None


async def test_post_with_body_and_basic_auth(env: Env) -> None:
    client = await Client.connect(env.port)
    basic = b"Basic " + base64.b64encode(f"sub1:{TOKEN}".encode())
    response, body = await client.request(
        b"POST", b"http://erp.virtual/orders", [(b"host", b"erp.virtual"), (b"proxy-authorization", basic)],
        body=b'{"order": 1}',
    )
    assert response.status_code == 200
    assert body == b'{"order": 1}'
    assert header(response, b"x-echo-method") == b"POST"
    assert env.router.opened[-1] == ("sub1", "", Target("erp.virtual", 80))
    assert env.backend.requests[-1]["body"] == b'{"order": 1}'


async def test_empty_post_reaches_the_internal_host_with_its_length(env: Env) -> None:
    client = await Client.connect(env.port)
    response, body = await client.request(b"POST", b"http://erp.virtual:8000/empty",
                                          [(b"host", b"erp.virtual:8000"), AUTH, (b"content-length", b"0")])
    assert (response.status_code, body) == (200, b"")
    assert echoed_headers(response)["content-length"] == "0"


async def test_chunked_request_body_and_trailers_both_ways(env: Env) -> None:
    client = await Client.connect(env.port)
    await client.send(h11.Request(
        method=b"PUT", target=b"http://erp.virtual:8000/upload",
        headers=[(b"host", b"erp.virtual:8000"), AUTH, (b"transfer-encoding", b"chunked")],
    ))
    parts = [b"alpha-", b"beta-", b"gamma"]
    for part in parts:
        await client.send(h11.Data(data=part))
    await client.send(h11.EndOfMessage(headers=[(b"x-checksum", b"abc"), (b"set-cookie", b"a=1")]))
    response, body = await client.read_response()
    assert response.status_code == 200
    assert body == b"".join(parts)
    assert echoed_headers(response)["transfer-encoding"] == "chunked"
    assert env.backend.requests[-1]["trailers"] == [(b"x-checksum", b"abc")]  # the one trailer rule
    assert client.trailers == [(b"x-checksum", b"abc")]  # and back, as the answer's trailers


async def test_large_body_streams_with_bounded_buffering(env: Env) -> None:
    """32 MiB up while the internal host does not read: the proxy stalls the client instead of buffering."""
    env.backend.gate = trio.Event()
    total = 32 * 1024 * 1024
    piece = bytes(range(256)) * 256  # 64 KiB
    sent = 0
    client = await Client.connect(env.port)
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
        # wait until the upload stalls (a bounded number of looks)
        last = -1
        for _ in range(100):
            await trio.sleep(0.05)
            if sent == last and sent > 0:
                break
            last = sent
        stalled_at = sent
        # kernel socket buffers on both loopback hops, a chunk or two at the proxy and the node,
        # one stream window in the tunnel; never the body
        assert 0 < stalled_at < 16 * 1024 * 1024, stalled_at  # 1 to 3 MiB on loopback
        nursery.start_soon(download)
        env.backend.gate.set()
    assert received == total
    assert digest_down.digest() == digest_up.digest()


async def test_head_request_gets_the_head_only_and_the_connection_goes_on(env: Env) -> None:
    client = await Client.connect(env.port)
    response, body = await client.request(b"HEAD", b"http://erp.virtual:8000/h", [(b"host", b"erp.virtual:8000"), AUTH])
    assert (response.status_code, body, header(response, b"x-echo-method")) == (200, b"", b"HEAD")
    response, body = await client.request(b"POST", b"http://erp.virtual:8000/next",
                                          [(b"host", b"erp.virtual:8000"), AUTH], body=b"more")
    assert (response.status_code, body) == (200, b"more")


async def test_expect_100_continue_is_answered_before_the_body_is_sent(env: Env) -> None:
    client = await Client.connect(env.port)
    await client.send(h11.Request(method=b"PUT", target=b"http://erp.virtual:8000/put", headers=[
        (b"host", b"erp.virtual:8000"), AUTH, (b"content-length", b"4"), (b"expect", b"100-continue")]))
    interim = await client.next_event()  # nothing of the body was sent: the invitation comes first
    assert isinstance(interim, h11.InformationalResponse) and interim.status_code == 100
    await client.send(h11.Data(data=b"body"))
    await client.send(h11.EndOfMessage())
    response, body = await client.read_response()
    assert (response.status_code, body) == (200, b"body")
    assert "expect" not in echoed_headers(response)


async def test_an_informational_answer_is_relayed_without_hop_by_hop_headers(env: Env) -> None:
    """Before: a 1xx went to the application with the node's headers as they were."""
    client = await Client.connect(env.port)
    await client.send(h11.Request(method=b"GET", target=b"http://odd.virtual/early-hints",
                                  headers=[(b"host", b"odd.virtual"), AUTH]))
    await client.send(h11.EndOfMessage())
    hints = await client.next_event()
    assert isinstance(hints, h11.InformationalResponse) and hints.status_code == 103
    assert hints.headers == [(b"link", b"</style.css>; rel=preload")]
    response = await client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 204


@pytest.mark.parametrize("path", [b"/short-body", b"/long-body"])
async def test_a_body_that_breaks_its_own_length_closes_the_application_connection(env: Env, path: bytes) -> None:
    client = await Client.connect(env.port)
    await client.send(h11.Request(method=b"GET", target=b"http://odd.virtual" + path,
                                  headers=[(b"host", b"odd.virtual"), AUTH]))
    await client.send(h11.EndOfMessage())
    response = await client.next_event()
    assert isinstance(response, h11.Response) and header(response, b"content-length") == b"10"
    data = b""
    while chunk := await client.sock.receive_some(65536):
        data += chunk
    leftover, _ = client.conn.trailing_data
    assert len(bytes(leftover) + data) <= 10  # never more than it declared, then closed
    await env.router.wait_no_streams()


async def test_keep_alive_connection_holds_no_stream_between_requests(env: Env) -> None:
    client = await Client.connect(env.port)
    for url, host in [
        (b"http://erp.virtual:8000/a", b"erp.virtual:8000"),
        (b"http://erp.virtual:8000/b", b"erp.virtual:8000"),
        (b"http://crm.virtual:9000/c", b"crm.virtual:9000"),
        (b"http://crm.virtual:9000/d", b"crm.virtual:9000"),
    ]:
        response, _ = await client.request(b"POST", url, [(b"host", host), AUTH], body=b"body")
        assert response.status_code == 200
        assert header(response, b"x-echo-target") == url[url.index(b"/", 7):]
        await trio.testing.wait_all_tasks_blocked()  # the connection waits for its next request
        assert env.router.streams_open() == 0
    assert [t for _, _, t in env.router.opened] == [Target("erp.virtual", 8000)] * 2 + [Target("crm.virtual", 9000)] * 2
    assert len({stream.stream_id for stream in env.router.streams}) == 4  # a stream per request


async def test_pipelined_requests_are_answered_in_order_each_on_its_own_stream(env: Env) -> None:
    client = await Client.connect(env.port)
    wire = b""
    for path in (b"/one", b"/two", b"/three"):
        writer = h11.Connection(h11.CLIENT)  # only to serialise the requests, all sent in one write
        body = path[1:] * 3
        wire += writer.send(h11.Request(method=b"POST", target=b"http://erp.virtual:8000" + path, headers=[
            (b"host", b"erp.virtual:8000"), AUTH, (b"content-length", b"%d" % len(body))])) or b""
        wire += (writer.send(h11.Data(data=body)) or b"") + (writer.send(h11.EndOfMessage()) or b"")
    await client.sock.send_all(wire)
    for path in (b"/one", b"/two", b"/three"):
        if client.conn.our_state is h11.DONE:
            client.conn.start_next_cycle()
        client.conn.send(h11.Request(method=b"POST", target=path, headers=[(b"host", b"x"), (b"content-length", b"0")]))
        client.conn.send(h11.EndOfMessage())  # only to track h11's state: the bytes went out above
        response, body = await client.read_response()
        assert (response.status_code, header(response, b"x-echo-target"), body) == (200, path, path[1:] * 3)
    assert len(env.router.streams) == 3


async def test_missing_and_bad_credentials_get_407(env: Env) -> None:
    client = await Client.connect(env.port)
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
    assert env.router.opened == []


async def test_connect_is_refused_with_405(env: Env) -> None:
    client = await Client.connect(env.port)
    await client.send(h11.Request(method=b"CONNECT", target=b"erp.virtual:443", headers=[(b"host", b"erp.virtual:443"), AUTH]))
    await client.send(h11.EndOfMessage())
    response, body = await client.read_response()
    assert response.status_code == 405
    assert "does not tunnel HTTPS" in json.loads(body)["message"]
    assert env.router.opened == []


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
async def test_bad_targets_get_400(env: Env, target: bytes, fragment: str) -> None:
    client = await Client.connect(env.port)
    response, body = await client.request(b"GET", target, [(b"host", b"erp.virtual"), AUTH])
    assert response.status_code == 400
    assert fragment in json.loads(body)["message"]


async def test_malformed_request_gets_400(env: Env) -> None:
    sock = await trio.open_tcp_stream("127.0.0.1", env.port)
    await sock.send_all(b"THIS IS NOT HTTP\r\n\r\n")
    data = b""
    while chunk := await sock.receive_some(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b'"malformed_request"' in data


async def test_request_head_over_max_header_bytes_gets_431(env: Env) -> None:
    sock = await trio.open_tcp_stream("127.0.0.1", env.port)
    await sock.send_all(b"GET http://erp.virtual:8000/x HTTP/1.1\r\nhost: erp.virtual:8000\r\n" + CREDENTIALS
                        + b"x-big: " + b"a" * 150000 + b"\r\n\r\n")  # over 65536 whichever way it is read
    data = b""
    while chunk := await sock.receive_some(65536):
        data += chunk
    assert data.startswith(b"HTTP/1.1 431 ")
    assert b'"request_header_too_large"' in data
    assert env.router.opened == []


@pytest.mark.parametrize(("method", "body"), [(b"GET", b""), (b"POST", b"data")])
async def test_request_head_too_large_for_the_tunnel_gets_431(env: Env, method: bytes, body: bytes) -> None:
    """Within max_header_bytes, but one field longer than a typed head can carry."""
    async with trio.open_nursery() as nursery:
        proxy = HttpProxy(env.router, authenticator(), settings=ProxySettings(max_header_bytes=1 << 20))
        port = await nursery.start(proxy.run, "127.0.0.1", 0)
        client = await Client.connect(port)
        response, answer = await client.request(method, b"http://erp.virtual:8000/x",
                                                [(b"host", b"erp.virtual:8000"), AUTH, (b"x-big", b"a" * 70000)], body)
        assert response.status_code == 431
        assert json.loads(answer)["error"] == "request_header_too_large"
        await env.router.wait_no_streams()
        assert not any(master.cloud.closed for master in env.router.masters)  # the tunnel serves on
        client = await Client.connect(port)
        response, _ = await client.request(b"GET", b"http://erp.virtual:8000/next", [(b"host", b"erp.virtual:8000"), AUTH])
        assert response.status_code == 200
        nursery.cancel_scope.cancel()


async def test_tls_client_hello_is_refused(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="connector.cloud.proxy")
    sock = await trio.open_tcp_stream("127.0.0.1", env.port)
    await sock.send_all(bytes([0x16, 0x03, 0x01, 0x00, 0x05]) + b"\x01\x00\x00\x01\x03")
    assert await sock.receive_some(100) == b""
    assert "HTTPS to the proxy itself is refused" in caplog.text


async def test_unknown_location_gets_503(env: Env) -> None:
    client = await Client.connect(env.port)
    response, body = await client.request(
        b"GET", b"http://erp.virtual/", [(b"host", b"erp.virtual"), AUTH, (b"sap-connectivity-scc-location_id", b"nowhere")]
    )
    assert response.status_code == 503
    assert json.loads(body) == {"error": "no_connector", "message": "no connector connected for location 'nowhere'"}


# --- the node's resets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [
        ("CONNECT_FAILED", 502, "internal_host_unreachable"),
        ("BACKEND_RESET", 502, "backend_reset"),
        ("INTERNAL_ERROR", 502, "internal_error"),
        ("NO_MAPPING", 403, "no_mapping"),
        ("DENIED", 403, "denied_by_allowlist"),
        ("CONNECT_TIMEOUT", 504, "internal_host_timeout"),
        ("BACKEND_TLS_ERROR", 502, "backend_tls_error"),
        ("TUNNEL_LOST", 502, "connector_connection_lost"),  # a POST: never replayed
    ],
)
async def test_stream_resets_map_to_statuses_without_the_nodes_words(
    env: Env, code: str, status: int, reason: str
) -> None:
    client = await Client.connect(env.port)
    response, body = await client.request(b"POST", f"http://odd.virtual/reset/{code}".encode(),
                                          [(b"host", b"odd.virtual"), AUTH], body=b"data")
    assert response.status_code == status
    assert json.loads(body)["error"] == reason
    assert SECRET.split(":")[0].encode() not in body and b"refused the connection" not in body
    if code == "TUNNEL_LOST":
        assert json.loads(body)["message"].startswith("connector connection lost")
    # the connection stays usable and the next request gets its own stream
    response, _ = await client.request(b"GET", b"http://erp.virtual/ok", [(b"host", b"erp.virtual"), AUTH])
    assert response.status_code == 200
    assert len(env.router.streams) == 2


@pytest.mark.parametrize(("host", "status", "reason"), [
    (b"unmapped.virtual:8000", 403, "no_mapping"),
    (b"dead.virtual:8000", 502, "internal_host_unreachable"),
])
async def test_the_real_nodes_refusals_reach_the_application(env: Env, host: bytes, status: int, reason: str) -> None:
    client = await Client.connect(env.port)
    response, body = await client.request(b"GET", b"http://" + host + b"/x", [(b"host", host), AUTH])
    assert (response.status_code, json.loads(body)["error"]) == (status, reason)
    assert b"127.0.0.1" not in body


async def test_reset_after_response_started_breaks_the_connection(env: Env) -> None:
    client = await Client.connect(env.port)
    await client.send(h11.Request(method=b"GET", target=b"http://odd.virtual/half-then-reset",
                                  headers=[(b"host", b"odd.virtual"), AUTH]))
    await client.send(h11.EndOfMessage())
    response = await client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 200
    with pytest.raises(h11.RemoteProtocolError):  # peer closed in the middle of a chunked body
        while True:
            assert not isinstance(await client.next_event(), h11.EndOfMessage)
    await env.router.wait_no_streams()


async def test_client_gone_mid_body_resets_the_stream(env: Env) -> None:
    client = await Client.connect(env.port)
    await client.send(h11.Request(
        method=b"POST", target=b"http://odd.virtual/record",
        headers=[(b"host", b"odd.virtual"), AUTH, (b"content-length", b"1000")],
    ))
    await client.send(h11.Data(data=b"x" * 10))
    await client.sock.aclose()
    await env.odd.reset_seen.wait()
    assert env.odd.resets == [ErrorCode.CANCEL]
    await env.router.wait_no_streams()


def test_parse_proxy_target() -> None:
    assert parse_proxy_target(b"http://Erp.Virtual:8000") == ("erp.virtual", 8000, b"/")
    assert parse_proxy_target(b"http://erp.virtual?x=1#frag") == ("erp.virtual", 80, b"/?x=1")
    assert parse_proxy_target(b"http://[::1]:81/p") == ("[::1]", 81, b"/p")
    with pytest.raises(BadTargetError):
        parse_proxy_target(b"http://erp virtual/")


CURL = shutil.which("curl")


@pytest.mark.skipif(CURL is None, reason="curl not installed")
async def test_curl_through_the_proxy(env: Env) -> None:
    assert CURL is not None
    result = await trio.run_process(
        [CURL, "-sS", "-x", f"http://127.0.0.1:{env.port}", "--proxy-header", f"Proxy-Authorization: Bearer {TOKEN}",
         "--proxy-header", "SAP-Connectivity-SCC-Location_ID: loc2", "-d", "hello=world",
         "http://erp.virtual:8000/curl", "http://erp.virtual:8000/curl2"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello=worldhello=world"
    assert env.router.opened == [("sub1", "loc2", Target("erp.virtual", 8000))] * 2  # a stream per request
    result = await trio.run_process(
        [CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{env.port}",
         "http://erp.virtual:8000/"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.stdout == b"407"


# --- replay: refused streams and lost tunnels -------------------------------------------------------


async def refuse_at_once(stream: SessionStream) -> None:
    """A node that is not the master: it refuses every stream before reading anything."""
    await stream.reset(ErrorCode.REFUSED, "not the master")


async def refuse_after_the_request(stream: SessionStream) -> None:
    """A node that read the request head and its whole body, then learnt it is not the master."""
    await stream.receive_head()
    while await stream.receive_some(65536):
        pass
    await stream.reset(ErrorCode.REFUSED, "no longer the master")


async def refuse_after_the_answer_started(stream: SessionStream) -> None:
    await stream.receive_head()
    await stream.send_head(ResponseHead(200, b"OK", [(b"content-length", b"100")]))
    await stream.send_all(b"half of it")
    await stream.reset(ErrorCode.REFUSED, "refused, too late")


async def tunnel_dies_after_the_request(stream: SessionStream) -> None:
    """The master's tunnel goes away once it read the request (maybe processed, maybe not)."""
    await stream.receive_head()
    while await stream.receive_some(65536):
        pass
    await stream.session.aclose(ErrorCode.GOING_AWAY, "node shutting down")


@asynccontextmanager
async def proxy_over(*handlers: Handler) -> AsyncIterator[tuple[Client, TunnelRouter, EchoBackend]]:
    """A proxy whose router has one master per handler, the last one the real node before EchoBackend."""
    async with trio.open_nursery() as nursery:
        backend = EchoBackend()
        node = real_node(mappings(await backend.start(nursery), await free_port()))
        async with open_router(*handlers, node) as router:
            proxy = HttpProxy(router, authenticator(), settings=ProxySettings(linger_timeout=LINGER))
            port = await nursery.start(proxy.run, "127.0.0.1", 0)
            with trio.fail_after(TEST_TIMEOUT):
                yield await Client.connect(port), router, backend
            nursery.cancel_scope.cancel()


HEADERS = [(b"host", b"erp.virtual:8000"), AUTH]


@pytest.mark.parametrize("method", [b"GET", b"POST", b"PATCH"])
async def test_a_stream_refused_before_its_head_was_read_is_replayed_on_the_next_master(method: bytes) -> None:
    async with proxy_over(refuse_at_once) as (client, router, backend):
        body = b"payload " * 100 if method != b"GET" else b""
        response, echoed = await client.request(method, b"http://erp.virtual:8000/x", HEADERS, body=body)
        assert (response.status_code, echoed) == (200, body)
        assert len(router.streams) == 2
        assert router.avoided == [None, router.streams[0]]  # the second open avoided the refusing tunnel
        assert router.streams[1].session is router.masters[1].cloud
        assert [(r["method"], r["body"]) for r in backend.requests] == [(method, body)]


async def test_a_post_refused_after_its_body_was_read_is_replayed_with_its_body_and_trailers() -> None:
    async with proxy_over(refuse_after_the_request) as (client, router, backend):
        await client.send(h11.Request(method=b"POST", target=b"http://erp.virtual:8000/orders",
                                      headers=[*HEADERS, (b"transfer-encoding", b"chunked")]))
        for part in (b"first,", b"second,", b"third"):
            await client.send(h11.Data(data=part))
        await client.send(h11.EndOfMessage(headers=[(b"x-checksum", b"42")]))
        response, echoed = await client.read_response()
        assert (response.status_code, echoed) == (200, b"first,second,third")
        assert len(router.streams) == 2 and router.avoided[1] is router.streams[0]
        assert [(r["body"], r["trailers"]) for r in backend.requests] == [(b"first,second,third", [(b"x-checksum", b"42")])]


async def test_a_refused_body_too_large_to_keep_is_not_replayed() -> None:
    async with proxy_over(refuse_after_the_request) as (client, router, backend):
        response, body = await client.request(b"POST", b"http://erp.virtual:8000/big", HEADERS,
                                              body=b"x" * (100 * 1024))
        assert response.status_code == 502 and json.loads(body)["error"] == "refused"
        assert len(router.streams) == 1 and backend.requests == []


async def test_a_refusal_after_the_response_started_is_not_replayed() -> None:
    async with proxy_over(refuse_after_the_answer_started) as (client, router, backend):
        await client.send(h11.Request(method=b"GET", target=b"http://erp.virtual:8000/x", headers=HEADERS))
        await client.send(h11.EndOfMessage())
        response = await client.next_event()
        assert isinstance(response, h11.Response) and response.status_code == 200
        with pytest.raises(h11.RemoteProtocolError):  # closed before its 100 bytes
            while not isinstance(await client.next_event(), h11.EndOfMessage):
                pass
        assert len(router.streams) == 1 and backend.requests == []


async def test_a_post_refused_in_the_middle_of_its_body_is_replayed_with_all_of_it() -> None:
    """The refusal comes while the application is still sending: what was taken so far is sent
    again on the next master, and the rest follows it there."""
    refused = trio.Event()

    async def refuse_after_a_part(stream: SessionStream) -> None:
        await stream.receive_head()
        await stream.receive_some(65536)
        await stream.reset(ErrorCode.REFUSED, "handing over")
        refused.set()

    async with proxy_over(refuse_after_a_part) as (client, router, backend):
        await client.send(h11.Request(method=b"POST", target=b"http://erp.virtual:8000/orders",
                                      headers=[*HEADERS, (b"content-length", b"12")]))
        await client.send(h11.Data(data=b"first-"))
        await refused.wait()
        await client.send(h11.Data(data=b"second"))
        await client.send(h11.EndOfMessage())
        response, echoed = await client.read_response()
        assert (response.status_code, echoed) == (200, b"first-second")
        assert [r["body"] for r in backend.requests] == [b"first-second"] and len(router.streams) == 2


async def test_replays_are_bounded_when_every_master_refuses() -> None:
    async with proxy_over(refuse_at_once, refuse_at_once) as (client, router, backend):
        response, body = await client.request(b"GET", b"http://erp.virtual:8000/x", HEADERS)
        assert (response.status_code, json.loads(body)["error"]) == (502, "refused")
        assert len(router.streams) == MAX_ATTEMPTS
        assert [stream.session for stream in router.streams] == [m.cloud for m in router.masters[:2]] * 2
        assert backend.requests == []


async def test_a_refused_websocket_upgrade_is_replayed_and_switches_on_the_next_master() -> None:
    async with proxy_over(refuse_at_once) as (client, router, backend):
        await client.send(h11.Request(method=b"GET", target=b"http://erp.virtual:8000/ws", headers=upgrade_headers()))
        await client.send(h11.EndOfMessage())
        response = await client.next_event()
        assert isinstance(response, h11.InformationalResponse) and response.status_code == 101
        leftover, _ = client.conn.trailing_data
        assert bytes(leftover) + await receive_exactly(client.sock, len(WS_GREETING) - len(leftover)) == WS_GREETING
        await client.sock.send_all(b"echo me")
        assert await receive_exactly(client.sock, 7) == b"echo me"
        assert len(router.streams) == 2 and router.avoided[1] is router.streams[0]


@pytest.mark.parametrize(("method", "body", "status"), [
    (b"GET", b"", 200),  # safe to repeat: replayed on the next master
    (b"DELETE", b"", 200),
    (b"POST", b"", 502),  # may have run on the lost master: never replayed
    (b"PUT", b"data", 502),  # idempotent, but its body was taken from the application
])
async def test_a_request_lost_with_its_tunnel_is_replayed_only_when_safe(method: bytes, body: bytes, status: int) -> None:
    async with proxy_over(tunnel_dies_after_the_request) as (client, router, backend):
        headers = HEADERS if body or method in (b"GET", b"DELETE") else [*HEADERS, (b"content-length", b"0")]
        response, answer = await client.request(method, b"http://erp.virtual:8000/x", headers, body=body)
        assert response.status_code == status, answer
        assert router.masters[0].cloud.closed
        if status == 200:
            assert len(router.streams) == 2 and [r["method"] for r in backend.requests] == [method]
        else:
            assert json.loads(answer)["error"] == "connector_connection_lost"
            assert len(router.streams) == 1 and backend.requests == []


async def test_a_tunnel_lost_in_the_middle_of_the_answer_closes_the_application_connection() -> None:
    async def die_mid_answer(stream: SessionStream) -> None:
        await stream.receive_head()
        await stream.send_head(ResponseHead(200, b"OK", [(b"content-length", b"100")]))
        await stream.send_all(b"x" * 10)
        await stream.session.aclose(ErrorCode.GOING_AWAY, "node shutting down")

    async with proxy_over(die_mid_answer) as (client, router, backend):
        await client.send(h11.Request(method=b"GET", target=b"http://erp.virtual:8000/x", headers=HEADERS))
        await client.send(h11.EndOfMessage())
        response = await client.next_event()
        assert isinstance(response, h11.Response) and response.status_code == 200
        with pytest.raises(h11.RemoteProtocolError):  # closed before its 100 bytes: never replayed
            while not isinstance(await client.next_event(), h11.EndOfMessage):
                pass
        assert len(router.streams) == 1 and backend.requests == []


async def test_a_tunnel_lost_while_the_body_is_sent_gets_502_and_closes() -> None:
    async def die_mid_body(stream: SessionStream) -> None:
        await stream.receive_head()
        await stream.receive_some(65536)
        await stream.session.aclose(ErrorCode.GOING_AWAY, "node shutting down")

    async with proxy_over(die_mid_body) as (client, router, backend):
        await client.send(h11.Request(method=b"PUT", target=b"http://erp.virtual:8000/x",
                                      headers=[*HEADERS, (b"content-length", b"1000")]))
        await client.send(h11.Data(data=b"a" * 10))
        response, body = await client.read_response()  # the rest of the body is not awaited
        assert (response.status_code, json.loads(body)["error"]) == (502, "connector_connection_lost")
        assert header(response, b"connection") == b"close"
        assert len(router.streams) == 1 and backend.requests == []


async def test_a_reset_that_is_no_failover_is_not_replayed(env: Env) -> None:
    client = await Client.connect(env.port)
    response, body = await client.request(b"GET", b"http://odd.virtual/reset/BACKEND_RESET",
                                          [(b"host", b"odd.virtual"), AUTH])
    assert (response.status_code, json.loads(body)["error"]) == (502, "backend_reset")
    assert len(env.router.streams) == 1


# --- WebSocket upgrades ---------------------------------------------------------------------------

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
WS_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def upgrade_headers(upgrade: bytes = b"websocket", host: bytes = b"erp.virtual:8000") -> list[tuple[bytes, bytes]]:
    return [
        (b"host", host), AUTH, (b"connection", b"keep-alive, Upgrade"), (b"upgrade", upgrade),
        (b"sec-websocket-key", WS_KEY), (b"sec-websocket-version", b"13"), (b"sec-websocket-protocol", b"chat"),
    ]


async def receive_exactly(sock: trio.SocketStream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = await sock.receive_some(count - len(data))
        assert chunk, f"EOF after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


async def test_websocket_upgrade_relays_101_then_raw_bytes_both_ways(env: Env) -> None:
    client = await Client.connect(env.port)
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
    assert header(response, b"keep-alive") is None  # hop-by-hop header of the 101 is not relayed
    forwarded = json.loads(header(response, b"x-echo-headers") or b"[]")
    names = [name for name, _ in forwarded]
    assert [("connection", "upgrade"), ("upgrade", "websocket")] == [
        (n, v) for n, v in forwarded if n in ("connection", "upgrade")]
    assert {"sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "host"} <= set(names)
    assert "proxy-authorization" not in names and "keep-alive" not in names
    # bytes the proxy had already read past the 101 head, then the echo of the early bytes
    leftover, _ = client.conn.trailing_data
    expected = WS_GREETING + early
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
    assert bytes(echoed) == payload  # and then EOF: the internal host's half-close was relayed
    await env.backend.websocket_finished.wait()
    await env.router.wait_no_streams()
    await trio.testing.wait_all_tasks_blocked()  # the node's exchange wrote its audit line
    assert env.router.opened == [("sub1", "", Target("erp.virtual", 8000))]
    (record,) = env.node.audit.records("request")
    assert (record["status"], record["reason"], record["bytes_in"]) == (101, "allowed", len(early) + len(payload))


async def test_websocket_reset_by_node_closes_the_application_connection(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connector.cloud.exchange")
    client = await Client.connect(env.port)
    await client.send(h11.Request(method=b"GET", target=b"http://odd.virtual/ws-reset",
                                  headers=upgrade_headers(host=b"odd.virtual")))
    await client.send(h11.EndOfMessage())
    response = await client.next_event()
    assert isinstance(response, h11.InformationalResponse) and response.status_code == 101
    leftover, _ = client.conn.trailing_data
    assert bytes(leftover) + await receive_exactly(client.sock, len(WS_GREETING) - len(leftover)) == WS_GREETING
    await client.sock.send_all(b"ping")  # the node reads it, then resets: the proxy closes
    assert await client.sock.receive_some(65536) == b""
    await env.router.wait_no_streams()
    assert "WebSocket of" in caplog.text and "ended abruptly" in caplog.text


async def test_websocket_upgrade_denied_by_node_is_relayed_and_connection_continues(env: Env) -> None:
    client = await Client.connect(env.port)
    response, body = await client.request(b"GET", b"http://erp.virtual:8000/denied/ws", upgrade_headers())
    assert response.status_code == 403
    assert json.loads(body)["error"] == "websocket_not_allowed"
    assert header(response, b"upgrade") is None
    response, body = await client.request(
        b"POST", b"http://erp.virtual:8000/after", [(b"host", b"erp.virtual:8000"), AUTH], body=b"plain"
    )
    assert response.status_code == 200 and body == b"plain"
    assert len(env.router.opened) == 2
    assert [r["target"] for r in env.backend.requests] == [b"/after"]  # the denied upgrade never left the node


async def test_h2c_upgrade_is_stripped(env: Env) -> None:
    client = await Client.connect(env.port)
    headers = [
        (b"host", b"odd.virtual"), AUTH, (b"connection", b"Upgrade, HTTP2-Settings"),
        (b"upgrade", b"h2c"), (b"http2-settings", b"AAMAAABkAARAAAAAAAIAAAAA"),
    ]
    response, _ = await client.request(b"GET", b"http://odd.virtual/record-h2c", headers)
    assert response.status_code == 204
    assert env.odd.heads[0].headers == [(b"host", b"odd.virtual")]
    response, _ = await client.request(b"GET", b"http://erp.virtual:8000/next", [(b"host", b"erp.virtual:8000"), AUTH])
    assert response.status_code == 200


async def test_a_101_to_a_request_that_asked_for_none_gets_502_and_closes(env: Env) -> None:
    client = await Client.connect(env.port)
    response, body = await client.request(b"GET", b"http://odd.virtual/switch", [(b"host", b"odd.virtual"), AUTH])
    assert (response.status_code, json.loads(body)["error"]) == (502, "bad_response")
    assert header(response, b"connection") == b"close"
    assert await client.sock.receive_some(65536) == b""
    assert b"nobody asked" not in body


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


# --- answers before the request body ---------------------------------------------------------------


async def _post_head_then_answer(port: int) -> Client:
    client = await Client.connect(port)
    await client.send(h11.Request(method=b"POST", target=b"http://erp.virtual:8000/early",
                                  headers=[AUTH, (b"host", b"erp.virtual:8000"), (b"content-length", b"5")]))
    response, body = await client.read_response()  # answered before the body was sent
    assert (response.status_code, body) == (200, b"early")
    return client


async def test_answer_before_the_body_keeps_the_connection_when_the_body_follows(env: Env) -> None:
    client = await _post_head_then_answer(env.port)
    await client.send(h11.Data(data=b"hello"))
    await client.send(h11.EndOfMessage())
    response, _ = await client.request(b"GET", b"http://erp.virtual:8000/after",
                                       [AUTH, (b"host", b"erp.virtual:8000")])
    assert response.status_code == 200
    assert len(env.router.opened) == 2
    # the internal host that answered early never got a byte of the body, nor a next request
    assert [(r["target"], r["body"]) for r in env.backend.requests] == [(b"/early", b""), (b"/after", b"")]
    await client.sock.aclose()


async def test_answer_before_the_body_and_no_body_closes_after_the_linger(env: Env) -> None:
    client = await _post_head_then_answer(env.port)
    with trio.fail_after(LINGER + 2.0):
        assert await client.sock.receive_some(1024) == b""
    assert len(env.router.opened) == 1
    await env.router.wait_no_streams()


# --- trailers ----------------------------------------------------------------------------------------


async def test_proxy_headers_in_request_trailers_do_not_reach_the_node(env: Env) -> None:
    """Trailers are headers too: the location header and the proxy credentials stay at the proxy."""
    sock = await trio.open_tcp_stream("127.0.0.1", env.port)
    await sock.send_all(
        b"POST http://odd.virtual/record-trailers HTTP/1.1\r\nhost: odd.virtual\r\n"
        b"proxy-authorization: Bearer " + TOKEN.encode() + b"\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nSAP-Connectivity-SCC-Location_ID: loc9\r\n"
        b"proxy-authorization: Bearer " + TOKEN.encode() + b"\r\nx-checksum: 1\r\n\r\n")
    answer = b""
    while b"204" not in answer:
        answer += await sock.receive_some(65536)
    assert env.odd.trailers == [[(b"x-checksum", b"1")]]  # other trailers pass
    await sock.aclose()


async def test_response_trailers_reach_the_application_through_the_one_trailer_rule(env: Env) -> None:
    """Before: the proxy ended every response with no trailer fields at all (checksums lost)."""
    client = await Client.connect(env.port)
    response, body = await client.request(b"GET", b"http://odd.virtual/trailers", [(b"host", b"odd.virtual"), AUTH])
    assert (response.status_code, body) == (200, b"hello")
    assert client.trailers == [(b"x-checksum", b"5d41")]
