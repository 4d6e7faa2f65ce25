"""Forwarding on the node: serve one tunnel stream the cloud opened, against the internal host.

Theory of operation. `serve_stream` looks up the stream's mapping (none: reset NO_MAPPING) and
then either
- relays raw bytes (TCP / TCP-TLS mappings): connect first, `accept()` the stream only once the
  internal host answered (so SOCKS5 clients get a real connect result), then copy both ways in
  reads of up to `settings.relay_chunk` (256 KiB: a quarter of the syscalls and loop turns of
  64 KiB reads at full speed; each direction holds at most one read, so a relayed connection
  buffers at most 512 KiB here besides the stream's window), propagating half-close; or
- speaks HTTP/1.1 (HTTP / HTTPS mappings): an h11 server on the stream, an h11 client on a lazily
  opened backend connection that is reused across the keep-alive requests of the stream. Every
  request is checked by the access control; a denied request gets a JSON error and, when its body
  can be drained within `max_drain_bytes`, the connection continues. The request is sent with the
  canonical path the access control checked (so the path checked is the path served) and a
  rewritten Host header. Request and response bodies are streamed event by event, never buffered:
  memory per stream is a few chunks whatever the body size.

Request body and response run concurrently (a backend may answer before it read the whole body).
The response head must arrive within `response_timeout` after the request body was sent.

Nothing the application does holds the stream for ever: each request head must be whole within
`request_head_timeout` of its first byte (of the stream's start, for the first request); a request
body must keep `min_request_body_rate` after `request_body_grace` (`connector.datarate`; only time
spent waiting for the application counts). Either is answered 408 (a body, once the response
started: a reset) and audited; a slow body also drops the internal host's connection (its request
is incomplete). A response write that the tunnel side does not take within `response_write_timeout` (the
application stopped reading) resets the stream, drops the internal host's connection and is
audited: memory was bounded by the stream's window already, now the stream's slot is too. A
kept-alive stream idle for `keepalive_timeout` between requests ends cleanly, and with it the
kept-alive internal-host connection.

Failures talking to the internal host become 502/504 JSON responses while no response byte was
sent, and a BACKEND_RESET stream reset afterwards. What goes up the stream (error bodies, reset
reasons) is a reason and a generic sentence from `connector.httperrors`; the detail (internal host
names, resolver and TLS errors, trust store paths) goes to the node's log and the audit line's
`detail`. Each request (or TCP session) produces one audit line and the metrics of
`connector.metrics`.

`serve_stream` never raises (except cancellation): it runs as a task inside the tunnel session,
where an exception would take down every other stream.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import ssl
from collections.abc import Callable
from typing import Any

import attrs
import h11
import trio

from connector import metrics
from connector.agent import acl as acl_mod
from connector.agent.acl import AccessControl, Decision, Mapping
from connector.agent.audit import AuditLog
from connector.datarate import MinDataRate, RateBudget, receive_some_at_rate
from connector.http1 import Outbox, framing_error, header_tokens, strip_hop_by_hop, trailer_fields
from connector.httperrors import ERRORS, REASON_PHRASES, RESET_REASONS, error_parts, reset_error
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, StreamResetError

log = logging.getLogger(__name__)

NO_MAPPING_LABEL = "-"  # mapping label when no mapping matched (virtual names are caller-chosen)

@attrs.frozen
class ForwardSettings:
    connect_timeout: float = 5.0
    response_timeout: float = 30.0
    max_header_bytes: int = 65536
    chunk: int = 65536  # HTTP: reads from the stream and the backend, response write batches
    relay_chunk: int = 262144  # raw byte relay (TCP mappings, WebSocket after 101): largest read
    max_drain_bytes: int = 1 << 20  # body of a denied request read and dropped to keep the connection
    request_head_timeout: float = 30.0  # a request head is whole within this of its first byte
    min_request_body_rate: float = 240.0  # bytes/s a request body keeps on average, after the grace
    request_body_grace: float = 5.0  # seconds of waiting for a body before its rate is enforced
    response_write_timeout: float = 60.0  # one response write the tunnel side does not take
    keepalive_timeout: float = 120.0  # a kept-alive stream idle between requests ends after this

    @property
    def body_rate(self) -> MinDataRate:
        return MinDataRate(self.min_request_body_rate, self.request_body_grace)


@attrs.frozen
class StreamContext:
    subaccount: str
    location_id: str
    audit: AuditLog
    settings: ForwardSettings = ForwardSettings()
    # Set when this node hands over: a kept-alive HTTP stream then takes no further request and
    # ends cleanly between requests, so the proxy sends the next one to the new master.
    draining: trio.Event | None = None


class BackendError(Exception):
    """The internal host could not be reached; `code` for a reset, `reason` a metrics label,
    `message` the detail for the node's log and audit line (never sent to the cloud)."""

    def __init__(self, code: ErrorCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


class _TunnelGone(Exception):
    """The stream to the cloud was reset or closed: nobody is left to answer."""

    audit_reason = "client_gone"

    def audit_detail(self) -> str | None:
        return None


class _TunnelStalled(_TunnelGone):
    """A response write waited response_write_timeout for the application to read."""

    audit_reason = "response_not_read"

    def audit_detail(self) -> str | None:
        return str(self)


class _ClientTooSlow(Exception):
    """The application's request body fell below min_request_body_rate."""


class _BackendGone(Exception):
    """The backend connection failed after it was open; `label` is reset or protocol_error."""

    def __init__(self, message: str, label: str = "backend_reset") -> None:
        super().__init__(message)
        self.label = label


_TUNNEL_ERRORS = (StreamResetError, trio.BrokenResourceError, trio.ClosedResourceError)
_BACKEND_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


# --- connecting to the internal host ----------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _ssl_context(trust_store: str | None, _mtime_ns: int) -> ssl.SSLContext:
    # Verification on: CERT_REQUIRED and hostname checking are create_default_context defaults.
    return ssl.create_default_context(cafile=trust_store)


def client_ssl_context(trust_store: str | None) -> ssl.SSLContext:
    """Verifying client context for `trust_store` (None: system CAs), reloaded when the file changes."""
    mtime = os.stat(trust_store).st_mtime_ns if trust_store else 0
    return _ssl_context(trust_store, mtime)


async def open_backend(mapping: Mapping, settings: ForwardSettings) -> trio.abc.Stream:
    """Connect (and for HTTPS/TCP-TLS verify TLS) to the internal host; raise BackendError."""
    host, port = mapping.internal_host, mapping.internal_port
    tcp: trio.SocketStream | None = None
    try:
        with trio.fail_after(settings.connect_timeout):
            tcp = await trio.open_tcp_stream(host, port)
            if not mapping.protocol.uses_tls:
                return tcp
            try:
                context = client_ssl_context(mapping.trust_store)
            except (OSError, ssl.SSLError) as exc:
                raise BackendError(
                    ErrorCode.BACKEND_TLS_ERROR, "tls_error", f"trust store {mapping.trust_store} unusable: {exc}"
                ) from None
            tls = trio.SSLStream(tcp, context, server_hostname=host)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__ or exc
                raise BackendError(
                    ErrorCode.BACKEND_TLS_ERROR, "tls_error", f"TLS to {host}:{port} failed: {cause}"
                ) from None
            return tls
    except trio.TooSlowError:
        if tcp is not None:
            await trio.aclose_forcefully(tcp)
        raise BackendError(
            ErrorCode.CONNECT_TIMEOUT, "connect_timeout",
            f"{host}:{port} did not answer within {settings.connect_timeout} s",
        ) from None
    except BackendError:
        if tcp is not None:
            await trio.aclose_forcefully(tcp)
        raise
    except OSError as exc:
        if tcp is not None:
            await trio.aclose_forcefully(tcp)
        raise BackendError(
            ErrorCode.CONNECT_FAILED, "connect_failed", f"{host}:{port} unreachable: {exc}"
        ) from None


# --- entry point --------------------------------------------------------------------------------


async def serve_stream(stream: TunnelStream, acl: AccessControl, ctx: StreamContext) -> None:
    """Serve one stream the cloud opened, until it or the backend is done. Never raises."""
    try:
        mapping = acl.find_mapping(stream.target)
        if mapping is None:
            metrics.REQUESTS.labels(NO_MAPPING_LABEL, "denied").inc()
            metrics.DENIALS.labels(acl_mod.NO_MAPPING).inc()
            ctx.audit.request(
                subaccount=ctx.subaccount, location=ctx.location_id,
                virtual_target=str(stream.target), mapping=None, decision="denied",
                reason=acl_mod.NO_MAPPING, duration_seconds=0.0,
            )
            await stream.reset(ErrorCode.NO_MAPPING, f"no mapping for {stream.target}")
            return
        if mapping.protocol.is_http:
            await _HttpSession(stream, acl, mapping, ctx).run()
        else:
            await _serve_tcp(stream, mapping, ctx)
    except (*_TUNNEL_ERRORS, _TunnelGone) as exc:
        log.debug("stream %s to %s ended: %s", stream.stream_id, stream.target, exc)
    except Exception:
        log.exception("forwarding stream %s to %s failed", stream.stream_id, stream.target)
        with trio.CancelScope(shield=True):
            try:
                await stream.reset(ErrorCode.INTERNAL_ERROR, "internal error in the connector")
            except Exception:
                pass


# --- raw byte relay (TCP mappings, WebSocket after 101) --------------------------------------


async def _copy(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    chunk: int,
    count: Callable[[int], None],
    source_is_tunnel: bool,
) -> None:
    """Copy until EOF, then half-close `sink` if it can; raise _TunnelGone / _BackendGone."""
    source_error, sink_error = (_TunnelGone, _BackendGone) if source_is_tunnel else (_BackendGone, _TunnelGone)
    while True:
        try:
            data = await source.receive_some(chunk)
        except _TUNNEL_ERRORS + _BACKEND_ERRORS as exc:
            raise source_error(str(exc)) from exc
        if not data:
            break
        try:
            await sink.send_all(data)
        except _TUNNEL_ERRORS + _BACKEND_ERRORS as exc:
            raise sink_error(str(exc)) from exc
        count(len(data))
    if isinstance(sink, trio.abc.HalfCloseableStream):
        try:
            await sink.send_eof()
        except _TUNNEL_ERRORS + _BACKEND_ERRORS as exc:
            raise sink_error(str(exc)) from exc


@attrs.define
class _Relay:
    bytes_in: int = 0  # towards the internal host
    bytes_out: int = 0
    failure: Exception | None = None


async def _relay_both_ways(
    stream: TunnelStream, backend: trio.abc.Stream, chunk: int, mapping: Mapping
) -> _Relay:
    """Pump bytes both ways until both directions ended or one side failed; then close both."""
    relay = _Relay()
    bytes_in = metrics.BYTES.labels(mapping.name, "in")
    bytes_out = metrics.BYTES.labels(mapping.name, "out")

    def count_in(n: int) -> None:
        relay.bytes_in += n
        bytes_in.inc(n)

    def count_out(n: int) -> None:
        relay.bytes_out += n
        bytes_out.inc(n)

    async with trio.open_nursery() as nursery:

        async def one_way(source: Any, sink: Any, count: Callable[[int], None], from_tunnel: bool) -> None:
            try:
                await _copy(source, sink, chunk, count, from_tunnel)
            except (_TunnelGone, _BackendGone) as exc:
                relay.failure = relay.failure or exc
                nursery.cancel_scope.cancel()

        nursery.start_soon(one_way, stream, backend, count_in, True)
        nursery.start_soon(one_way, backend, stream, count_out, False)

    with trio.CancelScope(shield=True):
        if relay.failure is None:
            await _aclose_quietly(backend)
        else:
            await trio.aclose_forcefully(backend)
        if isinstance(relay.failure, _BackendGone):
            await _reset_quietly(stream, ErrorCode.BACKEND_RESET, "internal host reset the connection")
        elif relay.failure is None:
            await _aclose_quietly(stream)
    return relay


async def _aclose_quietly(resource: trio.abc.AsyncResource) -> None:
    try:
        await resource.aclose()
    except _TUNNEL_ERRORS + _BACKEND_ERRORS:
        pass


async def _reset_quietly(stream: TunnelStream, code: ErrorCode, reason: str) -> None:
    try:
        await stream.reset(code, reason)
    except _TUNNEL_ERRORS:
        pass


async def _serve_tcp(stream: TunnelStream, mapping: Mapping, ctx: StreamContext) -> None:
    started = trio.current_time()
    audit: dict[str, Any] = {
        "subaccount": ctx.subaccount, "location": ctx.location_id,
        "virtual_target": str(stream.target), "mapping": mapping.name, "decision": "allowed",
    }
    metrics.REQUESTS.labels(mapping.name, "allowed").inc()
    try:
        backend = await open_backend(mapping, ctx.settings)
    except BackendError as exc:
        metrics.BACKEND_ERRORS.labels(mapping.name, exc.reason).inc()
        log.info("%s (TCP): %s", mapping.name, exc.message)
        ctx.audit.request(**audit, reason=exc.reason, detail=exc.message,
                          duration_seconds=trio.current_time() - started)
        await _reset_quietly(stream, exc.code, reset_error(exc.code)[2])
        return
    try:
        await stream.accept()
    except _TUNNEL_ERRORS:
        await trio.aclose_forcefully(backend)
        return
    relay = await _relay_both_ways(stream, backend, ctx.settings.relay_chunk, mapping)
    duration = trio.current_time() - started
    metrics.REQUEST_SECONDS.labels(mapping.name, str(mapping.protocol)).observe(duration)
    reason = "allowed"
    if isinstance(relay.failure, _BackendGone):
        reason = "backend_reset"
        metrics.BACKEND_ERRORS.labels(mapping.name, reason).inc()
    elif isinstance(relay.failure, _TunnelGone):
        reason = "client_gone"
    ctx.audit.request(**audit, reason=reason, bytes_in=relay.bytes_in, bytes_out=relay.bytes_out,
                      duration_seconds=duration)


# --- HTTP ------------------------------------------------------------------------------------------


def _printable_target(raw: bytes) -> str:
    return raw[:2048].decode("ascii", "backslashreplace")


@attrs.define
class _Exchange:
    """Book-keeping for one request on the stream."""

    method: bytes
    target: str
    started: float
    status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    head_sent: bool = False
    request_done: bool = False
    client_error: h11.RemoteProtocolError | None = None
    client_gone: bool = False
    body_pumped: trio.Event | None = None  # set when _pump_request_body ends (if it runs)
    request_whole: bool = False  # the request's last bytes are handed to the backend (maybe in flight)
    discard_body: bool = False  # answered before the request was whole: the rest is read and dropped
    audited: bool = False  # one audit line per request, whatever happens
    verdict: str = "allowed"  # the audit decision if the stream is reset before the answer
    body_rate: RateBudget | None = None  # the request body's minimum rate, once it is read
    too_slow: str | None = None  # why the request body was given up (below its minimum rate)

    def body_budget(self, rate: MinDataRate) -> RateBudget:
        """One budget for the whole body, whoever reads it (the pump, then maybe a drain)."""
        if self.body_rate is None:
            self.body_rate = RateBudget(rate)
        return self.body_rate


class _HttpSession:
    """One stream carrying HTTP/1.1 requests for one HTTP/HTTPS mapping."""

    def __init__(self, stream: TunnelStream, acl: AccessControl, mapping: Mapping, ctx: StreamContext) -> None:
        self.stream = stream
        self.acl = acl
        self.mapping = mapping
        self.ctx = ctx
        self.settings = ctx.settings
        self.client = h11.Connection(h11.SERVER, max_incomplete_event_size=ctx.settings.max_header_bytes)
        self.backend: trio.abc.Stream | None = None
        self.backend_conn: h11.Connection | None = None
        self._bytes_in = metrics.BYTES.labels(mapping.name, "in")
        self._bytes_out = metrics.BYTES.labels(mapping.name, "out")
        self._allowed = metrics.REQUESTS.labels(mapping.name, "allowed")
        self._seconds = metrics.REQUEST_SECONDS.labels(mapping.name, str(mapping.protocol))
        # responses for the stream: a head, its body and its end leave in one write
        self.out = Outbox(self.client, self._send_to_tunnel, _TUNNEL_ERRORS, lambda exc: _TunnelGone(str(exc)))
        self._idle_scope: trio.CancelScope | None = None  # set while waiting for a next request
        self._request_scope: trio.CancelScope | None = None  # set while a request is handled
        self._current: _Exchange | None = None  # the request being handled

    # --- loop over the requests of the stream ---------------------------------------------------

    async def run(self) -> None:
        draining = self.ctx.draining
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            # watchers for the life of the stream (not tasks per request): a drain ends the wait
            # for a next request, never a request in progress; a reset ends whatever is going on
            if draining is not None:
                nursery.start_soon(self._watch_drain, draining)
            nursery.start_soon(self._watch_reset)
            try:
                await self._run()
            except Exception as exc:  # re-raised below, outside the nursery (no exception group)
                error = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _watch_reset(self) -> None:
        """A reset stream ends the request in progress at once: while a response body is relayed
        only the internal host is read, and one that stalls would otherwise hold the task."""
        await self.stream.wait_reset()
        if self._request_scope is not None:
            self._request_scope.cancel()

    async def _watch_drain(self, draining: trio.Event) -> None:
        await draining.wait()
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    async def _run(self) -> None:
        try:
            try:
                await self.stream.accept()
            except _TUNNEL_ERRORS as exc:
                raise _TunnelGone(str(exc)) from exc
            first = True
            while True:
                if not first and not await self._wait_next_request():
                    break  # draining: end the idle stream cleanly (FIN), no request lost
                first = False
                try:
                    event = await self._next_request_head()
                except h11.RemoteProtocolError as exc:
                    await self._malformed(exc, None)
                    return
                if event is None:  # not whole in time: answered 408
                    return
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    break
                assert isinstance(event, h11.Request), event
                keep_going = False
                with trio.CancelScope() as scope:
                    self._request_scope = scope
                    keep_going = await self._handle(event)
                self._request_scope = None
                if scope.cancelled_caught:  # _watch_reset: the stream was reset meanwhile
                    exchange = self._current
                    if exchange is not None and not exchange.audited:
                        self._audit(exchange, exchange.verdict, "client_gone")
                    raise _TunnelGone("stream reset while a request was handled")
                if not keep_going or not self._start_next_cycle():
                    break
            await self._close_client()
        except _TunnelGone:
            with trio.CancelScope(shield=True):
                await _reset_quietly(self.stream, ErrorCode.CANCEL, "stream broken")
        finally:
            with trio.CancelScope(shield=True):
                await self._drop_backend()

    def _start_next_cycle(self) -> bool:
        if self.client.our_state is h11.DONE and self.client.their_state is h11.DONE:
            self.client.start_next_cycle()
            return True
        return False

    async def _wait_next_request(self) -> bool:
        """Between requests: False if the node started draining, or the stream stayed idle for
        keepalive_timeout, before a byte of the next request arrived; True once there is something
        to parse (the next head's deadline runs from there). False ends the stream cleanly: the
        proxy opens a new one for its next request."""
        draining = self.ctx.draining
        if self.client.trailing_data[0]:
            return True
        if draining is not None and draining.is_set():
            return False
        # _watch_drain cancels it
        with trio.CancelScope(deadline=trio.current_time() + self.settings.keepalive_timeout) as scope:
            self._idle_scope = scope
            try:
                data = await self.stream.receive_some(self.settings.chunk)
            except _TUNNEL_ERRORS as exc:
                raise _TunnelGone(str(exc)) from exc
            finally:
                self._idle_scope = None
            self.client.receive_data(data)  # type: ignore[arg-type]
            return True
        return False  # drain or idle deadline: the receive was cancelled and consumed nothing

    async def _next_request_head(self) -> Any:
        """The request (or the end of the stream) within request_head_timeout; None once a head
        that did not arrive whole in time was answered 408 and audited."""
        timeout = self.settings.request_head_timeout
        started = trio.current_time()
        with trio.move_on_after(timeout):
            return await self._next_client_event()
        exchange = _Exchange(b"-", "-", started)
        detail = f"request head not whole within {timeout} s"
        log.info("%s request_head_timeout: %s", self.mapping.name, detail)
        reason = "request_head_timeout"
        await self._refuse(exchange, ERRORS[reason][0], reason, ERRORS[reason][1], close=True, detail=detail)
        await self._close_client()
        return None

    async def _close_client(self) -> None:
        with trio.CancelScope(shield=True):
            await _aclose_quietly(self.stream)

    # --- tunnel I/O -----------------------------------------------------------------------------

    async def _next_client_event(self, body_rate: RateBudget | None = None) -> Any:
        """The next event from the application; with `body_rate` (reading a body) raise
        _ClientTooSlow once the body falls below its minimum rate."""
        while True:
            event = self.client.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                if body_rate is None:
                    data = await self.stream.receive_some(self.settings.chunk)
                else:
                    data = await receive_some_at_rate(self.stream, body_rate, self.settings.chunk)
            except _TUNNEL_ERRORS as exc:
                raise _TunnelGone(str(exc)) from exc
            except trio.TooSlowError as exc:
                raise _ClientTooSlow(str(exc)) from None
            self.client.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like

    async def _send_to_tunnel(self, data: bytes | bytearray) -> None:
        """Write to the application; raise _TunnelStalled if it does not take the write within
        response_write_timeout (memory is bounded by the stream's window; its slot is not)."""
        with trio.move_on_after(self.settings.response_write_timeout):
            await self.stream.send_all(data)
            return
        detail = f"a response write waited {self.settings.response_write_timeout} s for the application to read"
        log.info("%s response_not_read: %s", self.mapping.name, detail)
        raise _TunnelStalled(detail)


    # --- backend I/O ----------------------------------------------------------------------------

    async def _ensure_backend(self) -> bool:
        """Connect if needed; return True if the connection was reused."""
        if self.backend is not None:
            return True
        self.backend = await open_backend(self.mapping, self.settings)
        self.backend_conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.settings.max_header_bytes)
        return False

    async def _drop_backend(self) -> None:
        backend, self.backend, self.backend_conn = self.backend, None, None
        if backend is not None:
            await trio.aclose_forcefully(backend)

    async def _to_backend(self, *events: Any) -> None:
        if self.backend is None or self.backend_conn is None:
            raise _BackendGone("internal host connection already closed")
        data = b"".join([self.backend_conn.send(event) or b"" for event in events])
        if data:
            try:
                await self.backend.send_all(data)
            except _BACKEND_ERRORS as exc:
                raise _BackendGone(str(exc)) from exc

    async def _next_backend_event(self) -> Any:
        assert self.backend is not None and self.backend_conn is not None
        while True:
            try:
                event = self.backend_conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _BackendGone(f"internal host broke HTTP: {exc}", "protocol_error") from exc
            if event is not h11.NEED_DATA:
                return event
            await self.out.flush()  # what is complete goes out before we wait
            try:
                data = await self.backend.receive_some(self.settings.chunk)
            except _BACKEND_ERRORS as exc:
                raise _BackendGone(str(exc)) from exc
            self.backend_conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like

    # --- one request --------------------------------------------------------------------------------

    async def _handle(self, request: h11.Request) -> bool:
        """Answer one request; return False if the connection must close afterwards."""
        exchange = self._current = _Exchange(request.method, _printable_target(request.target),
                                             trio.current_time())
        headers = list(request.headers)
        head_size = len(request.target) + sum(len(k) + len(v) + 4 for k, v in headers)
        if head_size > self.settings.max_header_bytes:
            # h11 only bounds *incomplete* heads; a complete one may still exceed our limit
            await self._refuse(exchange, 431, acl_mod.BAD_REQUEST, "request head too large", close=True)
            return False
        framing = framing_error(headers)  # the proxy refuses these too: a second line of defence
        if framing is not None:
            await self._refuse(exchange, 400, acl_mod.BAD_REQUEST, framing, close=True)
            return False
        decision = self.acl.check_request(self.mapping, request.method, request.target, headers)
        if not decision.allowed:
            return await self._deny(request, exchange, decision)
        return await self._forward(request, exchange, decision)

    def _request_has_body(self, request: h11.Request) -> bool:
        for key, value in request.headers:
            if key == b"transfer-encoding":
                return True
            if key == b"content-length" and value.strip() != b"0":
                return True
        return False

    async def _drain_body(self, limit: int, body_rate: RateBudget) -> bool:
        """Read and drop the rest of the request body; False if it is over `limit`, too slow, or
        unsafe."""
        if self.client.they_are_waiting_for_100_continue:
            return False  # the client waits for us: reading would hang, answering is enough
        seen = 0
        while True:
            try:
                event = await self._next_client_event(body_rate)
            except (h11.RemoteProtocolError, _ClientTooSlow):
                return False
            if isinstance(event, h11.Data):
                seen += len(event.data)
                if seen > limit:
                    return False
            elif isinstance(event, h11.EndOfMessage):
                return True
            else:
                return False

    async def _drain_body_audited(self, exchange: _Exchange, decision: str, reason: str,
                                  detail: str | None = None) -> bool:
        """`_drain_body` before an error answer; a client gone meanwhile still leaves the audit line."""
        try:
            return await self._drain_body(self.settings.max_drain_bytes,
                                          exchange.body_budget(self.settings.body_rate))
        except _TunnelGone:
            if not exchange.audited:
                self._audit(exchange, decision, reason, detail)
            raise

    async def _deny(self, request: h11.Request, exchange: _Exchange, decision: Decision) -> bool:
        exchange.target = decision.path or exchange.target
        exchange.verdict = "denied"
        status = 400 if decision.reason in (acl_mod.BAD_REQUEST, acl_mod.AMBIGUOUS_PATH, acl_mod.HOST_MISMATCH) else 403
        keep = await self._drain_body_audited(exchange, "denied", decision.reason, decision.detail)
        message = f"the connector's access control denied this request ({decision.reason})"
        await self._refuse(exchange, status, decision.reason, message, close=not keep, detail=decision.detail)
        return keep

    async def _refuse(self, exchange: _Exchange, status: int, reason: str, message: str, *, close: bool,
                      detail: str | None = None) -> None:
        """Answer with an access-control refusal: metrics, audit, JSON error."""
        metrics.REQUESTS.labels(self.mapping.name, "denied").inc()
        metrics.DENIALS.labels(reason).inc()
        await self._send_error(exchange, status, reason, message, close=close, audit="denied", detail=detail)

    async def _send_error(self, exchange: _Exchange, status: int, reason: str, message: str, *,
                          close: bool, audit: str | None = None, detail: str | None = None) -> None:
        """Send a JSON error response; with `audit` ("denied"/"allowed") write the audit line first
        (with `detail`, which is for the node only: `message` is what the application reads)."""
        extra = [(b"connection", b"close")] if close else None
        status, headers, body = error_parts(status, reason, message, extra)
        exchange.status = status
        if exchange.method == b"HEAD":
            body = b""
        phrase = REASON_PHRASES.get(status, b"")
        try:
            data = self.client.send(h11.Response(status_code=status, headers=headers, reason=phrase))
            data += self.client.send(h11.Data(data=body)) if body else b""
            data += self.client.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            # the h11 state does not allow a response (e.g. after a malformed request): write it raw
            lines = [b"HTTP/1.1 %d %s" % (status, phrase)] + [k + b": " + v for k, v in headers]
            if not close:
                lines.append(b"connection: close")
            data = b"\r\n".join(lines) + b"\r\n\r\n" + body
        exchange.bytes_out += len(body)
        if audit is not None:
            self._audit(exchange, audit, reason, detail)
        try:
            await self._send_to_tunnel(data)
        except _TUNNEL_ERRORS as exc:
            raise _TunnelGone(str(exc)) from exc

    async def _malformed(self, exc: h11.RemoteProtocolError, exchange: _Exchange | None) -> None:
        """The client broke HTTP: answer 400/431 if we still can, then close."""
        status = 431 if exc.error_status_hint == 431 else 400
        exchange = exchange or _Exchange(b"-", "-", trio.current_time())
        if self.client.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._refuse(exchange, status, acl_mod.BAD_REQUEST, f"malformed request: {exc}", close=True)
            await self._close_client()
        else:
            metrics.REQUESTS.labels(self.mapping.name, "denied").inc()
            metrics.DENIALS.labels(acl_mod.BAD_REQUEST).inc()
            self._audit(exchange, "denied", acl_mod.BAD_REQUEST)
            await _reset_quietly(self.stream, ErrorCode.CANCEL, "malformed request body")

    def _audit(self, exchange: _Exchange, decision: str, reason: str, detail: str | None = None) -> None:
        exchange.audited = True
        extra = {"detail": detail} if detail else {}
        self.ctx.audit.request(
            subaccount=self.ctx.subaccount, location=self.ctx.location_id,
            virtual_target=str(self.stream.target), mapping=self.mapping.name,
            method=exchange.method.decode("ascii", "replace"), path=exchange.target,
            decision=decision, reason=reason, status=exchange.status,
            bytes_in=exchange.bytes_in, bytes_out=exchange.bytes_out,
            duration_seconds=round(trio.current_time() - exchange.started, 6), **extra,
        )

    def _backend_request(self, request: h11.Request, decision: Decision) -> h11.Request:
        m = self.mapping
        headers = [(k, v) for k, v in strip_hop_by_hop(list(request.headers))
                   if k not in (b"host", b"x-forwarded-host", b"expect")]
        if m.host_in_header is acl_mod.HostInHeader.INTERNAL:
            host = f"{m.internal_host}:{m.internal_port}".encode()
            headers.append((b"x-forwarded-host", f"{m.virtual_host}:{m.virtual_port}".encode()))
        else:
            host = f"{m.virtual_host}:{m.virtual_port}".encode()
        if self._is_switch(request, decision):
            headers += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
        assert decision.forward_target is not None
        return h11.Request(method=request.method, target=decision.forward_target,
                           headers=[(b"host", host), *headers])

    @staticmethod
    def _is_switch(request: h11.Request, decision: Decision) -> bool:
        """An allowed WebSocket upgrade that the client really proposed (Connection: upgrade)."""
        return decision.websocket and b"upgrade" in header_tokens(list(request.headers), b"connection")

    async def _backend_failed(self, exchange: _Exchange, reason: str, detail: str, label: str) -> bool:
        """Report a backend failure: 502/504 if no response byte went out yet, else reset. The
        application gets `reason` and its generic sentence; `detail` stays on the node."""
        metrics.BACKEND_ERRORS.labels(self.mapping.name, label).inc()
        log.info("%s %s: %s", self.mapping.name, reason, detail)
        await self._drop_backend()
        if exchange.head_sent:
            self._audit(exchange, "allowed", label, detail)
            await _reset_quietly(self.stream, ErrorCode.BACKEND_RESET, reset_error(ErrorCode.BACKEND_RESET)[2])
            raise _TunnelGone("stream reset after backend failure")
        keep = exchange.request_done or await self._drain_body_audited(exchange, "allowed", reason, detail)
        status, message = ERRORS[reason]
        await self._send_error(exchange, status, reason, message, close=not keep, audit="allowed",
                               detail=detail)
        return keep

    async def _forward(self, request: h11.Request, exchange: _Exchange, decision: Decision) -> bool:
        """Send an allowed request to the internal host and relay its answer."""
        exchange.target = decision.path or exchange.target
        self._allowed.inc()
        backend_request = self._backend_request(request, decision)
        replayable = not self._request_has_body(request)
        for attempt in (1, 2):
            try:
                reused = await self._ensure_backend()
            except BackendError as exc:
                return await self._backend_failed(exchange, RESET_REASONS[exc.code], exc.message, exc.reason)
            may_retry = reused and attempt == 1 and replayable
            try:
                if replayable:
                    # no body: its end is already parsed; head and end go out in one write
                    if not exchange.request_done:
                        end = self.client.next_event()
                        assert isinstance(end, h11.EndOfMessage), end
                        exchange.request_done = True
                    await self._to_backend(backend_request, h11.EndOfMessage())
                else:
                    await self._to_backend(backend_request)
                try:
                    return await self._exchange(request, exchange, decision)
                except _TunnelGone as exc:
                    # the application went away or stopped reading: the request reached the
                    # internal host (or its head did), so it has its audit line like any other
                    if not exchange.audited:
                        self._audit(exchange, "allowed", exc.audit_reason, exc.audit_detail())
                    raise
            except _ResponseTimeout:
                return await self._backend_failed(
                    exchange, "internal_host_timeout",
                    f"no response within {self.settings.response_timeout} s", "response_timeout")
            except _BackendGone as exc:
                if may_retry and not exchange.head_sent:
                    # a kept-alive connection the internal host had closed meanwhile: reconnect
                    await self._drop_backend()
                    continue
                reason = "internal_host_protocol_error" if exc.label == "protocol_error" else "backend_reset"
                return await self._backend_failed(
                    exchange, reason, f"internal host connection failed: {exc}", exc.label)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _pump_request_body(self, exchange: _Exchange, head_scope: trio.CancelScope,
                                 nursery: trio.Nursery) -> None:
        """Client request body -> backend, event by event; then start the response deadline.

        Never raises: failures are recorded on `exchange` for `_exchange` to act on.
        """
        try:
            await self._send_request_body(exchange, head_scope, nursery)
        finally:
            if exchange.body_pumped is not None:
                exchange.body_pumped.set()

    async def _send_request_body(self, exchange: _Exchange, head_scope: trio.CancelScope,
                                 nursery: trio.Nursery) -> None:
        try:
            if exchange.request_done:  # resending a body-less request on a fresh connection
                await self._to_backend(h11.EndOfMessage())
            else:
                while True:
                    # what h11 already holds goes out in one write; in the body state it yields
                    # only Data, EndOfMessage or NEED_DATA (or raises)
                    events = [await self._next_client_event(exchange.body_budget(self.settings.body_rate))]
                    while not isinstance(events[-1], h11.EndOfMessage):
                        more = self.client.next_event()
                        if more is h11.NEED_DATA:
                            break
                        events.append(more)
                    for i, event in enumerate(events):
                        if isinstance(event, h11.Data):
                            exchange.bytes_in += len(event.data)
                            self._bytes_in.inc(len(event.data))
                        elif isinstance(event, h11.EndOfMessage) and event.headers:
                            events[i] = h11.EndOfMessage(headers=trailer_fields(event.headers))
                    last = isinstance(events[-1], h11.EndOfMessage)
                    # set before the write yields: an answer that comes meanwhile is not "early"
                    exchange.request_whole = last
                    if not exchange.discard_body:
                        try:
                            await self._to_backend(*events)
                        except _BackendGone:
                            if not exchange.discard_body:
                                raise
                            # answered early and dropped: keep reading the client's body
                    if last:
                        break
                exchange.request_done = True
        except h11.RemoteProtocolError as exc:
            exchange.client_error = exc
            nursery.cancel_scope.cancel()
            return
        except _ClientTooSlow as exc:
            exchange.too_slow = str(exc)
            nursery.cancel_scope.cancel()
            return
        except _TunnelGone:
            exchange.client_gone = True
            nursery.cancel_scope.cancel()
            return
        except _BackendGone:
            return  # the internal host stopped reading; the response side reports why
        head_scope.deadline = trio.current_time() + self.settings.response_timeout

    async def _exchange(self, request: h11.Request, exchange: _Exchange, decision: Decision) -> bool:
        """Request body and response concurrently; return False if the stream must close."""
        head_scope = trio.CancelScope(deadline=math.inf)
        failure: Exception | None = None
        keep = False
        if self.client.they_are_waiting_for_100_continue:
            # Allowed and connected: invite the body ourselves (Expect is not forwarded), so a
            # backend that never sends 100 Continue cannot stall the client.
            await self.out.send(h11.InformationalResponse(status_code=100, headers=[]))
        if exchange.request_done:  # sent whole by _forward: no body to pump
            head_scope.deadline = trio.current_time() + self.settings.response_timeout
            try:
                keep = await self._relay_response(request, exchange, decision, head_scope)
            except (_BackendGone, _TunnelGone, _ResponseTimeout) as exc:
                failure = exc
        else:
            exchange.body_pumped = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_request_body, exchange, head_scope, nursery)
                try:
                    keep = await self._relay_response(request, exchange, decision, head_scope)
                except (_BackendGone, _TunnelGone, _ResponseTimeout) as exc:
                    failure = exc
                nursery.cancel_scope.cancel()
        if exchange.client_gone:
            raise _TunnelGone("client stream broken during the request body")
        if exchange.client_error is not None:
            await self._drop_backend()
            if exchange.head_sent:
                if not exchange.audited:
                    self._audit(exchange, "denied", acl_mod.BAD_REQUEST)
                await _reset_quietly(self.stream, ErrorCode.CANCEL, "malformed request body")
                raise _TunnelGone("malformed request body")
            await self._malformed(exchange.client_error, exchange)
            return False
        if exchange.too_slow is not None:
            return await self._body_too_slow(exchange, exchange.too_slow)
        if failure is not None:
            raise failure
        if not exchange.request_done:
            # the internal host answered before reading the whole body: neither side can continue
            await self._drop_backend()
            return False
        return keep

    async def _body_too_slow(self, exchange: _Exchange, detail: str) -> bool:
        """The request body fell below its minimum rate. The internal host's request is incomplete,
        so its connection goes; the application gets 408, or a reset once its response started.
        Returns False: the stream cannot carry another request."""
        reason = "request_body_too_slow"
        log.info("%s %s: %s", self.mapping.name, reason, detail)
        await self._drop_backend()
        if self.client.our_state is h11.DONE:
            return False  # answered whole before the body (and audited): only the rest was slow
        if exchange.head_sent:
            self._audit(exchange, "allowed", reason, detail)
            await _reset_quietly(self.stream, ErrorCode.CANCEL, ERRORS[reason][1])
            raise _TunnelGone(reason)
        status, message = ERRORS[reason]
        await self._send_error(exchange, status, reason, message, close=True, audit="allowed", detail=detail)
        return False

    async def _relay_response(self, request: h11.Request, exchange: _Exchange, decision: Decision,
                              head_scope: trio.CancelScope) -> bool:
        with head_scope:
            while True:
                event = await self._next_backend_event()
                if isinstance(event, h11.ConnectionClosed):
                    raise _BackendGone("internal host closed the connection without a response")
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        if self._is_switch(request, decision):
                            break
                        raise _BackendGone("internal host switched protocols unasked", "protocol_error")
                    if self.client.their_http_version == b"1.1":
                        await self.out.send(event)
                    continue
                break
        if head_scope.cancelled_caught:
            raise _ResponseTimeout()
        if isinstance(event, h11.InformationalResponse):  # 101 to an allowed WebSocket upgrade
            # outside head_scope: the response deadline must not cut a long-lived WebSocket
            return await self._switch_to_websocket(exchange, event)
        assert isinstance(event, h11.Response)
        backend_headers = list(event.headers)
        chunked = b"chunked" in header_tokens(backend_headers, b"transfer-encoding")
        self.out.queue(h11.Response(status_code=event.status_code,
                                    headers=strip_hop_by_hop(backend_headers),
                                    reason=event.reason,
                                    _parsed=True))  # h11 validated it when parsing
        exchange.status = event.status_code
        exchange.head_sent = True
        keep_trailers = chunked and self.client.their_http_version == b"1.1" and request.method != b"HEAD"
        while True:
            event = await self._next_backend_event()
            if isinstance(event, h11.Data):
                self.out.queue(event)
                if len(self.out) >= self.settings.chunk:
                    await self.out.flush()
                exchange.bytes_out += len(event.data)
                self._bytes_out.inc(len(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise _BackendGone(f"unexpected {type(event).__name__} in the response body", "protocol_error")
        end = h11.EndOfMessage(headers=trailer_fields(event.headers) if keep_trailers else [])
        pumped = exchange.body_pumped
        if pumped is not None and not exchange.request_whole:
            # The internal host finished its answer before the request was whole (an early error
            # does): it will not read the rest, and bytes it left unread must not be parsed as its
            # next request. Nothing more is sent to it and its connection is dropped (which also
            # ends a write blocked on it); the rest of the client's body is read and dropped (at
            # most response_timeout), so the client's stream can carry the next request.
            exchange.discard_body = True
            await self._drop_backend()
            try:
                await self.out.send(end)
                with trio.move_on_after(self.settings.response_timeout):
                    await pumped.wait()
            finally:  # audited even if the client goes away meanwhile
                self._audit(exchange, "allowed", acl_mod.ALLOWED)
                self._seconds.observe(trio.current_time() - exchange.started)
            return True
        if pumped is not None and not pumped.is_set():
            # the request's last write is still in flight: let it finish before the connection's
            # next cycle (bounded: a backend that stopped reading is dropped below)
            with trio.move_on_after(self.settings.response_timeout):
                await pumped.wait()
        # Book-keeping before the last bytes go out, so the audit line exists once the client has
        # the whole response.
        await self._finish_backend_cycle()
        self._audit(exchange, "allowed", acl_mod.ALLOWED)
        self._seconds.observe(trio.current_time() - exchange.started)
        await self.out.send(end)
        return True

    async def _finish_backend_cycle(self) -> None:
        """Keep the backend connection for the next request if both sides may, else close it."""
        conn = self.backend_conn
        if conn is not None and conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self._drop_backend()

    async def _switch_to_websocket(self, exchange: _Exchange, response: h11.InformationalResponse) -> bool:
        """Relay the 101, then bytes both ways until both sides closed; the stream ends after."""
        assert self.backend is not None and self.backend_conn is not None
        await self.out.send(h11.InformationalResponse(status_code=101, headers=list(response.headers),
                                                      reason=response.reason))
        exchange.status = 101
        exchange.head_sent = True
        backend_leftover = bytes(self.backend_conn.trailing_data[0])
        client_leftover = bytes(self.client.trailing_data[0])
        backend, self.backend, self.backend_conn = self.backend, None, None
        try:
            if backend_leftover:
                await self.stream.send_all(backend_leftover)
            if client_leftover:
                await backend.send_all(client_leftover)
        except _TUNNEL_ERRORS + _BACKEND_ERRORS:
            await trio.aclose_forcefully(backend)
            raise _TunnelGone("websocket start failed") from None
        exchange.request_done = True
        relay = await _relay_both_ways(self.stream, backend, self.settings.relay_chunk, self.mapping)
        exchange.bytes_in += relay.bytes_in + len(client_leftover)
        exchange.bytes_out += relay.bytes_out + len(backend_leftover)
        reason = "backend_reset" if isinstance(relay.failure, _BackendGone) else acl_mod.ALLOWED
        self._audit(exchange, "allowed", reason)
        metrics.REQUEST_SECONDS.labels(self.mapping.name, "websocket").observe(
            trio.current_time() - exchange.started)
        return False  # the relay closed (or reset) the stream


class _ResponseTimeout(Exception):
    """No response head from the internal host within response_timeout after the request."""
