"""The wire format of the tunnel protocol: frame header, frame types, flags, payload codecs.

Every frame is a fixed 10-byte header and a payload::

    type u8 | flags u8 | stream id u32 | payload length u32 | payload      (big-endian)

This module only turns payloads into values and back, checking that each is well formed; which
frame may come when (handshake, stream states, flow control) is `connector.tunnel.protocol`'s
job. Decoders raise `RemoteProtocolError` (the peer sent it), encoders `LocalProtocolError`.
HEADERS payloads are `connector.tunnel.heads`'.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any, TypeGuard

from connector.tunnel.events import Control, GoAway, Hello, LocalProtocolError, RemoteProtocolError
from connector.tunnel.types import ErrorCode, StreamProtocol, Target

__all__ = [
    "HEADER", "HEADER_SIZE", "FLAG_FIN", "FLAG_LAST_ID", "FrameType", "MIN_MAX_FRAME_SIZE",
    "MAX_MAX_FRAME_SIZE", "MAX_WINDOW", "MAX_STREAM_ID", "MAX_REASON_BYTES", "MAX_HOST_BYTES",
    "encode_frame", "u32", "encode_u32", "is_int", "decode_text", "decode_json_object",
    "encode_reason", "encode_hello", "decode_hello", "encode_target", "decode_target",
    "encode_goaway", "decode_goaway", "encode_control", "decode_control",
]

HEADER = struct.Struct(">BBII")
HEADER_SIZE = HEADER.size
FLAG_FIN = 0x01
FLAG_LAST_ID = 0x02  # GOAWAY: a u32 last processed stream id follows the code
MIN_MAX_FRAME_SIZE = 16 * 1024  # every peer must accept frames this large (HELLO fits in it)
MAX_MAX_FRAME_SIZE = 16 * 1024 * 1024
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**32 - 1
MAX_REASON_BYTES = 1024  # longer reasons are truncated on send
MAX_HOST_BYTES = 1024
_U32 = struct.Struct(">I")
_OPEN = struct.Struct(">HB")  # port, length of the protocol name; then the name, then the host


class FrameType(enum.IntEnum):
    HELLO = 1
    OPEN = 2
    ACCEPT = 3
    DATA = 4
    RESET = 5
    WINDOW_UPDATE = 6
    PING = 7
    PONG = 8
    GOAWAY = 9
    CONTROL = 10
    HEADERS = 11


def encode_frame(ftype: FrameType, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(ftype, flags, stream_id, len(payload)) + payload


# --- primitives ----------------------------------------------------------------------------------


def u32(payload: bytes) -> int:
    return int(_U32.unpack_from(payload)[0])


def encode_u32(value: int) -> bytes:
    return _U32.pack(value)


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} is not valid UTF-8") from None


def decode_json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(decode_text(raw, what))
    except (ValueError, RecursionError):
        raise RemoteProtocolError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} is not a JSON object")
    return value


def encode_reason(reason: str) -> bytes:
    raw = reason.encode("utf-8", "replace")
    if len(raw) > MAX_REASON_BYTES:
        raw = raw[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return raw


# --- HELLO ----------------------------------------------------------------------------------------


def encode_hello(event: Hello) -> bytes:
    """The HELLO payload: a small JSON object, at most MIN_MAX_FRAME_SIZE bytes."""
    try:
        payload = json.dumps({
            "versions": list(event.versions), "max_frame_size": event.max_frame_size,
            "initial_window": event.initial_window, "max_streams": event.max_streams,
            "info": event.info,
        }, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"HELLO info is not JSON-serialisable: {exc}") from None
    if len(payload) > MIN_MAX_FRAME_SIZE:
        raise LocalProtocolError("HELLO too large: keep the info dict small")
    return payload


def decode_hello(payload: bytes) -> Hello:
    """The peer's HELLO, every field checked (negotiating the version is the caller's job)."""
    doc = decode_json_object(payload, "HELLO")
    versions = doc.get("versions")
    info = doc.get("info", {})
    if not isinstance(versions, list) or not versions or not all(
            is_int(v) and 0 < v <= MAX_STREAM_ID for v in versions):
        raise RemoteProtocolError("HELLO: versions must be a non-empty list of positive ints")
    if not isinstance(info, dict):
        raise RemoteProtocolError("HELLO: info must be an object")
    limits: dict[str, int] = {}
    for key in ("max_frame_size", "initial_window", "max_streams"):
        value = doc.get(key)
        if not is_int(value):
            raise RemoteProtocolError(f"HELLO: {key} must be an integer")
        limits[key] = value
    if not MIN_MAX_FRAME_SIZE <= limits["max_frame_size"] <= MAX_MAX_FRAME_SIZE:
        raise RemoteProtocolError("HELLO: max_frame_size out of range")
    if not 1 <= limits["initial_window"] <= MAX_WINDOW:
        raise RemoteProtocolError("HELLO: initial_window out of range")
    if not 1 <= limits["max_streams"] <= 2**31:
        raise RemoteProtocolError("HELLO: max_streams out of range")
    return Hello(tuple(versions), limits["max_frame_size"], limits["initial_window"],
                 limits["max_streams"], info)


# --- OPEN -----------------------------------------------------------------------------------------


def encode_target(target: Target) -> bytes:
    """The OPEN payload: port u16 | protocol name length u8 | protocol name | virtual host."""
    proto = StreamProtocol(target.protocol).value.encode("ascii")
    host = target.virtual_host.encode("utf-8")
    if not host or len(host) > MAX_HOST_BYTES or not 0 <= target.port <= 65535:
        raise LocalProtocolError(f"invalid target {target}")
    return _OPEN.pack(target.port, len(proto)) + proto + host


def decode_target(payload: bytes) -> Target:
    if len(payload) < _OPEN.size:
        raise RemoteProtocolError("OPEN payload too short")
    port, proto_len = _OPEN.unpack_from(payload)
    host_at = _OPEN.size + proto_len
    if len(payload) < host_at:
        raise RemoteProtocolError("OPEN payload too short for its protocol name")
    proto_name = decode_text(payload[_OPEN.size:host_at], "OPEN protocol")
    host = decode_text(payload[host_at:], "OPEN virtual host")
    try:
        protocol = StreamProtocol(proto_name)
    except ValueError:
        raise RemoteProtocolError(f"OPEN with unknown protocol {proto_name!r}") from None
    if not host or len(payload) - host_at > MAX_HOST_BYTES:
        raise RemoteProtocolError("OPEN virtual host empty or too long")
    return Target(host, port, protocol)


# --- GOAWAY and CONTROL ---------------------------------------------------------------------------


def encode_goaway(event: GoAway) -> tuple[int, bytes]:
    """(flags, payload) of a GOAWAY: code u32 | [last stream id u32, flag LAST_ID] | reason."""
    code = _U32.pack(ErrorCode(event.code))
    if event.last_stream_id is None:
        return 0, code + encode_reason(event.reason)
    if not 0 <= event.last_stream_id <= MAX_STREAM_ID:
        raise LocalProtocolError(f"GOAWAY last stream id {event.last_stream_id} out of range")
    return FLAG_LAST_ID, code + _U32.pack(event.last_stream_id) + encode_reason(event.reason)


def decode_goaway(flags: int, payload: bytes) -> GoAway:
    reason_at = 8 if flags & FLAG_LAST_ID else 4
    if len(payload) < reason_at:
        raise RemoteProtocolError(f"GOAWAY needs {reason_at} bytes of code and last stream id")
    last = u32(payload[4:]) if flags & FLAG_LAST_ID else None
    return GoAway(ErrorCode.parse(u32(payload)), decode_text(payload[reason_at:], "GOAWAY reason"), last)


def encode_control(event: Control) -> bytes:
    if not isinstance(event.op, str) or not event.op or not isinstance(event.body, dict):
        raise LocalProtocolError("CONTROL needs a non-empty string op and a dict body")
    try:
        return json.dumps({"op": event.op, "body": event.body}, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"CONTROL body is not JSON-serialisable: {exc}") from None


def decode_control(payload: bytes) -> Control:
    doc = decode_json_object(payload, "CONTROL")
    op, body = doc.get("op"), doc.get("body", {})
    if not isinstance(op, str) or not op or not isinstance(body, dict):
        raise RemoteProtocolError("CONTROL needs a non-empty string op and an object body")
    return Control(op, body)
