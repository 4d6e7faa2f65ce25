"""The trio runner of the tunnel protocol over one trio-websocket connection.

Theory of operation
-------------------
`connector.tunnel.protocol.Connection` owns every protocol rule; this module only moves bytes
and wakes tasks. Three tasks run inside `run()`:

* the **reader** takes websocket messages, feeds them to the Connection and dispatches each
  event through the `{EventType: handler}` table in `_handlers`. It never blocks on writing, so
  a peer that stops reading cannot wedge it. `control_handler` is awaited here, in order.
* the **writer** owns the websocket's send side (`connector.tunnel.outgoing`): everybody else
  queues whole encoded frames, control frames ahead of stream data, and the writer sends what
  gathered as one message; senders wait while the queue is over its high-water mark.
* the **keepalive** (`connector.tunnel.keepalive`) sends PING every `ping_interval`; a PING not
  answered by PONG within `ping_timeout` closes the tunnel with reason "ping timeout".

Memory is bounded twice. Per stream, the protocol's credit: a `SessionStream` never holds more
than `initial_window` unread bytes, and `send_all` waits for credit, which the receiving end
grants back (WINDOW_UPDATE) once its application has consumed half a window. Per tunnel,
`send_all` and `send_control` wait while the outgoing queue holds more than `_HIGH_WATER`
bytes, so a slow websocket pushes back on writers instead of buffering. A slow reader on one
stream therefore stalls only that stream.

When the tunnel ends (GOAWAY either way, websocket closed, ping timeout, protocol error) every
open stream fails with `StreamResetError(TUNNEL_LOST)` (a stream whose peer had already sent
FIN still reads out what arrived, then EOF), handler tasks are cancelled and `run()` returns.

Performance: create the websocket with `receive_buffer_size=262144` on both ends
(`trio_websocket.open_websocket(..., receive_buffer_size=262144)` /
`serve_websocket(..., receive_buffer_size=262144)`): with trio-websocket's 4 KiB default the
tunnel runs at about half speed. Keep `max_message_size` at its 1 MiB default or above: the
writer's messages are `_MESSAGE_TARGET` plus at most one encoded write (`_SEND_CHUNK` and its
frame headers), so under about 260 KiB.

Bounds and why (measured with benchmarks/run.py): a websocket message is delivered only once
it arrived whole, so a stream can have at most `initial_window / message size` messages in
flight. With 256 KiB messages and a 256 KiB window the tunnel was stop-and-wait (46 MB/s);
64 to 128 KiB messages and a 768 KiB window (6 to 12 messages in flight) more than doubled
throughput; 128 KiB costs a little less CPU per byte. So the default per-stream window,
which is also the bound of a stream's receive buffer, is 768 KiB:
a tunnel buffers at most `max_streams * initial_window` (768 MiB at 1024 streams, reached only
if every stream has a reader that stopped; idle streams hold nothing). 768 KiB also keeps a
window's worth of frames below trio-websocket's 1 MiB default message limit.

The tunnel's websocket frames its data messages itself (one copy, all-zero masking key from
the node; see `connector.tunnel.wsfast` for why that is safe inside mutually authenticated TLS).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import attrs
import trio
import trio_websocket
from trio.lowlevel import ParkingLot

from connector import metrics
from connector.tunnel import protocol as p
from connector.tunnel import wsfast
from connector.tunnel.keepalive import Keepalive
from connector.tunnel.outgoing import Outgoing
from connector.tunnel.sessionstream import SessionStream
from connector.tunnel.types import ErrorCode, StreamProtocol, StreamResetError, Target

log = logging.getLogger(__name__)


_MESSAGE_TARGET = 128 * 1024  # the writer gathers frames up to this much per message (see above)
_HIGH_WATER = 512 * 1024  # writers wait while the outgoing queue holds more than this

StreamHandler = Callable[["SessionStream"], Awaitable[None]]
ControlHandler = Callable[[str, dict[str, Any]], Awaitable[None]]


@attrs.frozen
class TunnelSettings:
    max_frame_size: int = 64 * 1024
    initial_window: int = 768 * 1024  # per-stream credit = per-stream receive buffer bound
    ping_interval: float = 1.0
    ping_timeout: float = 3.0
    max_streams: int = 1024  # streams the peer may have open at once (extension of the contract)
    versions: tuple[int, ...] = p.PROTOCOL_VERSIONS  # protocol versions offered / accepted
    hello_timeout: float | None = None  # deadline of the HELLO exchange; None: ping_timeout


class TunnelError(Exception):
    """The handshake failed or the tunnel is closed; `.code` and `.reason` say why."""

    def __init__(self, code: ErrorCode, reason: str = "") -> None:
        super().__init__(f"{code.name}: {reason}" if reason else code.name)
        self.code = code
        self.reason = reason


@attrs.frozen
class SessionStatistics:
    streams_open: int
    streams_opened: int
    bytes_sent: int  # websocket payload bytes (frames), both directions below
    bytes_received: int
    last_rtt: float | None


class TunnelSession:
    """One tunnel over one websocket: `handshake()`, then `run()`; see the module docstring.

    The cloud side (websocket server, `client=False`) opens streams; the node (client) accepts.
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection, *, client: bool,
                 settings: TunnelSettings = TunnelSettings(),
                 hello_info: dict[str, Any] | None = None) -> None:
        self._ws = ws
        wsfast.fast_framing(ws)
        wsfast.greedy_tls_receive(ws)
        self.client = client
        self.settings = settings
        self._hello_info = dict(hello_info or {})
        self._conn = p.Connection(client, max_frame_size=settings.max_frame_size,
                                  initial_window=settings.initial_window,
                                  max_streams=settings.max_streams, versions=settings.versions)
        self._grant_threshold = max(1, settings.initial_window // 2)
        self.closed = False
        self.close_reason: tuple[ErrorCode, str] | None = None
        self.peer_info: dict[str, Any] | None = None
        self._closing = False  # GOAWAY queued or tunnel dead: no more frames
        self._closed_event = trio.Event()
        self._running = False
        self._streams: dict[int, SessionStream] = {}
        self._out = Outgoing(self._send_message, message_target=_MESSAGE_TARGET, high_water=_HIGH_WATER)
        self._streams_lot = ParkingLot()  # open_stream / wait_no_streams wait here
        self._stream_handler: StreamHandler | None = None
        self._control_handler: ControlHandler | None = None
        self._handler_nursery: trio.Nursery | None = None
        self._bytes_received = 0
        self._streams_opened = 0
        self._last_processed = 0  # highest stream id of the peer's handed to the stream handler
        side = "node" if client else "cloud"
        self._side = side
        self._keepalive = Keepalive(interval=settings.ping_interval, timeout=settings.ping_timeout,
                                    send_ping=lambda payload: self._send(p.Ping(payload), urgent=True),
                                    on_timeout=lambda: self._mark_closed(ErrorCode.TUNNEL_LOST, "ping timeout"),
                                    rtt_metric=metrics.TUNNEL_PING_RTT.labels(side))
        self._open_metric = metrics.STREAMS_OPEN.labels(side)
        self._opened_metrics = {protocol: metrics.STREAMS_OPENED.labels(side, str(protocol))
                                for protocol in StreamProtocol}  # a labels() lookup per stream costs
        self._handlers: dict[type[p.Event], Callable[[Any], Awaitable[None]]] = {
            p.OpenStream: self._on_open,
            p.AcceptStream: self._on_accept,
            p.Data: self._on_data,
            p.Headers: self._on_headers,
            p.ResetStream: self._on_reset,
            p.WindowUpdate: self._on_window_update,
            p.Ping: self._on_ping,
            p.Pong: self._on_pong,
            p.GoAway: self._on_goaway,
            p.Control: self._on_control,
            p.Hello: self._on_unexpected,
            p.ConnectionClosed: self._on_unexpected,
        }

    # --- handshake ---------------------------------------------------------------------------

    async def handshake(self) -> dict[str, Any]:
        """Exchange HELLO (the client speaks first); return the peer's info dict.

        Raises TunnelError if versions do not match, the peer refuses, breaks the protocol,
        closes, or does not answer within `hello_timeout` (default: `ping_timeout`).
        """
        timeout = self.settings.ping_timeout if self.settings.hello_timeout is None else self.settings.hello_timeout
        try:
            with trio.fail_after(timeout):
                if self.client:
                    await self._send_now(self._conn.make_hello(self._hello_info))
                hello = await self._receive_hello()
                if not self.client:
                    await self._send_now(self._conn.make_hello(self._hello_info))
        except trio.TooSlowError:
            await self._fail_handshake(ErrorCode.TUNNEL_LOST, "handshake timeout", goaway=False)
        except trio_websocket.ConnectionClosed as exc:
            await self._fail_handshake(
                ErrorCode.TUNNEL_LOST, f"websocket closed during handshake: {exc.reason}",
                goaway=False)
        self.peer_info = hello.info
        return hello.info

    async def _send_now(self, event: p.Event) -> None:
        data = self._conn.send(event)
        await self._ws.send_message(data)
        self._out.sent += len(data)

    async def _receive_hello(self) -> p.Hello:
        while True:
            try:
                event = self._conn.next_event()
            except p.RemoteProtocolError as exc:
                await self._fail_handshake(exc.code, str(exc), goaway=True)
            if isinstance(event, p.Hello):
                return event
            if isinstance(event, p.GoAway):
                await self._fail_handshake(event.code, event.reason, goaway=False)
            if event is not p.NEED_DATA:
                await self._fail_handshake(ErrorCode.PROTOCOL_ERROR,
                                           f"unexpected {type(event).__name__} in handshake",
                                           goaway=True)
            message = await self._ws.get_message()
            if isinstance(message, str):
                await self._fail_handshake(ErrorCode.PROTOCOL_ERROR, "text websocket message",
                                           goaway=True)
            self._bytes_received += len(message)
            self._conn.receive_data(message)

    async def _fail_handshake(self, code: ErrorCode, reason: str, *, goaway: bool) -> NoReturn:
        if goaway:
            with trio.move_on_after(self.settings.ping_timeout):
                try:
                    await self._send_now(p.GoAway(code, reason))
                except (trio_websocket.ConnectionClosed, p.LocalProtocolError):
                    pass
        self._mark_closed(code, reason)
        await self._close_ws(graceful=goaway)
        raise TunnelError(code, reason)

    # --- running -------------------------------------------------------------------------------

    async def run(self, *, stream_handler: StreamHandler | None = None,
                  control_handler: ControlHandler | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run reader, writer and keepalive until the tunnel closes; see the module docstring."""
        if not self._conn.handshake_complete:
            raise RuntimeError("handshake() must complete before run()")
        if self._running:
            raise RuntimeError("run() is already running")
        self._running = True
        self._stream_handler = stream_handler
        self._control_handler = control_handler
        try:
            async with trio.open_nursery() as nursery:
                self._handler_nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive.run)
                nursery.start_soon(self._reader)
                task_status.started()
                await self._closed_event.wait()
                nursery.cancel_scope.cancel()
        finally:
            # a dead peer (ping timeout) or an outside cancel gets no close handshake
            graceful = self.close_reason is not None and self.close_reason[1] != "ping timeout"
            self._mark_closed(ErrorCode.TUNNEL_LOST, "tunnel session cancelled")
            with trio.CancelScope(shield=True):
                await self._close_ws(graceful=graceful)

    async def _reader(self) -> None:
        conn, handlers, ws = self._conn, self._handlers, self._ws
        try:
            while True:
                for event in conn.events():
                    await handlers[type(event)](event)
                    if self._closing:
                        return
                message = await ws.get_message()
                if isinstance(message, str):
                    raise p.RemoteProtocolError("text websocket message")
                self._bytes_received += len(message)
                conn.receive_data(message)
        except trio_websocket.ConnectionClosed as exc:
            self._mark_closed(ErrorCode.TUNNEL_LOST, f"websocket closed: {exc.reason}")
        except p.RemoteProtocolError as exc:
            log.warning("tunnel peer broke the protocol: %s", exc)
            await self.aclose(exc.code, str(exc))

    async def _send_message(self, message: bytes) -> None:
        await self._ws.send_message(message)

    async def _writer(self) -> None:
        try:
            await self._out.run()
        except trio_websocket.ConnectionClosed as exc:
            self._mark_closed(ErrorCode.TUNNEL_LOST, f"websocket closed: {exc.reason}")

    # --- frames out ----------------------------------------------------------------------------

    def _send(self, event: p.Event, *, urgent: bool = False) -> bool:
        """Queue an event for the writer; False (nothing queued) once the tunnel is closing."""
        if self._closing:
            return False
        data = self._conn.send(event)
        if data:
            self._out.put(data, urgent=urgent)
        return True

    async def _wait_writable(self) -> None:
        """Back-pressure: wait while the outgoing queue is over its high-water mark."""
        if self._closing:
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        await self._out.wait_writable()

    # --- events in -----------------------------------------------------------------------------

    async def _on_open(self, event: p.OpenStream) -> None:
        assert self._conn.peer_hello is not None
        if self._closing:
            return  # our GOAWAY told the peer we process nothing above _last_processed
        stream = self._register(event.stream_id, event.target, opener=False)
        if self._stream_handler is None or self._handler_nursery is None:
            await stream.reset(ErrorCode.REFUSED, "this end accepts no streams")
            return
        self._last_processed = event.stream_id
        self._handler_nursery.start_soon(self._run_stream_handler, self._stream_handler, stream)

    async def _run_stream_handler(self, handler: StreamHandler, stream: SessionStream) -> None:
        try:
            await handler(stream)
        except (StreamResetError, trio.ClosedResourceError) as exc:
            log.debug("stream %d to %s ended: %r", stream.stream_id, stream.target, exc)
            await stream.reset(ErrorCode.CANCEL, "stream handler stopped")
        except Exception:
            log.exception("stream handler failed for %s", stream.target)
            await stream.reset(ErrorCode.INTERNAL_ERROR, "stream handler failed")
        else:
            await stream.aclose()

    async def _on_accept(self, event: p.AcceptStream) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._accepted = True
            stream.peer_started = True
            stream._wake()

    async def _on_data(self, event: p.Data) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.peer_started = True
            stream._on_data(event.data, event.end_stream)
            if event.end_stream:
                self._forget_if_closed(stream)

    async def _on_headers(self, event: p.Headers) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._on_head(event.head, event.end_stream)
            if event.end_stream:
                self._forget_if_closed(stream)

    async def _on_reset(self, event: p.ResetStream) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._on_reset(event.code, event.reason)
            self._forget_if_closed(stream)

    async def _on_window_update(self, event: p.WindowUpdate) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.peer_started = True
            stream._wake()

    async def _on_ping(self, event: p.Ping) -> None:
        self._send(p.Pong(event.payload), urgent=True)

    async def _on_pong(self, event: p.Pong) -> None:
        self._keepalive.pong(event.payload)

    async def _on_goaway(self, event: p.GoAway) -> None:
        last = event.last_stream_id
        if last is not None:
            # streams we opened above `last` were provably never processed: say so (REFUSED),
            # so that their openers may replay them elsewhere
            for stream in list(self._streams.values()):
                if stream.opener and stream.stream_id > last:
                    stream._on_reset(ErrorCode.REFUSED, f"the peer went away before it processed the stream "
                                                        f"({event.code.name}: {event.reason})")
        self._mark_closed(event.code, event.reason)

    async def _on_control(self, event: p.Control) -> None:
        if self._control_handler is not None:
            await self._control_handler(event.op, event.body)

    async def _on_unexpected(self, event: p.Event) -> None:
        raise p.RemoteProtocolError(f"unexpected {type(event).__name__}")

    # --- streams -------------------------------------------------------------------------------

    def _register(self, stream_id: int, target: Target, *, opener: bool) -> SessionStream:
        assert self._conn.peer_hello is not None
        stream = SessionStream(self, stream_id, target, opener=opener,
                               peer_window=self._conn.peer_hello.initial_window)
        self._streams[stream_id] = stream
        self._streams_opened += 1
        self._open_metric.inc()
        self._opened_metrics[target.protocol].inc()
        return stream

    def _forget_if_closed(self, stream: SessionStream) -> None:
        if (not self._conn.stream_is_open(stream.stream_id)
                and self._streams.pop(stream.stream_id, None) is not None):
            self._open_metric.dec()
            self._streams_lot.unpark_all()

    async def open_stream(self, target: Target) -> SessionStream:
        """Open a stream to `target`; waits while the peer's max_streams are in use.

        Raises TunnelError if the tunnel is closed, ValueError for an unusable target.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                return self.open_stream_nowait(target)
            except trio.WouldBlock:
                await self._streams_lot.park()

    def open_stream_nowait(self, target: Target) -> SessionStream:
        """`open_stream` without waiting: raises trio.WouldBlock while the peer's max_streams
        are in use (so a caller can put its own deadline over the wait, or avoid one)."""
        if not self._conn.handshake_complete and not self._closing:
            raise RuntimeError("handshake() must complete before open_stream()")
        if self._closing:
            raise self._tunnel_error()
        if self._conn.local_streams_open >= self._conn.peer_max_streams:
            raise trio.WouldBlock
        stream_id = self._conn.next_stream_id()
        try:
            self._send(p.OpenStream(stream_id, target))
        except p.LocalProtocolError as exc:
            raise ValueError(str(exc)) from None
        return self._register(stream_id, target, opener=True)

    async def send_control(self, op: str, body: dict[str, Any]) -> None:
        """Send a CONTROL message; the peer's control_handler sees them in order.

        Raises TunnelError if the tunnel is closed, ValueError if `body` is not JSON-able.
        """
        if not self._conn.handshake_complete and not self._closing:
            raise RuntimeError("handshake() must complete before send_control()")
        await self._wait_writable()
        if self._closing:
            raise self._tunnel_error()
        try:
            self._send(p.Control(op, body))
        except p.LocalProtocolError as exc:
            raise ValueError(str(exc)) from None

    def _tunnel_error(self) -> TunnelError:
        code, reason = self.close_reason or (ErrorCode.GOING_AWAY, "tunnel is closing")
        return TunnelError(code, reason)

    # --- closing -------------------------------------------------------------------------------

    async def aclose(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY(code, reason), fail open streams with TUNNEL_LOST, close the websocket."""
        if not self._closing and self._conn.handshake_complete:
            self._fail_streams(reason or code.name)
            data = self._conn.send(p.GoAway(code, reason, self._last_processed))
            self._closing = True
            if self._running:
                self._out.put(data)
                with trio.move_on_after(self.settings.ping_timeout):
                    await self._out.wait_flushed()
            else:
                with trio.move_on_after(self.settings.ping_timeout):
                    try:
                        await self._ws.send_message(data)
                    except trio_websocket.ConnectionClosed:
                        pass
        self._mark_closed(code, reason)
        await self._close_ws(graceful=True)

    def _fail_streams(self, reason: str) -> None:
        for stream in list(self._streams.values()):
            stream._on_reset(ErrorCode.TUNNEL_LOST, reason)
        self._open_metric.dec(len(self._streams))
        self._streams.clear()
        self._streams_lot.unpark_all()

    def _mark_closed(self, code: ErrorCode, reason: str) -> None:
        if self.closed:
            return
        log.info("tunnel closed: %s %s", code.name, reason)
        self.closed = True
        self._closing = True
        self.close_reason = (code, reason)
        self._fail_streams(reason or code.name)
        self._out.close()
        self._closed_event.set()

    async def _close_ws(self, *, graceful: bool) -> None:
        # trio-websocket's aclose() waits for the peer's close frame; when cancelled it closes
        # the transport anyway, which is how a dead peer is dropped without waiting.
        with trio.move_on_after(self.settings.ping_timeout if graceful else 0):
            await self._ws.aclose()

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    async def wait_no_streams(self) -> None:
        """Return once no stream is open (at once if the tunnel is closed): graceful drain."""
        while self._streams:
            await self._streams_lot.park()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(len(self._streams), self._streams_opened, self._out.sent,
                                 self._bytes_received, self._keepalive.last_rtt)
