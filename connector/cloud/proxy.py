"""The HTTP connectivity proxy: cloud applications send plain HTTP requests here (SAP's port 20003).

Theory of operation. An application connects and sends requests in absolute-form
(`GET http://erp.virtual:8000/path HTTP/1.1`) with `Proxy-Authorization: Bearer <token>` and,
optionally, `SAP-Connectivity-SCC-Location_ID: <id>` (default location id ""). The token names the
subaccount (`Authenticator`); the URL names the virtual host and port. h11 parses the application
side (server role); h11 runs only there. Each request is carried to the node on its own exchange
stream (`connector.cloud.exchange`): a typed request head in origin-form, without the proxy's own
headers (Proxy-Authorization, the location header, hop-by-hop headers; Host is kept), the body as
DATA, and the node's typed response head and body back. An application's kept-alive connection
holds no stream between its requests, and a request the node provably never processed is replayed
on the location's master (`connector.cloud.replay`).

WebSocket: a request with `Connection: Upgrade` and `Upgrade: websocket` (HTTP/1.1 GET) is
forwarded with those two headers and its Sec-WebSocket-* headers; every other upgrade (h2c, ...)
is stripped like any hop-by-hop header. If the node answers `101 Switching Protocols`, the 101 is
relayed and the connection becomes a raw byte pipe to the stream (`connector.relay`), first with
the bytes h11 had already read past the request head. Any other answer (a 403 from the node's
allow-list) is relayed as a normal response and the connection goes on serving requests.

Bodies stream both ways at the same time (two tasks: request body up, response down; a request
without a body is sent whole, head and end in one write, and needs no second task), one chunk
at a time, so memory per connection is bounded by the chunk size and the stream's window, never
by the body size; a backend may answer before the request body is complete.

Writes to the application are gathered: a response head, its body and its end go out in one
write, flushed whenever the relay would wait for more from the node or holds `chunk` bytes.

Errors are short JSON bodies from `connector.httperrors.error_parts`: 407 missing or bad
credentials, 401 a user token in SAP-Connectivity-(Technical-)Authentication that
`connector.cloud.principal` does not accept (both headers are never forwarded: the validated user
rides in the request head), 400 malformed or origin-form requests, 405 CONNECT (SAP's proxy does not tunnel
HTTPS: the node speaks TLS to the internal host when its mapping says HTTPS), 503 no connector,
403 refused by the node's allow-list, 504 connect timeout, 502 other stream failures. A TLS
ClientHello on this port (HTTPS *to the proxy*) is logged and the connection closed. Once a
response has started, a failure can only be reported by closing the application connection.
The proxy's own refusals (400, 401, 405, 407, 408, 431, 503) go through `_refuse`: one log line, one
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
`response_write_timeout` is disconnected. Both reset the stream.

Draining (`connector.cloud.drain`, a replica's SIGTERM): every response says `Connection: close`
once the drain began, and a kept-alive connection waiting for its next request with no byte of it
read is closed once the replica stopped accepting; a request under way always runs to its end, and
so does a new connection's first request.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import attrs
import h11
import trio

from connector.cloud.audit import CloudAudit
from connector.cloud.auth import Authenticator
from connector.cloud.drain import Drain
from connector.cloud.exchange import ClientGone, ProxyExchange, ResponseNotRead, TooSlow
from connector.cloud.jwtauth import JwtError
from connector.cloud.principal import PrincipalValidator
from connector.cloud.router import ProxyService, Router
from connector.cloud.target import (
    LOCATION_HEADER,
    PROXY_ONLY,
    BadTargetError,
    forwarded_headers,
    is_websocket_upgrade,
    parse_proxy_target,
)
from connector.datarate import MinDataRate, RateBudget, receive_some_at_rate
from connector.http1 import (
    Outbox,
    framing_error,
)
from connector.httperrors import REASON_PHRASES, error_parts
from connector.metrics import PROXY_REQUEST_SECONDS, PROXY_REQUESTS
from connector.tunnel.heads import RequestHead
from connector.tunnel.types import StreamProtocol, Target

log = logging.getLogger(__name__)

DEFAULT_HTTP_PROXY_PORT = 20003
TLS_HANDSHAKE_RECORD = 0x16




@attrs.frozen
class ProxySettings:
    """Limits of the HTTP proxy; times in seconds of trio time."""

    max_header_bytes: int = 65536
    chunk: int = 65536
    request_head_timeout: float = 30.0  # a request head is whole within this of its first byte (408)
    idle_timeout: float = 120.0  # keep-alive connection with no request
    # a request body arrives at this rate after its grace period (Kestrel's default) or gets 408
    request_body_rate: MinDataRate = MinDataRate(240.0, 5.0)
    response_write_timeout: float = 60.0  # one write the application does not take: disconnected
    linger_timeout: float = 2.0  # reading what the client still sends after a final error
    linger_bytes: int = 1 << 20


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


@functools.lru_cache(maxsize=64)
def _requests_counter(status: int | None) -> Any:
    """The PROXY_REQUESTS child of one status (a labels() lookup costs more than the inc)."""
    return PROXY_REQUESTS.labels("http", str(status) if status else "aborted")


_REQUEST_SECONDS = PROXY_REQUEST_SECONDS.labels("http")


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
        principals: PrincipalValidator | None = None,
    ) -> None:
        super().__init__(router, authenticator, settings=settings, drain=drain)
        self.audit = audit if audit is not None else CloudAudit()
        # without one, every principal header is refused: never forwarded unvalidated
        self.principals = principals if principals is not None else PrincipalValidator()

    async def _handle(self, sock: trio.SocketStream) -> None:
        connection = _ProxyConnection(self, sock)
        try:
            await connection.serve()
        except Exception:
            log.exception("HTTP proxy connection from %s failed", connection.peer)
        finally:
            await connection.close()


class _ProxyConnection:
    proxy_only = PROXY_ONLY  # headers of the proxy's own, never forwarded (connector.cloud.exchange)

    def __init__(self, proxy: HttpProxy, sock: trio.SocketStream) -> None:
        self.proxy = proxy
        self.settings = proxy.settings
        self.sock = sock
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes)
        # responses for the application: a head, its body and its end leave in one write
        self.out = Outbox(self.conn, self._send_client, (trio.BrokenResourceError, trio.ClosedResourceError),
                          lambda _exc: ClientGone())
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
            raise ClientGone() from exc

    async def _send_client(self, data: bytearray) -> None:
        """Write to the application; one it does not take within response_write_timeout raises
        `ResponseNotRead` (the socket buffers are full: it does not read)."""
        with trio.move_on_after(self.settings.response_write_timeout):
            await self.sock.send_all(data)
            return
        raise ResponseNotRead()

    async def _next_client_event(self, body_rate: RateBudget | None = None) -> h11.Event:
        """The application's next event; with `body_rate` (reading a body), `TooSlow` once the
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
                raise TooSlow("request_body_too_slow", "the request body arrived too slowly") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone() from exc
            self.conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like

    async def _next_request_head(self) -> h11.Event | None:
        """The application's next request head (or ConnectionClosed); None once idle_timeout passed
        without a byte of it.

        Once a byte of the head is there, the whole head must follow within request_head_timeout
        (`TooSlow` otherwise).
        """
        settings = self.settings
        idle_deadline = trio.current_time() + settings.idle_timeout
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
                raise TooSlow("request_head_timeout", "the request head did not arrive in time")
            # no byte of a next request yet: a draining replica closes the connection here
            with self.proxy.drain.while_idle(), trio.move_on_at(idle_deadline):
                self.conn.receive_data(await self._receive_client())
                continue
            return None  # idle for idle_timeout, or the replica drains

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
                event = await self._next_request_head()
            except h11.RemoteProtocolError as exc:
                await self._reject_malformed(exc)
                return
            except TooSlow as exc:
                PROXY_REQUESTS.labels("http", "408").inc()
                try:
                    await self._refuse(408, exc.reason, exc.message, close=True)
                    await self._linger()
                except ClientGone:
                    pass
                return
            except ClientGone:
                return
            if event is None or isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return
            try:
                await self._handle_request(event)
            except ResponseNotRead:
                log.info("HTTP proxy: response to %s aborted: a write was not taken within %g s",
                         self.peer, self.settings.response_write_timeout)
                self._audit("response_not_read", None)
                return
            except ClientGone:
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
        except ClientGone:
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
        with trio.CancelScope(shield=True):
            await self.sock.aclose()

    # --- one request ------------------------------------------------------------------------
    async def _handle_request(self, request: h11.Request) -> None:
        started = trio.current_time()
        status = await self._proxy_request(request)
        _requests_counter(status).inc()
        # for a WebSocket this is the time to its 101, not the life of the connection
        _REQUEST_SECONDS.observe(trio.current_time() - started)

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
        try:
            principal = await self.proxy.principals.principal(subaccount, headers)
        except JwtError as exc:
            log.info("HTTP proxy: principal token of %s refused (%s): %s", self.peer, exc.reason, exc)
            return await self._refuse(
                401, "invalid_principal_token", "the token in SAP-Connectivity-Authentication was not accepted",
                extra=[(b"www-authenticate", b'Bearer error="invalid_token"')])

        websocket = is_websocket_upgrade(request)
        head = RequestHead(request.method, origin_target, forwarded_headers(headers, host, port, websocket=websocket),
                           principal)
        bodyless = self._request_is_bodyless(headers)
        if bodyless:
            end = self.conn.next_event()  # no I/O: h11 ends a zero-length body at once
            assert isinstance(end, h11.EndOfMessage), end
        exchange = ProxyExchange(self, subaccount, location_id, Target(host, port, StreamProtocol.HTTP), head,
                                 bodyless=bodyless, websocket=websocket)
        return await exchange.run()

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
