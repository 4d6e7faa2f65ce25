"""A real tunnel session pair in memory, for tests of the proxy and the node beside the tunnel.

Both ends are `TunnelSession`s over trio-websocket over `trio.testing.memory_stream_pair`, so a
test runs exactly the framing, flow control and exchange-stream code production runs; only the
sockets and TLS are left out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing
import trio_websocket

from connector.tunnel.session import StreamHandler, TunnelSession, TunnelSettings


@asynccontextmanager
async def session_pair(
    handler: StreamHandler, *, settings: TunnelSettings | None = None,
) -> AsyncIterator[tuple[TunnelSession, TunnelSession]]:
    """Yield (cloud, node) sessions, running; `handler` serves each stream the cloud opens."""
    async with trio.open_nursery() as nursery:
        client_end, server_end = trio.testing.memory_stream_pair()
        server_ws: list[trio_websocket.WebSocketConnection] = []

        async def accept() -> None:
            request = await trio_websocket.wrap_server_stream(nursery, server_end)
            server_ws.append(await request.accept())

        async with trio.open_nursery() as handshake:
            handshake.start_soon(accept)
            client_ws = await trio_websocket.wrap_client_stream(
                nursery, client_end, "tunnel.test", "/tunnel")  # type: ignore[arg-type]  # any trio stream works
        settings = settings or TunnelSettings()
        cloud = TunnelSession(server_ws[0], client=False, settings=settings)
        node = TunnelSession(client_ws, client=True, settings=settings)
        async with trio.open_nursery() as hello:
            hello.start_soon(cloud.handshake)
            hello.start_soon(node.handshake)
        await nursery.start(lambda task_status: cloud.run(task_status=task_status))
        await nursery.start(lambda task_status: node.run(stream_handler=handler, task_status=task_status))
        try:
            yield cloud, node
        finally:
            nursery.cancel_scope.cancel()
