"""A node handing over ends idle kept-alive HTTP streams between requests, never inside one."""

from __future__ import annotations

import h11
import trio

from connector.agent.acl import AccessControl, Mapping, Resource
from connector.agent.audit import AuditLog
from connector.agent.forward import StreamContext, serve_stream
from connector.demo_backend import run_backend
from connector.tunnel.testing import memory_stream_pair
from connector.tunnel.types import Target


async def _exchange(stream, conn: h11.Connection, path: str) -> int:
    await stream.send_all(conn.send(h11.Request(method="GET", target=path, headers=[("host", "erp.virtual:8000")])))
    await stream.send_all(conn.send(h11.EndOfMessage()))
    return await _response_status(stream, conn)


async def _response_status(stream, conn: h11.Connection) -> int:
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return status


async def _serve(nursery) -> tuple[object, h11.Connection, trio.Event]:
    http_port, _ = await nursery.start(run_backend, "127.0.0.1", 0, 0)
    mapping = Mapping("erp.virtual", 8000, "127.0.0.1", http_port, resources=(Resource("/sap"),))
    draining = trio.Event()
    context = StreamContext("acme", "", AuditLog(None), draining=draining)
    opener, acceptor = memory_stream_pair(Target("erp.virtual", 8000))
    nursery.start_soon(serve_stream, acceptor, AccessControl([mapping]), context)
    return opener, h11.Connection(h11.CLIENT), draining


async def test_idle_stream_ends_cleanly_when_draining_starts(nursery):
    opener, conn, draining = await _serve(nursery)

    assert await _exchange(opener, conn, "/sap/a") == 200  # kept alive
    assert await _exchange(opener, conn, "/sap/b") == 200
    draining.set()
    with trio.fail_after(5):
        assert await opener.receive_some(65536) == b""  # FIN: the proxy opens a fresh stream elsewhere


async def test_request_already_arriving_is_served_before_the_drain_ends_it(nursery):
    opener, conn, draining = await _serve(nursery)
    assert await _exchange(opener, conn, "/sap/a") == 200
    # the next request is on its way when the drain starts: it must be answered, not dropped
    await opener.send_all(conn.send(h11.Request(method="GET", target="/sap/b", headers=[("host", "x")])))
    await trio.testing.wait_all_tasks_blocked()
    draining.set()
    await opener.send_all(conn.send(h11.EndOfMessage()))
    with trio.fail_after(5):
        assert await _response_status(opener, conn) == 200
    with trio.fail_after(5):
        assert await opener.receive_some(65536) == b""
