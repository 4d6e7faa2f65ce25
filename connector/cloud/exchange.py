"""One proxied HTTP request over one exchange stream, with replay by protocol.

Theory of operation. The proxy's edge (`connector.cloud.proxy`) has parsed, authenticated and
routed the application's request; this module carries it to the node. For each attempt it asks the
router for a stream (the failover hold is there), sends the typed request head (`RequestHead`:
FIN on it when the request has no body), streams the body up in a second task while it relays the
node's answer down: informational heads, the final head, the body, the end with its trailers, all
written to the application through its h11 connection. A `101` hands both sides to the byte relay.

Replay (`connector.cloud.replay`): while the node has sent nothing on the stream, the body bytes
taken from the application are kept (at most `REPLAY_BODY_LIMIT`, the rest makes the request
unreplayable). A stream the node refused (REFUSED, or above its GOAWAY's last id) is replayed on
the location's master, avoiding the refusing tunnel, with the kept body; a stream lost with its
tunnel only when the request is safe to repeat. Otherwise the failure is answered as before: a
status while no response byte went out, a broken connection after.

The node may finish its answer before the request body was whole (an early error): it then resets
its side with NO_ERROR, and the rest of the body is read here and dropped (within the linger
bounds) so that the application's connection stays usable; past them, it closes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import h11
import trio

from connector.cloud.replay import IDEMPOTENT_METHODS, Facts, Failure, may_replay
from connector.cloud.router import NoConnectorError
from connector.datarate import RateBudget
from connector.http1 import HOP_BY_HOP, header_tokens, strip_hop_by_hop, trailer_fields
from connector.httperrors import reset_error
from connector.relay import relay
from connector.tunnel.heads import RequestHead, ResponseHead
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, StreamResetError, Target

if TYPE_CHECKING:
    from connector.cloud.proxy import _ProxyConnection

log = logging.getLogger(__name__)

REPLAY_BODY_LIMIT = 64 * 1024  # request body bytes kept for a replay while the node is silent
_STREAM_ERRORS = (StreamResetError, trio.BrokenResourceError, trio.ClosedResourceError)


class ClientGone(Exception):
    """The application closed or broke its connection; nothing more can be told to it."""


class TooSlow(Exception):
    """The application missed a deadline: `reason` is the audit reason, `message` says which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ResponseNotRead(ClientGone):
    """The application does not read its response fast enough: the connection is dropped."""


class _Replay(Exception):
    """This attempt failed in a way `may_replay` allows: send the request once more."""


@attrs.define
class _Body:
    """What the request body did so far, across attempts."""

    done: bool  # the application's EndOfMessage was consumed
    trailers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    consumed: bool = False  # body bytes were read from the application
    kept: bytearray | None = attrs.Factory(bytearray)  # all of them, while replayable; else None


@attrs.define
class _Attempt:
    stream: TunnelStream
    pump_done: trio.Event = attrs.Factory(trio.Event)
    body_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    client_error: Exception | None = None
    replay: str | None = None  # why this attempt may be sent once more (`may_replay` said so)
    response_started: bool = False  # something of the response went to the application
    status: int | None = None


class ProxyExchange:
    """One request of `edge`'s application connection, carried to the node."""

    def __init__(self, edge: _ProxyConnection, subaccount: str, location_id: str, target: Target,
                 head: RequestHead, *, bodyless: bool, websocket: bool) -> None:
        self.edge = edge
        self.settings = edge.settings
        self.subaccount = subaccount
        self.location_id = location_id
        self.target = target
        self.head = head
        self.websocket = websocket
        self.bodyless = bodyless and not websocket  # the head ends the request (FIN on it)
        self.body = _Body(done=bodyless)
        self.attempts = 0

    async def run(self) -> int | None:
        """Answer the request; the status sent to the application (None if aborted)."""
        avoid: TunnelStream | None = None
        while True:
            try:
                stream = await self.edge.proxy.router.open_stream(
                    self.subaccount, self.location_id, self.target, avoid=avoid)
            except NoConnectorError as exc:  # the Router's one failure: none opens a stream reset
                return await self.edge._refuse(503, exc.code, exc.reason)
            self.attempts += 1
            try:
                return await self._attempt(stream)
            except _Replay as exc:
                log.info("HTTP proxy: request from %s %s; sending it once more", self.edge.peer, exc)
                avoid = stream
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(self.settings.linger_timeout):
                    try:
                        await stream.aclose()
                    except _STREAM_ERRORS:
                        pass

    # --- one attempt --------------------------------------------------------------------------------

    async def _attempt(self, stream: TunnelStream) -> int | None:
        attempt = _Attempt(stream)
        try:
            await stream.send_head(self.head, end_stream=self.bodyless)
        except ValueError:
            # nothing went out on the stream: no FIN can end a request without its head
            await self._reset(stream, "request head too large for the tunnel")
            return await self.edge._refuse(431, "request_header_too_large",
                                           "the request head is too large for the connector's tunnel")
        except StreamResetError as exc:
            await self._failed(attempt, exc)
            if attempt.replay is not None:
                raise _Replay(attempt.replay) from None
            return attempt.status
        if self.bodyless:
            attempt.pump_done.set()
            switched = await self._relay_response(attempt)
        else:
            async with trio.open_nursery() as nursery:

                async def body_task() -> None:
                    try:
                        with attempt.body_scope:
                            await self._pump_body(attempt)
                    finally:
                        attempt.pump_done.set()

                nursery.start_soon(body_task)
                switched = await self._relay_response(attempt)
                attempt.body_scope.cancel()
        if attempt.replay is not None:
            raise _Replay(attempt.replay)
        client_error = attempt.client_error
        if isinstance(client_error, ClientGone):
            raise client_error
        if isinstance(client_error, (h11.RemoteProtocolError, TooSlow)):
            await self._reset(stream, "application request broken")
            if isinstance(client_error, TooSlow):
                status, reason, message = 408, client_error.reason, client_error.message
            else:
                status, reason, message = 400, "malformed_request", f"malformed request body: {client_error}"
            await self.edge._refuse(status, reason, message, close=True)
            return status if attempt.status is None else None
        if switched is not None:
            return await self._switch(attempt, switched)
        if attempt.status is not None and not self.body.done and self.edge.conn.their_state is h11.SEND_BODY:
            await self._discard_rest_of_body()
        return attempt.status

    async def _pump_body(self, attempt: _Attempt) -> None:
        """The application's body (after what an earlier attempt kept) up the stream, then the end."""
        stream, body = attempt.stream, self.body
        try:
            if body.kept:
                await stream.send_all(bytes(body.kept))
            if not body.done:
                rate = RateBudget(self.settings.request_body_rate)
                while True:
                    event = await self.edge._next_client_event(rate)
                    if isinstance(event, h11.Data):
                        body.consumed = True
                        if body.kept is not None:
                            if stream.peer_started or len(body.kept) + len(event.data) > REPLAY_BODY_LIMIT:
                                body.kept = None  # processed, or too much to hold: not replayable
                            else:
                                body.kept += event.data
                        await stream.send_all(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        body.done = True
                        body.trailers = trailer_fields(event.headers, self.edge.proxy_only)
                        break
                    elif isinstance(event, h11.ConnectionClosed):  # in the middle of a body
                        raise ClientGone()
                    else:
                        return
            if not self.websocket:
                await stream.send_eof(body.trailers or None)
        except _STREAM_ERRORS:
            return  # the node stopped reading; the response side reports why (or relays its answer)
        except (h11.RemoteProtocolError, ClientGone, TooSlow) as exc:
            attempt.client_error = exc
            attempt.body_scope.cancel()
            await self._reset(stream, "application request broken")

    async def _relay_response(self, attempt: _Attempt) -> h11.InformationalResponse | None:
        """Relay the node's answer; a 101 is returned (not relayed) for `_switch`. Failures are
        recorded on `attempt` (never raised: this runs beside the body pump in a nursery)."""
        try:
            return await self._relay_events(attempt)
        except ClientGone as exc:
            attempt.client_error = exc
            await self._reset(attempt.stream, "application connection ended")
        return None

    async def _relay_events(self, attempt: _Attempt) -> h11.InformationalResponse | None:
        stream, edge = attempt.stream, self.edge
        try:
            while True:
                head = await stream.receive_head()
                assert isinstance(head, ResponseHead)
                if head.status == 101:
                    await attempt.pump_done.wait()
                    return h11.InformationalResponse(status_code=101, headers=head.headers,
                                                     reason=head.reason or b"Switching Protocols")
                attempt.response_started = True
                if head.status >= 200:
                    break
                if edge.conn.their_http_version == b"1.1":
                    await edge.out.send(h11.InformationalResponse(
                        status_code=head.status, reason=head.reason,
                        headers=strip_hop_by_hop(head.headers, edge.proxy_only)))
            attempt.status = head.status
            edge.out.queue(h11.Response(status_code=head.status, reason=head.reason,
                                        headers=strip_hop_by_hop(head.headers, edge.proxy_only) + edge._closing()))
            chunked = b"chunked" in header_tokens(head.headers, b"transfer-encoding")
            while True:
                data = await self._receive(stream, edge)
                if not data:
                    break
                edge.out.queue(h11.Data(data=data))
                if len(edge.out) >= self.settings.chunk:
                    await edge.out.flush()
            trailers = trailer_fields(getattr(stream, "trailers", None) or []) if chunked else []
            await edge.out.send(h11.EndOfMessage(headers=trailers))
        except h11.LocalProtocolError as exc:
            await self._failed_answer(attempt, 502, "bad_response", f"the node's answer cannot be relayed: {exc}")
        except StreamResetError as exc:
            await self._failed(attempt, exc)
        return None

    async def _receive(self, stream: TunnelStream, edge: _ProxyConnection) -> bytes:
        """Body bytes from the node; what is gathered goes out before a wait."""
        if not stream_has_data(stream):
            await edge.out.flush()
        return bytes(await stream.receive_some(self.settings.chunk))

    # --- failures ------------------------------------------------------------------------------------

    async def _failed(self, attempt: _Attempt, error: StreamResetError) -> None:
        """The stream failed: mark the attempt for a replay if the rule allows, else tell the
        application (raises ClientGone once its response had started)."""
        if attempt.client_error is not None:
            return  # the application broke the request: the exchange's end answers that
        failure = {ErrorCode.REFUSED: Failure.REFUSED, ErrorCode.TUNNEL_LOST: Failure.TUNNEL_LOST}.get(
            error.code, Failure.OTHER)
        facts = Facts(failure=failure, idempotent=self.head.method in IDEMPOTENT_METHODS,
                      response_started=attempt.response_started, body_consumed=self.body.consumed,
                      body_kept=self.body.kept is not None, attempts=self.attempts)
        if may_replay(facts):
            attempt.body_scope.cancel()
            attempt.replay = f"was {failure.value} ({error.code.name}: {error.reason})"
            return
        await self._failed_answer(attempt, *reset_error(error.code))

    async def _failed_answer(self, attempt: _Attempt, status: int, reason: str, message: str) -> None:
        # Stop the body pump first (suspended: cancelling it loses no application byte), so that
        # an already-buffered end of request can be consumed and keep-alive survives.
        attempt.body_scope.cancel()
        await self._reset(attempt.stream, "answer failed")
        edge = self.edge
        if attempt.status is None and edge.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            log.info("HTTP proxy: %s for %s: %s", status, edge.peer, message)
            await edge._send_error(status, reason, message)
            attempt.status = status
        else:
            # the response had started: the only way to tell the application is to break the connection
            log.info("HTTP proxy: response to %s aborted: %s", edge.peer, message)
            await edge.out.flush()
            raise ClientGone()

    async def _reset(self, stream: TunnelStream, reason: str) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self.settings.linger_timeout):
            try:
                await stream.reset(ErrorCode.CANCEL, reason)
            except _STREAM_ERRORS:
                pass

    async def _discard_rest_of_body(self) -> None:
        """The node answered before the body was whole: read the rest and drop it (linger bounds),
        so the connection can carry the next request; what does not come in time closes it."""
        received = 0
        with trio.move_on_after(self.settings.linger_timeout):
            while received <= self.settings.linger_bytes:
                try:
                    event = await self.edge._next_client_event()
                except (h11.RemoteProtocolError, ClientGone):
                    return
                if isinstance(event, h11.Data):
                    received += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self.body.done = True
                    return
                else:
                    return

    # --- WebSocket -----------------------------------------------------------------------------------

    async def _switch(self, attempt: _Attempt, response: h11.InformationalResponse) -> int | None:
        """Relay the node's 101, then bytes both ways until both ended or either failed."""
        edge, stream = self.edge, attempt.stream
        if edge.conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
            await self._reset(stream, "switched before the request was complete")
            await edge._send_error(502, "bad_response",
                                   "the internal host switched protocols before the request was complete", close=True)
            return 502
        await edge.out.send(h11.InformationalResponse(
            status_code=101, headers=switching_headers(response.headers, edge.proxy_only), reason=response.reason))
        to_node, client_eof = edge.conn.trailing_data
        result = await relay(edge.sock, stream, chunk=self.settings.chunk, a_first=bytes(to_node), a_ended=client_eof)
        if result.failed is not None:
            log.info("HTTP proxy: WebSocket of %s ended abruptly (%r)", edge.peer, result.error)
            await self._reset(stream, "WebSocket relay failed")
        return 101


def stream_has_data(stream: TunnelStream) -> bool:
    return getattr(stream, "buffered", 0) > 0


def switching_headers(headers: Sequence[tuple[bytes, bytes]], proxy_only: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """Headers of a relayed `101 Switching Protocols` to a WebSocket upgrade (Sec-WebSocket-* kept)."""
    listed = {t for t in header_tokens(headers, b"connection") if not t.startswith(b"sec-websocket-")}
    dropped = HOP_BY_HOP | proxy_only
    kept = [(name, value) for name, value in headers if name not in dropped and name not in listed]
    return [(b"connection", b"upgrade"), (b"upgrade", b"websocket"), *kept]
