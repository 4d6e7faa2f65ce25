"""The node's pool of idle connections to internal hosts (`connector.agent.origin.OriginPool`),
through real exchange streams and real backends on loopback: an application's kept-alive
connection costs the node no stream and no task between requests, and the internal host sees one
connection reused, bounded in number (`pool_max_idle`) and in idle time (`pool_idle_seconds`).
The pool's clock logic alone is in tests/unit/test_origin_pool_clock.py."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import trio
from test_forward_http import MAPPING_NAME, context, get, metric, node_for, open_exchange, start
from test_forward_support import CHUNK, make_pki, read_head, serve

from connector.agent.acl import BackendProtocol
from connector.agent.origin import PoolSettings
from connector.tunnel.types import ErrorCode, StreamResetError
from tests.support.exchangeclient import request_head

OUTCOMES = ("new", "reused", "expired", "closed_by_origin", "pool_full")


def outcomes() -> dict[str, float]:
    return {o: metric("connector_origin_connections_total", mapping=MAPPING_NAME, outcome=o) for o in OUTCOMES}


def counted_since(before: dict[str, float]) -> dict[str, float]:
    now = outcomes()
    return {o: now[o] - before[o] for o in OUTCOMES if now[o] != before[o]}


def idle_gauge() -> float:
    return metric("connector_origin_pool_idle_connections", mapping=MAPPING_NAME)


async def test_sequential_requests_reuse_one_internal_host_connection(nursery: trio.Nursery) -> None:
    before = outcomes()
    backend, cloud, node = await start(nursery)
    for i in range(5):
        reply = await get(cloud, b"/echo/%d" % i, method=b"POST" if i % 2 else b"GET", body=b"x" * i)
        assert reply.status == 200
        # between requests the application's keep-alive holds nothing on the node: no stream,
        # no task; only the idle internal-host connection in the pool
        await node.wait_finished(i + 1)
        assert cloud.statistics().streams_open == 0
        assert node.ctx.pool.idle_count() == 1
        assert idle_gauge() == 1
    assert backend.connections == 1
    assert [r["connection"] for r in backend.requests] == [1] * 5
    assert counted_since(before) == {"new": 1, "reused": 4}
    await node.audit_lines(5)


class GateBackend:
    """Holds every answer until `count` requests are in at once (so each has its own
    connection), then answers them all (keep-alive); records the connections the node closed."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.arrived = 0
        self.gate = trio.Event()
        self.closed_by_node = 0
        self.all_closed = trio.Event()

    async def handle(self, stream: trio.abc.Stream) -> None:
        data = b""
        with contextlib.suppress(trio.BrokenResourceError):
            while (read := await read_head(stream, data)) is not None:
                _, data = read
                self.arrived += 1
                if self.arrived == self.count:
                    self.gate.set()
                await self.gate.wait()
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        self.closed_by_node += 1
        if self.closed_by_node == self.count:
            self.all_closed.set()


async def test_max_idle_bounds_the_idle_connections(nursery: trio.Nursery) -> None:
    backend = GateBackend(count=5)
    port = await serve(nursery, backend.handle)
    before = outcomes()
    cloud, node = await node_for(nursery, port, context(pool=PoolSettings(max_idle=2)))
    async with trio.open_nursery() as requests:
        for i in range(5):
            requests.start_soon(get, cloud, b"/echo/%d" % i)
    await node.wait_finished(5)
    assert node.ctx.pool.idle_count() == 2
    assert idle_gauge() == 2
    assert backend.closed_by_node == 3  # given back to a full pool: closed at once
    assert counted_since(before) == {"new": 5, "pool_full": 3}
    await node.ctx.pool.aclose()
    with trio.fail_after(2):
        await backend.all_closed.wait()
    assert idle_gauge() == 0


async def test_idle_connections_are_closed_after_idle_seconds(nursery: trio.Nursery) -> None:
    closed = trio.Event()

    async def keeps_alive(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(CHUNK):
                pass
        closed.set()

    port = await serve(nursery, keeps_alive)
    before = outcomes()
    cloud, node = await node_for(nursery, port, context(pool=PoolSettings(idle_seconds=0.3)))
    nursery.start_soon(node.ctx.pool.run)
    assert (await get(cloud, b"/echo")).body == b"ok"
    await node.wait_finished(1)
    began = trio.current_time()
    assert idle_gauge() == 1
    with trio.fail_after(3):
        await closed.wait()
    assert trio.current_time() - began >= 0.25  # idle since just before the stream ended
    assert node.ctx.pool.idle_count() == 0
    assert idle_gauge() == 0
    assert counted_since(before) == {"new": 1, "expired": 1}


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_a_pooled_connection_the_internal_host_closed_is_not_used(
    nursery: trio.Nursery, tmp_path: Path, tls: bool,
) -> None:
    """A backend that drops its idle connections: the pool sees the close without a request
    (closed_by_origin; over TLS the close_notify and FIN under the TLS layer) and opens a fresh
    one; nothing is retried, nothing fails."""
    closed = trio.Event()
    connections = 0

    async def one_request_then_close(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.aclose()  # keep-alive was not refused: the node pools the connection
        closed.set()

    if tls:
        pki = make_pki(tmp_path)
        port = await serve(nursery, one_request_then_close, pki.server_context)
        mapping: dict[str, object] = {"protocol": BackendProtocol.HTTPS, "trust_store": pki.ca_file}
    else:
        port = await serve(nursery, one_request_then_close)
        mapping = {}
    before = outcomes()
    cloud, node = await node_for(nursery, port, **mapping)
    assert (await get(cloud, b"/echo")).body == b"ok"
    await closed.wait()  # on loopback the FIN is in the node's socket once close() returned
    assert (await get(cloud, b"/echo")).body == b"ok"
    assert connections == 2
    assert counted_since(before) == {"new": 2, "closed_by_origin": 1}
    assert [line["reason"] for line in await node.audit_lines(2)] == ["allowed", "allowed"]


class ClosesOnSecondRequest:
    """Answers the first request of each connection; on the second, reads its head and closes
    (an internal host whose idle timeout fired while the node's request was on its way)."""

    def __init__(self) -> None:
        self.connections = 0
        self.heads: list[bytes] = []

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        read = await read_head(stream)
        assert read is not None
        self.heads.append(read[0].split(b"\r\n")[0])
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        read = await read_head(stream, read[1])
        if read is not None:
            self.heads.append(read[0].split(b"\r\n")[0])
        await stream.aclose()


@pytest.mark.parametrize("method", [b"GET", b"DELETE"])
async def test_a_bodyless_idempotent_request_on_a_reused_connection_the_host_closed_is_retried_once(
    nursery: trio.Nursery, method: bytes,
) -> None:
    backend = ClosesOnSecondRequest()
    port = await serve(nursery, backend.handle)
    before = outcomes()
    cloud, node = await node_for(nursery, port)
    assert (await get(cloud, b"/echo/1")).body == b"ok"
    await node.wait_finished(1)
    reply = await get(cloud, b"/echo/2", method=method)
    assert (reply.status, reply.body) == (200, b"ok")  # the application never learns of the retry
    assert backend.connections == 2
    second = method + b" /echo/2 HTTP/1.1"
    assert backend.heads == [b"GET /echo/1 HTTP/1.1", second, second]
    assert counted_since(before) == {"new": 2, "reused": 1}
    lines = await node.audit_lines(2)
    assert [(line["reason"], line["status"]) for line in lines] == [("allowed", 200)] * 2


async def test_a_bodyless_non_idempotent_request_is_not_retried(nursery: trio.Nursery) -> None:
    """The host may have acted on a POST before it closed: a proxy must not send it twice
    (RFC 9112 section 9.3.1), body or not. The application gets a 502 and decides itself."""
    backend = ClosesOnSecondRequest()
    port = await serve(nursery, backend.handle)
    cloud, node = await node_for(nursery, port)
    assert (await get(cloud, b"/echo/1")).body == b"ok"
    await node.wait_finished(1)
    reply = await get(cloud, b"/echo/2", method=b"POST")
    assert (reply.status, reply.json()["error"]) == (502, "backend_reset")
    assert backend.heads == [b"GET /echo/1 HTTP/1.1", b"POST /echo/2 HTTP/1.1"]
    assert backend.connections == 1


async def test_a_request_with_a_body_is_not_retried(nursery: trio.Nursery) -> None:
    """The body went (partly) to the closed connection and is not kept: the node cannot resend
    it, so the application gets a 502 and decides itself."""
    backend = ClosesOnSecondRequest()
    port = await serve(nursery, backend.handle)
    cloud, node = await node_for(nursery, port)
    assert (await get(cloud, b"/echo/1")).body == b"ok"
    await node.wait_finished(1)
    reply = await get(cloud, b"/echo/2", method=b"POST", body=b"payload")
    assert (reply.status, reply.json()["error"]) == (502, "backend_reset")
    assert backend.connections == 1
    _, line = await node.audit_lines(2)
    assert (line["reason"], line["status"]) == ("backend_reset", 502)


async def test_no_internal_host_connection_outlives_its_exchange_on_any_path(nursery: trio.Nursery) -> None:
    """Many exchanges at once, ending every way (answered, denied, early, cut by the host, too
    slow, the application gone mid-download): afterwards the internal host has exactly the
    pooled connections open, and no stream is left."""
    backend, cloud, node = await start(nursery, context(pool=PoolSettings(max_idle=3), response_timeout=0.5))

    async def gone_mid_download() -> None:
        stream = await open_exchange(cloud, request_head(b"GET", b"/download?n=%d" % (50 << 20)), end_stream=True)
        await stream.receive_head()
        await stream.reset(ErrorCode.CANCEL, "application gone")

    async def one(i: int) -> None:
        kind = i % 6
        with contextlib.suppress(StreamResetError):
            if kind == 0:
                await get(cloud, b"/echo/%d" % i)
            elif kind == 1:
                await get(cloud, b"/echo/%d" % i, method=b"POST", body=b"b" * (i * 1000))
            elif kind == 2:
                await get(cloud, b"/admin", method=b"POST", body=b"x" * 100_000)
            elif kind == 3:
                await get(cloud, b"/cut")
            elif kind == 4:
                await get(cloud, b"/slow")
            else:
                await gone_mid_download()

    async with trio.open_nursery() as requests:
        for i in range(36):
            requests.start_soon(one, i)
    await node.wait_finished(36)
    assert cloud.statistics().streams_open == 0
    idle = node.ctx.pool.idle_count()
    assert 1 <= idle <= 3
    await backend.wait_open(idle)
    assert backend.open == idle
    lines = await node.audit_lines(36)
    reasons = sorted({line["reason"] for line in lines})
    assert reasons == ["allowed", "backend_reset", "client_gone", "internal_host_timeout", "no_resource"]
