"""One stream of a tunnel session: what `TunnelSession` hands to openers and stream handlers.

`SessionStream` is the application's side of one multiplexed stream (`TunnelStream`): its receive
buffer (bounded by the stream's window; WINDOW_UPDATE granted back once half a window was read),
its sends (waiting for credit, and for the session's outgoing queue to drain below its high-water
mark), and, on exchange streams, the typed heads and trailers. The session's reader calls the
`_on_*` methods; everything else is called by the stream's user. See `connector.tunnel.session`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import attrs
import trio
from trio.lowlevel import ParkingLot

from connector.tunnel import protocol as p
from connector.tunnel.heads import Head, Trailers
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, StreamResetError, Target

if TYPE_CHECKING:
    from connector.tunnel.session import TunnelSession

__all__ = ["SessionStream", "StreamStatistics"]

_SEND_CHUNK = 128 * 1024  # send_all hands the protocol at most this much at a time


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

    @property
    def reset_error(self) -> StreamResetError | None:
        """Why the stream was reset (by either side, or the tunnel died); None while it was not."""
        return self._write_error if self._reset_event.is_set() else None

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

    @property
    def buffered(self) -> int:
        """Received bytes not read yet (without building a StreamStatistics)."""
        return self._buffered

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

    def _send_frame(self, event: p.Headers | p.Data) -> None:
        """Queue one frame of our message. ValueError if the protocol refuses it (out of order,
        too large): then nothing changed, the stream stays usable. The stream's reset error if
        the tunnel is closing."""
        try:
            queued = self._session._send(event)
        except p.LocalProtocolError as exc:
            raise ValueError(str(exc)) from None
        if event.end_stream:
            self._eof_sent = True
        if not queued:
            raise self._lost()

    async def send_head(self, head: Head, *, end_stream: bool = False) -> None:
        """Send an HTTP head (exchange streams); `end_stream`: no body follows (FIN).

        ValueError if the stream's state does not allow it (`connector.tunnel.state`), as for
        DATA from `send_all` before the request head; nothing is sent then."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check_send()
        await self._session._wait_writable()
        self._check_send()
        self._send_frame(p.Headers(self.stream_id, head, end_stream))
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
                self._send_frame(p.Data(self.stream_id, chunk))
                pos += take
                unacked = self._unacknowledged()
                if unacked > self._max_unacked:
                    self._max_unacked = unacked
        finally:
            self._sending = False

    async def wait_buffered(self, count: int) -> None:
        """Return once at least `count` received bytes wait to be read (or the stream ended or was
        reset: then whatever arrived is all there is)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._buffered < count and not self._eof_received and self._read_error is None:
            await self._lot.park()

    async def wait_send_all_might_not_block(self) -> None:
        while not self._closed and self._write_error is None and not self._eof_sent and (
                self._conn.send_window(self.stream_id) == 0):
            await self._lot.park()
        await trio.lowlevel.checkpoint()

    async def send_eof(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        """End our message (FIN); on an exchange stream with `trailers`, as a trailers head."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._eof_sent:
            return
        self._check_send()
        self._send_frame(p.Headers(self.stream_id, Trailers(trailers), end_stream=True) if trailers
                         else p.Data(self.stream_id, b"", end_stream=True))
        self._session._forget_if_closed(self)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            # a cancel point per call; no yield when data is at hand (every reader of a tunnel
            # stream waits on something else in its loop, a socket or the stream itself)
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
        await trio.lowlevel.checkpoint_if_cancelled()
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
        """Half-close our side (FIN); if the peer has not finished, reset with CANCEL after it.

        An exchange message cannot end before its head: then the stream is reset at once."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            return
        self._closed = True
        if self._conn.stream_is_open(self.stream_id):
            reason = "stream closed before the peer finished"
            if not self._eof_sent and self._write_error is None:
                try:
                    self._session._send(p.Data(self.stream_id, b"", end_stream=True))
                    self._eof_sent = True
                except p.LocalProtocolError:
                    reason = "stream closed before its head was sent"
            if self._conn.stream_is_open(self.stream_id):
                self._session._send(p.ResetStream(self.stream_id, ErrorCode.CANCEL, reason))
        self._chunks.clear()
        self._buffered = 0
        self._session._forget_if_closed(self)
        self._lot.unpark_all()
