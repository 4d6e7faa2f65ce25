"""Fast paths under the tunnel's own websocket: fewer copies framing, more records per TLS read.

trio-websocket (over wsproto and trio's SSLStream) is the tunnel's transport; at full throughput
three of its habits cost more than the tunnel's own work. The functions here adjust one
connection's objects in place, each checking first that the internals it relies on are there and
leaving the connection stock otherwise (the tunnel still works, only slower). They are applied by
`connector.tunnel.session` to the tunnel's websocket and nowhere else.
"""

from __future__ import annotations

import struct
from typing import Any

import trio
import trio_websocket

# --- websocket framing fast path --------------------------------------------------------------
#
# wsproto serialises a data frame with four copies of the payload and, on the client, masks it
# with a fresh random key (one getrandom() call and a byte-wise XOR per message); the server
# unmasks every byte it receives. Measured, that was an eighth of the cloud's CPU at full
# throughput. Masking exists so that hostile scripts in browsers cannot choose bytes seen by
# intermediaries (RFC 6455 section 10.3); the tunnel is a mutually authenticated TLS connection
# between two programs of ours, so nothing on the path sees the frames. Hence, on the tunnel's
# own websocket only (`fast_framing`), data frames are built with one copy, and the node masks
# with the all-zero key, which is valid on the wire (any server accepts it). Receiving, an
# all-zero key is the identity: `_ZeroKeyMasker` returns such payloads without the XOR, in
# every wsproto connection of the process (it computes exactly what wsproto's masker does for
# every key). Control frames and connections with extensions keep wsproto's own code. If
# wsproto or trio-websocket change their internals, both fall back to the stock behaviour.


def install_zero_key_masker() -> bool:
    try:
        from wsproto import frame_protocol
        stock = frame_protocol.XorMaskerSimple
        stock(b"\x01\x02\x03\x04").process(bytearray(b"probe"))
    except Exception:  # noqa: BLE001 - any mismatch: leave wsproto alone
        return False
    if getattr(stock, "_connector_zero_key", False):
        return True

    class _ZeroKeyMasker(stock):  # type: ignore[misc, valid-type]
        _connector_zero_key = True

        def process(self, data: bytearray) -> bytearray:
            if self._masking_key == b"\0\0\0\0":
                return data if isinstance(data, bytearray) else bytearray(data)
            result: bytearray = super().process(data)
            return result

    frame_protocol.XorMaskerSimple = _ZeroKeyMasker  # type: ignore[misc]
    return True


ZERO_KEY_MASKER = install_zero_key_masker()
_FRAME_LEN16 = struct.Struct("!BBH")
_FRAME_LEN64 = struct.Struct("!BBQ")


def fast_framing(ws: trio_websocket.WebSocketConnection) -> bool:
    """Serialise data frames of `ws` with one copy and (client) a zero masking key; see above."""
    try:
        proto = ws._wsproto.connection._proto  # type: ignore[union-attr]
        original = proto._serialize_frame
        client = bool(proto.client)
        extensions = proto.extensions
    except AttributeError:
        return False
    if extensions or (client and not ZERO_KEY_MASKER):
        return False
    mask_bit = 0x80 if client else 0
    key = b"\0\0\0\0" if client else b""

    def serialize(opcode: Any, payload: bytes | bytearray = b"", fin: bool = True) -> bytes:
        if opcode.iscontrol():
            control: bytes = bytes(original(opcode, payload, fin))  # small: a ping, pong or close
            return control
        first = (0x80 if fin else 0) | int(opcode)
        n = len(payload)
        if n <= 125:
            header = bytes((first, mask_bit | n))
        elif n <= 0xFFFF:
            header = _FRAME_LEN16.pack(first, mask_bit | 126, n)
        else:
            header = _FRAME_LEN64.pack(first, mask_bit | 127, n)
        return b"".join((header, key, payload))

    proto._serialize_frame = serialize  # type: ignore[method-assign]
    return True


# --- TLS receive fast path --------------------------------------------------------------------
#
# trio-websocket's reader asks its stream for `receive_buffer_size` bytes per loop, but trio's
# SSLStream answers one `SSLObject.read()`, and OpenSSL returns at most one TLS record (16 KiB)
# per read, even when the socket read (64 KiB) brought several. Each record then costs a whole
# reader loop: a trio checkpoint (a trip through the scheduler), trio's `_retry` bookkeeping and
# a wsproto `events()` pass. `greedy_tls_receive` gives the tunnel's SSLStream a receive_some
# that, after trio's own call returned, also decrypts the records already sitting in the
# stream's incoming memory BIO (no I/O, no waiting) up to `max_bytes`, and returns them joined.
# It stops at the first read that wants more bytes, fails, hits EOF, or leaves bytes to send
# (a TLS 1.3 KeyUpdate answer): those cases are left to trio's next call, which handles each of
# them (trio sends any pending outgoing bytes on its next operation). Decrypting is
# synchronous, so no other task can run in between; trio's own send path is never entered.
# The socket underneath is read `TLS_SOCKET_READ` at a time instead of trio's 64 KiB, so one
# loop takes everything the kernel holds. If trio's internals change (attributes missing), the stream is left alone.


TLS_SOCKET_READ = 256 * 1024  # bytes the tunnel's TLS stream asks its socket for at once


def greedy_tls_receive(ws: trio_websocket.WebSocketConnection) -> bool:
    """Make `ws`'s TLS stream return every already-received record per receive_some; see above."""
    stream = getattr(ws, "_stream", None)
    if not isinstance(stream, trio.SSLStream):
        return False
    try:
        ssl_object = stream._ssl_object  # type: ignore[attr-defined]
        incoming = stream._incoming  # type: ignore[attr-defined]
        outgoing = stream._outgoing  # type: ignore[attr-defined]
        stock = stream.receive_some
        read, pending = ssl_object.read, ssl_object.pending
    except AttributeError:
        return False

    async def receive_some(max_bytes: int | None = None) -> bytes | bytearray:
        data = await stock(max_bytes)
        if not data or max_bytes is None:
            return data
        room = max_bytes - len(data)
        if room <= 0 or not (incoming.pending or pending()):
            return data
        parts = [data]
        while room > 0 and (incoming.pending or pending()):
            try:
                more = read(room)
            except Exception:  # noqa: BLE001 - want-read, EOF or error: trio's next call handles it
                break
            if not more:
                break
            parts.append(more)
            room -= len(more)
            if outgoing.pending:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    try:
        stream.receive_some = receive_some  # type: ignore[method-assign]
    except AttributeError:
        return False
    transport = stream.transport_stream
    if isinstance(transport, trio.SocketStream):
        # trio's SSLStream asks its socket for "some" bytes, which trio reads 64 KiB at a time;
        # ask for up to TLS_SOCKET_READ so one loop takes what the kernel has (more records).
        socket_receive = transport.receive_some

        async def receive_more(max_bytes: int | None = None) -> bytes | bytearray:
            return await socket_receive(TLS_SOCKET_READ if max_bytes is None else max_bytes)

        try:
            transport.receive_some = receive_more  # type: ignore[method-assign, assignment]  # trio types it as bytes
        except AttributeError:
            pass
    return True
