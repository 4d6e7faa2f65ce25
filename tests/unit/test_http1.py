"""The HTTP/1.1 helpers both hops share."""

from __future__ import annotations

import h11
import pytest
import trio

from connector.http1 import HOP_BY_HOP, Outbox, header_tokens, strip_hop_by_hop


def test_header_tokens_fold_case_split_lists_and_skip_empty_tokens() -> None:
    headers = [(b"Connection", b"Keep-Alive, , Upgrade"), (b"connection", b"x-private"), (b"upgrade", b"h2c")]
    assert header_tokens(headers, b"connection") == {b"keep-alive", b"upgrade", b"x-private"}
    assert header_tokens(headers, b"te") == set()


def test_strip_hop_by_hop_drops_listed_and_named_headers_and_keeps_framing() -> None:
    headers = [
        (b"host", b"erp"), (b"connection", b"x-private"), (b"x-private", b"1"), (b"keep-alive", b"5"),
        (b"content-length", b"3"), (b"transfer-encoding", b"chunked"), (b"x-routing", b"loc"),
    ]
    assert strip_hop_by_hop(headers) == [
        (b"host", b"erp"), (b"content-length", b"3"), (b"transfer-encoding", b"chunked"), (b"x-routing", b"loc"),
    ]
    assert strip_hop_by_hop(headers, frozenset({b"x-routing"}))[-1] == (b"transfer-encoding", b"chunked")
    assert b"content-length" not in HOP_BY_HOP and b"transfer-encoding" not in HOP_BY_HOP


class _Gone(Exception):
    pass


async def test_outbox_gathers_a_response_into_one_write_and_translates_failures() -> None:
    writes: list[bytes] = []

    async def send_all(data: bytearray) -> None:
        writes.append(bytes(data))

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    out = Outbox(conn, send_all, (trio.BrokenResourceError,), lambda exc: _Gone(str(exc)))
    out.queue(h11.Response(status_code=200, headers=[(b"content-length", b"2")]))
    out.queue(h11.Data(data=b"ok"))
    assert len(out) > 2 and writes == []
    await out.send(h11.EndOfMessage())
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\nok")
    assert len(out) == 0
    await out.flush()  # nothing queued: no empty write
    assert len(writes) == 1

    async def broken(data: bytearray) -> None:
        raise trio.BrokenResourceError("peer gone")

    conn2 = h11.Connection(h11.SERVER)
    conn2.receive_data(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    conn2.next_event()
    failing = Outbox(conn2, broken, (trio.BrokenResourceError,), lambda exc: _Gone(str(exc)))
    with pytest.raises(_Gone, match="peer gone"):
        await failing.send(h11.Response(status_code=204, headers=[]))
