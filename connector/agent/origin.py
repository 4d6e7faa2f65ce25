"""Connections from the node to internal hosts: dialling (TCP, TLS verified) and the HTTP pool.

`open_backend` dials one mapping's internal host within `connect_timeout`, and for HTTPS and
TCP-TLS mappings verifies its certificate (trust store per mapping, reloaded when the file
changes); failures are `BackendError`s whose `message` is for the node only.

`OriginPool` keeps idle HTTP/1.1 connections per mapping, independent of tunnel streams: every
exchange stream takes a connection for one request and gives it back when both sides of h11 are
done, so an application's kept-alive connection costs the node nothing between requests. The pool
is bounded per mapping (`max_idle`; one more given back is closed) and in time (`idle_seconds`:
older ones are closed on the next take and by `run()`'s sweep). A connection taken from the pool
is first checked without waiting: readable means the internal host closed it (or sent bytes
nobody asked for), and it is dropped. One the internal host closes while a request is on its way
is the caller's to retry (`OriginConnection.reused` tells it may).
"""

from __future__ import annotations

import collections
import logging
import select
import ssl

import attrs
import h11
import trio

from connector import metrics
from connector.agent.acl import Mapping
from connector.agent.identity import ClusterSecrets, IdentityError, backend_context
from connector.tunnel.types import ErrorCode

log = logging.getLogger(__name__)


class BackendError(Exception):
    """The internal host could not be reached; `code` for a reset, `reason` a metrics label,
    `message` the detail for the node's log and audit line (never sent to the cloud)."""

    def __init__(self, code: ErrorCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


async def open_backend(mapping: Mapping, connect_timeout: float, secrets: ClusterSecrets | None = None, *,
                       context: ssl.SSLContext | None = None) -> trio.abc.Stream:
    """Connect (and for HTTPS/TCP-TLS verify TLS, presenting the mapping's client identity, from
    `secrets` if it names one) to the internal host; raise BackendError. `context`: the TLS client
    context to use instead of the mapping's (a user's certificate: connector.agent.principal)."""
    host, port = mapping.internal_host, mapping.internal_port
    tcp: trio.SocketStream | None = None
    try:
        with trio.fail_after(connect_timeout):
            tcp = await trio.open_tcp_stream(host, port)
            if not mapping.protocol.uses_tls:
                return tcp
            try:
                context = context or backend_context(mapping, secrets)
            except IdentityError as exc:
                raise BackendError(ErrorCode.BACKEND_TLS_ERROR, "tls_error", str(exc)) from None
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
            ErrorCode.CONNECT_TIMEOUT, "connect_timeout", f"{host}:{port} did not answer within {connect_timeout} s",
        ) from None
    except BackendError:
        if tcp is not None:
            await trio.aclose_forcefully(tcp)
        raise
    except OSError as exc:
        if tcp is not None:
            await trio.aclose_forcefully(tcp)
        raise BackendError(ErrorCode.CONNECT_FAILED, "connect_failed", f"{host}:{port} unreachable: {exc}") from None


@attrs.frozen
class PoolSettings:
    max_idle: int = 32  # idle connections kept per mapping
    idle_seconds: float = 30.0  # an idle connection older than this is closed


@attrs.define(eq=False)
class OriginConnection:
    """One connection to an internal host with its h11 client state."""

    stream: trio.abc.Stream
    conn: h11.Connection
    mapping: Mapping
    reused: bool = False  # taken from the pool: the internal host may have closed it meanwhile
    idle_since: float = 0.0
    pooled: bool = True  # False: presents a user's certificate; closed after its one request


def _fileno(stream: trio.abc.Stream) -> int | None:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None


def _still_open(stream: trio.abc.Stream) -> bool:
    """Without waiting: False if the internal host closed the connection or sent unasked bytes
    (an idle HTTP connection has nothing to read; for TLS, a close_notify is something)."""
    fd = _fileno(stream)
    if fd is None or fd < 0:
        return fd is None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not poller.poll(0)


class OriginPool:
    """Idle HTTP connections to internal hosts, per mapping; see the module docstring."""

    def __init__(self, settings: PoolSettings = PoolSettings(), secrets: ClusterSecrets | None = None) -> None:
        self.settings = settings
        self.secrets = secrets  # client identities of mappings that name a cluster secret
        self._idle: dict[Mapping, collections.deque[OriginConnection]] = {}
        self._changed = trio.Event()

    def idle_count(self, mapping: Mapping | None = None) -> int:
        if mapping is not None:
            return len(self._idle.get(mapping, ()))
        return sum(map(len, self._idle.values()))

    async def take(self, mapping: Mapping, connect_timeout: float, *, max_header_bytes: int,
                   context: ssl.SSLContext | None = None) -> OriginConnection:
        """An idle connection of `mapping`'s, or a new one (BackendError if it cannot be made).
        With `context` (a user's client certificate: `connector.agent.principal`) always a new
        one, never pooled: another user's request must not ride on this user's logon."""
        if context is not None:
            stream = await open_backend(mapping, connect_timeout, context=context)
            metrics.child(metrics.ORIGIN_CONNECTIONS, mapping.name, "new").inc()
            return OriginConnection(stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes),
                                    mapping, pooled=False)
        idle = self._idle.get(mapping)
        now = trio.current_time()
        while idle:
            origin = idle.pop()  # the most recently used: the likeliest to be open still
            self._export(mapping)
            if now - origin.idle_since >= self.settings.idle_seconds:
                metrics.child(metrics.ORIGIN_CONNECTIONS, mapping.name, "expired").inc()
                await trio.aclose_forcefully(origin.stream)
                continue
            if not _still_open(origin.stream):
                metrics.child(metrics.ORIGIN_CONNECTIONS, mapping.name, "closed_by_origin").inc()
                await trio.aclose_forcefully(origin.stream)
                continue
            metrics.child(metrics.ORIGIN_CONNECTIONS, mapping.name, "reused").inc()
            await trio.lowlevel.checkpoint_if_cancelled()
            return origin
        stream = await open_backend(mapping, connect_timeout, self.secrets)
        metrics.child(metrics.ORIGIN_CONNECTIONS, mapping.name, "new").inc()
        return OriginConnection(stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes),
                                mapping)

    async def give_back(self, origin: OriginConnection) -> None:
        """Keep `origin` for the next request if h11 says both sides may go on, else close it."""
        conn = origin.conn
        leftover, closed = conn.trailing_data
        if not origin.pooled or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE or leftover or closed:
            # mid-message, or the internal host closed (a body ended by the close: h11 says DONE
            # until it is asked once more) or sent bytes nobody asked for
            await trio.aclose_forcefully(origin.stream)
            return
        conn.start_next_cycle()
        idle = self._idle.setdefault(origin.mapping, collections.deque())
        if len(idle) >= self.settings.max_idle:
            metrics.child(metrics.ORIGIN_CONNECTIONS, origin.mapping.name, "pool_full").inc()
            await trio.aclose_forcefully(origin.stream)
            return
        origin.reused = True
        origin.idle_since = trio.current_time()
        idle.append(origin)
        self._export(origin.mapping)
        self._changed.set()
        await trio.lowlevel.checkpoint_if_cancelled()

    def _export(self, mapping: Mapping) -> None:
        metrics.child(metrics.ORIGIN_IDLE, mapping.name).set(len(self._idle.get(mapping, ())))

    async def run(self) -> None:
        """Close idle connections once they are older than `idle_seconds` (runs for ever)."""
        while True:
            oldest = min((idle[0].idle_since for idle in self._idle.values() if idle), default=None)
            if oldest is None:
                self._changed = trio.Event()
                await self._changed.wait()
                continue
            await trio.sleep_until(oldest + self.settings.idle_seconds)
            await self._sweep()

    async def _sweep(self) -> None:
        now = trio.current_time()
        expired = []
        for mapping, idle in list(self._idle.items()):
            while idle and now - idle[0].idle_since >= self.settings.idle_seconds:
                expired.append(idle.popleft())
                metrics.child(metrics.ORIGIN_CONNECTIONS, mapping.name, "expired").inc()
            self._export(mapping)  # before the closes yield: the gauge never counts a closed one
            if not idle:
                del self._idle[mapping]
        for origin in expired:
            await trio.aclose_forcefully(origin.stream)

    async def aclose(self) -> None:
        """Close every idle connection."""
        for mapping, idle in list(self._idle.items()):
            while idle:
                await trio.aclose_forcefully(idle.popleft().stream)
            self._export(mapping)
        self._idle.clear()
