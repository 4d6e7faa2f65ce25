"""A SOCKS5 client for tests: RFC 1929 username/password or SAP's method 0x80."""

from __future__ import annotations

import base64
import struct

import trio


async def _read_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise EOFError("SOCKS5 server closed the connection")
        data += chunk
    return data


async def socks5_connect(
    port: int, host: str, target_port: int, *, token: str, subaccount: str | None = None,
    method: int = 0x02, location_id: str = "",
) -> tuple[trio.SocketStream, int]:
    """Return (stream, reply code); the stream carries the target's bytes when the code is 0."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(bytes([5, 1, method]))
    assert await _read_exactly(stream, 2) == bytes([5, method])
    if method == 0x02:
        user = (subaccount or "") + (f";{location_id}" if location_id else "")
        await stream.send_all(bytes([1, len(user)]) + user.encode() + bytes([len(token)]) + token.encode())
    else:
        location = base64.b64encode(location_id.encode()) if location_id else b""
        await stream.send_all(bytes([1]) + struct.pack(">I", len(token)) + token.encode()
                              + bytes([len(location)]) + location)
    status = await _read_exactly(stream, 2)
    if status[1] != 0:
        await stream.aclose()
        return stream, -1
    name = host.encode()
    await stream.send_all(bytes([5, 1, 0, 3, len(name)]) + name + struct.pack(">H", target_port))
    head = await _read_exactly(stream, 4)
    if head[3] == 1:
        await _read_exactly(stream, 6)
    elif head[3] == 4:
        await _read_exactly(stream, 18)
    else:
        await _read_exactly(stream, (await _read_exactly(stream, 1))[0] + 2)
    return stream, head[1]
