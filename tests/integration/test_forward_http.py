"""The node's HTTP forwarding (tunnel protocol 2: one exchange stream per request) against real
backends on loopback, through a real tunnel session pair in memory: the cloud's end speaks typed
heads (`tests.support.exchangeclient`), the node's end runs `serve_stream` as production does."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY
from test_forward_support import (
    CHUNK,
    ForwardNode,
    HttpBackend,
    free_port,
    make_pki,
    read_head,
    serve,
    start_node,
    websocket_backend,
)

from connector.agent.acl import AccessControl, BackendProtocol, HostInHeader, Mapping, Resource
from connector.agent.audit import AuditLog
from connector.agent.forward import ForwardSettings, StreamContext
from connector.agent.origin import OriginPool, PoolSettings
from connector.tunnel.heads import RequestHead
from connector.tunnel.session import SessionStream, TunnelSession
from connector.tunnel.types import ErrorCode, StreamProtocol, StreamResetError, Target
from tests.support.exchangeclient import (
    read_reply,
    read_until_closed,
    repeated,
    request,
    request_head,
    send_body,
)

REPO = Path(__file__).resolve().parents[2]
VIRTUAL = "erp.virtual"
VPORT = 443
DEFAULT_TARGET = Target(VIRTUAL, VPORT)
MAPPING_NAME = f"{VIRTUAL}:{VPORT}"
MiB = 1 << 20
RESOURCES = (
    Resource("/echo"),
    Resource("/download"),
    Resource("/slow"),
    Resource("/cut"),
    Resource("/close"),
    Resource("/ws", websocket_upgrade=True),
    Resource("/echo/private", enabled=False),
)


def mapping_for(port: int, **changes: object) -> Mapping:
    fields: dict[str, object] = dict(
        virtual_host=VIRTUAL, virtual_port=VPORT, internal_host="127.0.0.1", internal_port=port,
        resources=RESOURCES,
    )
    fields.update(changes)
    return Mapping(**fields)  # type: ignore[arg-type]


def context(audit: AuditLog | None = None, pool: PoolSettings | None = None, **settings: float) -> StreamContext:
    return StreamContext(subaccount="sub1", location_id="loc1", audit=audit or AuditLog(None),
                         settings=ForwardSettings(**settings),  # type: ignore[arg-type]
                         pool=OriginPool(pool or PoolSettings()))


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def start(nursery: trio.Nursery, ctx: StreamContext | None = None,
                **mapping_changes: object) -> tuple[HttpBackend, TunnelSession, ForwardNode]:
    """An HttpBackend, and a node serving it through a session pair: (backend, cloud, node)."""
    backend = HttpBackend()
    port = await serve(nursery, backend.handle)
    cloud, node = await start_node(nursery, AccessControl([mapping_for(port, **mapping_changes)]), ctx or context())
    return backend, cloud, node


async def node_for(nursery: trio.Nursery, port: int, ctx: StreamContext | None = None,
                   **mapping_changes: object) -> tuple[TunnelSession, ForwardNode]:
    return await start_node(nursery, AccessControl([mapping_for(port, **mapping_changes)]), ctx or context())


async def get(cloud: TunnelSession, target: bytes, headers: list[tuple[bytes, bytes]] | None = None,
              method: bytes = b"GET", body: bytes | AsyncIterator[bytes] = b"", **kwargs: object):  # noqa: ANN201
    return await request(cloud, DEFAULT_TARGET, request_head(method, target, headers or [], body), body,
                         **kwargs)  # type: ignore[arg-type]


async def open_exchange(cloud: TunnelSession, head: RequestHead, *, end_stream: bool = False) -> SessionStream:
    stream = await cloud.open_stream(DEFAULT_TARGET)
    await stream.send_head(head, end_stream=end_stream)
    return stream


# --- bodies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, MiB])
@pytest.mark.parametrize("method", [b"GET", b"POST"])
async def test_request_bodies_reach_the_backend(nursery: trio.Nursery, method: bytes, size: int) -> None:
    backend, cloud, node = await start(nursery)
    body = bytes(range(256)) * (size // 256)
    reply = await get(cloud, b"/echo/a?x=1", method=method, body=body)
    assert reply.status == 200
    seen = reply.json()
    assert (seen["method"], seen["target"], seen["body_len"]) == (method.decode(), "/echo/a?x=1", size)
    assert seen["sha256"] == hashlib.sha256(body).hexdigest()
    [line] = await node.audit_lines(1)
    assert line["decision"] == "allowed" and line["status"] == 200
    assert line["bytes_in"] == size and line["bytes_out"] == len(reply.body)
    assert line["mapping"] == MAPPING_NAME and line["path"] == "/echo/a"
    assert line["subaccount"] == "sub1" and line["location"] == "loc1"


async def test_100_mib_upload_streams_in_bounded_memory(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    count = 100 * MiB // CHUNK
    tracemalloc.start()
    try:
        reply = await get(cloud, b"/echo/big", [(b"content-length", b"%d" % (100 * MiB))], method=b"PUT",
                          body=repeated(b"z" * CHUNK, count))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.status == 200
    assert reply.json()["body_len"] == 100 * MiB
    assert peak < 4 * MiB, f"peak traced memory {peak} bytes for a 100 MiB body (both tunnel ends)"
    assert backend.largest_receive <= CHUNK
    [line] = await node.audit_lines(1)
    assert line["bytes_in"] == 100 * MiB


async def test_100_mib_download_streams_in_bounded_memory(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    tracemalloc.start()
    try:
        reply = await get(cloud, b"/download?n=%d" % (100 * MiB), keep_body=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.status == 200 and reply.body_len == 100 * MiB
    assert peak < 4 * MiB, f"peak traced memory {peak} bytes for a 100 MiB body (both tunnel ends)"
    [line] = await node.audit_lines(1)
    assert line["bytes_out"] == 100 * MiB


async def test_chunked_upload(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    pieces = [b"a" * 10, b"b" * 70000, b"c"]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    reply = await get(cloud, b"/echo", [(b"transfer-encoding", b"chunked")], method=b"POST", body=body())
    seen = reply.json()
    assert seen["body_len"] == 70011
    assert seen["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert ["transfer-encoding", "chunked"] in seen["headers"]
    await node.audit_lines(1)


@pytest.mark.parametrize("chunked", [True, False])
async def test_download(nursery: trio.Nursery, chunked: bool) -> None:
    backend, cloud, node = await start(nursery)
    target = b"/download?n=%d%s" % (3 * MiB + 5, b"&chunked=1" if chunked else b"")
    reply = await get(cloud, target)
    assert reply.body == b"x" * (3 * MiB + 5)
    # the framing of the internal host's answer reaches the proxy, which frames its own answer
    assert (reply.headers.get(b"transfer-encoding") == b"chunked") is chunked
    assert (reply.headers.get(b"content-length") == b"%d" % (3 * MiB + 5)) is not chunked
    [line] = await node.audit_lines(1)
    assert line["bytes_out"] == 3 * MiB + 5


# --- access control on every request ---------------------------------------------------------------


async def test_allowed_denied_allowed_each_audited_once(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    denied_before = metric("connector_denials_total", reason="no_resource")
    assert (await get(cloud, b"/echo/1")).status == 200
    denied = await get(cloud, b"/admin", method=b"POST", body=b"secret form")
    assert denied.status == 403
    assert denied.json()["error"] == "no_resource"
    assert denied.headers[b"x-connector-error"] == b"no_resource"
    assert (await get(cloud, b"/echo/2")).status == 200
    assert [r["target"] for r in backend.requests] == ["/echo/1", "/echo/2"]
    lines = await node.audit_lines(3)
    assert [(r["decision"], r["reason"], r["status"]) for r in lines] == [
        ("allowed", "allowed", 200), ("denied", "no_resource", 403), ("allowed", "allowed", 200)]
    assert lines[1]["path"] == "/admin" and lines[1]["method"] == "POST"
    assert metric("connector_denials_total", reason="no_resource") == denied_before + 1


async def test_disabled_resource_denied(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    reply = await get(cloud, b"/echo/private/x")
    assert (reply.status, reply.json()["error"]) == (403, "resource_disabled")
    assert backend.requests == []
    [line] = await node.audit_lines(1)
    assert (line["decision"], line["reason"]) == ("denied", "resource_disabled")


async def test_denied_with_large_body_is_answered_without_reading_the_body(nursery: trio.Nursery) -> None:
    """The node answers a denied request at once and ends the stream: the body (more than the
    stream's window) is neither read nor waited for; the proxy drops it within its linger bounds."""
    backend, cloud, node = await start(nursery)
    size = 5 * MiB
    stream = await open_exchange(cloud, request_head(b"POST", b"/admin", [(b"content-length", b"%d" % size)]))
    reply = await read_reply(stream)
    assert (reply.status, reply.json()["error"]) == (403, "no_resource")
    with pytest.raises(StreamResetError) as caught, trio.fail_after(5):
        await stream.send_all(b"x" * size)  # blocks on the window until the node's reset
    assert caught.value.code == ErrorCode.NO_ERROR  # the answer is complete: stop sending
    [line] = await node.audit_lines(1)
    assert (line["decision"], line["bytes_in"]) == ("denied", 0)
    assert backend.connections == 0


HOSTILE = [
    (b"/echo/..%2F..%2Fadmin", "ambiguous_path"),
    (b"/echo/%2e%2e/admin", "ambiguous_path"),
    (b"/echo\\..\\admin", "ambiguous_path"),
    (b"/echo/%5c../admin", "ambiguous_path"),
    (b"/echo/%00", "ambiguous_path"),
    (b"/echo/..;/admin", "ambiguous_path"),
    (b"/../echo", "ambiguous_path"),
    (b"/echo/%zz", "ambiguous_path"),
    (b"http://evil.example/echo", "host_mismatch"),
    (b"*", "bad_request"),
]


async def test_hostile_paths_refused_and_audited(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    for target, reason in HOSTILE:
        reply = await get(cloud, target)
        assert (reply.status, reply.json()["error"]) == (400, reason), target
    assert backend.requests == []
    assert [r["reason"] for r in await node.audit_lines(len(HOSTILE))] == [reason for _, reason in HOSTILE]


async def test_backend_sees_canonical_path_and_virtual_host(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    reply = await get(cloud, b"/echo//a/./b/../c%7e?q=%2F..", [(b"connection", b"x-hop"), (b"x-hop", b"1"),
                                                               (b"proxy-authorization", b"Basic x")])
    seen = reply.json()
    assert seen["target"] == "/echo/a/c~?q=%2F.."
    headers = dict(seen["headers"])
    assert headers["host"] == MAPPING_NAME
    assert "x-forwarded-host" not in headers
    assert "x-hop" not in headers and "proxy-authorization" not in headers
    [line] = await node.audit_lines(1)
    assert line["path"] == "/echo/a/c~"


async def test_host_in_header_internal(nursery: trio.Nursery) -> None:
    backend = HttpBackend()
    port = await serve(nursery, backend.handle)
    cloud, node = await node_for(nursery, port, host_in_header=HostInHeader.INTERNAL)
    headers = dict((await get(cloud, b"/echo")).json()["headers"])
    assert headers["host"] == f"127.0.0.1:{port}"
    assert headers["x-forwarded-host"] == MAPPING_NAME
    await node.audit_lines(1)


# --- failures of the internal host ----------------------------------------------------------------


async def test_internal_host_refused_gives_502(nursery: trio.Nursery) -> None:
    cloud, node = await node_for(nursery, await free_port())
    before = metric("connector_internal_host_errors_total", mapping=MAPPING_NAME, reason="connect_failed")
    reply = await get(cloud, b"/echo")
    assert (reply.status, reply.json()["error"]) == (502, "internal_host_unreachable")
    [line] = await node.audit_lines(1)
    assert (line["reason"], line["status"]) == ("internal_host_unreachable", 502)
    assert "unreachable" in line["detail"]
    assert metric("connector_internal_host_errors_total", mapping=MAPPING_NAME, reason="connect_failed") == before + 1


async def test_slow_internal_host_gives_504(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery, context(response_timeout=0.3))
    began = trio.current_time()
    reply = await get(cloud, b"/slow")
    elapsed = trio.current_time() - began
    assert (reply.status, reply.json()["error"]) == (504, "internal_host_timeout")
    assert 0.3 <= elapsed < 3.0
    [line] = await node.audit_lines(1)
    assert (line["reason"], line["status"]) == ("internal_host_timeout", 504)


async def test_an_internal_host_that_stops_reading_the_body_gets_a_504(nursery: trio.Nursery) -> None:
    """It read the head, then neither reads nor answers: the node's writes stall, and one that
    waits response_timeout ends the exchange (504, audited, connection closed); before, the
    exchange, its stream and the connection were held for ever."""

    async def stops_reading(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        await trio.sleep_forever()

    port = await serve(nursery, stops_reading)
    cloud, node = await node_for(nursery, port, context(response_timeout=0.5))
    began = trio.current_time()
    with trio.fail_after(5):
        reply = await get(cloud, b"/echo", [(b"content-length", b"%d" % (64 * MiB))], method=b"POST",
                          body=repeated(b"x" * CHUNK, 1024))
    assert (reply.status, reply.json()["error"]) == (504, "internal_host_timeout")
    assert trio.current_time() - began >= 0.5
    [line] = await node.audit_lines(1)
    assert (line["reason"], line["status"]) == ("internal_host_timeout", 504)
    assert "did not read the request" in line["detail"]


@pytest.mark.parametrize("body", [b"", b"ok"], ids=["bodyless", "with_body"])
async def test_a_response_head_too_large_for_the_tunnel_is_a_502(nursery: trio.Nursery, body: bytes) -> None:
    """h11 bounds a head only while it is incomplete: a complete one can be a little larger than
    max_header_bytes, and larger than one HEADERS frame. It is the internal host's failure (502,
    audited with the detail), not an internal error; the stream stays usable for the 502 even
    when the head would have ended the stream (the session marked its FIN sent before the send
    failed, once)."""

    async def big_head(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 65500 + b"\r\nx-more: " + b"b" * 40
                              + b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await stream.receive_some(CHUNK)

    port = await serve(nursery, big_head)
    cloud, node = await node_for(nursery, port)
    reply = await get(cloud, b"/echo")
    assert (reply.status, reply.json()["error"]) == (502, "internal_host_protocol_error")
    [line] = await node.audit_lines(1)
    assert line["reason"] == "internal_host_protocol_error"
    assert "cannot be relayed" in line["detail"] and "frame size" in line["detail"]


async def test_backend_cut_mid_response_resets_stream(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    with pytest.raises(StreamResetError) as caught:
        await get(cloud, b"/cut")
    assert caught.value.code == ErrorCode.BACKEND_RESET
    [line] = await node.audit_lines(1)
    assert (line["reason"], line["status"], line["bytes_out"]) == ("backend_reset", 200, 10)
    assert "closed the connection" in line["detail"]


async def test_backend_connection_close_is_not_pooled(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    assert (await get(cloud, b"/close")).status == 200
    assert (await get(cloud, b"/echo")).status == 200
    assert backend.connections == 2
    assert [line["status"] for line in await node.audit_lines(2)] == [200, 200]


class _RawBackend:
    """A hand-written backend; the forwarder may drop its connection (that is not a failure)."""

    connections = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        with contextlib.suppress(trio.BrokenResourceError):
            await self._serve(stream)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        raise NotImplementedError


class EarlyAnswerBackend(_RawBackend):
    """Answers each request as soon as its head is in, then reads the body it announced (5 bytes),
    like an echo of a small body or an early error can; keeps the connection alive."""

    BODY = b"hello"

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def _serve(self, stream: trio.abc.Stream) -> None:
        data = b""
        while (read := await read_head(stream, data)) is not None:
            head, data = read
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
            if head.startswith(b"POST"):
                while len(data) < len(self.BODY):
                    chunk = await stream.receive_some(CHUNK)
                    if not chunk:
                        return
                    data += chunk
                self.bodies.append(data[: len(self.BODY)])
                data = data[len(self.BODY):]


async def test_an_answer_before_the_body_ends_the_stream_and_its_connection(nursery: trio.Nursery) -> None:
    """The backend answers a POST whole before the body came: the cloud gets the answer with its
    FIN, then a NO_ERROR reset (read no more of the body); the backend connection, which may still
    expect the body, is not reused, and the body is never sent to it."""
    backend = EarlyAnswerBackend()
    port = await serve(nursery, backend.handle)
    cloud, node = await node_for(nursery, port)
    stream = await open_exchange(cloud, request_head(b"POST", b"/echo", [(b"content-length", b"5")]))
    reply = await read_reply(stream)  # answered while the body has not even been sent
    assert (reply.status, reply.body) == (200, b"early")
    with pytest.raises(StreamResetError) as caught, trio.fail_after(5):
        await stream.wait_reset()
        await stream.send_all(EarlyAnswerBackend.BODY)
    assert caught.value.code == ErrorCode.NO_ERROR
    second = await get(cloud, b"/echo")
    assert (second.status, second.body) == (200, b"early")
    assert backend.bodies == []
    assert backend.connections == 2
    lines = await node.audit_lines(2)
    assert [(line["decision"], line["status"]) for line in lines] == [("allowed", 200)] * 2


async def test_an_early_413_for_a_large_body_ends_the_exchange_at_once(nursery: trio.Nursery) -> None:
    """The internal host refuses a large upload from its head and reads nothing more: the node's
    body writes stall on it, the answer still goes up whole, then the stream is reset NO_ERROR
    and the connection dropped (the stalled write ends with it)."""

    async def refuses_uploads(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 3\r\n\r\nbig")
        await trio.sleep_forever()

    port = await serve(nursery, refuses_uploads)
    cloud, node = await node_for(nursery, port)
    size = 20 * MiB
    stream = await open_exchange(cloud, request_head(b"POST", b"/echo", [(b"content-length", b"%d" % size)]))
    with trio.fail_after(5):
        async with trio.open_nursery() as sender:
            sender.start_soon(send_body, stream, repeated(b"u" * CHUNK, size // CHUNK))
            reply = await read_reply(stream)
        [line] = await node.audit_lines(1)
    assert (reply.status, reply.body) == (413, b"big")
    assert (line["reason"], line["status"]) == ("allowed", 413)
    assert line["bytes_in"] < size
    with pytest.raises(StreamResetError) as caught:
        await stream.send_all(b"more")
    assert caught.value.code == ErrorCode.NO_ERROR


class BodyIgnoringBackend(_RawBackend):
    """A keep-alive backend that answers every head at once and never reads a body (a naive
    handler ignoring it); it logs each request line it parses."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    async def _serve(self, stream: trio.abc.Stream) -> None:
        data = b""
        while (read := await read_head(stream, data)) is not None:
            head, data = read
            line = head.split(b"\r\n")[0]
            self.lines.append(line)
            body = b"for " + line.split(b" ")[1]
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


@pytest.mark.parametrize("body_sent", ["none", "part"])
async def test_a_body_the_backend_left_unread_is_never_parsed_as_a_request(
    nursery: trio.Nursery, body_sent: str,
) -> None:
    """Request smuggling through an early answer: the body holds a request for a disabled
    resource. The backend answered before it read the body, so its connection is not reused: no
    later request's bytes follow an unread body on it (and the smuggled bytes never reach it)."""
    smuggled = b"GET /echo/private HTTP/1.1\r\nhost: x\r\n\r\n"  # disabled in RESOURCES
    backend = BodyIgnoringBackend()
    port = await serve(nursery, backend.handle)
    cloud, node = await node_for(nursery, port)
    length = len(smuggled) + 10
    stream = await open_exchange(cloud, request_head(b"POST", b"/echo", [(b"content-length", b"%d" % length)]))
    if body_sent == "part":
        await stream.send_all(b"0123456789")  # not a head: the backend is left waiting for one
    assert (await read_reply(stream)).body == b"for /echo"
    with contextlib.suppress(StreamResetError):
        await stream.send_all(smuggled)
    second = await get(cloud, b"/echo/next")
    assert second.body == b"for /echo/next"  # answers stay in step
    assert b"GET /echo/private HTTP/1.1" not in backend.lines
    assert backend.lines == [b"POST /echo HTTP/1.1", b"GET /echo/next HTTP/1.1"]
    assert backend.connections == 2
    await node.audit_lines(2)


async def test_a_client_gone_in_the_middle_of_its_body_is_audited(nursery: trio.Nursery) -> None:
    """Head and half the body reached the internal host, then the application went away: the
    request still gets its one audit line."""
    reached = trio.Event()

    async def swallow(stream: trio.abc.Stream) -> None:
        while await stream.receive_some(CHUNK):
            reached.set()

    port = await serve(nursery, swallow)
    cloud, node = await node_for(nursery, port)
    stream = await open_exchange(cloud, request_head(b"POST", b"/echo", [(b"content-length", b"10")]))
    await stream.send_all(b"12345")
    with trio.fail_after(3):
        await reached.wait()
    await stream.reset(ErrorCode.CANCEL, "application gone")
    (line,) = await node.audit_lines(1)
    assert (line["decision"], line["reason"], line["path"]) == ("allowed", "client_gone", "/echo")


async def test_hop_by_hop_request_trailers_do_not_reach_the_backend(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    reply = await get(cloud, b"/echo", [(b"transfer-encoding", b"chunked"), (b"te", b"trailers")], method=b"POST",
                      body=b"abc", trailers=[(b"x-checksum", b"1"), (b"keep-alive", b"timeout=5")])
    assert reply.status == 200
    assert backend.requests[-1]["body_len"] == 3
    assert backend.requests[-1]["trailers"] == [["x-checksum", "1"]]  # keep-alive is hop-by-hop


async def _busy_node() -> None:
    """Other streams' work on a busy node: the forwarder's tasks get scheduled late."""
    while True:
        started = time.perf_counter()
        while time.perf_counter() - started < 0.0002:
            pass
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize(("size", "writes"), [(5, 1), (100_000, 4)])
async def test_a_backend_that_reads_the_body_keeps_its_pooled_connection_on_a_busy_node(
    nursery: trio.Nursery, size: int, writes: int
) -> None:
    """A fast internal host in its own process answers as soon as the last body byte is in; on a
    busy node its answer can be relayed before the body task resumes. That must not count as an
    early answer: the pooled connection serves every POST."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.support.readall_backend"], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert process.stdout is not None
        with trio.fail_after(10):
            port = int((await process.stdout.receive_some(64)).decode())
        for _ in range(8):
            nursery.start_soon(_busy_node)
        cloud, node = await node_for(nursery, port)
        body = b"y" * size
        step = -(-size // writes)

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, size, step):
                yield body[i:i + step]

        connections = set()
        with trio.fail_after(60):
            for _ in range(50):
                reply = await get(cloud, b"/echo", [(b"content-length", b"%d" % size)], method=b"POST",
                                  body=pieces())
                assert reply.body == b"ok"
                connections.add(reply.headers[b"x-connection"])
        assert connections == {b"1"}
    finally:
        process.kill()
        await process.wait()
        nursery.cancel_scope.cancel()


async def _client_gone_in_the_middle_of_the_body(nursery: trio.Nursery, port: int, target: bytes) -> ForwardNode:
    cloud, node = await node_for(nursery, port)
    stream = await open_exchange(cloud, request_head(b"POST", target, [(b"content-length", b"10")]))
    await stream.send_all(b"12345")
    with contextlib.suppress(StreamResetError):
        await read_reply(stream)  # the node answers without waiting for the body
    await stream.reset(ErrorCode.CANCEL, "application gone")
    return node


async def test_refused_requests_are_audited_once_when_the_client_goes_during_the_body(
    nursery: trio.Nursery,
) -> None:
    """Denied by the allow-list, or the internal host unreachable: the node answers at once, and
    a client gone afterwards leaves the request's one audit line."""
    port = await free_port()  # nothing listens there
    denied = await _client_gone_in_the_middle_of_the_body(nursery, port, b"/admin")
    unreachable = await _client_gone_in_the_middle_of_the_body(nursery, port, b"/echo")
    (line,) = await denied.audit_lines(1)
    assert (line["decision"], line["path"], line["status"]) == ("denied", "/admin", 403)
    (line,) = await unreachable.audit_lines(1)
    assert (line["decision"], line["reason"], line["status"]) == ("allowed", "internal_host_unreachable", 502)


async def test_a_reset_stream_ends_a_stalled_response_at_once(nursery: trio.Nursery) -> None:
    """The internal host sends a head and part of the body, then stalls (long-poll): when the
    application goes away (the stream is reset) the forwarder stops at once, closes the backend
    connection and audits the request; it does not wait for the host to send more."""
    closed = trio.Event()

    async def stalls(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(CHUNK):
                pass
        closed.set()  # the forwarder closed its side

    port = await serve(nursery, stalls)
    cloud, node = await node_for(nursery, port)
    stream = await open_exchange(cloud, request_head(b"GET", b"/echo"), end_stream=True)
    assert (await stream.receive_head()).status == 200  # type: ignore[union-attr]
    assert await stream.receive_some(CHUNK) == b"0123456789"
    await stream.reset(ErrorCode.CANCEL, "application gone")
    with trio.fail_after(2):
        await node.wait_finished(1)
        await closed.wait()
    (line,) = await node.audit_lines(1)
    assert (line["decision"], line["reason"], line["status"]) == ("allowed", "client_gone", 200)


async def test_client_reset_mid_download_ends_the_stream_task(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    stream = await open_exchange(cloud, request_head(b"GET", b"/download?n=%d" % (100 * MiB)), end_stream=True)
    assert (await stream.receive_head()).status == 200  # type: ignore[union-attr]
    await stream.reset(ErrorCode.CANCEL, "client went away")
    (line,) = await node.audit_lines(1)
    assert line["reason"] == "client_gone"
    assert backend.connections == 1


# --- protocol hygiene -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("framing", "status"),
    [
        ([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], 400),
        ([(b"connection", b"content-length"), (b"content-length", b"3")], 400),
        ([(b"x-big", b"a" * 2000)], 431),
        ([(b"content-length", b"3"), (b"content-length", b"4")], 400),
        ([(b"content-length", b"abc")], 400),
        ([(b"transfer-encoding", b"gzip")], 400),
        ([(b"bad header", b"1")], 400),
        ([(b"x-ok", b"a\r\nx-injected: 1")], 400),
    ],
    ids=["cl_and_te", "connection_names_content_length", "head_too_large", "conflicting_lengths",
         "bad_length", "unsupported_coding", "bad_name", "crlf_in_value"],
)
async def test_requests_the_proxy_refuses_are_refused_by_the_node_too(
    nursery: trio.Nursery, framing: list[tuple[bytes, bytes]], status: int,
) -> None:
    """A second line of defence with the proxy's rules (`http1.framing_error`, the head size, what
    h11 accepts): a clear 400 or 431, audited, never an internal error (once, the node reset these
    INTERNAL_ERROR with a traceback: h11 refused to build the internal host's request)."""
    backend = BodyIgnoringBackend()
    port = await serve(nursery, backend.handle)
    cloud, node = await node_for(nursery, port, context(max_header_bytes=1000))
    reply = await get(cloud, b"/echo", framing, method=b"POST", body=b"abc")
    assert reply.status == status
    assert reply.json()["error"] == "bad_request"
    assert backend.lines == []
    [line] = await node.audit_lines(1)
    assert (line["decision"], line["reason"]) == ("denied", "bad_request")


@pytest.mark.parametrize(("length", "body"), [(b"10", b"abc"), (b"2", b"abcdef")], ids=["shorter", "longer"])
async def test_a_body_that_does_not_fit_its_head_is_a_400(nursery: trio.Nursery, length: bytes, body: bytes) -> None:
    """The proxy's h11 frames bodies by their heads; a body that does not fit (a broken or
    hostile cloud) is refused by the node's h11 too: a 400, audited, the internal host's
    incomplete request closed; once, an internal error with a traceback."""
    backend, cloud, node = await start(nursery)
    reply = await get(cloud, b"/echo", [(b"content-length", length)], method=b"POST", body=body)
    assert (reply.status, reply.json()["error"]) == (400, "bad_request")
    [line] = await node.audit_lines(1)
    assert (line["reason"], line["status"]) == ("bad_request", 400)
    assert "does not fit its head" in line["detail"]
    await backend.wait_open(0)
    assert backend.requests == []  # never a whole request


async def test_trailers_after_a_content_length_body_are_dropped(nursery: trio.Nursery) -> None:
    """HTTP/1.1 cannot carry them after a Content-Length body; they were an internal error once."""
    backend, cloud, node = await start(nursery)
    reply = await get(cloud, b"/echo", [(b"content-length", b"3")], method=b"POST", body=b"abc",
                      trailers=[(b"x-checksum", b"1")])
    assert reply.status == 200
    assert (backend.requests[-1]["body_len"], backend.requests[-1]["trailers"]) == (3, [])
    [line] = await node.audit_lines(1)
    assert line["reason"] == "allowed"


async def test_a_head_answer_has_no_body(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    reply = await get(cloud, b"/admin", method=b"HEAD")
    assert (reply.status, reply.body) == (403, b"")
    await node.audit_lines(1)


async def test_informational_heads_are_relayed_before_the_answer(nursery: trio.Nursery) -> None:
    async def hints(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n"
                              b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.receive_some(CHUNK)

    port = await serve(nursery, hints)
    cloud, node = await node_for(nursery, port)
    reply = await get(cloud, b"/echo")
    assert [(h.status, h.headers) for h in reply.informational] == [(103, [(b"link", b"</a.css>")])]
    assert (reply.status, reply.body) == (200, b"ok")
    [line] = await node.audit_lines(1)
    assert line["status"] == 200


class HeadAwareBackend(_RawBackend):
    """Answers HEAD with the length a GET would have and no body, GET with the body."""

    async def _serve(self, stream: trio.abc.Stream) -> None:
        data = b""
        while (read := await read_head(stream, data)) is not None:
            head, data = read
            body = b"" if head.startswith(b"HEAD ") else b"x" * 1000
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + body)


async def test_a_head_request_gets_the_length_and_no_body_and_keeps_the_connection(nursery: trio.Nursery) -> None:
    backend = HeadAwareBackend()
    port = await serve(nursery, backend.handle)
    cloud, node = await node_for(nursery, port)
    head = await get(cloud, b"/echo", method=b"HEAD")
    assert (head.status, head.headers[b"content-length"], head.body) == (200, b"1000", b"")
    assert (await get(cloud, b"/echo")).body == b"x" * 1000
    assert backend.connections == 1
    await node.audit_lines(2)


async def test_a_body_ended_by_closing_the_connection_is_relayed_whole(nursery: trio.Nursery) -> None:
    async def close_delimited(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * 100_000)
        await stream.aclose()

    port = await serve(nursery, close_delimited)
    cloud, node = await node_for(nursery, port)
    reply = await get(cloud, b"/echo")
    assert (reply.status, reply.body_len) == (200, 100_000)
    [line] = await node.audit_lines(1)
    assert (line["reason"], line["bytes_out"]) == ("allowed", 100_000)
    assert node.ctx.pool.idle_count() == 0  # a connection that ended its answer by closing is not pooled


async def test_expect_100_continue_is_answered_by_the_node(nursery: trio.Nursery) -> None:
    backend, cloud, node = await start(nursery)
    stream = await open_exchange(cloud, request_head(
        b"POST", b"/echo", [(b"content-length", b"5"), (b"expect", b"100-continue")]))
    with trio.fail_after(2):
        interim = await stream.receive_head()
    assert interim.status == 100  # type: ignore[union-attr]
    await stream.send_all(b"hello")
    await stream.send_eof()
    reply = await read_reply(stream)
    assert reply.status == 200
    seen = reply.json()
    assert seen["body_len"] == 5
    assert "expect" not in dict(seen["headers"])
    [line] = await node.audit_lines(1)
    assert (line["status"], line["bytes_in"]) == (200, 5)


async def test_unproposed_101_from_backend_is_a_502(nursery: trio.Nursery) -> None:
    """Upgrade without Connection: upgrade is no switch proposal; a 101 anyway is a bad gateway."""
    port = await serve(nursery, websocket_backend)
    cloud, node = await node_for(nursery, port)
    reply = await get(cloud, b"/ws/chat", [(b"upgrade", b"websocket")])
    assert (reply.status, reply.json()["error"]) == (502, "internal_host_protocol_error")
    [line] = await node.audit_lines(1)
    assert line["reason"] == "internal_host_protocol_error"


# --- WebSocket ------------------------------------------------------------------------------------

UPGRADE = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket"),
           (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"sec-websocket-version", b"13")]


async def test_websocket_upgrade_relays_bytes(nursery: trio.Nursery) -> None:
    port = await serve(nursery, websocket_backend)
    cloud, node = await node_for(nursery, port, context(response_timeout=0.2))
    stream = await open_exchange(cloud, request_head(b"GET", b"/ws/chat", UPGRADE))
    with trio.fail_after(2):
        head = await stream.receive_head()
    assert head.status == 101  # type: ignore[union-attr]
    await trio.sleep(0.4)  # longer than response_timeout: a WebSocket is not a slow response
    await stream.send_all(b"hello frames")
    echoed = b""
    with trio.fail_after(2):
        while len(echoed) < len(b"hello frames"):
            echoed += await stream.receive_some(CHUNK)
    assert echoed == b"HELLO FRAMES"
    await stream.send_eof()
    assert await read_until_closed(stream) == b""
    [line] = await node.audit_lines(1)
    assert (line["status"], line["bytes_in"], line["bytes_out"]) == (101, 12, 12)


async def test_websocket_upgrade_denied_where_not_allowed(nursery: trio.Nursery) -> None:
    port = await serve(nursery, websocket_backend)
    cloud, node = await node_for(nursery, port)
    reply = await get(cloud, b"/echo", UPGRADE)
    assert reply.status == 403
    assert reply.headers[b"x-connector-error"] == b"websocket_not_allowed"
    [line] = await node.audit_lines(1)
    assert (line["decision"], line["reason"]) == ("denied", "websocket_not_allowed")


# --- mapping lookup and TLS backends ----------------------------------------------------------------


async def test_no_mapping_resets_the_stream(nursery: trio.Nursery) -> None:
    cloud, node = await node_for(nursery, 1)
    for target in (Target("other.virtual", VPORT), Target(VIRTUAL, VPORT, StreamProtocol.TCP)):
        stream = await cloud.open_stream(target)
        with pytest.raises(StreamResetError) as caught:
            await stream.wait_accepted()
        assert caught.value.code == ErrorCode.NO_MAPPING
    lines = await node.audit_lines(2)
    assert [(r["decision"], r["reason"]) for r in lines] == [("denied", "no_mapping")] * 2


async def test_https_backend_verified_with_trust_store(nursery: trio.Nursery, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    backend = HttpBackend()
    port = await serve(nursery, backend.handle, pki.server_context)
    cloud, _ = await node_for(nursery, port, protocol=BackendProtocol.HTTPS, trust_store=pki.ca_file)
    assert (await get(cloud, b"/echo", method=b"POST", body=b"over tls")).json()["body_len"] == 8
    assert (await get(cloud, b"/echo")).json()["connection"] == 1  # the TLS connection is pooled too
    cloud, node = await node_for(nursery, port, protocol=BackendProtocol.HTTPS, trust_store=pki.other_ca_file)
    reply = await get(cloud, b"/echo")
    assert (reply.status, reply.json()["error"]) == (502, "backend_tls_error")
    [line] = await node.audit_lines(1)
    assert "certificate verify failed" in line["detail"]
