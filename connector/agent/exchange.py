"""One HTTP exchange on the node: a typed request head from the tunnel, h11 to the internal host.

Theory of operation. The cloud opens one stream per request and sends its head as the proxy parsed
it (`connector.tunnel.heads.RequestHead`), then its body as DATA. The node

1. admits it (`admit`): head size, framing (CL+TE), the allow-list on the canonical path; a
   refusal is answered here (a JSON error as the response), never reaching the internal host;
2. takes a connection to the internal host from the `OriginPool` and writes the request with h11,
   with the checked path (the path checked is the path sent) and the Host the mapping asks for;
3. streams the body up (`_pump_body`) while it relays the response down: h11 parses the internal
   host's answer and each event becomes a head, DATA or the FIN (with trailers) on the stream;
4. gives the connection back to the pool when h11 says both sides may go on.

A `101` to an allowed WebSocket upgrade turns the stream into a byte pipe (`connector.relay`).
Failures before the response head are answered 502/504 with a generic sentence; after it, the
stream is reset (BACKEND_RESET). The detail (internal host names, resolver and TLS errors) goes to
the node's log and the audit line only.

Deadlines, from trio's clock: the request head within `request_head_timeout` of the stream's
opening; the request body at `min_request_body_rate` after `request_body_grace`; the response head
within `response_timeout` of the request's end; each response write taken within
`response_write_timeout` (else the application stopped reading: reset).

Exactly one audit line per exchange: `run` writes it in its `finally`, from the `Outcome` every
step fills in.
"""

from __future__ import annotations

import logging
import math
import ssl

import attrs
import h11
import trio

from connector import metrics
from connector.agent import acl as acl_mod
from connector.agent.acl import AccessControl, Decision, Mapping
from connector.agent.admission import Refusal, admit, has_body, is_switch, origin_request
from connector.agent.audit import AuditLog
from connector.agent.origin import BackendError, OriginConnection, OriginPool
from connector.agent.principal import Logon, PrincipalError, PrincipalPropagator
from connector.agent.redirects import rewrite_locations
from connector.cloud.replay import IDEMPOTENT_METHODS
from connector.datarate import MinDataRate, RateBudget, receive_some_at_rate
from connector.http1 import header_tokens, strip_hop_by_hop, trailer_fields
from connector.httperrors import ERRORS, REASON_PHRASES, RESET_REASONS, error_parts, reset_error
from connector.relay import relay
from connector.tunnel.heads import RequestHead, ResponseHead
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, StreamResetError

log = logging.getLogger(__name__)

_TUNNEL_ERRORS = (StreamResetError, trio.BrokenResourceError, trio.ClosedResourceError)
_ORIGIN_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


@attrs.frozen
class ForwardSettings:
    connect_timeout: float = 5.0
    response_timeout: float = 30.0
    max_header_bytes: int = 65536
    chunk: int = 65536  # HTTP: reads from the stream and the internal host
    relay_chunk: int = 262144  # raw byte relay (TCP mappings, WebSocket after 101): largest read
    request_head_timeout: float = 30.0  # the request head arrives within this of the stream's opening
    min_request_body_rate: float = 240.0  # bytes/s a request body keeps on average, after the grace
    request_body_grace: float = 5.0  # seconds of waiting for a body before its rate is enforced
    response_write_timeout: float = 60.0  # one response write the tunnel side does not take

    @property
    def body_rate(self) -> MinDataRate:
        return MinDataRate(self.min_request_body_rate, self.request_body_grace)


@attrs.frozen
class StreamContext:
    subaccount: str
    location_id: str
    audit: AuditLog
    settings: ForwardSettings = ForwardSettings()
    pool: OriginPool = attrs.field(factory=OriginPool)
    principals: PrincipalPropagator = attrs.field(factory=PrincipalPropagator)


@attrs.define
class Outcome:
    """What the audit line of one exchange says; filled in as the exchange goes."""

    started: float
    method: str = "-"
    path: str = "-"
    decision: str = "allowed"
    reason: str = acl_mod.ALLOWED
    detail: str | None = None
    status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    user: str | None = None  # the user the cloud validated for the request (principal propagation)

    def fail(self, reason: str, detail: str | None = None) -> None:
        self.reason, self.detail = reason, detail


class _OriginGone(Exception):
    """The internal host's connection failed after it was open; `label` for the metrics."""

    def __init__(self, message: str, label: str = "backend_reset") -> None:
        super().__init__(message)
        self.label = label


def _origin_gone(exc: BaseException) -> _OriginGone:
    """A read or write on the internal host's connection failed. A TLS error after the handshake
    is a TLS failure, not a reset: with TLS 1.3 the internal host refuses a client certificate
    (or its absence) only after our side of the handshake is done."""
    if isinstance(exc.__cause__, ssl.SSLError):
        return _OriginGone(f"TLS to the internal host failed: {exc.__cause__}", "tls_error")
    return _OriginGone(str(exc))


class _ResponseTimeout(Exception):
    """No response head within response_timeout; the message, if any, says why."""


class _Stalled(Exception):
    """A response write waited response_write_timeout: the application does not read."""


class _BodyTooSlow(Exception):
    pass


class _BadBody(Exception):
    """The request body does not fit its head's framing (too short, too long, trailers after a
    Content-Length body): h11 will not send it; the proxy's h11 would not have either."""


class Exchange:
    """Serves one exchange stream of an HTTP/HTTPS mapping; `run` never raises (but cancellation)."""

    def __init__(self, stream: TunnelStream, acl: AccessControl, mapping: Mapping, ctx: StreamContext) -> None:
        self.stream = stream
        self.acl = acl
        self.mapping = mapping
        self.ctx = ctx
        self.settings = ctx.settings
        self.outcome = Outcome(trio.current_time())
        self.origin: OriginConnection | None = None
        self.head_sent = False  # a response head (not 1xx) went up the stream
        self.body_sent = trio.Event()  # the whole request is with the internal host
        self.pump_ended = trio.Event()  # the body task is over (body sent, or given up)
        # the request's last bytes are handed to the internal host (maybe still in flight): an
        # answer from now on is not early (set before the write yields, or it would race it)
        self.request_whole = False
        self.request_ended = False  # the application's request ended: a bodyless head, or its FIN read
        self.answered = False  # our answer ended (FIN sent)

    async def run(self) -> None:
        try:
            # a reset (the application left, the tunnel died) ends the exchange at once, even
            # while only the internal host is awaited; no watcher task is needed for that
            with trio.CancelScope() as gone:
                self.stream.on_reset(gone.cancel)
                await self._run()
                if self.answered and not self.request_ended:
                    # answered before the request was whole (a refusal, an error, an early
                    # answer): the proxy stops sending and drops the rest; NO_ERROR, for the
                    # answer is complete and nobody gave up
                    await self._reset(ErrorCode.NO_ERROR, "answered before the request body was complete")
            if gone.cancelled_caught:
                self.outcome.fail("client_gone")
        except _TUNNEL_ERRORS as exc:
            self.outcome.fail("client_gone", str(exc) or None)
        except _Stalled as exc:
            self.outcome.fail("response_not_read", str(exc))
            await self._reset(ErrorCode.CANCEL, "response not read")
        except Exception:
            log.exception("exchange on stream %s to %s failed", self.stream.stream_id, self.stream.target)
            self.outcome.fail("internal_error")
            await self._reset(ErrorCode.INTERNAL_ERROR, "internal error in the connector")
        finally:
            with trio.CancelScope(shield=True):
                if self.origin is not None:
                    await trio.aclose_forcefully(self.origin.stream)
                self._audit()

    def _audit(self) -> None:
        o = self.outcome
        extra = {"detail": o.detail} if o.detail else {}
        if o.user is not None:
            extra["user"] = o.user
        self.ctx.audit.request(
            subaccount=self.ctx.subaccount, location=self.ctx.location_id,
            virtual_target=str(self.stream.target), mapping=self.mapping.name,
            method=o.method, path=o.path, decision=o.decision, reason=o.reason, status=o.status,
            bytes_in=o.bytes_in, bytes_out=o.bytes_out,
            duration_seconds=round(trio.current_time() - o.started, 6), **extra,
        )
        metrics.child(metrics.REQUESTS, self.mapping.name, o.decision).inc()
        if o.decision == "denied":
            metrics.child(metrics.DENIALS, o.reason).inc()

    async def _run(self) -> None:
        settings = self.settings
        head = None
        with trio.move_on_after(settings.request_head_timeout):
            head = await self.stream.receive_head()
        if not isinstance(head, RequestHead):
            self.outcome.decision = "denied"
            self.outcome.fail("request_head_timeout", f"request head not whole within {settings.request_head_timeout} s")
            await self._reset(ErrorCode.CANCEL, ERRORS["request_head_timeout"][1])
            return
        self.request_ended = not has_body(head.headers)  # the proxy sent its FIN with the head
        outcome = self.outcome
        outcome.method = head.method.decode("ascii", "replace")
        outcome.path = head.target[:2048].decode("ascii", "backslashreplace")
        verdict = admit(self.acl, self.mapping, head, settings.max_header_bytes)
        if isinstance(verdict, Refusal):
            outcome.decision = "denied"
            outcome.path = self._checked_path(head) or outcome.path
            outcome.fail(verdict.reason, verdict.detail)
            await self._answer(head, verdict.status, verdict.reason, verdict.message)
            return
        outcome.path = verdict.path or outcome.path
        try:
            request = origin_request(self.mapping, head, verdict)
        except h11.LocalProtocolError as exc:
            # what h11 would not send (bad names or values, conflicting lengths, codings other
            # than chunked): the proxy's h11 refuses these too, this is the second line
            outcome.decision = "denied"
            outcome.fail(acl_mod.BAD_REQUEST, str(exc))
            await self._answer(head, 400, acl_mod.BAD_REQUEST, f"malformed request head: {exc}")
            return
        if head.principal is not None:
            outcome.user = head.principal.name  # whatever the mapping passes on, the user is audited
        try:
            logon = await self.ctx.principals.logon(self.mapping, head.principal)
        except PrincipalError as exc:
            outcome.decision = "denied"
            outcome.fail(exc.reason, str(exc))
            await self._answer(head, exc.status, exc.reason, "the user of this request cannot be logged on to the "
                                                             "internal host")
            return
        await self._forward(head, verdict, logon.apply(request), logon)

    def _checked_path(self, head: RequestHead) -> str | None:
        decision = self.acl.check_request(self.mapping, head.method, head.target, head.headers)
        return decision.path

    # --- answers from the node itself -----------------------------------------------------------

    async def _answer(self, head: RequestHead, status: int, reason: str, message: str) -> None:
        """A JSON error as the response (head, body, FIN)."""
        status, headers, body = error_parts(status, reason, message)
        if head.method == b"HEAD":
            body = b""
        self.outcome.status = status
        self.outcome.bytes_out += len(body)
        await self._send_head(ResponseHead(status, REASON_PHRASES.get(status, b""), headers), end=not body)
        if body:
            await self._write(body)
            await self._end_answer()

    async def _origin_failed(self, head: RequestHead, reason: str, detail: str, label: str) -> None:
        """The internal host failed: 502/504 while no response head went up, else a reset."""
        metrics.child(metrics.BACKEND_ERRORS, self.mapping.name, label).inc()
        log.info("%s %s: %s", self.mapping.name, reason, detail)
        self.outcome.fail(label if self.head_sent else reason, detail)
        if self.origin is not None:
            await trio.aclose_forcefully(self.origin.stream)
            self.origin = None
        if self.head_sent:
            await self._reset(ErrorCode.BACKEND_RESET, reset_error(ErrorCode.BACKEND_RESET)[2])
            return
        status, message = ERRORS[reason]
        await self._answer(head, status, reason, message)

    # --- tunnel I/O -------------------------------------------------------------------------------

    async def _send_head(self, head: ResponseHead, *, end: bool = False) -> None:
        with trio.move_on_after(self.settings.response_write_timeout):
            await self.stream.send_head(head, end_stream=end)
            if head.status >= 200:
                self.head_sent = True
            self.answered = end
            return
        raise _Stalled(f"a response write waited {self.settings.response_write_timeout} s for the application")

    async def _relay_head(self, head: ResponseHead, *, end: bool = False) -> None:
        """The internal host's head up the stream; one that cannot be encoded in a HEADERS frame
        (h11 bounds only a head still incomplete) is the host's failure, answered 502."""
        try:
            await self._send_head(head, end=end)
        except ValueError as exc:
            raise _OriginGone(f"its response head cannot be relayed: {exc}", "protocol_error") from None

    async def _end_answer(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        await self.stream.send_eof(trailers or None)
        self.answered = True

    async def _write(self, data: bytes | bytearray) -> None:
        with trio.move_on_after(self.settings.response_write_timeout):
            await self.stream.send_all(data)
            return
        raise _Stalled(f"a response write waited {self.settings.response_write_timeout} s for the application")

    async def _reset(self, code: ErrorCode, reason: str) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.stream.reset(code, reason)
            except _TUNNEL_ERRORS:
                pass

    # --- forwarding -------------------------------------------------------------------------------

    async def _forward(self, head: RequestHead, decision: Decision, request: h11.Request, logon: Logon) -> None:
        settings = self.settings
        bodyless = not has_body(head.headers)
        for attempt in (1, 2):
            try:
                self.origin = await self.ctx.pool.take(self.mapping, settings.connect_timeout,
                                                       max_header_bytes=settings.max_header_bytes,
                                                       context=logon.context)
            except BackendError as exc:
                await self._origin_failed(head, RESET_REASONS[exc.code], exc.message, exc.reason)
                return
            # a reused connection the internal host closed meanwhile: resend once, if nothing of the
            # request is lost (no body) and sending it twice is harmless (RFC 9112 section 9.3.1:
            # a proxy MUST NOT retry a non-idempotent request)
            retry_allowed = self.origin.reused and bodyless and head.method in IDEMPOTENT_METHODS and attempt == 1
            try:
                await self._exchange(head, decision, request, bodyless)
                return
            except _ResponseTimeout as exc:
                await self._origin_failed(head, "internal_host_timeout",
                                          str(exc) or f"no response within {settings.response_timeout} s",
                                          "response_timeout")
                return
            except _OriginGone as exc:
                if retry_allowed and not self.head_sent:
                    # a kept-alive connection the internal host closed meanwhile: once more, fresh
                    await trio.aclose_forcefully(self.origin.stream)
                    self.origin = None
                    continue
                reason = {"protocol_error": "internal_host_protocol_error", "tls_error": "backend_tls_error"}.get(
                    exc.label, "backend_reset")
                await self._origin_failed(head, reason, f"internal host connection failed: {exc}", exc.label)
                return
            except _BodyTooSlow as exc:
                await self._request_failed(head, "request_body_too_slow", str(exc))
                return
            except _BadBody as exc:
                await self._request_failed(head, acl_mod.BAD_REQUEST, f"the request body does not fit its head: {exc}")
                return

    async def _request_failed(self, head: RequestHead, reason: str, detail: str) -> None:
        """The application's request failed mid-body: the internal host's request is incomplete
        (its connection is closed); 408/400 while no response head went up, else a reset."""
        log.info("%s %s: %s", self.mapping.name, reason, detail)
        self.outcome.fail(reason, detail)
        if self.origin is not None:
            await trio.aclose_forcefully(self.origin.stream)
            self.origin = None
        status, message = ERRORS.get(reason, (400, detail))
        if self.head_sent:
            await self._reset(ErrorCode.CANCEL, message)
            return
        await self._answer(head, status, reason, message)

    async def _to_origin(self, *events: h11.Event) -> None:
        if self.origin is None:  # given up by the response side (an early answer)
            raise _OriginGone("the internal host's connection was given up")
        conn = self.origin.conn
        try:
            data = b"".join([conn.send(event) or b"" for event in events])
        except h11.LocalProtocolError as exc:
            raise _BadBody(str(exc)) from None
        # an internal host that stops reading the request (and does not answer) would hold the
        # exchange for ever: one write waits at most response_timeout
        with trio.move_on_after(self.settings.response_timeout):
            try:
                await self.origin.stream.send_all(data)
            except _ORIGIN_ERRORS as exc:
                raise _origin_gone(exc) from exc
            return
        raise _ResponseTimeout(f"the internal host did not read the request for {self.settings.response_timeout} s")

    async def _next_origin_event(self) -> h11.Event:
        assert self.origin is not None
        conn = self.origin.conn
        closed = False
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if closed:  # h11 refuses the end of a message cut short: a reset, not bad HTTP
                    raise _OriginGone(f"internal host closed the connection: {exc}") from exc
                raise _OriginGone(f"internal host broke HTTP: {exc}", "protocol_error") from exc
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = await self.origin.stream.receive_some(self.settings.chunk)
            except _ORIGIN_ERRORS as exc:
                raise _origin_gone(exc) from exc
            closed = not data
            conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like

    async def _exchange(self, head: RequestHead, decision: Decision, request: h11.Request, bodyless: bool) -> None:
        """Request body up and response down, concurrently (an answer may come before the body)."""
        head_scope = trio.CancelScope(deadline=math.inf)
        if bodyless:
            self.request_whole = True
            await self._to_origin(request, h11.EndOfMessage())
            self.body_sent.set()
            head_scope.deadline = trio.current_time() + self.settings.response_timeout
            await self._relay_response(head, decision, head_scope)
            return
        await self._to_origin(request)
        if b"100-continue" in header_tokens(head.headers, b"expect"):
            # allowed and connected: invite the body ourselves (Expect is not forwarded), so an
            # internal host that never sends 100 Continue cannot stall the application
            await self._send_head(ResponseHead(100, b"Continue", []))
        failure: list[BaseException] = []
        stalled: list[_ResponseTimeout] = []
        async with trio.open_nursery() as nursery:

            async def pump() -> None:
                try:
                    await self._pump_body(request)
                except _OriginGone:
                    return  # the internal host stopped reading: the response side tells why
                except _ResponseTimeout as exc:  # a write stalled: no answer is coming either
                    stalled.append(exc)
                    head_scope.cancel()  # (if the answer has begun, it goes on without the body)
                    return
                except Exception as exc:  # raised below, outside the nursery
                    failure.append(exc)
                    nursery.cancel_scope.cancel()
                    return
                finally:
                    self.pump_ended.set()
                head_scope.deadline = trio.current_time() + self.settings.response_timeout

            nursery.start_soon(pump)
            try:
                await self._relay_response(head, decision, head_scope)
            except Exception as exc:  # raised below, outside the nursery (no exception group)
                failure.append(exc)
            nursery.cancel_scope.cancel()
        if failure:
            if isinstance(failure[0], _ResponseTimeout) and stalled:
                raise stalled[0]  # why no answer came: the request was not read
            raise failure[0]

    async def _pump_body(self, request: h11.Request) -> None:
        """The request body from the stream to the internal host, then its end (with trailers)."""
        budget = RateBudget(self.settings.body_rate)
        stream = self.stream
        # h11 validated it: a Content-Length body is whole at the internal host with its last
        # byte, before the stream's FIN (and the empty EndOfMessage) are read here
        length = next((int(v) for k, v in request.headers if k == b"content-length"), None)
        sent = 0
        while True:
            try:
                data = await receive_some_at_rate(stream, budget, self.settings.chunk)
            except trio.TooSlowError as exc:
                raise _BodyTooSlow(str(exc)) from None
            if not data:
                self.request_ended = True
                break
            self.outcome.bytes_in += len(data)
            metrics.child(metrics.BYTES, self.mapping.name, "in").inc(len(data))
            sent += len(data)
            if length is not None and sent >= length:
                self.request_whole = True
            await self._to_origin(h11.Data(data=bytes(data)))
        # a Content-Length body has no way to carry trailers to the internal host: dropped
        trailers = (getattr(stream, "trailers", None) or []) if length is None else []
        self.request_whole = True
        await self._to_origin(h11.EndOfMessage(headers=trailer_fields(trailers)))
        self.body_sent.set()

    async def _relay_response(self, head: RequestHead, decision: Decision, head_scope: trio.CancelScope) -> None:
        event: object = None
        with head_scope:
            while True:
                event = await self._next_origin_event()
                if isinstance(event, h11.ConnectionClosed):
                    raise _OriginGone("internal host closed the connection without a response")
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        if is_switch(head, decision):
                            break
                        raise _OriginGone("internal host switched protocols unasked", "protocol_error")
                    await self._relay_head(ResponseHead(event.status_code, event.reason, list(event.headers)))
                    continue
                break
        if head_scope.cancelled_caught:
            raise _ResponseTimeout()
        if isinstance(event, h11.InformationalResponse):
            await self._switch(event)
            return
        if not isinstance(event, h11.Response):
            raise _OriginGone(f"unexpected {type(event).__name__} instead of a response", "protocol_error")
        assert self.origin is not None
        self.outcome.status = event.status_code
        response = ResponseHead(event.status_code, event.reason,
                                rewrite_locations(strip_hop_by_hop(list(event.headers)), self.mapping))
        first = self.origin.conn.next_event()  # without I/O: a bodyless answer ends at once
        if isinstance(first, h11.EndOfMessage) and not first.headers:
            await self._relay_head(response, end=True)
        else:
            await self._relay_head(response)
            bytes_out = metrics.child(metrics.BYTES, self.mapping.name, "out")
            event = await self._next_origin_event() if first is h11.NEED_DATA else first
            while isinstance(event, h11.Data):
                self.outcome.bytes_out += len(event.data)
                bytes_out.inc(len(event.data))
                await self._write(event.data)
                event = await self._next_origin_event()
            if not isinstance(event, h11.EndOfMessage):
                raise _OriginGone(f"unexpected {type(event).__name__} in the response body", "protocol_error")
            await self._end_answer(trailer_fields(event.headers))
        metrics.child(metrics.REQUEST_SECONDS, self.mapping.name, str(self.mapping.protocol)).observe(
            trio.current_time() - self.outcome.started)
        await self._finish_origin()

    async def _finish_origin(self) -> None:
        """Back to the pool if the whole request reached the internal host and h11 allows it."""
        if not self.request_whole:
            # answered before the request was whole: the internal host will not read the rest,
            # and what it left unread must never be parsed as its next request
            origin, self.origin = self.origin, None
            assert origin is not None
            await trio.aclose_forcefully(origin.stream)
            return  # run() resets the stream (NO_ERROR): the rest of the body is not read
        if not self.body_sent.is_set():
            # the last body write is in flight, or the stream's FIN after a whole Content-Length
            # body is still to come: the request's end goes out on this connection first (bounded)
            with trio.move_on_after(self.settings.response_timeout):
                await self.pump_ended.wait()
        origin, self.origin = self.origin, None
        assert origin is not None
        if not self.body_sent.is_set():
            await trio.aclose_forcefully(origin.stream)
            return
        await self.ctx.pool.give_back(origin)

    async def _switch(self, response: h11.InformationalResponse) -> None:
        """Relay the 101, then bytes both ways until both sides closed."""
        origin, self.origin = self.origin, None
        assert origin is not None
        self.outcome.status = 101
        await self._send_head(ResponseHead(101, response.reason, list(response.headers)))
        leftover = bytes(origin.conn.trailing_data[0])
        bytes_in = metrics.child(metrics.BYTES, self.mapping.name, "in")
        bytes_out = metrics.child(metrics.BYTES, self.mapping.name, "out")
        try:
            result = await relay(self.stream, origin.stream, chunk=self.settings.relay_chunk, b_first=leftover,
                                 count_a_to_b=bytes_in.inc, count_b_to_a=bytes_out.inc)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(origin.stream)
        self.outcome.bytes_in += result.a_to_b
        self.outcome.bytes_out += result.b_to_a
        metrics.child(metrics.REQUEST_SECONDS, self.mapping.name, "websocket").observe(trio.current_time() - self.outcome.started)
        if result.failed == "b":
            self.outcome.fail("backend_reset", str(result.error))
            await self._reset(ErrorCode.BACKEND_RESET, reset_error(ErrorCode.BACKEND_RESET)[2])
        elif result.failed == "a":
            self.outcome.fail("client_gone", str(result.error))
            await self._reset(ErrorCode.CANCEL, "stream broken")
