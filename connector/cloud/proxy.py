"""The HTTP connectivity proxy: cloud applications send plain HTTP requests here (SAP's port 20003).

Theory of operation. An application connects and sends requests in absolute-form
(`GET http://erp.virtual:8000/path HTTP/1.1`) with `Proxy-Authorization: Bearer <token>` and,
optionally, `SAP-Connectivity-SCC-Location_ID: <id>` (default location id ""). The token names the
subaccount (`Authenticator`); the URL names the virtual host and port. h11 parses the application
side (server role). For each request the proxy needs a tunnel stream to
Target(virtual_host, port, HTTP) from the `Router`; one stream is kept per application connection
and reused for the next request while (subaccount, location_id, host, port) stay the same, and
replaced when they change. On the stream a second h11 connection (client role) writes the request
in origin-form, without the proxy's own headers (Proxy-Authorization, the location header,
hop-by-hop headers; Host is kept), and parses the response, which is relayed back.

WebSocket: a request with `Connection: Upgrade` and `Upgrade: websocket` (HTTP/1.1 GET) is
forwarded with those two headers and its Sec-WebSocket-* headers; every other upgrade (h2c, ...)
is stripped like any hop-by-hop header. If the node answers `101 Switching Protocols`, the 101 is
relayed and the connection becomes a raw byte pipe to the stream: first the bytes h11 had already
read past each head (`trailing_data` of both h11 connections), then one chunk at a time each way,
each direction half-closed at its EOF, until both ended or either side failed (the stream is then
reset). Any other answer (a 403 from the node's allow-list) is relayed as a normal response and
the connection goes on serving requests.

Kept-alive streams the node closes: a FIN, reset or stray byte that arrived on an idle stream
before the application's next request retires the stream, so that request goes to a fresh
stream. A tunnel session stream tells what arrived on it without a reader (`peer_activity`), so
it is asked when the request is there; any other stream is watched by a task while idle. If the node closes the stream just as the next request is sent, the request
is sent once more on a fresh stream, but only when the node provably took nothing of it: the
stream had served a request before, no response byte came, no body byte was read from the
application yet, and the stream refused the request head or ended with a bare FIN (the node
answers or resets every request it reads). Otherwise the failure is answered as usual (502).

Bodies stream both ways at the same time (two tasks: request body up, response down; a request
without a body is sent whole, head and end in one write, and needs no second task), one chunk
at a time, so memory per connection is bounded by the chunk size and the stream's window, never
by the body size; a backend may answer before the request body is complete.

Writes to the application are gathered: a response head, its body and its end go out in one
write, flushed whenever the relay would wait for more from the node or holds `chunk` bytes.

Errors are short JSON bodies from `connector.httperrors.error_parts`: 407 missing or bad
credentials, 400 malformed or origin-form requests, 405 CONNECT (SAP's proxy does not tunnel
HTTPS: the node speaks TLS to the internal host when its mapping says HTTPS), 503 no connector,
403 refused by the node's allow-list, 504 connect timeout, 502 other stream failures. A TLS
ClientHello on this port (HTTPS *to the proxy*) is logged and the connection closed. Once a
response has started, a failure can only be reported by closing the application connection.
The proxy's own refusals (400, 405, 407, 408, 431, 503) go through `_refuse`: one log line, one
record in the cloud audit log (`connector.cloud.audit`), then the answer.

Framing. A request with both Content-Length and Transfer-Encoding, or whose Connection header
names one of them, is refused 400 before anything else and the connection closed (RFC 9112
section 6.3): a front-end that frames it otherwise than h11 would have us read the rest of its
body as a next request (request smuggling). A malformed body (bad chunk size, missing CRLF) is
answered 400 and closes the connection; the stream is reset.

Deadlines (`ProxySettings`, times from trio's clock), as on the node. No byte of a next request
within `idle_timeout`: the connection closes quietly. A head must be whole
`request_head_timeout` after its first byte (408). A request body must keep a minimum data rate
after a grace period (`connector.datarate`, as Kestrel), else 408 (or a closed connection once
the response started); an application that does not take one write of its response within
`response_write_timeout` is disconnected. Both reset the stream. A kept-alive connection idle
for `stream_idle_timeout` gives its stream back (FIN), so idle application connections do not
hold the streams of a location's tunnel.

Draining (`connector.cloud.drain`, a replica's SIGTERM): every response says `Connection: close`
once the drain began, and a kept-alive connection waiting for its next request with no byte of it
read is closed once the replica stopped accepting; a request under way always runs to its end, and
so does a new connection's first request.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import attrs
import h11
import trio

from connector.cloud.audit import CloudAudit
from connector.cloud.auth import Authenticator
from connector.cloud.drain import Drain
from connector.cloud.router import NoConnectorError, ProxyService, Router
from connector.datarate import MinDataRate, RateBudget, receive_some_at_rate
from connector.http1 import (
    HOP_BY_HOP,
    Outbox,
    framing_error,
    header_tokens,
    strip_hop_by_hop,
    trailer_fields,
)
from connector.httperrors import REASON_PHRASES, error_parts, reset_error
from connector.metrics import PROXY_REQUEST_SECONDS, PROXY_REQUESTS
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, StreamProtocol, StreamResetError, Target

log = logging.getLogger(__name__)

DEFAULT_HTTP_PROXY_PORT = 20003
LOCATION_HEADER = b"sap-connectivity-scc-location_id"
TLS_HANDSHAKE_RECORD = 0x16

# hop-by-hop for the proxy: also its own routing header, which the node must not see
PROXY_ONLY = frozenset({LOCATION_HEADER})
_NOT_FORWARDED = HOP_BY_HOP | PROXY_ONLY


_HOST = re.compile(rb"[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\]")


@attrs.frozen
class ProxySettings:
    """Limits of the HTTP proxy; times in seconds of trio time."""

    max_header_bytes: int = 65536
    chunk: int = 65536
    request_head_timeout: float = 30.0  # a request head is whole within this of its first byte (408)
    idle_timeout: float = 120.0  # keep-alive connection with no request
    stream_idle_timeout: float = 2.0  # a kept-alive tunnel stream is given back after this long idle
    # a request body arrives at this rate after its grace period (Kestrel's default) or gets 408
    request_body_rate: MinDataRate = MinDataRate(240.0, 5.0)
    response_write_timeout: float = 60.0  # one write the application does not take: disconnected
    linger_timeout: float = 2.0  # reading what the client still sends after a final error
    linger_bytes: int = 1 << 20


class BadTargetError(ValueError):
    """The request line does not name an http:// URL the proxy can route."""


def parse_proxy_target(raw: bytes) -> tuple[str, int, bytes]:
    """Split an absolute-form target into (virtual_host, port, origin-form target)."""
    if raw.startswith(b"/") or raw == b"*":
        raise BadTargetError(
            "origin-form request sent to the proxy: send the absolute URL "
            "(GET http://virtual-host:port/path) as HTTP proxy clients do"
        )
    scheme, sep, rest = raw.partition(b"://")
    if not sep:
        raise BadTargetError("request target is not an absolute http:// URL")
    if scheme.lower() == b"https":
        raise BadTargetError(
            "https:// URLs are not proxied: send http://virtual-host:port/...; the connector node "
            "uses TLS to the internal host when its mapping says HTTPS"
        )
    if scheme.lower() != b"http":
        raise BadTargetError(f"unsupported URL scheme {scheme.decode('latin-1')!r}")
    split = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        index = rest.find(delimiter)
        if index != -1:
            split = min(split, index)
    authority, path = rest[:split], rest[split:]
    path = path.partition(b"#")[0]
    if not path.startswith(b"/"):
        path = b"/" + path
    if b"@" in authority:
        raise BadTargetError("user information in the URL is not allowed")
    if authority.startswith(b"["):
        host, _, port_part = authority.partition(b"]")
        host += b"]"
        if port_part and not port_part.startswith(b":"):
            raise BadTargetError("malformed IPv6 authority")
        port_text = port_part[1:]
    else:
        host, _, port_text = authority.partition(b":")
    if not host:
        raise BadTargetError("the URL names no host")
    if not _HOST.fullmatch(host):
        raise BadTargetError("the URL host contains characters not allowed in a host name")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise BadTargetError("the URL port is not a number between 1 and 65535")
        port = int(port_text)
    else:
        port = 80
    return host.decode("ascii").lower(), port, path


def is_websocket_upgrade(request: h11.Request) -> bool:
    """True for an HTTP/1.1 GET with `Connection: Upgrade` and `Upgrade: websocket` (RFC 6455 4.1)."""
    return (
        request.method == b"GET"
        and request.http_version == b"1.1"
        and b"upgrade" in header_tokens(request.headers, b"connection")
        and b"websocket" in header_tokens(request.headers, b"upgrade")
    )


# Framing headers: a Connection header naming one would have this hop drop it, and the node
# would frame the request differently from the application and from us.
def forwarded_headers(
    headers: Sequence[tuple[bytes, bytes]], host: str, port: int, *, websocket: bool = False
) -> list[tuple[bytes, bytes]]:
    """Request headers to send to the node: proxy and hop-by-hop headers removed, Host kept.

    With `websocket` the upgrade is forwarded (`Connection: upgrade`, `Upgrade: websocket`) and
    the Sec-WebSocket-* headers are kept even if the application listed them in Connection; every
    other upgrade (h2c, ...) is stripped like any hop-by-hop header.
    """
    listed = header_tokens(headers, b"connection")
    if websocket:
        listed = {token for token in listed if not token.startswith(b"sec-websocket-")}
    result = [(name, value) for name, value in headers if name not in _NOT_FORWARDED and name not in listed]
    if not any(name == b"host" for name, _ in result):
        authority = host if port == 80 else f"{host}:{port}"
        result.insert(0, (b"host", authority.encode("ascii")))
    if websocket:
        result += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    return result


def response_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Response headers to relay to the application: hop-by-hop headers removed."""
    return strip_hop_by_hop(headers, PROXY_ONLY)


def switching_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers of a relayed `101 Switching Protocols` to a WebSocket upgrade (Sec-WebSocket-* kept)."""
    listed = {t for t in header_tokens(headers, b"connection") if not t.startswith(b"sec-websocket-")}
    kept = [(name, value) for name, value in headers if name not in _NOT_FORWARDED and name not in listed]
    return [(b"connection", b"upgrade"), (b"upgrade", b"websocket"), *kept]


def reset_status(error: StreamResetError) -> tuple[int, str, str]:
    """(status, reason token, message) for a stream the node reset or the tunnel lost: generic,
    from `httperrors` (the reset's reason text may name on-premise hosts, files and errors)."""
    return reset_error(error.code)


class _ClientGone(Exception):
    """The application closed or broke its connection; nothing more can be told to it."""


class _TooSlow(Exception):
    """The application missed a deadline: `reason` is the audit reason, `message` says which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class _ResponseNotRead(_ClientGone):
    """The application does not read its response fast enough: the connection is dropped."""


@attrs.define
class _Seen:
    """What the proxy learnt of the current request so far: the fields of its audit record."""

    started: float
    method: bytes | None = None
    subaccount: str | None = None
    location: str | None = None
    host: str | None = None
    port: int | None = None
    path: bytes | None = None  # origin-form, once the target was parsed


@attrs.define
class _Upstream:
    key: tuple[str, str, str, int]
    stream: TunnelStream
    conn: h11.Connection
    exchanges: int = 0  # completed request/response cycles: > 0 means a kept-alive, reused stream
    closed_by_node: bool = False  # seen while idle: EOF or reset; never reused
    unsolicited: bool = False  # the node sent bytes while idle: the stream is out of step


# Methods a client may send twice without changing the outcome (RFC 9110 section 9.2.2).
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@attrs.define
class _Progress:
    """What one request has taken from the application so far; carried across a retry."""

    request_done: bool = False  # the application's EndOfMessage was consumed
    body_consumed: bool = False  # body bytes were read from the application: not replayable
    retried: bool = False


@attrs.define
class _Attempt:
    """One try of a request on one tunnel stream."""

    body_scope: trio.CancelScope
    pump_done: trio.Event = attrs.Factory(trio.Event)
    status: int | None = None
    client_error: Exception | None = None
    response_started: bool = False  # a byte of the response arrived from the node
    retry: bool = False
    switched: h11.InformationalResponse | None = None


@attrs.define
class _Switched:
    """A WebSocket connection after its `101`: the stream and the bytes h11 had already read."""

    stream: TunnelStream
    to_node: bytes  # sent by the application right after its request head
    to_client: bytes  # sent by the node right after its 101 head
    client_eof: bool
    node_eof: bool


@functools.lru_cache(maxsize=64)
def _requests_counter(status: int | None) -> Any:
    """The PROXY_REQUESTS child of one status (a labels() lookup costs more than the inc)."""
    return PROXY_REQUESTS.labels("http", str(status) if status else "aborted")


_REQUEST_SECONDS = PROXY_REQUEST_SECONDS.labels("http")
_RETRY = object()  # _exchange's answer when the request may be sent again on a fresh stream
_STREAM_ERRORS = (StreamResetError, trio.BrokenResourceError, trio.ClosedResourceError)


class HttpProxy(ProxyService[ProxySettings]):
    """Serves the HTTP connectivity proxy; one `_ProxyConnection` per application connection."""

    name = "HTTP connectivity proxy"
    default_port = DEFAULT_HTTP_PROXY_PORT

    def __init__(
        self,
        router: Router,
        authenticator: Authenticator,
        *,
        settings: ProxySettings = ProxySettings(),
        audit: CloudAudit | None = None,
        drain: Drain | None = None,
    ) -> None:
        super().__init__(router, authenticator, settings=settings, drain=drain)
        self.audit = audit if audit is not None else CloudAudit()

    async def _handle(self, sock: trio.SocketStream) -> None:
        connection = _ProxyConnection(self, sock)
        try:
            await connection.serve()
        except Exception:
            log.exception("HTTP proxy connection from %s failed", connection.peer)
        finally:
            await connection.close()


class _ProxyConnection:
    def __init__(self, proxy: HttpProxy, sock: trio.SocketStream) -> None:
        self.proxy = proxy
        self.settings = proxy.settings
        self.sock = sock
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes)
        self.upstream: _Upstream | None = None
        self.switched: _Switched | None = None
        # responses for the application: a head, its body and its end leave in one write
        self.out = Outbox(self.conn, self._send_client, (trio.BrokenResourceError, trio.ClosedResourceError),
                          lambda _exc: _ClientGone())
        # what the audit knows of the request being handled (filled in as it is parsed)
        self.seen = _Seen(trio.current_time())  # of the request being read or handled
        try:
            host, port = sock.socket.getpeername()[:2]
            self.peer = f"{host}:{port}"
        except OSError:
            self.peer = "?"

    # --- application side -------------------------------------------------------------------
    async def _receive_client(self) -> bytes:
        try:
            return await self.sock.receive_some(self.settings.chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone() from exc

    async def _send_client(self, data: bytearray) -> None:
        """Write to the application; one it does not take within response_write_timeout raises
        `_ResponseNotRead` (the socket buffers are full: it does not read)."""
        with trio.move_on_after(self.settings.response_write_timeout):
            await self.sock.send_all(data)
            return
        raise _ResponseNotRead()

    async def _next_client_event(self, body_rate: RateBudget | None = None) -> h11.Event:
        """The application's next event; with `body_rate` (reading a body), `_TooSlow` once the
        body falls below its minimum rate."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            if body_rate is None:
                self.conn.receive_data(await self._receive_client())
                continue
            try:
                data = await receive_some_at_rate(self.sock, body_rate, self.settings.chunk)
            except trio.TooSlowError as exc:
                log.info("HTTP proxy: request body of %s too slow: %s", self.peer, exc)
                raise _TooSlow("request_body_too_slow", "the request body arrived too slowly") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _ClientGone() from exc
            self.conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like

    async def _next_request_head(self) -> h11.Event | None:
        """The application's next request head (or ConnectionClosed); None once idle_timeout passed
        without a byte of it.

        Once a byte of the head is there, the whole head must follow within request_head_timeout
        (`_TooSlow` otherwise). A kept-alive stream is given back (closed cleanly) once the
        connection has waited stream_idle_timeout: an idle connection holds no tunnel stream.
        """
        settings = self.settings
        now = trio.current_time()
        idle_deadline = now + settings.idle_timeout
        release_at = now + settings.stream_idle_timeout if self.upstream is not None else math.inf
        head_deadline = math.inf
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            if head_deadline == math.inf and self.conn.trailing_data[0]:
                head_deadline = trio.current_time() + settings.request_head_timeout
            if head_deadline < math.inf:
                with trio.move_on_at(head_deadline):
                    self.conn.receive_data(await self._receive_client())
                    continue
                raise _TooSlow("request_head_timeout", "the request head did not arrive in time")
            # no byte of a next request yet: a draining replica closes the connection here
            with self.proxy.drain.while_idle() as idle, trio.move_on_at(min(idle_deadline, release_at)):
                self.conn.receive_data(await self._receive_client())
                continue
            if idle.cancelled_caught:
                return None
            if trio.current_time() >= idle_deadline:
                return None
            release_at = math.inf
            await self._drop_upstream(clean=True)

    async def _next_request_event(self) -> h11.Event | None:
        """`_next_request_head`, watching a kept-alive stream meanwhile.

        The node may close an idle stream (FIN or reset); seeing that before the next request
        arrives lets that request go to a fresh stream with nothing sent on the dead one.
        """
        upstream = self.upstream
        if upstream is None:
            return await self._next_request_head()
        probe = getattr(upstream.stream, "peer_activity", None)
        if probe is not None:
            # A tunnel session stream knows without a reader what arrived on it: ask it when
            # the request is there (a watcher task per request cost about a sixth of the CPU)
            next_event = await self._next_request_head()
            if self.upstream is upstream:  # not given back meanwhile
                activity = probe()
                if activity != "idle":
                    upstream.closed_by_node = True
                    upstream.unsolicited = activity == "data"
                    if upstream.unsolicited:
                        log.warning("HTTP proxy: the node sent bytes on an idle stream; dropping it")
            return next_event
        error: Exception | None = None
        event: h11.Event | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_idle_upstream, upstream)
            try:
                event = await self._next_request_head()
            except (h11.RemoteProtocolError, _ClientGone, _TooSlow) as exc:
                error = exc  # raised below, outside the nursery (no exception group)
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return event

    async def _watch_idle_upstream(self, upstream: _Upstream) -> None:
        # Cancelled as soon as the next request arrives; a receive_some cancelled while waiting
        # loses no bytes (memory channel / tunnel stream buffer).
        try:
            data = await upstream.stream.receive_some(self.settings.chunk)
        except _STREAM_ERRORS:
            data = b""
        upstream.closed_by_node = True
        upstream.unsolicited = bool(data)
        if data:
            log.warning("HTTP proxy: the node sent %d bytes on an idle stream; dropping it", len(data))

    async def serve(self) -> None:
        first = b""
        # not `while_idle`: a connection accepted just before the listener closed has its first
        # request on the way (the load balancer opened it for one); the drain's deadline bounds it
        with trio.move_on_after(self.settings.idle_timeout):
            first = await self._receive_client()
        if not first:
            return  # closed or idle before its first byte: nothing to answer
        if first[0] == TLS_HANDSHAKE_RECORD:
            log.warning(
                "TLS ClientHello from %s on the HTTP proxy port: HTTPS to the proxy itself is refused; "
                "use a plain http:// proxy URL (the connector protects the hop to the internal host)",
                self.peer,
            )
            PROXY_REQUESTS.labels("http", "tls_refused").inc()
            return
        self.conn.receive_data(first)
        while True:
            self.seen = _Seen(trio.current_time())
            try:
                event = await self._next_request_event()
            except h11.RemoteProtocolError as exc:
                await self._reject_malformed(exc)
                return
            except _TooSlow as exc:
                PROXY_REQUESTS.labels("http", "408").inc()
                try:
                    await self._refuse(408, exc.reason, exc.message, close=True)
                    await self._linger()
                except _ClientGone:
                    pass
                return
            except _ClientGone:
                return
            if event is None or isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return
            try:
                await self._handle_request(event)
            except _ResponseNotRead:
                log.info("HTTP proxy: response to %s aborted: a write was not taken within %g s",
                         self.peer, self.settings.response_write_timeout)
                self._audit("response_not_read", None)
                return
            except _ClientGone:
                return
            if self.conn.our_state is h11.SWITCHED_PROTOCOL:
                return  # the WebSocket relay ran to its end; the connection is done
            if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                self.conn.start_next_cycle()
            else:
                if self.conn.our_state in (h11.DONE, h11.MUST_CLOSE):
                    await self._linger()
                return

    async def _reject_malformed(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        PROXY_REQUESTS.labels("http", str(status)).inc()
        reason = "request_header_too_large" if status == 431 else "malformed_request"
        try:
            await self._refuse(status, reason, f"malformed HTTP request: {exc}", close=True)
            await self._linger()
        except _ClientGone:
            pass

    async def _refuse(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        extra: list[tuple[bytes, bytes]] | None = None,
        close: bool = False,
    ) -> int:
        """Turn the current request away: a log line, an audit record, then the error response
        (if the application can still be answered); returns `status`."""
        log.info("HTTP proxy: %d %s for %s: %s", status, reason, self.peer, message)
        self._audit(reason, status)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send_error(status, reason, message, extra=extra, close=close)
        return status

    def _audit(self, reason: str, status: int | None) -> None:
        seen = self.seen
        self.proxy.audit.refusal(
            proxy="http", client=self.peer, reason=reason, status=status,
            duration_seconds=trio.current_time() - seen.started,
            method=seen.method.decode("ascii", "replace") if seen.method is not None else None,
            subaccount=seen.subaccount, location=seen.location,
            virtual_target=f"http://{seen.host}:{seen.port}" if seen.host is not None else None,
            path=seen.path.decode("ascii", "replace") if seen.path is not None else None,
        )

    async def _send_error(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        extra: list[tuple[bytes, bytes]] | None = None,
        close: bool = False,
    ) -> None:
        status, headers, body = error_parts(status, reason, message, extra)
        self._discard_buffered_body()
        if close or self.conn.their_state not in (h11.DONE, h11.MIGHT_SWITCH_PROTOCOL):
            # the rest of the request body is not read: the connection cannot be reused
            headers.append((b"connection", b"close"))
        else:
            headers += self._closing()
        self.out.queue(
            h11.Response(status_code=status, headers=headers, reason=REASON_PHRASES.get(status, b""))
        )
        self.out.queue(h11.Data(data=body))
        await self.out.send(h11.EndOfMessage())

    def _closing(self) -> list[tuple[bytes, bytes]]:
        """`Connection: close` for a response of a draining replica: the application's next
        request opens a new connection, which the load balancer sends to another replica."""
        return [(b"connection", b"close")] if self.proxy.drain.draining else []

    def _discard_buffered_body(self) -> None:
        """Consume a request body that is already fully buffered (typically: none), no I/O.

        An error answered before the body was read can keep the connection alive only if the
        whole request has been read; otherwise the response says `Connection: close`.
        """
        while self.conn.their_state is h11.SEND_BODY:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                return
            if event is h11.NEED_DATA or not isinstance(event, (h11.Data, h11.EndOfMessage)):
                return

    async def _linger(self) -> None:
        """Half-close, then read what the client still sends, so closing does not reset the response."""
        try:
            await self.sock.send_eof()
            received = 0
            with trio.move_on_after(self.settings.linger_timeout):
                while received < self.settings.linger_bytes:
                    data = await self.sock.receive_some(self.settings.chunk)
                    if not data:
                        break
                    received += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def close(self) -> None:
        await self._drop_upstream(clean=False)
        if self.switched is not None:
            switched, self.switched = self.switched, None
            with trio.CancelScope(shield=True):
                await self._reset_quietly(switched.stream, "proxy client connection ended")
        with trio.CancelScope(shield=True):
            await self.sock.aclose()

    # --- one request ------------------------------------------------------------------------
    async def _handle_request(self, request: h11.Request) -> None:
        started = trio.current_time()
        status = await self._proxy_request(request)
        _requests_counter(status).inc()
        # for a WebSocket this is the time to its 101, not the life of the connection
        _REQUEST_SECONDS.observe(trio.current_time() - started)
        if self.switched is not None:
            await self._relay_switched(self.switched)

    async def _proxy_request(self, request: h11.Request) -> int | None:
        """Answer one request; return the status sent to the application (None if aborted)."""
        seen = self.seen
        seen.method = request.method
        headers = list(request.headers)
        framing = framing_error(headers)
        if framing is not None:
            # nothing after this head can be trusted to start a request: answer and close
            return await self._refuse(400, "ambiguous_framing", framing, close=True)
        if request.method == b"CONNECT":
            return await self._refuse(
                405,
                "connect_not_supported",
                "CONNECT is not supported: the connectivity proxy does not tunnel HTTPS. Send plain "
                "http:// requests; the connector node uses TLS to the internal host when its mapping "
                "says HTTPS",
                extra=[(b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")],
                close=True,
            )
        authorization = next((v for n, v in headers if n == b"proxy-authorization"), None)
        challenge = [(b"proxy-authenticate", b'Bearer realm="connectivity-proxy"')]
        if authorization is None:
            return await self._refuse(
                407, "proxy_authentication_required", "send Proxy-Authorization: Bearer <token>", extra=challenge
            )
        subaccount = await self.proxy.authenticate_header(authorization)
        if subaccount is None:
            return await self._refuse(
                407, "invalid_proxy_credentials", "the proxy credentials were not accepted", extra=challenge
            )
        seen.subaccount = subaccount
        try:
            host, port, origin_target = parse_proxy_target(request.target)
        except BadTargetError as exc:
            # the target is not recorded: it may carry anything (user information, ...)
            return await self._refuse(400, "bad_request_target", str(exc))
        seen.host, seen.port, seen.path = host, port, origin_target
        location_raw = next((v for n, v in headers if n == LOCATION_HEADER), b"")
        try:
            location_id = location_raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return await self._refuse(400, "bad_location_id", "the location id header must be ASCII")
        seen.location = location_id

        key = (subaccount, location_id, host, port)
        # _parsed: h11 validated every part when it parsed the request (the host and target
        # were checked again by parse_proxy_target); it need not run its regexes a second time
        outgoing = h11.Request(
            method=request.method,
            target=origin_target,
            headers=forwarded_headers(headers, host, port, websocket=is_websocket_upgrade(request)),
            _parsed=True,
        )
        progress = _Progress()
        if self._request_is_bodyless(headers):
            end = self.conn.next_event()  # no I/O: h11 ends a zero-length body at once
            assert isinstance(end, h11.EndOfMessage), end
            progress.request_done = True
        while True:
            upstream = self.upstream
            if upstream is not None and (
                upstream.key != key or upstream.conn.our_state is not h11.IDLE or upstream.closed_by_node
            ):
                await self._drop_upstream(clean=not upstream.unsolicited)
            if self.upstream is None:
                try:
                    stream = await self.proxy.router.open_stream(
                        subaccount, location_id, Target(host, port, StreamProtocol.HTTP)
                    )
                except NoConnectorError as exc:
                    return await self._refuse(503, exc.code, exc.reason)
                except StreamResetError as exc:
                    status, reason, message = reset_status(exc)
                    await self._send_error(status, reason, message)
                    return status
                self.upstream = _Upstream(
                    key, stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=self.settings.max_header_bytes)
                )
            result = await self._exchange(self.upstream, outgoing, progress)
            if result is not _RETRY:
                assert result is None or isinstance(result, int)
                return result
            log.info(
                "HTTP proxy: the stream for the request from %s ended before any answer (idle stream "
                "closed by the node, or its master lost); sending it once more on a fresh stream", self.peer,
            )
            progress.retried = True

    async def _exchange(self, upstream: _Upstream, outgoing: h11.Request, progress: _Progress) -> object:
        """Send the request on `upstream` and relay the answer: the status sent, None, or _RETRY.

        _RETRY only when the node provably took nothing of the request: the stream was reused
        (the node may close idle streams), no response byte came, no body byte was read from the
        application (so the request can be sent again as it was), and either the stream refused
        the request head outright (send_all raised: the head never arrived whole) or ended with a
        clean FIN and no response (the node answers or resets every request it reads; a FIN
        without an answer is the node closing a stream on which it read nothing).
        """
        attempt = _Attempt(body_scope=trio.CancelScope())

        def may_retry() -> bool:
            return (
                upstream.exchanges > 0
                and not progress.retried
                and not progress.body_consumed
                and not attempt.response_started
            )

        async def send_upstream(event: h11.Event) -> None:
            data = upstream.conn.send(event)
            if data:
                await upstream.stream.send_all(data)

        async def pump_request_body() -> None:
            try:
                try:
                    await send_upstream(outgoing)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    if may_retry():
                        attempt.retry = True
                        nursery.cancel_scope.cancel()
                    return
                if progress.request_done:  # a retry of a request whose end was already read
                    await send_upstream(h11.EndOfMessage())
                    return
                body_rate = RateBudget(self.settings.request_body_rate)
                while True:
                    event = await self._next_client_event(body_rate)
                    if isinstance(event, h11.Data):
                        progress.body_consumed = True
                        await send_upstream(event)
                    elif isinstance(event, h11.EndOfMessage):
                        progress.request_done = True
                        # the one trailer rule of both hops (RFC 9110 6.5.1), and the proxy's own fields
                        await send_upstream(h11.EndOfMessage(headers=trailer_fields(event.headers, PROXY_ONLY)))
                        return
                    elif isinstance(event, h11.ConnectionClosed):  # in the middle of a body
                        raise _ClientGone()
                    else:
                        return
            except _STREAM_ERRORS:
                # the node stopped reading; the response side reports why (or relays its answer)
                return
            except (h11.RemoteProtocolError, _ClientGone, _TooSlow) as exc:
                # the request ends here: the response side stops at once (the stream is reset
                # once both sides stopped) and the exchange's end answers the application
                attempt.client_error = exc
                nursery.cancel_scope.cancel()

        async def relay_response() -> None:
            try:
                await relay_response_events()
            except _ClientGone as exc:
                attempt.client_error = exc
                await self._drop_upstream(clean=False)

        async def relay_response_events() -> None:
            try:
                while True:
                    event = upstream.conn.next_event()
                    if event is h11.NEED_DATA:
                        await self.out.flush()  # what is complete goes out before we wait
                        data = await upstream.stream.receive_some(self.settings.chunk)
                        if not data and not attempt.response_started:
                            if may_retry():
                                attempt.retry = True
                                attempt.body_scope.cancel()
                                return
                            await self._upstream_failed(
                                attempt, 502, "no_response", "the connector closed the stream without a response"
                            )
                            return
                        attempt.response_started = attempt.response_started or bool(data)
                        upstream.conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like
                        continue
                    if isinstance(event, h11.InformationalResponse):
                        if event.status_code == 101:
                            # h11 accepts a 101 only to a request that asked to upgrade, and
                            # only WebSocket upgrades are forwarded: switch once the request
                            # has been sent whole
                            await attempt.pump_done.wait()
                            attempt.switched = event
                            return
                        await self.out.send(event)
                    elif isinstance(event, h11.Response):
                        relayed = h11.Response(
                            status_code=event.status_code,
                            headers=response_headers(event.headers) + self._closing(),
                            reason=event.reason,
                            _parsed=True,  # parsed (and validated) by h11 from the node's answer
                        )
                        self.out.queue(relayed)
                        attempt.status = event.status_code
                    elif isinstance(event, h11.Data):
                        self.out.queue(event)
                        if len(self.out) >= self.settings.chunk:
                            await self.out.flush()
                    elif isinstance(event, h11.EndOfMessage):  # response trailers: the one rule of both hops
                        await self.out.send(h11.EndOfMessage(headers=trailer_fields(event.headers)))
                        return
                    else:
                        raise StreamResetError(
                            ErrorCode.BACKEND_RESET, "the stream ended before the response was complete"
                        )
            except h11.RemoteProtocolError as exc:
                await self._upstream_failed(
                    attempt, 502, "bad_response", f"the internal host sent a malformed response: {exc}"
                )
            except StreamResetError as exc:
                if may_replay(exc.code):
                    attempt.retry = True
                    attempt.body_scope.cancel()
                    return
                await self._upstream_failed(attempt, *reset_status(exc))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if may_replay(ErrorCode.TUNNEL_LOST):
                    attempt.retry = True
                    attempt.body_scope.cancel()
                    return
                await self._upstream_failed(attempt, *reset_status(StreamResetError(ErrorCode.TUNNEL_LOST)))

        def may_replay(code: ErrorCode) -> bool:
            """After a failover: send the request once more (the router holds it for the next
            master) when no response byte came and no body byte was taken from the application,
            and either the node provably did not take it (NOT_MASTER) or the master died under
            it (TUNNEL_LOST) and the method is idempotent, so a second execution is harmless
            (what HTTP clients do themselves on a lost connection, RFC 9110 section 9.2.2)."""
            if progress.retried or progress.body_consumed or attempt.response_started:
                return False
            if code == ErrorCode.NOT_MASTER:
                return True
            return code == ErrorCode.TUNNEL_LOST and outgoing.method in IDEMPOTENT_METHODS

        async def send_whole_request() -> None:
            # A request without a body: head and end in one write, and no body task.
            try:
                data = upstream.conn.send(outgoing)
                data += upstream.conn.send(h11.EndOfMessage())
                await upstream.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                attempt.retry = may_retry()
            except StreamResetError:
                pass  # the response side reports why (or relays the node's answer)
            finally:
                attempt.pump_done.set()

        if progress.request_done:
            await send_whole_request()
            if not attempt.retry:
                await relay_response()
        else:
            async with trio.open_nursery() as nursery:

                async def body_task() -> None:
                    try:
                        with attempt.body_scope:
                            await pump_request_body()
                    finally:
                        attempt.pump_done.set()

                nursery.start_soon(body_task)
                await relay_response()
                if upstream.conn.their_state is h11.DONE and not attempt.pump_done.is_set():
                    # The node answered whole before the request body was through (an echo of a
                    # small body can, an early error does): give the rest of the body
                    # linger_timeout to arrive so the connection stays usable. What has not come
                    # by then is not read: the application connection closes (state not DONE).
                    with trio.move_on_after(self.settings.linger_timeout):
                        await attempt.pump_done.wait()
                attempt.body_scope.cancel()

        client_error = attempt.client_error
        if isinstance(client_error, _ClientGone):
            await self._drop_upstream(clean=False)
            raise client_error
        if isinstance(client_error, (h11.RemoteProtocolError, _TooSlow)):
            await self._drop_upstream(clean=False)
            if isinstance(client_error, _TooSlow):
                status, reason, message = 408, client_error.reason, client_error.message
            else:
                status, reason, message = 400, "malformed_request", f"malformed request body: {client_error}"
            # answered if no response had started; otherwise audited and the connection closes
            # (the request is not DONE)
            await self._refuse(status, reason, message, close=True)
            return status if attempt.status is None else None
        if attempt.retry:
            await self._drop_upstream(clean=False)
            if not progress.body_consumed:
                return _RETRY
            # the body pump had already taken body bytes when it was stopped: not replayable
            await self._upstream_failed(
                attempt, 502, "no_response", "the connector closed the stream without a response"
            )
            return attempt.status
        if attempt.switched is not None:
            return await self._switch_protocols(upstream, attempt.switched)
        if upstream.conn.our_state is h11.DONE and upstream.conn.their_state is h11.DONE:
            upstream.conn.start_next_cycle()
            upstream.exchanges += 1
            if upstream.conn.trailing_data[0]:  # bytes after the response: the stream is out of step
                upstream.closed_by_node = upstream.unsolicited = True
        else:
            await self._drop_upstream(clean=upstream.conn.their_state is h11.DONE)
        return attempt.status

    def _request_is_bodyless(self, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """True if the request being read (these are its headers as h11 parsed them) has no
        body: h11 frames it so (neither chunked nor a non-zero Content-Length), so its
        EndOfMessage is available without reading."""
        if self.conn.their_state is not h11.SEND_BODY:
            return False
        for name, value in headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
                return False
        return True

    async def _upstream_failed(self, attempt: _Attempt, status: int, reason: str, message: str) -> None:
        if attempt.client_error is not None:
            return  # the application broke the request: the exchange's end answers that
        # Stop the request-body pump first (it is suspended: cancelling it loses no client bytes),
        # so that an already-buffered end of request can be consumed here and keep-alive survives.
        attempt.body_scope.cancel()
        await self._drop_upstream(clean=False)
        if attempt.status is None and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            log.info("HTTP proxy: %s for %s: %s", status, self.peer, message)
            await self._send_error(status, reason, message)
            attempt.status = status
        else:
            # the response had started: the only way to tell the application is to break the connection
            log.info("HTTP proxy: response to %s aborted: %s", self.peer, message)
            await self.out.flush()  # what was relayed so far, as without the write queue
            raise _ClientGone()

    # --- WebSocket ------------------------------------------------------------------------------
    async def _switch_protocols(self, upstream: _Upstream, response: h11.InformationalResponse) -> int | None:
        """Relay the node's 101 and hand the stream to `_relay_switched`; return 101."""
        if self.conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL or upstream.conn.our_state is not h11.SWITCHED_PROTOCOL:
            await self._drop_upstream(clean=False)
            await self._send_error(
                502, "bad_response", "the internal host switched protocols before the request was complete",
                close=True,
            )
            return 502
        self.upstream = None  # the stream now carries raw bytes, owned by self.switched
        to_client, node_eof = upstream.conn.trailing_data
        to_node, client_eof = self.conn.trailing_data
        self.switched = _Switched(upstream.stream, bytes(to_node), bytes(to_client), client_eof, node_eof)
        await self.out.send(
            h11.InformationalResponse(
                status_code=101,
                headers=switching_headers(response.headers),
                reason=response.reason or b"Switching Protocols",
            )
        )
        return 101

    async def _relay_switched(self, switched: _Switched) -> None:
        """Pump raw bytes both ways, one chunk at a time, half-closing each way at its EOF.

        Ends when both directions reached EOF (the stream is then closed gracefully) or either
        side failed (the stream is reset and the application connection closed).
        """
        stream = switched.stream
        failed: list[str] = []

        async def one_way(
            source: trio.abc.ReceiveStream,
            sink: trio.abc.HalfCloseableStream,
            leftover: bytes,
            source_eof: bool,
            direction: str,
        ) -> None:
            try:
                if leftover:
                    await sink.send_all(leftover)
                while not source_eof:
                    data = await source.receive_some(self.settings.chunk)
                    if not data:
                        break
                    await sink.send_all(data)
                await sink.send_eof()
            except (*_STREAM_ERRORS, OSError) as exc:
                failed.append(f"{direction}: {exc!r}")
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_way, self.sock, stream, switched.to_node, switched.client_eof, "to node")
            nursery.start_soon(one_way, stream, self.sock, switched.to_client, switched.node_eof, "to application")
        self.switched = None
        with trio.CancelScope(shield=True):
            if failed:
                log.info("HTTP proxy: WebSocket of %s ended abruptly (%s)", self.peer, failed[0])
                await self._reset_quietly(stream, "WebSocket relay failed")
            else:
                try:
                    await stream.aclose()
                except _STREAM_ERRORS:
                    pass

    async def _reset_quietly(self, stream: TunnelStream, reason: str) -> None:
        with trio.move_on_after(self.settings.linger_timeout):
            try:
                await stream.reset(ErrorCode.CANCEL, reason)
            except _STREAM_ERRORS:
                pass

    async def _drop_upstream(self, *, clean: bool) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self.settings.linger_timeout):
            try:
                if clean:
                    await upstream.stream.aclose()
                else:
                    await upstream.stream.reset(ErrorCode.CANCEL, "proxy client connection ended")
            except _STREAM_ERRORS:
                pass

