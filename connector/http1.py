"""HTTP/1.1 pieces both hops share (the cloud's proxy and the node's forwarder).

h11 parses and frames; this module only holds what sits on top of it in both places: which
headers belong to one hop, which fields a trailer section may carry, the tokens of a list header,
and the outbox that gathers h11's output so that a response head, its body and its end leave in
one write.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import h11

# Headers that belong to one hop (RFC 9110 section 7.6.1) or to a proxy; never forwarded. Framing
# headers (content-length, transfer-encoding) are kept: h11 frames the next hop from them.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)


async def next_event(conn: h11.Connection, stream: Any, max_bytes: int = 65536) -> Any:
    """`conn`'s next event, reading from `stream` (a trio ReceiveStream) whenever h11 needs more.

    The one read-until-event loop of every h11 user here; the end of `stream` reaches h11 as
    b"", so it comes back as ConnectionClosed (or h11's RemoteProtocolError mid-message).
    """
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some(max_bytes)))


def header_tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    """Lower-cased comma-separated tokens of every `name` header (Connection, Upgrade, ...).

    `name` is lower case; h11 lower-cases the names it parses, other callers' names are folded.
    """
    return {
        token.strip().lower()
        for key, value in headers
        if key.lower() == name
        for token in value.split(b",")
        if token.strip()
    }


# Fields a trailer section must not carry (RFC 9110 section 6.5.1), because a recipient that merges
# trailers into the header section (against the RFC, yet some do) would let them override what was
# checked, routed and framed on the head: framing, routing and forwarding, authentication and
# cookies, request modifiers (controls, conditionals, content negotiation, method overrides),
# response control data, and the fields that say how to process the content. Other fields (a
# checksum, Server-Timing, an application's own) pass.
NOT_IN_TRAILERS = frozenset(
    {
        # framing
        b"content-length",
        b"transfer-encoding",
        # routing and forwarding
        b"host",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-proto",
        b"x-real-ip",
        b"via",
        b"x-original-url",
        b"x-rewrite-url",
        # authentication
        b"authorization",
        b"www-authenticate",
        b"authentication-info",
        b"proxy-authentication-info",
        b"cookie",
        b"set-cookie",
        # request modifiers: controls, conditionals, content negotiation, method overrides
        b"cache-control",
        b"expect",
        b"max-forwards",
        b"pragma",
        b"range",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"if-range",
        b"accept",
        b"accept-charset",
        b"accept-encoding",
        b"accept-language",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        # response control data
        b"age",
        b"expires",
        b"date",
        b"location",
        b"retry-after",
        b"vary",
        b"warning",
        # how to process the content
        b"content-encoding",
        b"content-type",
        b"content-range",
        b"content-location",
        b"content-language",
    }
)


def strip_hop_by_hop(
    headers: Iterable[tuple[bytes, bytes]], also: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """`headers` without hop-by-hop ones: HOP_BY_HOP, `also`, and those the Connection header names."""
    headers = list(headers)
    listed = header_tokens(headers, b"connection")
    return [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in also and k not in listed]


def trailer_fields(
    headers: Iterable[tuple[bytes, bytes]], also: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """The fields of a trailer section that may be forwarded, at either hop and in either direction:
    hop-by-hop ones, NOT_IN_TRAILERS and `also` removed (names are lower case, as h11 parses them)."""
    return strip_hop_by_hop(headers, NOT_IN_TRAILERS | also)


class Outbox:
    """What one h11 connection has to say to its peer, gathered until `flush`.

    `send_all` writes to the peer; `gone` turns the transport's failures (`errors`) into the
    caller's own exception, so the code that drives h11 tells "my peer went away" apart from
    every other failure without a try block at each call.
    """

    def __init__(
        self,
        conn: h11.Connection,
        send_all: Callable[[bytearray], Awaitable[None]],
        errors: tuple[type[BaseException], ...],
        gone: Callable[[BaseException], Exception],
    ) -> None:
        self.conn = conn
        self._send_all = send_all
        self._errors = errors
        self._gone = gone
        self._out = bytearray()

    def __len__(self) -> int:
        return len(self._out)

    def queue(self, event: Any) -> None:
        """Encode an event without sending it yet."""
        data = self.conn.send(event)
        if data:
            self._out += data

    async def flush(self) -> None:
        """Send what was queued, in one write."""
        if not self._out:
            return
        data, self._out = self._out, bytearray()
        try:
            await self._send_all(data)
        except self._errors as exc:
            raise self._gone(exc) from exc

    async def send(self, event: Any) -> None:
        self.queue(event)
        await self.flush()


_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


def framing_error(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """Why the framing of a request cannot be trusted, or None.

    Both Content-Length and Transfer-Encoding is how request smuggling starts: a front-end that
    frames the request by its length and h11 (by its chunks) disagree on where the next request
    begins, so RFC 9112 section 6.3 has such a request refused and its connection closed.
    """
    length = chunked = connection = False
    for name, _ in headers:
        if name == b"content-length":
            length = True
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"connection":
            connection = True
    if length and chunked:
        return "Content-Length and Transfer-Encoding in one request (RFC 9112 section 6.3)"
    listed = header_tokens(headers, b"connection") & _FRAMING if connection else None
    if listed:
        return f"the Connection header names {', '.join(sorted(t.decode() for t in listed))}, which frames the request"
    return None
