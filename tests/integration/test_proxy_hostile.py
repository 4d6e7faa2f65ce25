"""The HTTP proxy against hostile or broken applications, over real loopback sockets.

Smuggling-shaped framing (Content-Length with Transfer-Encoding, a Connection header naming a
framing header, malformed chunks), slow heads and bodies, responses the application does not
read, idle connections, and the audit record of each refusal. Deadlines are configured in
fractions of a second. The proxy routes through real in-memory tunnels (`tests.support.tunnelrouter`)
to the real node in front of `EchoBackend` on 127.0.0.1, or to a few lines speaking typed heads
where the node must misbehave (an answer that never ends).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import h11
import pytest
import trio
import trio.testing

from connector.agent.audit import REQUEST_FIELDS
from connector.cli import init_certs
from connector.cloud.audit import CloudAudit
from connector.cloud.proxy import HttpProxy, ProxySettings
from connector.cloud.server import CloudServer
from connector.config import load_cloud_config
from connector.datarate import MinDataRate
from connector.http1 import framing_error
from connector.tunnel.heads import ResponseHead
from connector.tunnel.session import SessionStream
from connector.tunnel.types import ErrorCode, StreamResetError
from tests.integration.test_proxy_http import (
    AUTH,
    TOKEN,
    Client,
    authenticator,
    free_port,
    mappings,
)
from tests.support.stack import SUBACCOUNT, cloud_toml
from tests.support.tunnelrouter import (
    EchoBackend,
    Handler,
    RealNode,
    TunnelRouter,
    open_router,
    real_node,
)

TEST_TIMEOUT = 10.0
SHORT = 0.3  # every deadline under test, in seconds
HEAD = b"host: erp.virtual:8000\r\n"
TARGET = b"http://erp.virtual:8000"
CREDENTIALS = b"proxy-authorization: Bearer " + TOKEN.encode() + b"\r\n"


@attrs.define(eq=False)
class Env:
    port: int
    router: TunnelRouter
    audit: CloudAudit  # the proxy's
    backend: EchoBackend
    node: RealNode


@asynccontextmanager
async def open_proxy(handler: Handler | None = None, **settings: object) -> AsyncIterator[Env]:
    """A proxy on 127.0.0.1 with `settings` (short linger), routing to the real node in front of
    an `EchoBackend`, or to `handler`."""
    settings.setdefault("linger_timeout", SHORT)
    async with trio.open_nursery() as nursery:
        backend = EchoBackend()
        node = real_node(mappings(await backend.start(nursery), await free_port()))
        async with open_router(handler or node) as router:
            audit = CloudAudit()
            proxy = HttpProxy(router, authenticator(), settings=ProxySettings(**settings), audit=audit)  # type: ignore[arg-type]
            port = await nursery.start(proxy.run, "127.0.0.1", 0)
            with trio.fail_after(TEST_TIMEOUT):
                yield Env(port, router, audit, backend, node)
            nursery.cancel_scope.cancel()


async def read_to_eof(sock: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await sock.receive_some(65536):
        data += chunk
    return data


def responses(data: bytes) -> list[tuple[int, dict[str, object]]]:
    """Every (status, JSON body) in `data`, which must end at the end of a response."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    found: list[tuple[int, dict[str, object]]] = []
    status, body = 0, b""
    while True:
        # pretend each request was sent so h11 reads the next response
        if conn.our_state is h11.IDLE:
            conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"x")]))
            conn.send(h11.EndOfMessage())
        event = conn.next_event()
        if isinstance(event, h11.Response):
            status, body = event.status_code, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            found.append((status, json.loads(body) if body else {}))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return found
            conn.start_next_cycle()
        else:
            return found


def assert_audit_fields(record: dict[str, object]) -> None:
    """The node's request fields in the node's order, then the cloud's own."""
    assert list(record)[: 2 + len(REQUEST_FIELDS)] == ["ts", "kind", *REQUEST_FIELDS]
    assert record["kind"] == "request" and record["decision"] == "denied"
    assert str(record["client"]).startswith("127.0.0.1:")
    assert TOKEN not in json.dumps(record)


# --- framing --------------------------------------------------------------------------------------


async def test_cl_te_attacker_prefix_never_reaches_the_node_and_the_connection_closes() -> None:
    """A front-end framing by Content-Length sees one request (the attacker's, with a body) and
    then the victim's; framed by Transfer-Encoding the body ends at `0\\r\\n\\r\\n` and the rest
    is the attacker's request, completed by the victim's credentials. RFC 9112 6.3: 400, close."""
    smuggled = b"GET " + TARGET + b"/attacker HTTP/1.1\r\nx-ignore: "  # the victim's head completes it
    body = b"0\r\n\r\n" + smuggled
    attacker = (b"POST " + TARGET + b"/public HTTP/1.1\r\n" + HEAD
                + b"content-length: %d\r\ntransfer-encoding: chunked\r\n\r\n" % len(body) + body)
    victim = b"GET " + TARGET + b"/victim HTTP/1.1\r\n" + HEAD + CREDENTIALS + b"\r\n"
    async with open_proxy() as env:
        sock = await trio.open_tcp_stream("127.0.0.1", env.port)
        await sock.send_all(attacker + victim)  # one shared front-end connection
        received, closed = b"", False
        with trio.move_on_after(2):  # bounded: a proxy that keeps the connection never closes it
            while chunk := await sock.receive_some(65536):
                received += chunk
            closed = True
        assert env.router.opened == []  # /attacker never reached a node
        answers = responses(received)
        assert [(status, body["error"]) for status, body in answers] == [(400, "ambiguous_framing")]
        assert closed
        (record,) = await env.audit.wait_records(1)
        assert_audit_fields(record)
        assert (record["status"], record["reason"], record["method"]) == (400, "ambiguous_framing", "POST")


async def test_cl_te_request_with_credentials_is_refused_before_any_stream() -> None:
    async with open_proxy() as env:
        sock = await trio.open_tcp_stream("127.0.0.1", env.port)
        await sock.send_all(b"POST " + TARGET + b"/x HTTP/1.1\r\n" + HEAD + CREDENTIALS
                            + b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        assert [status for status, _ in responses(await read_to_eof(sock))] == [400]
        assert env.router.opened == []


@pytest.mark.parametrize(
    ("framing", "body"),
    [(b"content-length: 5\r\n", b"hello"), (b"transfer-encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n")],
)
@pytest.mark.parametrize("listed", [b"content-length", b"Transfer-Encoding"])
async def test_connection_header_naming_a_framing_header_gets_400(framing: bytes, body: bytes, listed: bytes) -> None:
    async with open_proxy() as env:
        sock = await trio.open_tcp_stream("127.0.0.1", env.port)
        await sock.send_all(b"POST " + TARGET + b"/x HTTP/1.1\r\n" + HEAD + CREDENTIALS + framing
                            + b"connection: keep-alive, " + listed + b"\r\n\r\n" + body)
        answers = responses(await read_to_eof(sock))
        assert [(status, body["error"]) for status, body in answers] == [(400, "ambiguous_framing")]
        assert env.router.opened == []
        (record,) = await env.audit.wait_records(1)
        assert record["subaccount"] is None  # refused before the credentials were looked at


def test_framing_error_names_the_problem() -> None:
    assert framing_error([(b"content-length", b"1"), (b"transfer-encoding", b"chunked")]) is not None
    assert "content-length" in (framing_error([(b"connection", b"Content-Length")]) or "")
    assert framing_error([(b"content-length", b"1"), (b"connection", b"keep-alive, x-trace")]) is None


@pytest.mark.parametrize(
    "chunks",
    [
        b"-1\r\nabc\r\n0\r\n\r\n",  # negative size
        b"0x5\r\nhello\r\n0\r\n\r\n",  # not hexadecimal digits only
        b"5\r\nhelloXY0\r\n\r\n",  # no CRLF after the data
        b"3\r\nhello\r\n0\r\n\r\n",  # more data than the size said
    ],
)
@pytest.mark.parametrize("split", [False, True])
async def test_malformed_chunked_body_gets_400_and_a_truthful_log(
    chunks: bytes, split: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The internal host holds its answer (/gate), so the proxy can still answer; with `split`,
    the malformed body comes after the stream to the node was opened and the head sent on it."""
    caplog.set_level(logging.INFO, logger="connector.cloud")
    async with open_proxy() as env:
        env.backend.gate = trio.Event()
        sock = await trio.open_tcp_stream("127.0.0.1", env.port)
        head = b"PUT " + TARGET + b"/gate HTTP/1.1\r\n" + HEAD + CREDENTIALS + b"transfer-encoding: chunked\r\n\r\n"
        if split:
            await sock.send_all(head)
            await trio.testing.wait_all_tasks_blocked()  # the proxy (same trio run) sent the head on
            assert env.router.streams_open() == 1
            assert [r["target"] for r in env.backend.requests] == [b"/gate"]  # and the node forwarded it
            await sock.send_all(chunks)
        else:
            await sock.send_all(head + chunks)
        answers = responses(await read_to_eof(sock))
        assert [(status, body["error"]) for status, body in answers] == [(400, "malformed_request")]
        (record,) = await env.audit.wait_records(1)
        assert (record["status"], record["reason"], record["path"]) == (400, "malformed_request", "/gate")
        await env.router.wait_no_streams()  # the stream was reset, not left open
    assert "502" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- deadlines ------------------------------------------------------------------------------------


async def test_idle_connection_without_a_byte_closes_quietly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with open_proxy(idle_timeout=SHORT) as env:
        sock = await trio.open_tcp_stream("127.0.0.1", env.port)
        assert await read_to_eof(sock) == b""
        await trio.testing.wait_all_tasks_blocked()  # the proxy's task has finished its close
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert env.audit.written == 0


async def test_trickled_request_head_gets_408_after_request_head_timeout() -> None:
    """A byte every 50 ms never completes the head: 408 at request_head_timeout, not at idle_timeout."""
    async with open_proxy(request_head_timeout=SHORT, idle_timeout=60.0) as env:
        sock = await trio.open_tcp_stream("127.0.0.1", env.port)

        async def trickle() -> None:
            with trio.move_on_after(5):  # the test fails long before: the answer must come first
                for byte in b"GET " + TARGET + b"/x HTTP/1.1\r\n" + HEAD + b"x-slow: " + b"a" * 1000:
                    await sock.send_all(bytes([byte]))
                    await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            started = trio.current_time()
            answer = b""
            while chunk := await sock.receive_some(65536):
                answer += chunk
            nursery.cancel_scope.cancel()
        assert SHORT <= trio.current_time() - started < 3.0
        assert [(status, body["error"]) for status, body in responses(answer)] == [(408, "request_head_timeout")]
        (record,) = await env.audit.wait_records(1)
        assert (record["status"], record["reason"]) == (408, "request_head_timeout")


async def test_slow_request_body_gets_408_and_the_stream_is_given_back() -> None:
    """1 byte every 50 ms against a minimum of 1000 bytes/s after SHORT s of grace; the internal
    host answers only once it has the whole body (/gate, closed)."""
    rate = MinDataRate(1000, SHORT)
    async with open_proxy(request_body_rate=rate) as env:
        env.backend.gate = trio.Event()
        sock = await trio.open_tcp_stream("127.0.0.1", env.port)
        await sock.send_all(b"POST " + TARGET + b"/gate HTTP/1.1\r\n" + HEAD + CREDENTIALS
                            + b"content-length: 100000\r\n\r\n" + b"x" * 10)

        async def trickle() -> None:
            with trio.move_on_after(5):
                while True:
                    await sock.send_all(b"x")
                    await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            started = trio.current_time()
            answer = b""
            while chunk := await sock.receive_some(65536):
                answer += chunk
            nursery.cancel_scope.cancel()
        assert SHORT <= trio.current_time() - started < 3.0
        assert [(status, body["error"]) for status, body in responses(answer)] == [(408, "request_body_too_slow")]
        (record,) = await env.audit.wait_records(1)
        assert (record["status"], record["reason"], record["subaccount"]) == (408, "request_body_too_slow", "sub1")
        await env.router.wait_no_streams()  # the stream was reset: the node gave up the request
        await trio.testing.wait_all_tasks_blocked()
        (line,) = env.node.audit.records("request")
        assert (line["path"], line["reason"]) == ("/gate", "client_gone")


async def test_a_body_at_the_rate_is_not_cut() -> None:
    rate = MinDataRate(1000, SHORT)
    async with open_proxy(request_body_rate=rate) as env:
        env.backend.gate = trio.Event()  # the answer comes once the whole body is there
        client = await Client.connect(env.port)
        await client.send(h11.Request(method=b"POST", target=TARGET + b"/gate",
                                      headers=[AUTH, (b"host", b"erp.virtual:8000"), (b"content-length", b"8000")]))
        for _ in range(10):  # 800 bytes every 100 ms: 8000 bytes/s
            await client.send(h11.Data(data=b"y" * 800))
            await trio.sleep(0.1)
        await client.send(h11.EndOfMessage())
        env.backend.gate.set()
        response, body = await client.read_response()
        assert (response.status_code, body) == (200, b"y" * 8000)
        assert env.audit.written == 0


@attrs.define(eq=False)
class _FloodNode:
    """Answers every request with a body that never ends; records the resets it sees."""

    resets: list[ErrorCode] = attrs.Factory(list)
    reset_seen: trio.Event = attrs.Factory(trio.Event)

    async def __call__(self, stream: SessionStream) -> None:
        await stream.receive_head()
        try:
            await stream.send_head(ResponseHead(200, b"OK", [(b"transfer-encoding", b"chunked")]))
            piece = b"z" * 65536
            while True:
                await stream.send_all(piece)
        except StreamResetError as exc:
            self.resets.append(exc.code)
            self.reset_seen.set()


async def test_response_the_application_does_not_read_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="connector.cloud.proxy")
    node = _FloodNode()
    async with open_proxy(node, response_write_timeout=SHORT) as env:
        sock = await trio.open_tcp_stream("127.0.0.1", env.port)
        await sock.send_all(b"GET " + TARGET + b"/big HTTP/1.1\r\n" + HEAD + CREDENTIALS + b"\r\n")
        # ... and never reads: the socket buffers fill, then a write waits past its deadline
        await node.reset_seen.wait()
        assert node.resets == [ErrorCode.CANCEL]
        await env.router.wait_no_streams()
        (record,) = await env.audit.wait_records(1)
        assert (record["reason"], record["status"], record["path"]) == ("response_not_read", None, "/big")
        assert "was not taken within" in caplog.text


# --- idle kept-alive connections ----------------------------------------------------------------


async def test_idle_kept_alive_connection_holds_no_stream_and_closes_after_idle_timeout() -> None:
    """Every request has its own stream: between requests, and while the connection idles until
    idle_timeout closes it, the tunnel has no stream of it open."""
    async with open_proxy(idle_timeout=SHORT) as env:
        client = await Client.connect(env.port)
        headers = [AUTH, (b"host", b"erp.virtual:8000")]
        for path in (b"/a", b"/b"):
            response, _ = await client.request(b"GET", TARGET + path, headers)
            assert response.status_code == 200
            await trio.testing.wait_all_tasks_blocked()
            assert env.router.streams_open() == 0
        started = trio.current_time()
        assert await read_to_eof(client.sock) == b""  # closed quietly after idle_timeout
        assert trio.current_time() - started >= SHORT * 0.9
        assert len(env.router.streams) == 2 and env.router.streams_open() == 0
        assert env.audit.written == 0


# --- audit of every refusal -----------------------------------------------------------------------


async def test_refusals_are_audited_with_the_nodes_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="connector.cloud.proxy")
    async with open_proxy() as env:
        client = await Client.connect(env.port)
        host = (b"host", b"erp.virtual:8000")
        cases = [
            (b"GET", TARGET + b"/a", [host], 407),
            (b"GET", TARGET + b"/b", [host, (b"proxy-authorization", b"Bearer wrong")], 407),
            (b"GET", b"http://user:secret@erp.virtual/c", [host, AUTH], 400),
            (b"GET", TARGET + b"/d", [host, AUTH, (b"sap-connectivity-scc-location_id", b"nowhere")], 503),
        ]
        for method, target, headers, status in cases:
            response, _ = await client.request(method, target, headers)
            assert response.status_code == status
        client.conn.start_next_cycle()
        await client.send(h11.Request(method=b"CONNECT", target=b"erp.virtual:443", headers=[host, AUTH]))
        await client.send(h11.EndOfMessage())
        response, _ = await client.read_response()
        assert response.status_code == 405
        records = await env.audit.wait_records(5)
    for record in records:
        assert_audit_fields(record)
        assert record["proxy"] == "http"
    assert [(r["status"], r["reason"], r["subaccount"], r["location"], r["virtual_target"], r["path"])
            for r in records] == [
        (407, "proxy_authentication_required", None, None, None, None),
        (407, "invalid_proxy_credentials", None, None, None, None),
        (400, "bad_request_target", "sub1", None, None, None),  # the target is not recorded
        (503, "no_connector", "sub1", "nowhere", "http://erp.virtual:8000", "/d"),
        (405, "connect_not_supported", None, None, None, None),
    ]
    assert "secret" not in json.dumps(records)
    assert caplog.text.count(" 407 ") == 2  # and logged


async def test_cloud_server_writes_refusals_to_its_audit_log_file(tmp_path: Path) -> None:
    """[proxy] audit_log and request_head_timeout from cloud.toml reach the running proxies."""
    certs = init_certs(tmp_path / "certs", SUBACCOUNT, ["node-a"], ["127.0.0.1"])
    config_path = cloud_toml(tmp_path, certs)
    config_path.write_text(config_path.read_text().replace(
        "[proxy]\n", '[proxy]\naudit_log = "cloud-audit.jsonl"\nrequest_head_timeout = 0.3\n'))
    cloud = CloudServer(load_cloud_config(config_path))
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        with trio.fail_after(TEST_TIMEOUT):
            client = await Client.connect(ports.http_proxy)
            response, _ = await client.request(b"GET", TARGET + b"/x", [(b"host", b"erp.virtual:8000")])
            assert response.status_code == 407
            slow = await trio.open_tcp_stream("127.0.0.1", ports.http_proxy)
            await slow.send_all(b"GET " + TARGET + b"/y HTTP/1.1\r\n")  # and nothing more
            assert (await read_to_eof(slow)).startswith(b"HTTP/1.1 408 ")
            await cloud.audit.wait_records(2)
        nursery.cancel_scope.cancel()
    lines = [json.loads(line) for line in (tmp_path / "cloud-audit.jsonl").read_text().splitlines()]
    assert [(r["status"], r["reason"], r["proxy"]) for r in lines] == [
        (407, "proxy_authentication_required", "http"), (408, "request_head_timeout", "http")]
    assert stat.S_IMODE(os.stat(tmp_path / "cloud-audit.jsonl").st_mode) == 0o600
