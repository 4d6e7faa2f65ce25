"""The websocket framing fast path of connector.tunnel.session, against stock trio-websocket.

Real websockets on 127.0.0.1 (plain ws, port 0): one end with `_fast_framing`, the other stock;
every payload length class of RFC 6455 (7-bit, 16-bit, 64-bit lengths) goes both ways intact.
"""

from __future__ import annotations

import os
from functools import partial

import trio
import trio_websocket
from wsproto import frame_protocol

from connector.tunnel import session

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70001, 300_000]
TEST_DEADLINE = 20.0


async def _exchange(fast_client: bool, fast_server: bool) -> list[bytes]:
    """Send each size client->server, server echoes; return what the client got back."""
    payloads = [os.urandom(n) for n in SIZES]
    applied: list[bool] = []

    async def serve(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        if fast_server:
            applied.append(session._fast_framing(ws))
        for _ in SIZES:
            await ws.send_message(await ws.get_message())

    received = []
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(
                trio_websocket.serve_websocket, serve, "127.0.0.1", 0, ssl_context=None,
                max_message_size=1 << 20))
            ws = await trio_websocket.connect_websocket(
                nursery, "127.0.0.1", server.port, "/t", use_ssl=False, max_message_size=1 << 20)
            if fast_client:
                applied.append(session._fast_framing(ws))
            for payload in payloads:
                await ws.send_message(payload)
                received.append(await ws.get_message())
            await ws.aclose()
            nursery.cancel_scope.cancel()
    assert applied == [True] * (fast_client + fast_server)
    assert received == payloads
    return received


async def test_fast_client_and_stock_server() -> None:
    await _exchange(fast_client=True, fast_server=False)


async def test_stock_client_and_fast_server() -> None:
    await _exchange(fast_client=False, fast_server=True)


async def test_fast_both_ends() -> None:
    await _exchange(fast_client=True, fast_server=True)


def test_zero_key_masker_matches_wsproto_for_every_key() -> None:
    assert session._ZERO_KEY_MASKER
    stock = frame_protocol.XorMaskerSimple.__mro__[1]
    for key in (b"\0\0\0\0", b"\x01\x02\x03\x04", b"\0\0\0\x01", os.urandom(4)):
        fast, reference = frame_protocol.XorMaskerSimple(key), stock(key)
        for size in (0, 1, 3, 4, 5, 1000, 65537):  # odd sizes rotate the key between calls
            data = bytearray(os.urandom(size))
            assert fast.process(bytearray(data)) == reference.process(bytearray(data))
