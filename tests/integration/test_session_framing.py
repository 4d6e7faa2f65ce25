"""The websocket framing fast path of connector.tunnel.session, against stock trio-websocket.

Real websockets on 127.0.0.1 (plain ws, port 0): one end with `wsfast.fast_framing`, the other stock;
every payload length class of RFC 6455 (7-bit, 16-bit, 64-bit lengths) goes both ways intact.
The TLS receive fast path (`wsfast.greedy_tls_receive`) over real TLS: messages spanning many TLS
records arrive intact, and one receive returns several records.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import trio
import trio_websocket
from wsproto import frame_protocol

from connector import pki
from connector.tunnel import wsfast

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70001, 300_000]
TEST_DEADLINE = 20.0


async def _exchange(fast_client: bool, fast_server: bool) -> list[bytes]:
    """Send each size client->server, server echoes; return what the client got back."""
    payloads = [os.urandom(n) for n in SIZES]
    applied: list[bool] = []

    async def serve(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        if fast_server:
            applied.append(wsfast.fast_framing(ws))
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
                applied.append(wsfast.fast_framing(ws))
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
    assert wsfast.ZERO_KEY_MASKER
    stock = frame_protocol.XorMaskerSimple.__mro__[1]
    for key in (b"\0\0\0\0", b"\x01\x02\x03\x04", b"\0\0\0\x01", os.urandom(4)):
        fast, reference = frame_protocol.XorMaskerSimple(key), stock(key)
        for size in (0, 1, 3, 4, 5, 1000, 65537):  # odd sizes rotate the key between calls
            data = bytearray(os.urandom(size))
            assert fast.process(bytearray(data)) == reference.process(bytearray(data))


async def test_greedy_tls_receive_over_real_tls(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path, "ca", "test ca")
    server_cert = pki.issue(ca, tmp_path, "server", common_name="server", server_names=["127.0.0.1"])
    client_cert = pki.issue(ca, tmp_path, "client", common_name="client", client=True)
    server_ctx = pki.server_context(server_cert.cert_path, server_cert.key_path, [ca.cert_path])
    client_ctx = pki.client_context(ca.cert_path, client_cert.cert_path, client_cert.key_path)
    payloads = [os.urandom(n) for n in (*SIZES, 600_000)]
    applied: list[bool] = []
    biggest_receive: list[int] = []

    async def serve(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        applied.append(wsfast.greedy_tls_receive(ws))
        greedy = ws._stream.receive_some  # type: ignore[attr-defined]

        async def measured(max_bytes: int | None = None) -> bytes | bytearray:
            data = await greedy(max_bytes)
            biggest_receive.append(len(data))
            return data

        ws._stream.receive_some = measured  # type: ignore[attr-defined]
        for _ in payloads:
            await ws.send_message(await ws.get_message())

    received = []
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(
                trio_websocket.serve_websocket, serve, "127.0.0.1", 0, ssl_context=server_ctx,
                max_message_size=1 << 20, receive_buffer_size=262144))
            ws = await trio_websocket.connect_websocket(
                nursery, "127.0.0.1", server.port, "/t", use_ssl=client_ctx,
                max_message_size=1 << 20, receive_buffer_size=262144)
            applied.append(wsfast.greedy_tls_receive(ws))
            for payload in payloads:
                await ws.send_message(payload)
                received.append(await ws.get_message())
            await ws.aclose()
            nursery.cancel_scope.cancel()
    assert applied == [True, True]
    assert received == payloads
    assert max(biggest_receive) > 16384  # several TLS records (16 KiB each at most) in one receive


async def test_greedy_tls_receive_leaves_plain_streams_alone() -> None:
    async def serve(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(
                trio_websocket.serve_websocket, serve, "127.0.0.1", 0, ssl_context=None))
            ws = await trio_websocket.connect_websocket(
                nursery, "127.0.0.1", server.port, "/t", use_ssl=False)
            assert wsfast.greedy_tls_receive(ws) is False
            await ws.send_message(b"x")
            await ws.aclose()
            nursery.cancel_scope.cancel()
