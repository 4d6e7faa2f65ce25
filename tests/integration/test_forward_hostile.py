"""Hostile applications and broken peers against the node's forwarder, through real backends on
loopback and a memory tunnel stream: trailers, ambiguous paths, slow heads and bodies, and
responses nobody reads. (Error bodies through the whole stack: test_forward_error_bodies.py.)"""

from __future__ import annotations

import contextlib
import json

import h11
import pytest
import trio
from test_forward_http import DEFAULT_TARGET, audit_lines, context, mapping_for, open_stream, start
from test_forward_support import CHUNK, HttpClient, read_head, read_raw_until_closed, serve

from connector.agent.acl import AccessControl
from connector.agent.audit import AuditLog
from connector.agent.forward import serve_stream
from connector.tunnel.testing import memory_stream_pair
from connector.tunnel.types import StreamResetError

# Short deadlines for the tests; the defaults are in docs/configuration.md.
HEAD_TIMEOUT = 0.5
GRACE = 0.5
WRITE_TIMEOUT = 0.5

# Trailer fields a hostile application sends, and the ones a legitimate one does.
HOSTILE_TRAILERS = [
    (b"host", b"admin.internal"),
    (b"content-length", b"0"),
    (b"transfer-encoding", b"chunked"),
    (b"authorization", b"Basic YWRtaW46YWRtaW4="),
    (b"cookie", b"session=stolen"),
    (b"x-forwarded-for", b"10.0.0.1"),
    (b"x-http-method-override", b"DELETE"),
    (b"if-none-match", b"*"),
    (b"cache-control", b"no-store"),
    (b"content-type", b"text/html"),
    (b"location", b"http://evil.example/"),
    (b"keep-alive", b"timeout=5"),
]
BENIGN_TRAILERS = [(b"x-checksum", b"1"), (b"server-timing", b"db;dur=53"), (b"content-digest", b"sha-256=:x:")]


async def test_request_trailers_carry_no_framing_routing_or_authentication(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    client = HttpClient(open_stream(nursery, acl, context(AuditLog(None))))
    await client._send(h11.Request(method=b"POST", target=b"/echo",
                                   headers=[(b"host", b"x"), (b"transfer-encoding", b"chunked"), (b"te", b"trailers")]))
    await client._send(h11.Data(data=b"abc"))
    await client._send(h11.EndOfMessage(headers=HOSTILE_TRAILERS + BENIGN_TRAILERS))
    reply = await client.read_response()
    assert reply.status == 200
    assert backend.requests[-1]["trailers"] == [[k.decode(), v.decode()] for k, v in BENIGN_TRAILERS]


async def test_response_trailers_carry_no_framing_routing_or_authentication(nursery: trio.Nursery) -> None:
    async def answers_with_trailers(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        trailers = b"".join(k + b": " + v + b"\r\n" for k, v in [(b"set-cookie", b"admin=1"), *HOSTILE_TRAILERS,
                                                                *BENIGN_TRAILERS])
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                              b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n")
        await stream.receive_some(CHUNK)

    port = await serve(nursery, answers_with_trailers)
    opener = open_stream(nursery, AccessControl([mapping_for(port)]), context(AuditLog(None)))
    await opener.send_all(b"GET /echo HTTP/1.1\r\nhost: a\r\n\r\n")
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"GET", target=b"/echo", headers=[(b"host", b"a")]))
    conn.send(h11.EndOfMessage())
    with trio.fail_after(5):
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await opener.receive_some(CHUNK))
    assert list(event.headers) == BENIGN_TRAILERS


# --- paths that could mean another path to the internal host -------------------------------------


async def test_ambiguous_path_refused_and_unambiguous_one_arrives_byte_for_byte(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    audit = AuditLog(None)
    client = HttpClient(open_stream(nursery, acl, context(audit)))
    refused = await client.request(b"GET", b"/echo/%252e%252e/admin")
    assert (refused.status, refused.json()["error"]) == (400, "ambiguous_path")
    accepted_target = b"/echo/caf%C3%A9/a%3Fb%23c;v=1/%E2%82%AC?x=%252e%c0%ae"
    accepted = await client.request(b"GET", accepted_target)
    assert accepted.status == 200
    assert [r["target"].encode() for r in backend.requests] == [accepted_target]
    denied, allowed = await audit_lines(audit, 2)
    assert (denied["decision"], denied["reason"]) == ("denied", "ambiguous_path")
    assert "survives one decoding" in denied["detail"]
    assert (allowed["decision"], allowed["path"]) == ("allowed", "/echo/caf%C3%A9/a%3Fb%23c;v=1/%E2%82%AC")


# --- applications that are slow on purpose ----------------------------------------------------------


async def _trickle(stream: trio.abc.SendStream, data: bytes, every: float) -> None:
    """Send `data` one byte at a time, one every `every` seconds, until done or the stream breaks."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, StreamResetError):
        for byte in data:
            await stream.send_all(bytes([byte]))
            await trio.sleep(every)


def _answer(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


async def test_a_trickled_request_head_gets_408_at_its_deadline(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    audit = AuditLog(None)
    opener = open_stream(nursery, acl, context(audit, request_head_timeout=HEAD_TIMEOUT))
    began = trio.current_time()
    nursery.start_soon(_trickle, opener, b"GET /echo HTTP/1.1\r\nhost: a\r\nx-slow: " + b"a" * 1000, 0.05)
    answer = await read_raw_until_closed(opener, within=3)
    assert HEAD_TIMEOUT <= trio.current_time() - began < HEAD_TIMEOUT + 1
    assert _answer(answer) == (408, {"error": "request_head_timeout",
                                     "message": "the request head did not arrive in time"})
    (line,) = await audit_lines(audit, 1)
    assert (line["decision"], line["reason"], line["status"]) == ("denied", "request_head_timeout", 408)
    assert backend.requests == []


async def test_the_head_deadline_runs_per_request_and_not_while_the_stream_is_idle(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    audit = AuditLog(None)
    opener = open_stream(nursery, acl, context(audit, request_head_timeout=HEAD_TIMEOUT))
    client = HttpClient(opener)
    assert (await client.request(b"GET", b"/echo/1")).status == 200
    await trio.sleep(2 * HEAD_TIMEOUT)  # a kept-alive stream between requests: no deadline
    assert (await client.request(b"GET", b"/echo/2")).status == 200
    nursery.start_soon(_trickle, opener, b"GET /echo/3 HTTP/1.1\r\nhost: a\r\nx-slow: " + b"a" * 1000, 0.05)
    answer = await read_raw_until_closed(opener, within=3)
    assert _answer(answer)[0] == 408
    assert [r["reason"] for r in await audit_lines(audit, 3)] == ["allowed", "allowed", "request_head_timeout"]


async def test_a_trickled_request_body_gets_408_and_the_internal_host_connection_is_closed(
    nursery: trio.Nursery,
) -> None:
    backend_closed = trio.Event()
    received = bytearray()

    async def reads_the_body(stream: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(CHUNK):
                received.extend(data)
        backend_closed.set()

    port = await serve(nursery, reads_the_body)
    audit = AuditLog(None)
    ctx = context(audit, min_request_body_rate=240, request_body_grace=GRACE)
    opener = open_stream(nursery, AccessControl([mapping_for(port)]), ctx)
    began = trio.current_time()
    await opener.send_all(b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\n")
    nursery.start_soon(_trickle, opener, b"b" * 1000, 0.2)  # 5 bytes/s
    answer = await read_raw_until_closed(opener, within=3)
    assert GRACE <= trio.current_time() - began < GRACE + 1
    assert _answer(answer) == (408, {"error": "request_body_too_slow",
                                     "message": "the request body arrived too slowly"})
    with trio.fail_after(2):
        await backend_closed.wait()
    assert received.startswith(b"POST /echo HTTP/1.1")  # the request had reached the internal host
    (line,) = await audit_lines(audit, 1)
    assert (line["decision"], line["reason"], line["status"]) == ("allowed", "request_body_too_slow", 408)
    assert "below 240 bytes/s" in line["detail"]


async def test_a_body_that_keeps_its_rate_is_not_cut(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    ctx = context(AuditLog(None), min_request_body_rate=100, request_body_grace=GRACE)
    client = HttpClient(open_stream(nursery, acl, ctx))

    async def steady() -> object:
        for _ in range(8):  # 200 bytes every 0.1 s, twice the grace period long
            yield b"c" * 200
            await trio.sleep(0.1)

    reply = await client.request(b"POST", b"/echo", headers=[(b"content-length", b"1600")], body=steady())
    assert (reply.status, reply.json()["body_len"]) == (200, 1600)


@pytest.mark.parametrize("read_head_first", [False, True])
async def test_a_response_nobody_reads_resets_the_stream_and_closes_the_internal_host(
    nursery: trio.Nursery, read_head_first: bool,
) -> None:
    backend_closed = trio.Event()

    async def endless(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            while True:
                await stream.send_all(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        backend_closed.set()

    port = await serve(nursery, endless)
    audit = AuditLog(None)
    opener, acceptor = memory_stream_pair(DEFAULT_TARGET)
    finished = trio.Event()

    async def forwarder() -> None:
        await serve_stream(acceptor, AccessControl([mapping_for(port)]),
                           context(audit, response_write_timeout=WRITE_TIMEOUT))
        finished.set()

    nursery.start_soon(forwarder)
    await opener.send_all(b"GET /echo HTTP/1.1\r\nhost: a\r\n\r\n")
    if read_head_first:
        assert (await opener.receive_some(CHUNK)).startswith(b"HTTP/1.1 200 ")
    with trio.fail_after(WRITE_TIMEOUT + 2):  # the application reads nothing more
        await finished.wait()
        await backend_closed.wait()
    with pytest.raises(StreamResetError):
        while await opener.receive_some(CHUNK):
            pass
    (line,) = await audit_lines(audit, 1)
    assert (line["decision"], line["reason"], line["status"]) == ("allowed", "response_not_read", 200)
    assert "for the application to read" in line["detail"]


async def test_an_idle_kept_alive_stream_ends_cleanly_with_its_internal_host_connection(
    nursery: trio.Nursery,
) -> None:
    backend_closed = trio.Event()

    async def keeps_alive(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(CHUNK):
                pass
        backend_closed.set()

    port = await serve(nursery, keeps_alive)
    audit = AuditLog(None)
    opener = open_stream(nursery, AccessControl([mapping_for(port)]), context(audit, keepalive_timeout=0.3))
    assert (await HttpClient(opener).request(b"GET", b"/echo")).status == 200
    began = trio.current_time()
    with trio.fail_after(3):
        assert await opener.receive_some(CHUNK) == b""  # a clean end of stream, not a reset
        await backend_closed.wait()
    assert trio.current_time() - began >= 0.3
    assert [r["reason"] for r in audit.records("request")] == ["allowed"]
