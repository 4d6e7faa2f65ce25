"""The node's HTTP forwarder against real backends on loopback, through a memory tunnel stream."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest
import trio
from prometheus_client import REGISTRY
from test_forward_support import (
    CHUNK,
    HttpBackend,
    HttpClient,
    free_port,
    make_pki,
    read_head,
    read_raw_until_closed,
    serve,
    websocket_backend,
)

from connector.agent.acl import AccessControl, BackendProtocol, HostInHeader, Mapping, Resource
from connector.agent.audit import AuditLog
from connector.agent.forward import ForwardSettings, StreamContext, serve_stream
from connector.tunnel.testing import MemoryTunnelStream, memory_stream_pair
from connector.tunnel.types import ErrorCode, StreamProtocol, StreamResetError, Target

REPO = Path(__file__).resolve().parents[2]
VIRTUAL = "erp.virtual"
VPORT = 443
DEFAULT_TARGET = Target(VIRTUAL, VPORT)
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


def context(audit: AuditLog, **settings: float) -> StreamContext:
    return StreamContext(subaccount="sub1", location_id="loc1", audit=audit, settings=ForwardSettings(**settings))  # type: ignore[arg-type]


def open_stream(nursery: trio.Nursery, acl: AccessControl, ctx: StreamContext,
                target: Target = DEFAULT_TARGET) -> MemoryTunnelStream:
    opener, acceptor = memory_stream_pair(target)
    nursery.start_soon(serve_stream, acceptor, acl, ctx)
    return opener


async def audit_lines(audit: AuditLog, count: int) -> list[dict[str, object]]:
    """The request lines once there are `count` (the client may finish reading a response just
    before the forwarder writes its audit line)."""
    with trio.fail_after(2):
        while len(audit.records("request")) < count:  # noqa: ASYNC110 (AuditLog is synchronous)
            await trio.sleep(0.005)
    return audit.records("request")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def start(nursery: trio.Nursery, **mapping_changes: object) -> tuple[HttpBackend, AccessControl]:
    backend = HttpBackend()
    port = await serve(nursery, backend.handle)
    return backend, AccessControl([mapping_for(port, **mapping_changes)])


# --- bodies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, MiB])
@pytest.mark.parametrize("method", [b"GET", b"POST"])
async def test_request_bodies_reach_the_backend(nursery: trio.Nursery, method: bytes, size: int) -> None:
    backend, acl = await start(nursery)
    audit = AuditLog(None)
    client = HttpClient(open_stream(nursery, acl, context(audit)))
    body = bytes(range(256)) * (size // 256)
    reply = await client.request(method, b"/echo/a?x=1", body=body)
    assert reply.status == 200
    seen = reply.json()
    assert (seen["method"], seen["target"], seen["body_len"]) == (method.decode(), "/echo/a?x=1", size)
    assert seen["sha256"] == hashlib.sha256(body).hexdigest()
    [line] = await audit_lines(audit, 1)
    assert line["decision"] == "allowed" and line["status"] == 200
    assert line["bytes_in"] == size and line["bytes_out"] == len(reply.body)
    assert line["mapping"] == f"{VIRTUAL}:{VPORT}" and line["path"] == "/echo/a"
    assert line["subaccount"] == "sub1" and line["location"] == "loc1"


async def repeated(piece: bytes, count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield piece


async def test_100_mib_upload_streams_in_bounded_memory(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    client = HttpClient(open_stream(nursery, acl, context(AuditLog(None))))
    piece = b"z" * CHUNK
    count = 100 * MiB // CHUNK
    tracemalloc.start()
    try:
        reply = await client.request(
            b"PUT", b"/echo/big", headers=[(b"content-length", str(100 * MiB).encode())],
            body=repeated(piece, count),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.status == 200
    assert reply.json()["body_len"] == 100 * MiB
    assert peak < 4 * MiB, f"peak traced memory {peak} bytes for a 100 MiB body"
    assert backend.largest_receive <= CHUNK


async def test_100_mib_download_streams_in_bounded_memory(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    client = HttpClient(open_stream(nursery, acl, context(AuditLog(None))))
    tracemalloc.start()
    try:
        reply = await client.request(b"GET", f"/download?n={100 * MiB}".encode(), keep_body=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.status == 200 and reply.body_len == 100 * MiB
    assert peak < 4 * MiB, f"peak traced memory {peak} bytes for a 100 MiB body"


async def test_chunked_upload(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    client = HttpClient(open_stream(nursery, acl, context(AuditLog(None))))
    pieces = [b"a" * 10, b"b" * 70000, b"c"]
    reply = await client.request(
        b"POST", b"/echo", headers=[(b"transfer-encoding", b"chunked")], body=repeated_list(pieces))
    seen = reply.json()
    assert seen["body_len"] == 70011
    assert seen["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert ["transfer-encoding", "chunked"] in seen["headers"]


async def repeated_list(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


@pytest.mark.parametrize("chunked", [True, False])
async def test_download(nursery: trio.Nursery, chunked: bool) -> None:
    backend, acl = await start(nursery)
    audit = AuditLog(None)
    client = HttpClient(open_stream(nursery, acl, context(audit)))
    target = f"/download?n={3 * MiB + 5}{'&chunked=1' if chunked else ''}".encode()
    reply = await client.request(b"GET", target)
    assert reply.body == b"x" * (3 * MiB + 5)
    assert (reply.headers.get(b"transfer-encoding") == b"chunked") is chunked
    assert (await audit_lines(audit, 1))[-1]["bytes_out"] == 3 * MiB + 5


# --- keep-alive and access control on every request ---------------------------------------------


async def test_keep_alive_allowed_denied_allowed_on_one_stream(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    audit = AuditLog(None)
    client = HttpClient(open_stream(nursery, acl, context(audit)))
    denied_before = metric("connector_denials_total", reason="no_resource")
    assert (await client.request(b"GET", b"/echo/1")).status == 200
    denied = await client.request(b"POST", b"/admin", body=b"secret form")
    assert denied.status == 403
    assert denied.json()["error"] == "no_resource"
    assert denied.headers[b"x-connector-error"] == b"no_resource"
    assert (await client.request(b"GET", b"/echo/2")).status == 200
    assert backend.connections == 1
    assert [r["target"] for r in backend.requests] == ["/echo/1", "/echo/2"]
    lines = await audit_lines(audit, 3)
    assert [(r["decision"], r["reason"], r["status"]) for r in lines] == [
        ("allowed", "allowed", 200), ("denied", "no_resource", 403), ("allowed", "allowed", 200)]
    assert lines[1]["path"] == "/admin" and lines[1]["method"] == "POST"
    assert metric("connector_denials_total", reason="no_resource") == denied_before + 1


async def test_disabled_resource_denied(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    client = HttpClient(open_stream(nursery, acl, context(AuditLog(None))))
    reply = await client.request(b"GET", b"/echo/private/x")
    assert (reply.status, reply.json()["error"]) == (403, "resource_disabled")
    assert backend.requests == []


async def test_denied_with_large_body_closes_the_connection(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    opener = open_stream(nursery, acl, context(AuditLog(None), max_drain_bytes=1000))
    client = HttpClient(opener)
    reply = await client.request(b"POST", b"/admin", body=b"x" * 5000)
    assert reply.status == 403 and reply.headers[b"connection"] == b"close"
    assert await read_raw_until_closed(opener) == b""


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
    backend, acl = await start(nursery)
    audit = AuditLog(None)
    client = HttpClient(open_stream(nursery, acl, context(audit)))
    for target, reason in HOSTILE:
        reply = await client.request(b"GET", target)
        assert (reply.status, reply.json()["error"]) == (400, reason), target
    assert backend.requests == []
    assert [r["reason"] for r in audit.records("request")] == [reason for _, reason in HOSTILE]


async def test_backend_sees_canonical_path_and_virtual_host(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    client = HttpClient(open_stream(nursery, acl, context(AuditLog(None))))
    reply = await client.request(
        b"GET", b"/echo//a/./b/../c%7e?q=%2F..", headers=[(b"connection", b"x-hop"), (b"x-hop", b"1"),
                                                        (b"proxy-authorization", b"Basic x")])
    seen = reply.json()
    assert seen["target"] == "/echo/a/c~?q=%2F.."
    headers = dict(seen["headers"])
    assert headers["host"] == f"{VIRTUAL}:{VPORT}"
    assert "x-forwarded-host" not in headers
    assert "x-hop" not in headers and "proxy-authorization" not in headers


async def test_host_in_header_internal(nursery: trio.Nursery) -> None:
    backend = HttpBackend()
    port = await serve(nursery, backend.handle)
    acl = AccessControl([mapping_for(port, host_in_header=HostInHeader.INTERNAL)])
    client = HttpClient(open_stream(nursery, acl, context(AuditLog(None))))
    headers = dict((await client.request(b"GET", b"/echo")).json()["headers"])
    assert headers["host"] == f"127.0.0.1:{port}"
    assert headers["x-forwarded-host"] == f"{VIRTUAL}:{VPORT}"


# --- failures of the internal host ----------------------------------------------------------------


async def test_internal_host_refused_gives_502(nursery: trio.Nursery) -> None:
    port = await free_port()
    acl = AccessControl([mapping_for(port)])
    audit = AuditLog(None)
    name = f"{VIRTUAL}:{VPORT}"
    before = metric("connector_internal_host_errors_total", mapping=name, reason="connect_failed")
    client = HttpClient(open_stream(nursery, acl, context(audit)))
    reply = await client.request(b"GET", b"/echo")
    assert (reply.status, reply.json()["error"]) == (502, "internal_host_unreachable")
    assert audit.records("request")[-1]["reason"] == "internal_host_unreachable"
    assert metric("connector_internal_host_errors_total", mapping=name, reason="connect_failed") == before + 1
    # the stream stays usable: a denied request is still answered
    assert (await client.request(b"GET", b"/nope")).status == 403


async def test_slow_internal_host_gives_504(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    client = HttpClient(open_stream(nursery, acl, context(AuditLog(None), response_timeout=0.3)))
    began = trio.current_time()
    reply = await client.request(b"GET", b"/slow")
    elapsed = trio.current_time() - began
    assert (reply.status, reply.json()["error"]) == (504, "internal_host_timeout")
    assert 0.3 <= elapsed < 3.0


async def test_backend_cut_mid_response_resets_stream(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    opener = open_stream(nursery, acl, context(AuditLog(None)))
    client = HttpClient(opener)
    with pytest.raises(StreamResetError) as caught:
        await client.request(b"GET", b"/cut")
    assert caught.value.code == ErrorCode.BACKEND_RESET


async def test_backend_connection_close_then_reconnect(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    client = HttpClient(open_stream(nursery, acl, context(AuditLog(None))))
    assert (await client.request(b"GET", b"/close")).status == 200
    assert (await client.request(b"GET", b"/echo")).status == 200
    assert backend.connections == 2


async def test_stale_kept_alive_backend_connection_is_replaced(nursery: trio.Nursery) -> None:
    """A backend that silently drops idle connections: the next body-less request is resent."""
    backend = HttpBackend()
    closed = trio.Event()

    async def one_request_then_close(stream: trio.abc.Stream) -> None:
        conn_backend = HttpBackend()
        # answer exactly one request, keep-alive advertised, then drop the connection
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(CHUNK)
        backend.connections += 1
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.aclose()
        del conn_backend
        closed.set()

    port = await serve(nursery, one_request_then_close)
    acl = AccessControl([mapping_for(port)])
    client = HttpClient(open_stream(nursery, acl, context(AuditLog(None))))
    assert (await client.request(b"GET", b"/echo")).body == b"ok"
    await closed.wait()
    await trio.sleep(0.05)  # let the FIN reach the forwarder's socket
    assert (await client.request(b"GET", b"/echo")).body == b"ok"
    assert backend.connections == 2


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


async def post_head_only(
    nursery: trio.Nursery, **settings: float
) -> tuple[EarlyAnswerBackend, AuditLog, MemoryTunnelStream, HttpClient]:
    """An EarlyAnswerBackend behind a forwarder, and a POST of which only the head was sent."""
    backend = EarlyAnswerBackend()
    port = await serve(nursery, backend.handle)
    audit = AuditLog(None)
    opener = open_stream(nursery, AccessControl([mapping_for(port)]), context(audit, **settings))
    client = HttpClient(opener)
    await client._send(h11.Request(method=b"POST", target=b"/echo",
                                   headers=[(b"host", b"x"), (b"content-length", b"5")]))
    return backend, audit, opener, client


async def test_answer_before_the_body_then_body_then_next_request_on_the_same_connection(
    nursery: trio.Nursery,
) -> None:
    """The backend answers a POST whole before the body has gone through: the client gets the
    answer, and the stream carries the next request (this raced once: the connection was dropped
    under the body's feet and the stream broke)."""
    backend, audit, opener, client = await post_head_only(nursery)
    reply = await client.read_response()  # answered while the body has not even been sent
    assert (reply.status, reply.body) == (200, b"early")
    await client._send(h11.Data(data=EarlyAnswerBackend.BODY))
    await client._send(h11.EndOfMessage())
    second = await client.request(b"GET", b"/echo")
    assert (second.status, second.body) == (200, b"early")
    # the answer was complete before the body came: the body is read from the client and dropped
    # (never sent to a backend that may not read it), and that backend connection is not reused
    assert backend.bodies == []
    assert backend.connections == 2
    lines = await audit_lines(audit, 2)
    assert [(line["decision"], line["status"]) for line in lines] == [("allowed", 200)] * 2


async def test_answer_before_the_body_and_the_body_never_comes(nursery: trio.Nursery) -> None:
    """The client got its answer and never sends the body it announced: after response_timeout
    the stream is closed (not kept waiting) and the request is audited as answered."""
    backend, audit, opener, client = await post_head_only(nursery, response_timeout=0.3)
    reply = await client.read_response()
    assert (reply.status, reply.body) == (200, b"early")
    with trio.fail_after(3):
        assert await opener.receive_some(CHUNK) == b""  # the forwarder ended the stream
    (line,) = await audit_lines(audit, 1)
    assert (line["decision"], line["status"]) == ("allowed", 200)
    assert backend.bodies == []


async def test_answer_before_the_body_and_the_client_goes_away(nursery: trio.Nursery) -> None:
    """The client resets its stream while the forwarder waits for the body: the request is still
    audited (one line per request, whatever happens after the answer)."""
    backend, audit, opener, client = await post_head_only(nursery)
    assert (await client.read_response()).status == 200
    await opener.reset(ErrorCode.CANCEL, "application gone")
    (line,) = await audit_lines(audit, 1)
    assert (line["decision"], line["status"]) == ("allowed", 200)


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


async def test_a_body_the_backend_left_unread_is_never_parsed_as_a_request(nursery: trio.Nursery) -> None:
    """Request smuggling through an early answer: the body holds a request for a disabled
    resource. The backend that answered early may not have read it, so its connection is not
    reused: the smuggled bytes can never become a request the allow-list did not check."""
    smuggled = b"GET /echo/private HTTP/1.1\r\nhost: x\r\n\r\n"  # disabled in RESOURCES
    backend = BodyIgnoringBackend()
    port = await serve(nursery, backend.handle)
    client = HttpClient(open_stream(nursery, AccessControl([mapping_for(port)]), context(AuditLog(None))))
    await client._send(h11.Request(method=b"POST", target=b"/echo",
                                   headers=[(b"host", b"x"), (b"content-length", str(len(smuggled)).encode())]))
    assert (await client.read_response()).body == b"for /echo"
    await client._send(h11.Data(data=smuggled))
    await client._send(h11.EndOfMessage())
    second = await client.request(b"GET", b"/echo/next")
    assert second.body == b"for /echo/next"  # answers stay in step
    assert b"GET /echo/private HTTP/1.1" not in backend.lines
    assert backend.lines == [b"POST /echo HTTP/1.1", b"GET /echo/next HTTP/1.1"]


async def test_a_client_gone_in_the_middle_of_its_body_is_audited(nursery: trio.Nursery) -> None:
    """Head and half the body reached the internal host, then the application went away: the
    request still gets its audit line (one per request)."""
    reached = trio.Event()

    async def swallow(stream: trio.abc.Stream) -> None:
        while await stream.receive_some(CHUNK):
            reached.set()

    port = await serve(nursery, swallow)
    audit = AuditLog(None)
    opener = open_stream(nursery, AccessControl([mapping_for(port)]), context(audit))
    client = HttpClient(opener)
    await client._send(h11.Request(method=b"POST", target=b"/echo",
                                   headers=[(b"host", b"x"), (b"content-length", b"10")]))
    await client._send(h11.Data(data=b"12345"))
    with trio.fail_after(3):
        await reached.wait()
    await opener.reset(ErrorCode.CANCEL, "application gone")
    (line,) = await audit_lines(audit, 1)
    assert (line["decision"], line["reason"], line["path"]) == ("allowed", "client_gone", "/echo")


async def test_hop_by_hop_request_trailers_do_not_reach_the_backend(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    client = HttpClient(open_stream(nursery, acl, context(AuditLog(None))))
    await client._send(h11.Request(method=b"POST", target=b"/echo",
                                   headers=[(b"host", b"x"), (b"transfer-encoding", b"chunked"), (b"te", b"trailers")]))
    await client._send(h11.Data(data=b"abc"))
    await client._send(h11.EndOfMessage(headers=[(b"x-checksum", b"1"), (b"keep-alive", b"timeout=5")]))
    reply = await client.read_response()
    assert reply.status == 200
    assert backend.requests[-1]["trailers"] == [["x-checksum", "1"]]  # keep-alive is hop-by-hop


async def _busy_node() -> None:
    """Other streams' work on a busy node: the forwarder's tasks get scheduled late."""
    while True:
        started = time.perf_counter()
        while time.perf_counter() - started < 0.0002:
            pass
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize(("size", "writes"), [(5, 1), (100_000, 4)])
async def test_a_backend_that_reads_the_body_keeps_its_connection_on_a_busy_node(
    nursery: trio.Nursery, size: int, writes: int
) -> None:
    """A fast internal host in its own process answers as soon as the last body byte is in; on a
    busy node its answer can be relayed before the body task resumes. That must not count as an
    early answer: the connection is reused for every POST (it was not, about 1 in 3, once)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.support.readall_backend"], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert process.stdout is not None
        with trio.fail_after(10):
            port = int((await process.stdout.receive_some(64)).decode())
        for _ in range(8):
            nursery.start_soon(_busy_node)
        client = HttpClient(open_stream(nursery, AccessControl([mapping_for(port)]), context(AuditLog(None))))
        body = b"y" * size
        step = -(-size // writes)

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, size, step):
                yield body[i:i + step]

        connections = set()
        with trio.fail_after(60):
            for _ in range(100):
                reply = await client.request(b"POST", b"/echo", [(b"content-length", str(size).encode())], pieces())
                assert reply.body == b"ok"
                connections.add(reply.headers[b"x-connection"])
        assert connections == {b"1"}
    finally:
        process.kill()
        await process.wait()
        nursery.cancel_scope.cancel()


async def _client_gone_in_the_middle_of_the_body(nursery: trio.Nursery, acl: AccessControl, target: bytes) -> AuditLog:
    audit = AuditLog(None)
    opener = open_stream(nursery, acl, context(audit))
    client = HttpClient(opener)
    await client._send(h11.Request(method=b"POST", target=target,
                                   headers=[(b"host", b"x"), (b"content-length", b"10")]))
    await client._send(h11.Data(data=b"12345"))
    await trio.sleep(0.1)  # the forwarder decided and drains the body
    await opener.reset(ErrorCode.CANCEL, "application gone")
    return audit


async def test_refused_requests_are_audited_when_the_client_goes_while_its_body_is_drained(
    nursery: trio.Nursery,
) -> None:
    """Denied by the allow-list, or the internal host unreachable: the forwarder reads the body
    before answering; a client gone meanwhile still leaves the request's one audit line."""
    acl = AccessControl([mapping_for(await free_port())])  # nothing listens there
    denied = await _client_gone_in_the_middle_of_the_body(nursery, acl, b"/admin")
    unreachable = await _client_gone_in_the_middle_of_the_body(nursery, acl, b"/echo")
    (line,) = await audit_lines(denied, 1)
    assert (line["decision"], line["path"]) == ("denied", "/admin")
    (line,) = await audit_lines(unreachable, 1)
    assert (line["decision"], line["reason"]) == ("allowed", "internal_host_unreachable")


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
    audit = AuditLog(None)
    opener, acceptor = memory_stream_pair(DEFAULT_TARGET)
    finished = trio.Event()

    async def forwarder() -> None:
        await serve_stream(acceptor, AccessControl([mapping_for(port)]), context(audit))
        finished.set()

    nursery.start_soon(forwarder)
    await opener.send_all(b"GET /echo HTTP/1.1\r\nhost: a\r\n\r\n")
    assert (await opener.receive_some(CHUNK)).startswith(b"HTTP/1.1 200 ")
    await trio.sleep(0.2)  # the forwarder waits on the stalled host
    await opener.reset(ErrorCode.CANCEL, "application gone")
    with trio.fail_after(2):
        await finished.wait()
        await closed.wait()
    (line,) = await audit_lines(audit, 1)
    assert (line["decision"], line["reason"], line["status"]) == ("allowed", "client_gone", 200)


# --- protocol hygiene -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd", 400),
        (b"GET /echo HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    ],
)
async def test_malformed_requests_get_an_error_and_close(nursery: trio.Nursery, raw: bytes, status: int) -> None:
    backend, acl = await start(nursery)
    audit = AuditLog(None)
    opener = open_stream(nursery, acl, context(audit))
    await opener.send_all(raw)
    answer = await read_raw_until_closed(opener)
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "bad_request"
    assert backend.requests == []
    assert audit.records("request")[-1]["reason"] == "bad_request"


async def test_http10_and_connection_close_are_honoured(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    for request in (
        b"GET /echo HTTP/1.0\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    ):
        opener = open_stream(nursery, acl, context(AuditLog(None)))
        await opener.send_all(request)
        answer = await read_raw_until_closed(opener)  # returns only once the node closed the stream
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert json.loads(body)["target"] == "/echo"


# --- WebSocket ------------------------------------------------------------------------------------

UPGRADE = (b"GET /ws/chat HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
           b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")


async def test_websocket_upgrade_relays_bytes(nursery: trio.Nursery) -> None:
    port = await serve(nursery, websocket_backend)
    audit = AuditLog(None)
    opener = open_stream(nursery, AccessControl([mapping_for(port)]), context(audit, response_timeout=0.2))
    await opener.send_all(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        head += await opener.receive_some(CHUNK)
    assert head.startswith(b"HTTP/1.1 101 ")
    await trio.sleep(0.4)  # longer than response_timeout: a WebSocket is not a slow response
    await opener.send_all(b"hello frames")
    echoed = b""
    while len(echoed) < len(b"hello frames"):
        echoed += await opener.receive_some(CHUNK)
    assert echoed == b"HELLO FRAMES"
    await opener.send_eof()
    assert await read_raw_until_closed(opener) == b""
    [line] = await audit_lines(audit, 1)
    assert (line["status"], line["bytes_in"], line["bytes_out"]) == (101, 12, 12)


async def test_websocket_upgrade_denied_where_not_allowed(nursery: trio.Nursery) -> None:
    port = await serve(nursery, websocket_backend)
    opener = open_stream(nursery, AccessControl([mapping_for(port)]), context(AuditLog(None)))
    await opener.send_all(UPGRADE.replace(b"/ws/chat", b"/echo"))
    head = b""
    while b"\r\n\r\n" not in head:
        head += await opener.receive_some(CHUNK)
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"x-connector-error: websocket_not_allowed" in head


# --- mapping lookup and TLS backends ----------------------------------------------------------------


async def test_no_mapping_resets_the_stream(nursery: trio.Nursery) -> None:
    audit = AuditLog(None)
    acl = AccessControl([mapping_for(1)])
    for target in (Target("other.virtual", VPORT), Target(VIRTUAL, VPORT, StreamProtocol.TCP)):
        opener = open_stream(nursery, acl, context(audit), target)
        with pytest.raises(StreamResetError) as caught:
            await opener.wait_accepted()
        assert caught.value.code == ErrorCode.NO_MAPPING
    assert [(r["decision"], r["reason"]) for r in audit.records("request")] == [("denied", "no_mapping")] * 2


async def test_https_backend_verified_with_trust_store(nursery: trio.Nursery, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    backend = HttpBackend()
    port = await serve(nursery, backend.handle, pki.server_context)
    good = AccessControl([mapping_for(port, protocol=BackendProtocol.HTTPS, trust_store=pki.ca_file)])
    client = HttpClient(open_stream(nursery, good, context(AuditLog(None))))
    assert (await client.request(b"POST", b"/echo", body=b"over tls")).json()["body_len"] == 8
    bad = AccessControl([mapping_for(port, protocol=BackendProtocol.HTTPS, trust_store=pki.other_ca_file)])
    client = HttpClient(open_stream(nursery, bad, context(AuditLog(None))))
    reply = await client.request(b"GET", b"/echo")
    assert (reply.status, reply.json()["error"]) == (502, "backend_tls_error")


async def test_expect_100_continue_is_answered_by_the_node(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    opener = open_stream(nursery, acl, context(AuditLog(None)))
    await opener.send_all(b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n"
                          b"expect: 100-continue\r\nconnection: close\r\n\r\n")
    interim = b""
    with trio.fail_after(2):
        while b"\r\n\r\n" not in interim:
            interim += await opener.receive_some(CHUNK)
    assert interim.startswith(b"HTTP/1.1 100 ")
    await opener.send_all(b"hello")
    answer = interim + await read_raw_until_closed(opener)
    final = answer.split(b"\r\n\r\n", 1)[1]
    assert final.startswith(b"HTTP/1.1 200 ")
    seen = json.loads(final.split(b"\r\n\r\n", 1)[1])
    assert seen["body_len"] == 5
    assert "expect" not in dict(seen["headers"])


async def test_pipelined_requests_answered_in_order(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    opener = open_stream(nursery, acl, context(AuditLog(None)))
    await opener.send_all(b"GET /echo/1 HTTP/1.1\r\nhost: a\r\n\r\nGET /nope HTTP/1.1\r\nhost: a\r\n\r\n"
                          b"GET /echo/3 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    answer = await read_raw_until_closed(opener)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == [b"200", b"403", b"200"]
    assert [r["target"] for r in backend.requests] == ["/echo/1", "/echo/3"]


async def test_unproposed_101_from_backend_is_a_502(nursery: trio.Nursery) -> None:
    """Upgrade without Connection: upgrade is no switch proposal; a 101 anyway is a bad gateway."""
    port = await serve(nursery, websocket_backend)
    client = HttpClient(open_stream(nursery, AccessControl([mapping_for(port)]), context(AuditLog(None))))
    reply = await client.request(b"GET", b"/ws/chat", headers=[(b"upgrade", b"websocket")])
    assert (reply.status, reply.json()["error"]) == (502, "internal_host_protocol_error")
    assert (await client.request(b"GET", b"/nope")).status == 403  # the stream goes on


async def test_client_reset_mid_download_ends_the_stream_task(nursery: trio.Nursery) -> None:
    backend, acl = await start(nursery)
    opener, acceptor = memory_stream_pair(DEFAULT_TARGET)
    finished = trio.Event()

    async def serve_then_flag() -> None:
        await serve_stream(acceptor, acl, context(AuditLog(None)))
        finished.set()

    nursery.start_soon(serve_then_flag)
    await opener.send_all(f"GET /download?n={100 * MiB} HTTP/1.1\r\nhost: a\r\n\r\n".encode())
    assert (await opener.receive_some(CHUNK)).startswith(b"HTTP/1.1 200 ")
    await opener.reset(ErrorCode.CANCEL, "client went away")
    with trio.fail_after(2):
        await finished.wait()
    assert backend.connections == 1


@pytest.mark.parametrize("framing", [
    b"content-length: 3\r\ntransfer-encoding: chunked\r\n",
    b"connection: content-length\r\ncontent-length: 3\r\n",
], ids=["cl_and_te", "connection_names_content_length"])
async def test_ambiguous_framing_is_refused_by_the_node_too(nursery: trio.Nursery, framing: bytes) -> None:
    """The proxy refuses these; the node is a second line of defence with the same rule
    (`http1.framing_error`): before, it missed a Connection header naming a framing header."""
    backend = BodyIgnoringBackend()
    port = await serve(nursery, backend.handle)
    stream = open_stream(nursery, AccessControl([mapping_for(port)]), context(AuditLog(None)))
    await stream.send_all(b"POST /echo HTTP/1.1\r\nhost: x\r\n" + framing + b"\r\nabc")
    answer = await read_raw_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert backend.lines == []
