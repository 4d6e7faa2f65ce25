"""Sans-I/O core of the tunnel protocol: bytes in, events out, `send(event) -> bytes`.

Theory of operation
-------------------
The tunnel is one ordered byte stream. The trio layer (`connector.tunnel.session`) carries it in
binary websocket messages, any number of frames per message; this module never sees messages,
only bytes, so it works on any split of the stream. Every frame is a fixed 10-byte header and
a payload (`connector.tunnel.frames`: the wire format and the payload codecs). This module holds
the rules: handshake, stream ids, flow control, stream states; `connector.tunnel.events` the
events it yields and takes, and the two error classes. It re-exports their public names, so
`from connector.tunnel import protocol as p; p.Data, p.HEADER, p.RemoteProtocolError` all work.

Stream 0 is the connection itself (HELLO, PING, PONG, GOAWAY, CONTROL); every other id is one
multiplexed stream (OPEN, ACCEPT, HEADERS, DATA, RESET, WINDOW_UPDATE). The server (the cloud side)
opens even ids, the client (the node) odd ids, each strictly increasing, so both could open
streams without colliding.

Handshake: the client sends HELLO listing the protocol versions it speaks and its receive limits
(max frame size, per-stream window, max concurrent streams, plus a free-form `info` dict). The
server picks the highest common version and answers with a HELLO naming just that version, or,
when there is none, `next_event()` raises `RemoteProtocolError(UNSUPPORTED_VERSION)` and the
server answers GOAWAY with its message: both sides' versions and which side to upgrade (an old
node must learn it from the cloud: version 1 nodes cannot parse anything newer). Nothing but
HELLO and GOAWAY may flow before the handshake.

Flow control is per stream and credit based, like HTTP/2 and yamux: a sender may have at most
`window` unacknowledged DATA bytes on a stream. The window starts at the receiver's advertised
`initial_window`; the receiver's application grants credit back with WINDOW_UPDATE as it
consumes. Sending beyond the credit is a `LocalProtocolError`; receiving beyond it is a
`RemoteProtocolError(FLOW_CONTROL_ERROR)`. So a stream's receive buffer is bounded by its window
and the whole tunnel's by `max_streams * initial_window`.

Exchange streams (version 2): a stream opened to an HTTP target carries one HTTP exchange. The
opener sends the request head in a HEADERS frame (`connector.tunnel.heads`), then the body in
DATA; the acceptor answers with informational heads, the final head and the body; either message
may end with a trailers HEADERS frame. `connector.tunnel.state` is the table of what may come
when; a frame it does not allow is a protocol error. A `101` head turns the stream into a byte
pipe; TCP streams are byte pipes from the start. HEADERS are not flow-controlled (like HTTP/2) and
fit in one frame.

Refusal: a node that will not process a stream resets it with REFUSED before it reads anything,
and GOAWAY carries the last stream id the sender processed (flag LAST_ID), so the opener knows
which of its streams were provably never processed and may be replayed elsewhere.

Stream life: DATA with the FIN flag half-closes one direction; a stream is gone once both
directions are closed or either side sent RESET. Frames that cross a close on the wire are
harmless races and are dropped silently: WINDOW_UPDATE and RESET for a closed stream, anything
for a stream we reset ourselves (remembered for the last `RECENT_RESETS` resets). Everything
else on a closed or never-opened stream is a protocol error.

Errors: `LocalProtocolError` means our application misused the connection; `RemoteProtocolError`
means the peer broke the protocol. Both carry `.code`, the `ErrorCode` to send in GOAWAY. Parsing
never raises anything else, whatever the bytes. After a remote error the connection is dead:
`next_event()` raises the same error again, and only GOAWAY may still be sent.

Hot path: received bytes are parsed in place (a bytes object, or a bytearray with a read offset
that is compacted lazily); a DATA payload is copied once, into the event.
"""


from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs

from connector.tunnel.events import (
    NEED_DATA,
    AcceptStream,
    ConnectionClosed,
    Control,
    Data,
    Event,
    GoAway,
    Headers,
    Hello,
    LocalProtocolError,
    OpenStream,
    Ping,
    Pong,
    ProtocolError,
    RemoteProtocolError,
    ResetStream,
    WindowUpdate,
)
from connector.tunnel.frames import (
    FLAG_FIN,
    FLAG_LAST_ID,
    HEADER,
    HEADER_SIZE,
    MAX_MAX_FRAME_SIZE,
    MAX_STREAM_ID,
    MAX_WINDOW,
    MIN_MAX_FRAME_SIZE,
    FrameType,
    decode_control,
    decode_goaway,
    decode_hello,
    decode_target,
    decode_text,
    encode_control,
    encode_frame,
    encode_goaway,
    encode_hello,
    encode_reason,
    encode_target,
    encode_u32,
    is_int,
    u32,
)
from connector.tunnel.heads import HeadError, decode_head, encode_head
from connector.tunnel.state import DATA, Message, StateError, StreamState
from connector.tunnel.types import ErrorCode, StreamProtocol

__all__ = [
    "PROTOCOL_VERSIONS", "HEADER", "HEADER_SIZE", "FLAG_FIN", "FLAG_LAST_ID", "FrameType",
    "Connection", "NEED_DATA", "RECENT_RESETS",
    "Event", "Hello", "OpenStream", "AcceptStream", "Headers", "Data", "ResetStream", "WindowUpdate",
    "Ping", "Pong", "GoAway", "Control", "ConnectionClosed",
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
]

PROTOCOL_VERSIONS: tuple[int, ...] = (2,)  # 1 (byte streams carrying HTTP/1.1) is retired
DEFAULT_MAX_FRAME_SIZE = 64 * 1024
DEFAULT_INITIAL_WINDOW = 256 * 1024
DEFAULT_MAX_STREAMS = 1024
RECENT_RESETS = 4096  # late frames for this many of our own resets are dropped, not errors


# --- connection --------------------------------------------------------------------------------


class _Stream:
    __slots__ = ("stream_id", "local", "send_window", "recv_window", "local_fin", "remote_fin",
                 "accepted", "state", "sends", "receives")

    def __init__(self, stream_id: int, local: bool, send_window: int, recv_window: int,
                 raw: bool) -> None:
        self.stream_id = stream_id
        self.local = local  # opened by us
        self.send_window = send_window  # credit the peer granted us
        self.recv_window = recv_window  # credit we granted the peer, not yet used
        self.local_fin = False
        self.remote_fin = False
        self.accepted = False
        self.state = StreamState(raw=raw)
        # the opener sends the request and receives the response; the acceptor the other way
        self.sends = Message.REQUEST if local else Message.RESPONSE
        self.receives = Message.RESPONSE if local else Message.REQUEST


def _versions(versions: Iterable[int]) -> str:
    return " and ".join(map(str, sorted(versions)))


def _no_common_version(node_versions: Iterable[int], cloud_versions: Iterable[int]) -> str:
    """The GOAWAY reason of a failed negotiation: both sides' versions and which one to upgrade
    (the cloud is the server, the node the client); an operator reads it in both logs."""
    node, cloud = sorted(node_versions), sorted(cloud_versions)
    if node[-1] < cloud[0]:
        advice = f"upgrade the node to a release that speaks version {cloud[-1]}"
    elif cloud[-1] < node[0]:
        advice = f"upgrade the cloud to a release that speaks version {node[-1]}"
    else:
        advice = "upgrade the older side"
    return (f"no common tunnel protocol version: the node speaks {_versions(node)}, "
            f"the cloud speaks {_versions(cloud)}; {advice}")


class Connection:
    """One end of a tunnel. `client=True` is the node (opens odd ids), False the cloud (even).

    `max_frame_size`, `initial_window` and `max_streams` are this end's receive limits, told to
    the peer in HELLO: the largest frame payload we accept, the credit each new stream starts
    with, and how many streams the peer may have open at once (which bounds buffered memory at
    `max_streams * initial_window`).
    """

    def __init__(
        self,
        client: bool,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        initial_window: int = DEFAULT_INITIAL_WINDOW,
        max_streams: int = DEFAULT_MAX_STREAMS,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
    ) -> None:
        if not MIN_MAX_FRAME_SIZE <= max_frame_size <= MAX_MAX_FRAME_SIZE:
            raise ValueError(
                f"max_frame_size must be within {MIN_MAX_FRAME_SIZE}..{MAX_MAX_FRAME_SIZE}")
        if not 1 <= initial_window <= MAX_WINDOW:
            raise ValueError(f"initial_window must be within 1..{MAX_WINDOW}")
        if not 1 <= max_streams <= 2**31:
            raise ValueError("max_streams must be at least 1")
        if not versions or not all(is_int(v) and v > 0 for v in versions):
            raise ValueError("versions must be a non-empty tuple of positive ints")
        self.client = client
        self.max_frame_size = max_frame_size
        self.initial_window = initial_window
        self.max_streams = max_streams
        self.versions = tuple(sorted(set(versions)))
        self.version: int | None = None  # negotiated version, once the handshake is done
        self.peer_hello: Hello | None = None
        self._hello_sent = False
        self._goaway_sent = False
        self._src: bytes | bytearray = b""  # received bytes not parsed yet start at _off
        self._off = 0
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1 if client else 2
        self._last_peer_id = 0
        self._local_open = 0  # streams we opened that are not closed yet
        self._peer_open = 0
        self._recent_resets: dict[int, None] = {}  # insertion-ordered set
        self._receivers: dict[int, Callable[[int, int, bytes], Event | None]] = {
            FrameType.HELLO: self._recv_hello,
            FrameType.OPEN: self._recv_open,
            FrameType.ACCEPT: self._recv_accept,
            FrameType.DATA: self._recv_data,
            FrameType.RESET: self._recv_reset,
            FrameType.WINDOW_UPDATE: self._recv_window_update,
            FrameType.PING: self._recv_ping,
            FrameType.PONG: self._recv_pong,
            FrameType.GOAWAY: self._recv_goaway,
            FrameType.CONTROL: self._recv_control,
            FrameType.HEADERS: self._recv_headers,
        }
        self._senders: dict[type[Event], Callable[[Any], bytes]] = {
            Hello: self._send_hello,
            OpenStream: self._send_open,
            AcceptStream: self._send_accept,
            Data: self._send_data,
            ResetStream: self._send_reset,
            WindowUpdate: self._send_window_update,
            Ping: self._send_ping,
            Pong: self._send_pong,
            GoAway: self._send_goaway,
            Control: self._send_control,
            Headers: self._send_headers,
        }

    # --- queries ------------------------------------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        return self._hello_sent and self.peer_hello is not None

    def make_hello(self, info: dict[str, Any] | None = None) -> Hello:
        """The HELLO this end must send: our versions (client) or the negotiated one (server)."""
        if self.client:
            versions = self.versions
        else:
            if self.version is None:
                raise LocalProtocolError("the server answers the client's HELLO; none received yet")
            versions = (self.version,)
        return Hello(versions, self.max_frame_size, self.initial_window, self.max_streams,
                     dict(info or {}))

    def next_stream_id(self) -> int:
        """The id `send(OpenStream(...))` will accept next."""
        return self._next_local_id

    def send_window(self, stream_id: int) -> int:
        """Bytes we may send on the stream now (0 if it is not open or we sent FIN)."""
        st = self._streams.get(stream_id)
        return 0 if st is None or st.local_fin else st.send_window

    def stream_is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def local_streams_open(self) -> int:
        """Streams we opened that are not closed yet (limited by the peer's max_streams)."""
        return self._local_open

    @property
    def peer_streams_open(self) -> int:
        return self._peer_open

    @property
    def peer_max_streams(self) -> int:
        return self.peer_hello.max_streams if self.peer_hello is not None else 0

    # --- receiving ----------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the transport; b"" means the transport reached end of file."""
        if self._eof:
            raise LocalProtocolError("receive_data() after end of file")
        if not data:
            self._eof = True
            return
        src, off = self._src, self._off
        if off >= len(src):  # nothing pending: parse the new bytes in place
            self._src = data if isinstance(data, bytes) else bytes(data)
            self._off = 0
        elif isinstance(src, bytes):  # a partial frame was pending in a bytes object
            buf = bytearray(memoryview(src)[off:])
            buf += data
            self._src, self._off = buf, 0
        else:
            if off > 65536 and 2 * off > len(src):  # compact lazily: amortised linear
                del src[:off]
                self._off = 0
            src += data

    def next_event(self) -> Event:
        """The next event, NEED_DATA, or ConnectionClosed after a clean EOF.

        Raises RemoteProtocolError (the same one on every later call) if the peer broke the
        protocol.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def events(self) -> Iterator[Event]:
        """Iterate over the events available now (stops at NEED_DATA or ConnectionClosed)."""
        while True:
            event = self.next_event()
            if event is NEED_DATA:
                return
            yield event
            if isinstance(event, ConnectionClosed):
                return

    def _next_event(self) -> Event:
        while True:
            src, off = self._src, self._off
            avail = len(src) - off
            if avail < HEADER_SIZE:
                return self._incomplete(avail)
            ftype, flags, stream_id, length = HEADER.unpack_from(src, off)
            if length > self.max_frame_size:
                raise RemoteProtocolError(
                    f"frame of {length} bytes exceeds max_frame_size {self.max_frame_size}",
                    ErrorCode.FRAME_TOO_LARGE)
            receiver = self._receivers.get(ftype)
            if receiver is None:
                raise RemoteProtocolError(f"unknown frame type {ftype}")
            if avail < HEADER_SIZE + length:
                return self._incomplete(avail)
            start = off + HEADER_SIZE
            end = start + length
            if isinstance(src, bytes):
                payload = src[start:end] if (start, end) != (0, len(src)) else src
            else:
                with memoryview(src) as view:
                    payload = bytes(view[start:end])
            self._off = end
            if end == len(src):
                self._src, self._off = b"", 0
            event = receiver(flags, stream_id, payload)
            if event is not None:
                return event

    def _incomplete(self, avail: int) -> Event:
        if not self._eof:
            return NEED_DATA
        if avail:
            raise RemoteProtocolError(f"connection closed in the middle of a frame ({avail} bytes)")
        return ConnectionClosed()

    # --- per-frame receive rules ----------------------------------------------------------------

    @staticmethod
    def _connection_frame(name: str, flags: int, stream_id: int) -> None:
        if stream_id != 0:
            raise RemoteProtocolError(f"{name} on stream {stream_id}; it belongs on stream 0")
        if flags:
            raise RemoteProtocolError(f"{name} with unknown flags {flags:#x}")

    def _require_handshake(self, name: str) -> None:
        if self.peer_hello is None:
            raise RemoteProtocolError(f"{name} before HELLO")

    def _was_opened(self, stream_id: int) -> bool:
        if (stream_id % 2 == 1) == self.client:
            return stream_id < self._next_local_id
        return stream_id <= self._last_peer_id

    def _stream_for(self, name: str, flags: int, stream_id: int, *, late_ok: bool) -> _Stream | None:
        """The open stream a frame is for; None to drop a harmless late frame; else raise."""
        self._require_handshake(name)
        if stream_id == 0:
            raise RemoteProtocolError(f"{name} on stream 0")
        st = self._streams.get(stream_id)
        if st is not None:
            return st
        if not self._was_opened(stream_id):
            raise RemoteProtocolError(f"{name} on stream {stream_id}, which was never opened")
        if late_ok or stream_id in self._recent_resets:
            return None
        raise RemoteProtocolError(f"{name} on closed stream {stream_id}")

    def _recv_hello(self, flags: int, stream_id: int, payload: bytes) -> Event | None:
        self._connection_frame("HELLO", flags, stream_id)
        if self.peer_hello is not None:
            raise RemoteProtocolError("second HELLO")
        if self.client and not self._hello_sent:
            raise RemoteProtocolError("server sent HELLO before the client did")
        hello = decode_hello(payload)
        versions = list(hello.versions)
        if self.client:
            if len(versions) != 1 or versions[0] not in self.versions:
                raise RemoteProtocolError(
                    f"the cloud chose tunnel protocol version {versions}, but this node speaks "
                    f"{_versions(self.versions)}", ErrorCode.UNSUPPORTED_VERSION)
            self.version = versions[0]
        else:
            common = set(versions) & set(self.versions)
            if not common:
                raise RemoteProtocolError(_no_common_version(versions, self.versions),
                                          ErrorCode.UNSUPPORTED_VERSION)
            self.version = max(common)
        self.peer_hello = hello
        return hello

    def _recv_open(self, flags: int, stream_id: int, payload: bytes) -> Event | None:
        self._require_handshake("OPEN")
        assert self.peer_hello is not None
        if flags:
            raise RemoteProtocolError(f"OPEN with unknown flags {flags:#x}")
        if stream_id == 0 or (stream_id % 2 == 1) == self.client:
            raise RemoteProtocolError(f"peer opened stream {stream_id}, an id it may not use")
        if stream_id <= self._last_peer_id:
            raise RemoteProtocolError(
                f"peer opened stream {stream_id} after {self._last_peer_id}; ids must increase")
        if self._peer_open >= self.max_streams:
            raise RemoteProtocolError(f"peer exceeded max_streams={self.max_streams}")
        target = decode_target(payload)
        self._last_peer_id = stream_id
        self._streams[stream_id] = _Stream(
            stream_id, False, self.peer_hello.initial_window, self.initial_window,
            raw=target.protocol is StreamProtocol.TCP)
        self._peer_open += 1
        return OpenStream(stream_id, target)

    def _recv_accept(self, flags: int, stream_id: int, payload: bytes) -> Event | None:
        st = self._stream_for("ACCEPT", flags, stream_id, late_ok=False)
        if st is None:
            return None
        if flags or payload:
            raise RemoteProtocolError("ACCEPT carries no flags and no payload")
        if not st.local:
            raise RemoteProtocolError(f"ACCEPT from the opener of stream {stream_id}")
        if st.accepted or st.remote_fin:
            raise RemoteProtocolError(f"ACCEPT repeated or after FIN on stream {stream_id}")
        st.accepted = True
        return AcceptStream(stream_id)

    def _recv_data(self, flags: int, stream_id: int, payload: bytes) -> Event | None:
        if flags & ~FLAG_FIN:
            raise RemoteProtocolError(f"DATA with unknown flags {flags:#x}")
        st = self._stream_for("DATA", flags, stream_id, late_ok=False)
        fin = bool(flags & FLAG_FIN)
        if not payload and not fin:
            raise RemoteProtocolError("empty DATA frame without FIN")
        if st is None:
            return None
        if st.remote_fin:
            raise RemoteProtocolError(f"DATA after FIN on stream {stream_id}")
        try:
            st.state.process(st.receives, DATA, fin)
        except StateError as exc:
            raise RemoteProtocolError(f"stream {stream_id}: {exc}") from None
        if len(payload) > st.recv_window:
            raise RemoteProtocolError(
                f"DATA of {len(payload)} bytes exceeds the window of {st.recv_window} "
                f"on stream {stream_id}", ErrorCode.FLOW_CONTROL_ERROR)
        st.recv_window -= len(payload)
        if fin:
            st.remote_fin = True
            if st.local_fin:
                self._forget(st)
        return Data(stream_id, payload, fin)

    def _recv_headers(self, flags: int, stream_id: int, payload: bytes) -> Event | None:
        if flags & ~FLAG_FIN:
            raise RemoteProtocolError(f"HEADERS with unknown flags {flags:#x}")
        st = self._stream_for("HEADERS", flags, stream_id, late_ok=False)
        try:
            head = decode_head(payload)
        except HeadError as exc:
            raise RemoteProtocolError(f"HEADERS on stream {stream_id}: {exc}") from None
        if st is None:
            return None
        fin = bool(flags & FLAG_FIN)
        try:
            st.state.process(st.receives, head.kind, fin)
        except StateError as exc:
            raise RemoteProtocolError(f"stream {stream_id}: {exc}") from None
        if fin:
            st.remote_fin = True
            if st.local_fin:
                self._forget(st)
        return Headers(stream_id, head, fin)

    def _recv_reset(self, flags: int, stream_id: int, payload: bytes) -> Event | None:
        if flags or len(payload) < 4:
            raise RemoteProtocolError("RESET needs no flags and a 4-byte code")
        st = self._stream_for("RESET", flags, stream_id, late_ok=True)
        reason = decode_text(payload[4:], "RESET reason")
        if st is None:
            return None
        self._forget(st)
        return ResetStream(stream_id, ErrorCode.parse(u32(payload)), reason)

    def _recv_window_update(self, flags: int, stream_id: int, payload: bytes) -> Event | None:
        if flags or len(payload) != 4:
            raise RemoteProtocolError("WINDOW_UPDATE needs no flags and a 4-byte increment")
        st = self._stream_for("WINDOW_UPDATE", flags, stream_id, late_ok=True)
        increment = u32(payload)
        if increment == 0:
            raise RemoteProtocolError("WINDOW_UPDATE with increment 0")
        if st is None:
            return None
        if st.send_window + increment > MAX_WINDOW:
            raise RemoteProtocolError(f"WINDOW_UPDATE overflows the window on stream {stream_id}",
                                      ErrorCode.FLOW_CONTROL_ERROR)
        st.send_window += increment
        return WindowUpdate(stream_id, increment)

    def _recv_ping(self, flags: int, stream_id: int, payload: bytes) -> Event | None:
        self._ping_rules("PING", flags, stream_id, payload)
        return Ping(payload)

    def _recv_pong(self, flags: int, stream_id: int, payload: bytes) -> Event | None:
        self._ping_rules("PONG", flags, stream_id, payload)
        return Pong(payload)

    def _ping_rules(self, name: str, flags: int, stream_id: int, payload: bytes) -> None:
        self._connection_frame(name, flags, stream_id)
        self._require_handshake(name)
        if len(payload) != 8:
            raise RemoteProtocolError(f"{name} payload must be 8 bytes, not {len(payload)}")

    def _recv_goaway(self, flags: int, stream_id: int, payload: bytes) -> Event | None:
        self._connection_frame("GOAWAY", flags & ~FLAG_LAST_ID, stream_id)
        return decode_goaway(flags, payload)

    def _recv_control(self, flags: int, stream_id: int, payload: bytes) -> Event | None:
        self._connection_frame("CONTROL", flags, stream_id)
        self._require_handshake("CONTROL")
        return decode_control(payload)

    def _forget(self, st: _Stream) -> None:
        del self._streams[st.stream_id]
        if st.local:
            self._local_open -= 1
        else:
            self._peer_open -= 1

    # --- sending ------------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """Encode one event as wire bytes, updating state; raise LocalProtocolError on misuse."""
        sender = self._senders.get(type(event))
        if sender is None:
            raise LocalProtocolError(f"cannot send {type(event).__name__}")
        if self._goaway_sent:
            raise LocalProtocolError("the connection is closing: GOAWAY was sent")
        return sender(event)

    def _require_ready(self, name: str) -> Hello:
        if not self.handshake_complete:
            raise LocalProtocolError(f"cannot send {name} before the handshake is complete")
        assert self.peer_hello is not None
        return self.peer_hello

    def _local_stream(self, name: str, stream_id: int) -> _Stream | None:
        """The open stream to send on; None if it is already closed; raise if never opened."""
        self._require_ready(name)
        st = self._streams.get(stream_id)
        if st is None and (stream_id == 0 or not self._was_opened(stream_id)):
            raise LocalProtocolError(f"{name} on stream {stream_id}, which was never opened")
        return st

    def _send_hello(self, event: Hello) -> bytes:
        if self._hello_sent:
            raise LocalProtocolError("HELLO already sent")
        if not self.client and self.version is None:
            raise LocalProtocolError("the server answers the client's HELLO; none received yet")
        expected = self.make_hello(event.info)
        if self.client and event.versions and set(event.versions) <= set(self.versions):
            expected = attrs.evolve(expected, versions=tuple(event.versions))
        if event != expected:
            raise LocalProtocolError(f"HELLO must match this connection's settings: {expected}")
        payload = encode_hello(event)
        self._hello_sent = True
        return encode_frame(FrameType.HELLO, 0, 0, payload)

    def _send_open(self, event: OpenStream) -> bytes:
        peer = self._require_ready("OPEN")
        sid = event.stream_id
        if sid < self._next_local_id or (sid % 2 == 1) != self.client or sid > MAX_STREAM_ID:
            raise LocalProtocolError(f"stream id {sid} is not usable; next is {self._next_local_id}")
        if self._local_open >= peer.max_streams:
            raise LocalProtocolError(f"the peer allows at most {peer.max_streams} open streams")
        target = event.target
        payload = encode_target(target)
        self._next_local_id = sid + 2
        self._streams[sid] = _Stream(sid, True, peer.initial_window, self.initial_window,
                                     raw=target.protocol is StreamProtocol.TCP)
        self._local_open += 1
        return encode_frame(FrameType.OPEN, 0, sid, payload)

    def _send_accept(self, event: AcceptStream) -> bytes:
        st = self._local_stream("ACCEPT", event.stream_id)
        if st is None or st.local or st.accepted or st.local_fin:
            raise LocalProtocolError(
                "ACCEPT is sent once, by the acceptor, on an open stream, before its FIN")
        st.accepted = True
        return encode_frame(FrameType.ACCEPT, 0, event.stream_id)

    def _send_data(self, event: Data) -> bytes:
        peer = self._require_ready("DATA")
        sid = event.stream_id
        st = self._streams.get(sid)
        if st is None or st.local_fin:
            raise LocalProtocolError(f"DATA on stream {sid}, which is not open for sending")
        try:
            data = memoryview(event.data).cast("B")
        except TypeError:
            raise LocalProtocolError("DATA payload must be bytes-like") from None
        n = len(data)
        if n == 0 and not event.end_stream:
            return b""
        try:
            st.state.process(st.sends, DATA, event.end_stream)
        except StateError as exc:
            raise LocalProtocolError(f"stream {sid}: {exc}") from None
        if n > st.send_window:
            raise LocalProtocolError(
                f"DATA of {n} bytes exceeds the window of {st.send_window} on stream {sid}",
                ErrorCode.FLOW_CONTROL_ERROR)
        st.send_window -= n
        fin = FLAG_FIN if event.end_stream else 0
        chunk = peer.max_frame_size
        pack = HEADER.pack
        parts: list[bytes | memoryview] = []
        pos = 0
        while True:
            size = min(chunk, n - pos)
            last = pos + size >= n
            parts.append(pack(FrameType.DATA, fin if last else 0, sid, size))
            parts.append(data[pos:pos + size])
            pos += size
            if last:
                break
        if event.end_stream:
            st.local_fin = True
            if st.remote_fin:
                self._forget(st)
        return b"".join(parts)

    def _send_headers(self, event: Headers) -> bytes:
        peer = self._require_ready("HEADERS")
        sid = event.stream_id
        st = self._streams.get(sid)
        if st is None or st.local_fin:
            raise LocalProtocolError(f"HEADERS on stream {sid}, which is not open for sending")
        try:
            payload = encode_head(event.head)
        except HeadError as exc:
            raise LocalProtocolError(str(exc)) from None
        if len(payload) > peer.max_frame_size:
            raise LocalProtocolError(
                f"a head of {len(payload)} bytes exceeds the peer's frame size {peer.max_frame_size}",
                ErrorCode.FRAME_TOO_LARGE)
        try:
            st.state.process(st.sends, event.head.kind, event.end_stream)
        except StateError as exc:
            raise LocalProtocolError(f"stream {sid}: {exc}") from None
        if event.end_stream:
            st.local_fin = True
            if st.remote_fin:
                self._forget(st)
        return encode_frame(FrameType.HEADERS, FLAG_FIN if event.end_stream else 0, sid, payload)

    def _send_reset(self, event: ResetStream) -> bytes:
        st = self._local_stream("RESET", event.stream_id)
        if st is None:
            return b""  # already closed: resetting is idempotent
        payload = encode_u32(ErrorCode(event.code)) + encode_reason(event.reason)
        self._forget(st)
        self._recent_resets[st.stream_id] = None
        if len(self._recent_resets) > RECENT_RESETS:
            del self._recent_resets[next(iter(self._recent_resets))]
        return encode_frame(FrameType.RESET, 0, event.stream_id, payload)

    def _send_window_update(self, event: WindowUpdate) -> bytes:
        st = self._local_stream("WINDOW_UPDATE", event.stream_id)
        if not 1 <= event.increment <= MAX_WINDOW:
            raise LocalProtocolError(f"window increment {event.increment} out of range")
        if st is None or st.remote_fin:
            return b""  # the peer sends no more: credit is moot
        if st.recv_window + event.increment > MAX_WINDOW:
            raise LocalProtocolError("window increment overflows the window",
                                     ErrorCode.FLOW_CONTROL_ERROR)
        st.recv_window += event.increment
        return encode_frame(FrameType.WINDOW_UPDATE, 0, event.stream_id, encode_u32(event.increment))

    def _send_ping(self, event: Ping) -> bytes:
        return self._ping_frame(FrameType.PING, event.payload)

    def _send_pong(self, event: Pong) -> bytes:
        return self._ping_frame(FrameType.PONG, event.payload)

    def _ping_frame(self, ftype: FrameType, payload: bytes) -> bytes:
        self._require_ready(ftype.name)
        if len(payload) != 8:
            raise LocalProtocolError(f"{ftype.name} payload must be 8 bytes")
        return encode_frame(ftype, 0, 0, bytes(payload))

    def _send_goaway(self, event: GoAway) -> bytes:
        flags, payload = encode_goaway(event)
        self._goaway_sent = True
        return encode_frame(FrameType.GOAWAY, flags, 0, payload)

    def _send_control(self, event: Control) -> bytes:
        peer = self._require_ready("CONTROL")
        payload = encode_control(event)
        if len(payload) > peer.max_frame_size:
            raise LocalProtocolError(f"CONTROL of {len(payload)} bytes exceeds the peer's frame size")
        return encode_frame(FrameType.CONTROL, 0, 0, payload)
