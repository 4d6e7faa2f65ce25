"""Bad input at the session level: a raw websocket peer speaking broken tunnel protocol.

Each kind of breakage must close the tunnel with GOAWAY carrying the right code and a clear
reason, fail open streams with TUNNEL_LOST, and never crash with anything else.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio_websocket

from connector.tunnel import protocol as p
from connector.tunnel.session import SessionStream, TunnelError, TunnelSession, TunnelSettings
from connector.tunnel.types import ErrorCode, StreamProtocol, StreamResetError, Target

SETTINGS = TunnelSettings(ping_interval=0.05, ping_timeout=2.0)
TEST_DEADLINE = 20.0


async def cloud_with_raw_node(
    nursery: trio.Nursery,
) -> tuple[TunnelSession, trio_websocket.WebSocketConnection, p.Connection]:
    """A real cloud session, and a node that is just a websocket plus a protocol Connection."""
    send, receive = trio.open_memory_channel[TunnelSession](1)

    async def serve(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        session = TunnelSession(ws, client=False, settings=SETTINGS)
        await session.handshake()
        await send.send(session)
        await session.run()

    server = await nursery.start(partial(
        trio_websocket.serve_websocket, serve, "127.0.0.1", 0, ssl_context=None))
    ws = await trio_websocket.connect_websocket(
        nursery, "127.0.0.1", server.port, "/tunnel", use_ssl=False)
    raw = p.Connection(client=True)
    await ws.send_message(raw.send(raw.make_hello()))
    raw.receive_data(await ws.get_message())
    assert isinstance(raw.next_event(), p.Hello)
    return await receive.receive(), ws, raw


async def goaway_from(ws: trio_websocket.WebSocketConnection, raw: p.Connection) -> p.GoAway:
    while True:
        for event in raw.events():
            if isinstance(event, p.GoAway):
                return event
        raw.receive_data(await ws.get_message())


@pytest.mark.parametrize(("garbage", "code", "reason"), [
    (p.HEADER.pack(99, 0, 0, 0), ErrorCode.PROTOCOL_ERROR, "unknown frame type 99"),
    (p.HEADER.pack(p.FrameType.DATA, 0, 1, 10**6), ErrorCode.FRAME_TOO_LARGE, "exceeds"),
    (p.HEADER.pack(p.FrameType.DATA, 0, 4, 1) + b"x", ErrorCode.PROTOCOL_ERROR, "never opened"),
    (p.HEADER.pack(p.FrameType.CONTROL, 0, 0, 3) + b"{{{", ErrorCode.PROTOCOL_ERROR, "JSON"),
    ("a text message", ErrorCode.PROTOCOL_ERROR, "text websocket message"),
])
async def test_broken_peer_gets_goaway_and_the_tunnel_closes(
    garbage: bytes | str, code: ErrorCode, reason: str
) -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            cloud, ws, raw = await cloud_with_raw_node(nursery)
            stream = await cloud.open_stream(Target("h", 1))
            await ws.send_message(garbage)
            goaway = await goaway_from(ws, raw)
            assert goaway.code == code and reason in goaway.reason
            await cloud.wait_closed()
            assert cloud.close_reason is not None and cloud.close_reason[0] == code
            with pytest.raises(StreamResetError) as info:
                await stream.receive_some()
            assert info.value.code == ErrorCode.TUNNEL_LOST
            nursery.cancel_scope.cancel()


async def test_flow_control_violation_by_the_peer_closes_the_tunnel() -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            cloud, ws, raw = await cloud_with_raw_node(nursery)
            await cloud.open_stream(Target("h", 1, StreamProtocol.TCP))  # a byte pipe: DATA first
            raw.receive_data(await ws.get_message())
            assert isinstance(next(e for e in raw.events() if isinstance(e, p.OpenStream)),
                              p.OpenStream)
            window = SETTINGS.initial_window
            overrun = b"".join(p.HEADER.pack(p.FrameType.DATA, 0, 2, 65536) + bytes(65536)
                               for _ in range(window // 65536 + 1))
            await ws.send_message(overrun)
            goaway = await goaway_from(ws, raw)
            assert goaway.code == ErrorCode.FLOW_CONTROL_ERROR
            await cloud.wait_closed()
            assert cloud.close_reason is not None
            assert cloud.close_reason[0] == ErrorCode.FLOW_CONTROL_ERROR
            nursery.cancel_scope.cancel()


async def test_opens_without_a_stream_handler_are_refused_and_handler_crash_resets() -> None:
    async def crashing(stream: SessionStream) -> None:
        raise RuntimeError("bug in a handler")

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[TunnelSession](1)

            async def serve(request: trio_websocket.WebSocketRequest) -> None:
                ws = await request.accept()
                session = TunnelSession(ws, client=False, settings=SETTINGS)
                await session.handshake()
                await send.send(session)
                await session.run()

            server = await nursery.start(partial(
                trio_websocket.serve_websocket, serve, "127.0.0.1", 0, ssl_context=None))
            ws = await trio_websocket.connect_websocket(
                nursery, "127.0.0.1", server.port, "/t", use_ssl=False)
            node = TunnelSession(ws, client=True, settings=SETTINGS)
            await node.handshake()
            cloud = await receive.receive()
            nursery.start_soon(partial(node.run, stream_handler=crashing))
            stream = await cloud.open_stream(Target("h", 1))
            with pytest.raises(StreamResetError) as info:
                await stream.wait_accepted()
            assert (info.value.code, info.value.reason) == (
                ErrorCode.INTERNAL_ERROR, "stream handler failed")
            # the node opening a stream to the cloud, which has no handler: refused, tunnel up
            back = await node.open_stream(Target("cloud-side", 2))
            with pytest.raises(StreamResetError) as info:
                await back.wait_accepted()
            assert info.value.code == ErrorCode.REFUSED
            assert not back.peer_started  # a refusal is not the peer processing the stream
            assert not cloud.closed and not node.closed
            await cloud.aclose(ErrorCode.GOING_AWAY, "shutdown")
            await node.wait_closed()
            assert node.close_reason == (ErrorCode.GOING_AWAY, "shutdown")
            with pytest.raises(TunnelError):
                await cloud.open_stream(Target("h", 1))
            nursery.cancel_scope.cancel()


async def test_misuse_before_the_handshake_is_refused() -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            cloud, ws, raw = await cloud_with_raw_node(nursery)
            fresh = TunnelSession(ws, client=True)
            with pytest.raises(RuntimeError):
                await fresh.open_stream(Target("h", 1))
            with pytest.raises(RuntimeError):
                await fresh.send_control("x", {})
            with pytest.raises(RuntimeError):
                await fresh.run()
            with pytest.raises(ValueError):
                await cloud.open_stream(Target("", 1))
            nursery.cancel_scope.cancel()


async def test_a_version_1_hello_gets_goaway_unsupported_version_on_the_wire() -> None:
    """What an old node receives: one GOAWAY whose reason it logs as it is."""
    refused: list[TunnelError] = []
    server_done = trio.Event()

    async def serve(request: trio_websocket.WebSocketRequest) -> None:
        session = TunnelSession(await request.accept(), client=False, settings=SETTINGS)
        with pytest.raises(TunnelError) as info:
            await session.handshake()
        refused.append(info.value)
        server_done.set()

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(
                trio_websocket.serve_websocket, serve, "127.0.0.1", 0, ssl_context=None))
            ws = await trio_websocket.connect_websocket(
                nursery, "127.0.0.1", server.port, "/tunnel", use_ssl=False)
            old_node = p.Connection(client=True, versions=(1,))
            await ws.send_message(old_node.send(old_node.make_hello()))
            goaway = await goaway_from(ws, old_node)
            assert goaway == p.GoAway(
                ErrorCode.UNSUPPORTED_VERSION,
                "no common tunnel protocol version: the node speaks 1, the cloud speaks 2; "
                "upgrade the node to a release that speaks version 2")
            with pytest.raises(trio_websocket.ConnectionClosed):  # and the cloud hangs up
                await ws.get_message()
            await server_done.wait()
            assert [(e.code, e.reason) for e in refused] == [(goaway.code, goaway.reason)]
            nursery.cancel_scope.cancel()
