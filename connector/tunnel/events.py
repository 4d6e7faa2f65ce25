"""The events of the tunnel protocol and its two error classes (sans-I/O, no wire format here).

`connector.tunnel.protocol.Connection` turns bytes into these events and these events into bytes;
`connector.tunnel.frames` holds the wire format. Events are small frozen value objects, as h11's.
"""

from __future__ import annotations

from typing import Any

import attrs

from connector.tunnel.heads import Head
from connector.tunnel.types import ErrorCode, Target

__all__ = [
    "Event", "Hello", "OpenStream", "AcceptStream", "Headers", "Data", "ResetStream", "WindowUpdate",
    "Ping", "Pong", "GoAway", "Control", "ConnectionClosed", "NEED_DATA",
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
]


# --- errors ------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """Base of both error classes; `.code` is the ErrorCode to put in GOAWAY."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """Our own application asked for something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow; the tunnel must go away."""


# --- events ------------------------------------------------------------------------------------


class Event:
    """Base class of everything `next_event()` returns and `send()` accepts."""

    __slots__ = ()


@attrs.frozen
class Hello(Event):
    """Handshake. Client: versions it speaks. Server: the single version it picked."""

    versions: tuple[int, ...]
    max_frame_size: int
    initial_window: int
    max_streams: int
    info: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class OpenStream(Event):
    stream_id: int
    target: Target


@attrs.frozen
class AcceptStream(Event):
    """The acceptor reached the backend; the opener may report success (e.g. SOCKS5 reply)."""

    stream_id: int


@attrs.frozen
class Headers(Event):
    """An HTTP head on an exchange stream; `end_stream` ends the message (no body follows)."""

    stream_id: int
    head: Head
    end_stream: bool = False


@attrs.frozen
class Data(Event):
    """Stream payload; `end_stream` is the FIN flag (half-close). `send()` takes any bytes-like."""

    stream_id: int
    data: bytes
    end_stream: bool = False


@attrs.frozen
class ResetStream(Event):
    stream_id: int
    code: ErrorCode
    reason: str = ""


@attrs.frozen
class WindowUpdate(Event):
    stream_id: int
    increment: int


@attrs.frozen
class Ping(Event):
    payload: bytes  # exactly 8 opaque bytes


@attrs.frozen
class Pong(Event):
    payload: bytes


@attrs.frozen
class GoAway(Event):
    """The connection ends. `last_stream_id`: the highest stream of the receiver's that the sender
    processed; streams above it were never processed (None: not said, e.g. in a handshake)."""

    code: ErrorCode
    reason: str = ""
    last_stream_id: int | None = None


@attrs.frozen
class Control(Event):
    """Connection-level message: registration with a fencing epoch, drain, master-lost..."""

    op: str
    body: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ConnectionClosed(Event):
    """The byte stream ended cleanly (`receive_data(b"")` at a frame boundary)."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Any = _NeedData()  # next_event(): no whole frame buffered yet
