"""Streams per token and per client address: one application must not take a whole location.

Theory of operation
-------------------
Before a request of an application connection waits for, or takes, a tunnel stream, the
registry asks `StreamAdmission.admit` for a `Ticket`, counted against the request's token and
its client address (both from `connector.cloud.clients.current_client`). Past a limit the request
is refused at once (`NoConnectorError` with code ``stream_limit_token`` or
``stream_limit_client``: the HTTP proxy answers 503 with that reason, SOCKS5 replies 0x03), never
queued. A request that waits counts too, so waiting cannot be used to get around the limit.

The ticket is returned exactly once: when the request gives up (deadline, client gone,
cancelled: the registry releases it on every exit path) or, once it got its stream, when the
holder closes or resets the stream (`AdmittedStream`). Counts exist only while tickets are out, so
memory is bounded by the streams in use. Requests without a client connection (internal callers,
tests of the registry) are not counted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from connector import metrics
from connector.cloud.clients import ClientConnection
from connector.cloud.router import NoConnectorError
from connector.tunnel.heads import Head
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode


@attrs.frozen
class StreamLimits:
    """Concurrent streams (held or awaited) one token, or one client address, may have; 0 = no limit."""

    per_token: int = 256
    per_client_address: int = 512
    per_token_by_subaccount: Mapping[str, int] = attrs.field(factory=dict)

    def for_subaccount(self, subaccount: str) -> int:
        return self.per_token_by_subaccount.get(subaccount, self.per_token)


@attrs.frozen
class AdmissionStatistics:
    streams: int  # tickets out: streams held plus requests waiting for one
    tokens: int  # distinct tokens holding tickets
    client_addresses: int  # distinct client addresses holding tickets


class StreamAdmission:
    """Counts tickets per token and per client address and refuses past `StreamLimits`."""

    def __init__(self, limits: StreamLimits = StreamLimits()) -> None:
        self.limits = limits
        self._by_token: dict[str, int] = {}
        self._by_address: dict[str, int] = {}
        self._by_subaccount: dict[str, int] = {}
        self._streams = 0
        self._changed = trio.lowlevel.ParkingLot()

    def admit(self, subaccount: str, client: ClientConnection | None) -> Ticket:
        """A ticket for one stream of `client`, or NoConnectorError if a limit is reached.

        Requests without a client connection (internal callers) are not counted.
        """
        if client is None:
            return Ticket(self, subaccount, None, None)
        token = client.principal.token_digest if client.principal is not None else None
        token_limit = self.limits.for_subaccount(subaccount)
        if token is not None and token_limit and self._by_token.get(token, 0) >= token_limit:
            metrics.PROXY_STREAM_REFUSALS.labels(subaccount, "stream_limit_token").inc()
            raise NoConnectorError(
                f"this token already holds {token_limit} streams to connectors (the limit per token); "
                "retry when some of its requests finished",
                code="stream_limit_token",
            )
        address_limit = self.limits.per_client_address
        if address_limit and self._by_address.get(client.address, 0) >= address_limit:
            metrics.PROXY_STREAM_REFUSALS.labels(subaccount, "stream_limit_client").inc()
            raise NoConnectorError(
                f"this client address already holds {address_limit} streams to connectors "
                "(the limit per client address); retry when some of its requests finished",
                code="stream_limit_client",
            )
        if token is not None:
            self._by_token[token] = self._by_token.get(token, 0) + 1
        self._by_address[client.address] = self._by_address.get(client.address, 0) + 1
        self._count(subaccount, +1)
        return Ticket(self, subaccount, token, client.address)

    def _release(self, ticket: Ticket) -> None:
        if ticket.token is not None:
            _decrement(self._by_token, ticket.token)
        if ticket.address is not None:
            _decrement(self._by_address, ticket.address)
            self._count(ticket.subaccount, -1)

    def _count(self, subaccount: str, delta: int) -> None:
        self._streams += delta
        held = self._by_subaccount.get(subaccount, 0) + delta
        if held:
            self._by_subaccount[subaccount] = held
        else:
            self._by_subaccount.pop(subaccount, None)
        _admitted_gauge(subaccount).set(held)
        _TOKENS_HOLDING.set(len(self._by_token))
        _ADDRESSES_HOLDING.set(len(self._by_address))
        self._changed.unpark_all()

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(self._streams, len(self._by_token), len(self._by_address))

    async def wait_streams(self, count: int) -> None:
        """Return once exactly `count` tickets are out (tests wait on this instead of polling)."""
        while self._streams != count:
            await self._changed.park()


_TOKENS_HOLDING = metrics.PROXY_STREAM_HOLDERS.labels("token")
_ADDRESSES_HOLDING = metrics.PROXY_STREAM_HOLDERS.labels("client_address")


@functools.lru_cache(maxsize=256)
def _admitted_gauge(subaccount: str) -> Any:
    """The PROXY_STREAMS_ADMITTED child of a subaccount (a labels() lookup per stream costs)."""
    return metrics.PROXY_STREAMS_ADMITTED.labels(subaccount)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


@attrs.define(eq=False)
class Ticket:
    """One admitted stream (or wait for one); `release()` returns it, once."""

    admission: StreamAdmission
    subaccount: str
    token: str | None
    address: str | None
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._release(self)

    def attach(self, stream: TunnelStream) -> TunnelStream:
        """The stream its holder gets: returns the ticket when closed or reset."""
        if self.address is None:  # not counted: nothing to return
            self.released = True
            return stream
        return AdmittedStream(stream, self)


class AdmittedStream(TunnelStream):
    """A tunnel stream counted against a token and a client address until closed or reset.

    Everything is the wrapped stream's; attributes beyond `TunnelStream` (a session stream's
    `statistics`, its `session`) are looked up on it.
    """

    def __init__(self, stream: TunnelStream, ticket: Ticket) -> None:
        self._stream = stream
        self._ticket = ticket
        self.stream_id = stream.stream_id
        self.target = stream.target

    def __getattr__(self, name: str) -> object:
        if name == "_stream":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._stream, name)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        await self._stream.send_eof(trailers)

    async def send_head(self, head: Head, *, end_stream: bool = False) -> None:
        await self._stream.send_head(head, end_stream=end_stream)

    async def receive_head(self) -> Head:
        return await self._stream.receive_head()

    def on_reset(self, callback: Callable[[], object]) -> None:
        self._stream.on_reset(callback)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def accept(self) -> None:
        await self._stream.accept()

    async def wait_accepted(self) -> None:
        await self._stream.wait_accepted()

    async def wait_reset(self) -> None:
        await self._stream.wait_reset()

    async def reset(self, code: ErrorCode, reason: str = "") -> None:
        try:
            await self._stream.reset(code, reason)
        finally:
            self._ticket.release()

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._ticket.release()


