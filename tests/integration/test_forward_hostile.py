"""Hostile applications and broken peers against the node's forwarder, through real backends on
loopback and a memory tunnel stream: trailers, ambiguous paths, slow heads and bodies, responses
nobody reads, and error bodies that must not reveal on-premise details."""

from __future__ import annotations

import h11
import trio
from test_forward_http import AuditLog, audit_lines, context, mapping_for, open_stream, start
from test_forward_support import CHUNK, HttpClient, read_head, serve

from connector.agent.acl import AccessControl

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
