"""The HTTP proxy over a real tunnel session: kept-alive streams checked with `peer_activity`.

A cloud and a node TunnelSession over a plain websocket on 127.0.0.1; the node answers each
request with its stream id, then, for /close, ends the stream, and for /stray, writes bytes
nobody asked for (/glued: in the same write as the response). The application's next request must go to a fresh stream, without the
"sent once more" retry (the closed stream was seen when the request arrived, before anything was
sent on it).
"""

from __future__ import annotations

import logging
from functools import partial

import h11
import pytest
import trio
import trio_websocket

from connector.cloud.auth import Authenticator, hash_token
from connector.cloud.proxy import HttpProxy, ProxySettings
from connector.tunnel.session import SessionStream, TunnelSession, TunnelSettings
from connector.tunnel.types import Target

TOKEN = "app-token"
SETTINGS = TunnelSettings(ping_interval=0.5, ping_timeout=5.0)
TEST_DEADLINE = 20.0


async def node_handler(stream: SessionStream) -> None:
    """One request per loop; /close ends the stream after answering, /stray adds junk bytes."""
    await stream.accept()
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            target = event.target
            continue
        if isinstance(event, h11.EndOfMessage):
            body = str(stream.stream_id).encode()
            out = conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"%d" % len(body))]))
            out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            if target == b"/glued":
                out += b"junk"  # in the same frame as the response: the proxy's h11 reads it
            await stream.send_all(out)
            conn.start_next_cycle()
            if target == b"/close":
                await stream.aclose()
                return
            if target == b"/stray":
                await stream.send_all(b"junk")
            continue
        return


class SessionRouter:
    def __init__(self, cloud: TunnelSession) -> None:
        self.cloud = cloud
        self.streams: list[SessionStream] = []

    async def open_stream(self, subaccount: str, location_id: str, target: Target) -> SessionStream:
        stream = await self.cloud.open_stream(target)
        self.streams.append(stream)
        return stream


async def get(sock: trio.SocketStream, conn: h11.Connection, path: bytes) -> bytes:
    if conn.our_state is h11.DONE:
        conn.start_next_cycle()
    request = h11.Request(method=b"GET", target=b"http://erp.virtual:8000" + path, headers=[
        (b"host", b"erp.virtual:8000"), (b"proxy-authorization", b"Bearer " + TOKEN.encode())])
    await sock.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await sock.receive_some(65536))
        elif isinstance(event, h11.Response):
            assert event.status_code == 200, event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return body


@pytest.mark.parametrize(("path", "warning"), [(b"/close", False), (b"/stray", True), (b"/glued", False)])
async def test_idle_stream_the_node_ended_or_spoiled_is_replaced(
    path: bytes, warning: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connector.cloud.proxy")
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            clouds: trio.MemorySendChannel[TunnelSession]
            clouds, cloud_ready = trio.open_memory_channel(1)

            async def serve(request: trio_websocket.WebSocketRequest) -> None:
                ws = await request.accept()
                session = TunnelSession(ws, client=False, settings=SETTINGS)
                await session.handshake()
                await clouds.send(session)
                await session.run()

            server = await nursery.start(partial(
                trio_websocket.serve_websocket, serve, "127.0.0.1", 0, ssl_context=None))
            ws = await trio_websocket.connect_websocket(
                nursery, "127.0.0.1", server.port, "/t", use_ssl=False)
            node = TunnelSession(ws, client=True, settings=SETTINGS)
            await node.handshake()
            nursery.start_soon(partial(node.run, stream_handler=node_handler))
            cloud = await cloud_ready.receive()

            router = SessionRouter(cloud)
            proxy = HttpProxy(router, Authenticator({"sub": [hash_token(TOKEN)]}),  # type: ignore[arg-type]
                              settings=ProxySettings(linger_timeout=0.5))
            port = await nursery.start(proxy.run, "127.0.0.1", 0)
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            conn = h11.Connection(h11.CLIENT)

            first = await get(sock, conn, path)
            assert first == str(router.streams[0].stream_id).encode()
            # the node's FIN / junk crosses a real socket: poll (bounded by TEST_DEADLINE)
            while path != b"/glued" and router.streams[0].peer_activity() == "idle":  # noqa: ASYNC110
                await trio.sleep(0.005)
            second = await get(sock, conn, b"/next")
            assert len(router.streams) == 2
            assert second == str(router.streams[1].stream_id).encode()
            assert "once more" not in caplog.text  # seen when the request came: nothing resent
            assert ("sent bytes on an idle stream" in caplog.text) == warning
            third = await get(sock, conn, b"/next")  # a healthy kept-alive stream is reused
            assert third == second and len(router.streams) == 2
            await sock.aclose()
            nursery.cancel_scope.cancel()
