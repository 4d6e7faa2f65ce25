"""Hostile applications and broken peers against the node's forwarder, through real backends on
loopback and a real tunnel session pair: trailers, ambiguous paths, slow heads and bodies, and
responses nobody reads. (Error bodies through the whole stack: test_forward_error_bodies.py.)"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio
from test_forward_http import DEFAULT_TARGET, context, get, node_for, open_exchange, start
from test_forward_support import CHUNK, read_head, serve

from connector.tunnel.types import ErrorCode, StreamResetError
from tests.support.exchangeclient import read_reply, request_head

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
    backend, cloud, node = await start(nursery)
    reply = await get(cloud, b"/echo", [(b"transfer-encoding", b"chunked"), (b"te", b"trailers")], method=b"POST",
                      body=b"abc", trailers=HOSTILE_TRAILERS + BENIGN_TRAILERS)
    assert reply.status == 200
    assert backend.requests[-1]["trailers"] == [[k.decode(), v.decode()] for k, v in BENIGN_TRAILERS]
    await node.audit_lines(1)


async def test_response_trailers_carry_no_framing_routing_or_authentication(nursery: trio.Nursery) -> None:
    async def answers_with_trailers(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        trailers = b"".join(k + b": " + v + b"\r\n" for k, v in [(b"set-cookie", b"admin=1"), *HOSTILE_TRAILERS,
                                                                *BENIGN_TRAILERS])
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                              b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n")
        await stream.receive_some(CHUNK)

    port = await serve(nursery, answers_with_trailers)
    cloud, node = await node_for(nursery, port)
    with trio.fail_after(5):
        reply = await get(cloud, b"/echo")
    assert reply.body == b"hello"
    assert reply.trailers == BENIGN_TRAILERS
    await node.audit_lines(1)


# --- paths that could mean another path to the internal host -------------------------------------


async def test_ambiguous_path_refused_and_unambiguous_one_arrives_byte_for_byte(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    refused = await get(cloud, b"/echo/%252e%252e/admin")
    assert (refused.status, refused.json()["error"]) == (400, "ambiguous_path")
    accepted_target = b"/echo/caf%C3%A9/a%3Fb%23c;v=1/%E2%82%AC?x=%252e%c0%ae"
    accepted = await get(cloud, accepted_target)
    assert accepted.status == 200
    assert [r["target"].encode() for r in backend.requests] == [accepted_target]
    denied, allowed = await node.audit_lines(2)
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


async def test_a_stream_whose_request_head_does_not_come_is_reset_at_its_deadline(nursery: trio.Nursery) -> None:
    """The request head is one frame: the deadline counts from the stream's opening, and a stream
    opened without one is reset (nothing can be answered) and audited."""
    backend, cloud, node = await start(nursery, context(request_head_timeout=HEAD_TIMEOUT))
    began = trio.current_time()
    stream = await cloud.open_stream(DEFAULT_TARGET)
    with pytest.raises(StreamResetError) as caught, trio.fail_after(3):
        await stream.receive_head()
    assert HEAD_TIMEOUT <= trio.current_time() - began < HEAD_TIMEOUT + 1
    assert caught.value.code == ErrorCode.CANCEL
    (line,) = await node.audit_lines(1)
    assert (line["decision"], line["reason"]) == ("denied", "request_head_timeout")
    assert backend.connections == 0


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
    cloud, node = await node_for(nursery, port, context(min_request_body_rate=240, request_body_grace=GRACE))
    began = trio.current_time()
    stream = await open_exchange(cloud, request_head(b"POST", b"/echo", [(b"content-length", b"1000")]))
    nursery.start_soon(_trickle, stream, b"b" * 1000, 0.2)  # 5 bytes/s
    with trio.fail_after(3):
        reply = await read_reply(stream)
    assert GRACE <= trio.current_time() - began < GRACE + 1
    assert (reply.status, reply.json()) == (408, {"error": "request_body_too_slow",
                                                  "message": "the request body arrived too slowly"})
    with trio.fail_after(2):
        await backend_closed.wait()
    assert received.startswith(b"POST /echo HTTP/1.1")  # the request had reached the internal host
    (line,) = await node.audit_lines(1)
    assert (line["decision"], line["reason"], line["status"]) == ("allowed", "request_body_too_slow", 408)
    assert "below 240 bytes/s" in line["detail"]


async def test_a_body_that_keeps_its_rate_is_not_cut(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery, context(min_request_body_rate=100, request_body_grace=GRACE))

    async def steady() -> AsyncIterator[bytes]:
        for _ in range(8):  # 200 bytes every 0.1 s, twice the grace period long
            yield b"c" * 200
            await trio.sleep(0.1)

    reply = await get(cloud, b"/echo", [(b"content-length", b"1600")], method=b"POST", body=steady())
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
    cloud, node = await node_for(nursery, port, context(response_write_timeout=WRITE_TIMEOUT))
    stream = await open_exchange(cloud, request_head(b"GET", b"/echo"), end_stream=True)
    if read_head_first:
        assert (await stream.receive_head()).status == 200  # type: ignore[union-attr]
    with trio.fail_after(WRITE_TIMEOUT + 2):  # the application reads nothing more
        await node.wait_finished(1)
        await backend_closed.wait()
    with pytest.raises(StreamResetError) as caught:
        while await stream.receive_some(CHUNK):
            pass
    assert caught.value.code == ErrorCode.CANCEL
    (line,) = await node.audit_lines(1)
    assert (line["decision"], line["reason"], line["status"]) == ("allowed", "response_not_read", 200)
    assert f"waited {WRITE_TIMEOUT} s for the application" in line["detail"]
