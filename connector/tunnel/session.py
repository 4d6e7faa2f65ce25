"""The trio runner of the tunnel protocol over one trio-websocket connection.

Theory of operation
-------------------
`connector.tunnel.protocol.Connection` owns every protocol rule; this module only moves bytes
and wakes tasks. Three tasks run inside `run()`:

* the **reader** takes websocket messages, feeds them to the Connection and dispatches each
  event through the `{EventType: handler}` table in `_handlers`. It never blocks on writing, so
  a peer that stops reading cannot wedge it. `control_handler` is awaited here, in order.
* the **writer** owns the websocket's send side. Everybody else appends encoded frames to an
  outgoing queue (PING/PONG/WINDOW_UPDATE to a small urgent queue that jumps ahead, since
  they carry no ordering with stream data) and the writer sends whatever has gathered as one
  binary message of up to `_MESSAGE_TARGET` bytes: small writes coalesce for free while a
  large one is in flight, and frames from different streams never interleave badly because a
  frame is only ever appended whole.
* the **keepalive** sends PING every `ping_interval`; a PING not answered by PONG within
  `ping_timeout` closes the tunnel with reason "ping timeout". Only PONG counts as an answer:
  a peer whose reader is stuck can still send (its own pings), but cannot answer ours.

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

import collections
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, cast

import attrs
import trio
import trio_websocket
from trio.lowlevel import ParkingLot

from connector import metrics
from connector.tunnel import protocol as p
from connector.tunnel import wsfast
from connector.tunnel.heads import Head, Trailers
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, StreamResetError, Target

log = logging.getLogger(__name__)


_MESSAGE_TARGET = 128 * 1024  # the writer gathers frames up to this much per message (see above)
_SEND_CHUNK = 128 * 1024  # send_all hands the protocol at most this much at a time
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


@attrs.frozen
class StreamStatistics:
    """Flow-control view of one stream; the maxima show the window bound held."""

    buffered: int  # received, not yet read by the application
    max_buffered: int
    unacknowledged: int  # sent, not yet credited back by the peer
    max_unacknowledged: int


class SessionStream(TunnelStream):
    """One stream of a `TunnelSession`; see `TunnelStream` for the contract."""

    def __init__(self, session: TunnelSession, stream_id: int, target: Target, *,
                 opener: bool, peer_window: int) -> None:
        self.stream_id = stream_id
        self.target = target
        self.opener = opener
        self.session = session  # the tunnel it runs in (the router avoids a refusing one)
        self._session = session
        self._conn = session._conn
        self._peer_window = peer_window
        self._chunks: collections.deque[bytes] = collections.deque()
        self._heads: collections.deque[Head] = collections.deque()
        self.trailers: list[tuple[bytes, bytes]] | None = None  # the peer's, once its message ended
        self.peer_started = False  # the peer sent a frame on this stream: it is processing it
        self._buffered = 0
        self._max_buffered = 0
        self._max_unacked = 0
        self._consumed = 0  # read since the last WINDOW_UPDATE
        self._eof_received = False
        self._eof_sent = False
        self._closed = False  # aclose() was called
        self._accepted = False
        self._read_error: StreamResetError | None = None
        self._write_error: StreamResetError | None = None
        self._receiving = False
        self._sending = False
        self._lot = ParkingLot()  # any change: data, credit, accept, reset, close
        self._reset_event = trio.Event()
        self._reset_callbacks: list[Callable[[], object]] = []

    # --- called by the session (reader task) --------------------------------------------------

    def _on_data(self, data: bytes, end_stream: bool) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > self._max_buffered:
                self._max_buffered = self._buffered
        if end_stream:
            self._eof_received = True
        self._lot.unpark_all()

    def _on_head(self, head: Head, end_stream: bool) -> None:
        self.peer_started = True
        if isinstance(head, Trailers):
            self.trailers = head.headers
        else:
            self._heads.append(head)
        if end_stream:
            self._eof_received = True
        self._lot.unpark_all()

    def _on_reset(self, code: ErrorCode, reason: str) -> None:
        """The peer reset the stream, or the tunnel died: fail I/O, but keep a finished read."""
        error = StreamResetError(code, reason)
        if self._write_error is None:
            self._write_error = error
        if self._read_error is None and not self._eof_received:
            self._read_error = error
            self._chunks.clear()
            self._buffered = 0
        self._reset_event.set()
        self._lot.unpark_all()
        callbacks, self._reset_callbacks = self._reset_callbacks, []
        for callback in callbacks:
            callback()

    def on_reset(self, callback: Callable[[], object]) -> None:
        if self._reset_event.is_set():
            callback()
        else:
            self._reset_callbacks.append(callback)

    def _wake(self) -> None:
        self._lot.unpark_all()

    async def wait_reset(self) -> None:
        await self._reset_event.wait()

    # --- application side -----------------------------------------------------------------------

    def statistics(self) -> StreamStatistics:
        return StreamStatistics(self._buffered, self._max_buffered, self._unacknowledged(),
                                self._max_unacked)

    def _unacknowledged(self) -> int:
        if not self._conn.stream_is_open(self.stream_id) or self._eof_sent:
            return 0
        return max(0, self._peer_window - self._conn.send_window(self.stream_id))

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._write_error is not None:
            raise StreamResetError(self._write_error.code, self._write_error.reason)
        if self._eof_sent:
            raise trio.ClosedResourceError("send after send_eof")

    def _lost(self) -> StreamResetError:
        code, reason = self._session.close_reason or (ErrorCode.TUNNEL_LOST, "tunnel closing")
        self._on_reset(ErrorCode.TUNNEL_LOST, reason or code.name)
        assert self._write_error is not None
        return StreamResetError(self._write_error.code, self._write_error.reason)

    async def send_head(self, head: Head, *, end_stream: bool = False) -> None:
        """Send an HTTP head (exchange streams); `end_stream`: no body follows (FIN)."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check_send()
        await self._session._wait_writable()
        self._check_send()
        try:
            queued = self._session._send(p.Headers(self.stream_id, head, end_stream))
        except p.LocalProtocolError as exc:
            raise ValueError(str(exc)) from None  # nothing sent: the stream is as it was
        if end_stream:
            self._eof_sent = True
        if not queued:
            raise self._lost()
        if end_stream:
            self._session._forget_if_closed(self)

    async def receive_head(self) -> Head:
        """The peer's next head: for the acceptor the request, for the opener each 1xx and then
        the final response (or 101). Raises StreamResetError if the stream is reset first."""
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while not self._heads:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._read_error is not None:
                    raise StreamResetError(self._read_error.code, self._read_error.reason)
                if self._eof_received:
                    raise StreamResetError(ErrorCode.PROTOCOL_ERROR, "the stream ended without a head")
                await self._lot.park()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return self._heads.popleft()
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            self._check_send()
            view = memoryview(data).cast("B")
            total, pos = len(view), 0
            if not total:
                await trio.lowlevel.checkpoint()
            while pos < total:
                credit = self._conn.send_window(self.stream_id)
                if credit == 0:
                    await self._lot.park()
                    self._check_send()
                    continue
                await self._session._wait_writable()
                self._check_send()
                take = min(self._conn.send_window(self.stream_id), total - pos, _SEND_CHUNK)
                # Connection.send takes any bytes-like payload: a slice of the caller's buffer, no copy
                chunk = cast(bytes, view[pos:pos + take])
                if not self._session._send(p.Data(self.stream_id, chunk)):
                    raise self._lost()
                pos += take
                unacked = self._unacknowledged()
                if unacked > self._max_unacked:
                    self._max_unacked = unacked
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        while not self._closed and self._write_error is None and not self._eof_sent and (
                self._conn.send_window(self.stream_id) == 0):
            await self._lot.park()
        await trio.lowlevel.checkpoint()

    async def send_eof(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        """End our message (FIN); on an exchange stream with `trailers`, as a trailers head."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await trio.lowlevel.checkpoint()
        if self._eof_sent:
            return
        self._check_send()
        self._eof_sent = True
        event: p.Event = (p.Headers(self.stream_id, Trailers(trailers), end_stream=True) if trailers
                          else p.Data(self.stream_id, b"", end_stream=True))
        if not self._session._send(event):
            raise self._lost()
        self._session._forget_if_closed(self)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            # one schedule point per call, as trio's own streams: a yield when data is at hand,
            # else the wait itself (parking is a schedule point)
            if self._chunks:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            while not self._chunks:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._read_error is not None:
                    raise StreamResetError(self._read_error.code, self._read_error.reason)
                if self._eof_received:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                await self._lot.park()
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            chunks = self._chunks
            chunk = chunks[0]
            if max_bytes is None or max_bytes >= len(chunk):
                chunks.popleft()
                if chunks:  # every buffered chunk that fits: one wake-up, one socket send
                    chunk = self._take_more(chunk, max_bytes)
            else:
                chunks[0] = chunk[max_bytes:]
                chunk = chunk[:max_bytes]
            self._buffered -= len(chunk)
            self._consumed += len(chunk)
            if self._consumed >= self._session._grant_threshold and not self._eof_received:
                self._session._send(p.WindowUpdate(self.stream_id, self._consumed), urgent=True)
                self._consumed = 0
            return chunk
        finally:
            self._receiving = False

    def _take_more(self, first: bytes, max_bytes: int | None) -> bytes:
        """`first` joined with the following buffered chunks, up to `max_bytes` in all."""
        chunks = self._chunks
        parts = [first]
        room = (max_bytes if max_bytes is not None else self._buffered + len(first)) - len(first)
        while chunks and room > 0:
            chunk = chunks[0]
            if len(chunk) <= room:
                chunks.popleft()
            else:
                chunks[0] = chunk[room:]
                chunk = chunk[:room]
            parts.append(chunk)
            room -= len(chunk)
        return b"".join(parts) if len(parts) > 1 else first

    async def accept(self) -> None:
        if self.opener:
            raise RuntimeError("only the acceptor of a stream accepts it")
        await trio.lowlevel.checkpoint()
        if self._accepted:
            return
        self._check_send()
        self._accepted = True
        if not self._session._send(p.AcceptStream(self.stream_id)):
            raise self._lost()

    async def wait_accepted(self) -> None:
        if not self.opener:
            raise RuntimeError("only the opener of a stream waits for acceptance")
        await trio.lowlevel.checkpoint()
        while not self._accepted:
            if self._write_error is not None:
                raise StreamResetError(self._write_error.code, self._write_error.reason)
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            await self._lot.park()

    async def reset(self, code: ErrorCode, reason: str = "") -> None:
        await trio.lowlevel.checkpoint()
        if self._write_error is None or self._read_error is None:
            self._session._send(p.ResetStream(self.stream_id, code, reason))
            error = StreamResetError(code, reason)
            self._write_error = self._write_error or error
            self._read_error = self._read_error or error
            self._chunks.clear()
            self._buffered = 0
        self._session._forget_if_closed(self)
        self._lot.unpark_all()

    async def aclose(self) -> None:
        """Half-close our side (FIN); if the peer has not finished, reset with CANCEL after it."""
        await trio.lowlevel.checkpoint()
        if self._closed:
            return
        self._closed = True
        if self._conn.stream_is_open(self.stream_id):
            if not self._eof_sent and self._write_error is None:
                self._eof_sent = True
                self._session._send(p.Data(self.stream_id, b"", end_stream=True))
            if self._conn.stream_is_open(self.stream_id):
                self._session._send(p.ResetStream(
                    self.stream_id, ErrorCode.CANCEL, "stream closed before the peer finished"))
        self._chunks.clear()
        self._buffered = 0
        self._session._forget_if_closed(self)
        self._lot.unpark_all()


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
        self._queue: collections.deque[bytes] = collections.deque()
        self._urgent: list[bytes] = []
        self._queued = 0  # bytes in both queues
        self._writing = False
        self._writer_lot = ParkingLot()  # the writer waits here for frames
        self._drain_lot = ParkingLot()  # writers wait here for the queue to drain
        self._streams_lot = ParkingLot()  # open_stream / wait_no_streams wait here
        self._pings: dict[bytes, float] = {}
        self._ping_counter = 0
        self._stream_handler: StreamHandler | None = None
        self._control_handler: ControlHandler | None = None
        self._handler_nursery: trio.Nursery | None = None
        self._bytes_sent = 0
        self._bytes_received = 0
        self._streams_opened = 0
        self._last_processed = 0  # highest stream id of the peer's handed to the stream handler
        self._last_rtt: float | None = None
        side = "node" if client else "cloud"
        self._side = side
        self._rtt_metric = metrics.TUNNEL_PING_RTT.labels(side)
        self._open_metric = metrics.STREAMS_OPEN.labels(side)
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
        self._bytes_sent += len(data)

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
                nursery.start_soon(self._keepalive)
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

    async def _writer(self) -> None:
        ws, queue, urgent = self._ws, self._queue, self._urgent
        try:
            while True:
                while not queue and not urgent:
                    await self._writer_lot.park()
                parts: list[bytes] = urgent[:]
                urgent.clear()
                size = sum(map(len, parts))
                while queue and size < _MESSAGE_TARGET:
                    part = queue.popleft()
                    parts.append(part)
                    size += len(part)
                message = parts[0] if len(parts) == 1 else b"".join(parts)
                self._writing = True
                try:
                    await ws.send_message(message)
                finally:
                    self._writing = False
                    self._queued -= size
                self._bytes_sent += size
                self._drain_lot.unpark_all()
        except trio_websocket.ConnectionClosed as exc:
            self._mark_closed(ErrorCode.TUNNEL_LOST, f"websocket closed: {exc.reason}")

    async def _keepalive(self) -> None:
        interval, timeout = self.settings.ping_interval, self.settings.ping_timeout
        next_ping = trio.current_time() + interval
        while True:
            oldest = next(iter(self._pings.values()), None)
            deadline = next_ping if oldest is None else min(next_ping, oldest + timeout)
            await trio.sleep_until(deadline)
            now = trio.current_time()
            oldest = next(iter(self._pings.values()), None)
            if oldest is not None and now >= oldest + timeout:
                log.warning("tunnel ping timeout: no PONG within %.3f s", timeout)
                self._mark_closed(ErrorCode.TUNNEL_LOST, "ping timeout")
                return
            if now >= next_ping:
                self._ping_counter += 1
                payload = struct.pack(">Q", self._ping_counter)
                if self._send(p.Ping(payload), urgent=True):
                    self._pings[payload] = now
                next_ping = now + interval

    # --- frames out ----------------------------------------------------------------------------

    def _send(self, event: p.Event, *, urgent: bool = False) -> bool:
        """Queue an event for the writer; False (nothing queued) once the tunnel is closing."""
        if self._closing:
            return False
        data = self._conn.send(event)
        if data:
            (self._urgent.append if urgent else self._queue.append)(data)
            self._queued += len(data)
            self._writer_lot.unpark_all()
        return True

    async def _wait_writable(self) -> None:
        """Back-pressure: wait while the outgoing queue is over the high-water mark."""
        if self._queued <= _HIGH_WATER or self._closing:
            await trio.lowlevel.checkpoint()
            return
        while self._queued > _HIGH_WATER and not self._closing:
            await self._drain_lot.park()

    async def _wait_flushed(self) -> None:
        while (self._queue or self._urgent or self._writing) and not self.closed:
            await self._drain_lot.park()

    # --- events in -----------------------------------------------------------------------------

    async def _on_open(self, event: p.OpenStream) -> None:
        assert self._conn.peer_hello is not None
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
        sent_at = self._pings.get(event.payload)
        if sent_at is None:
            return
        for payload in list(self._pings):  # pongs come in order: earlier pings are answered too
            del self._pings[payload]
            if payload == event.payload:
                break
        self._last_rtt = trio.current_time() - sent_at
        self._rtt_metric.observe(self._last_rtt)

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
        metrics.STREAMS_OPENED.labels(self._side, str(target.protocol)).inc()
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
        await trio.lowlevel.checkpoint()
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
                self._queue.append(data)
                self._queued += len(data)
                self._writer_lot.unpark_all()
                with trio.move_on_after(self.settings.ping_timeout):
                    await self._wait_flushed()
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
        self._drain_lot.unpark_all()
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
        return SessionStatistics(len(self._streams), self._streams_opened, self._bytes_sent,
                                 self._bytes_received, self._last_rtt)
