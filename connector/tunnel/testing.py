"""A real tunnel session pair in memory, for tests of the proxy and the node beside the tunnel.

Both ends are `TunnelSession`s over trio-websocket over `trio.testing.memory_stream_pair`, so a
test runs exactly the framing, flow control and exchange-stream code production runs; only the
sockets and TLS are left out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio
import trio.testing
import trio_websocket

from connector.tunnel.session import StreamHandler, TunnelError, TunnelSession, TunnelSettings


class HandshakeFailed(Exception):
    """`session_pair`'s handshake failed; each end's TunnelError (None: that end succeeded)."""

    def __init__(self, cloud: TunnelError | None, node: TunnelError | None) -> None:
        super().__init__(f"cloud: {cloud}; node: {node}")
        self.cloud = cloud
        self.node = node


@asynccontextmanager
async def session_pair(
    handler: StreamHandler, *, settings: TunnelSettings | None = None,
    versions: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> AsyncIterator[tuple[TunnelSession, TunnelSession]]:
    """Yield (cloud, node) sessions, running; `handler` serves each stream the cloud opens.

    `versions`: (the cloud's, the node's) protocol versions, to test negotiation; by default both
    speak `settings.versions`. A failed handshake raises HandshakeFailed.
    """
    settings = settings or TunnelSettings()
    failed: dict[str, TunnelError] = {}
    cloud_settings = node_settings = settings
    if versions is not None:
        cloud_settings = attrs.evolve(settings, versions=versions[0])
        node_settings = attrs.evolve(settings, versions=versions[1])
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
        cloud = TunnelSession(server_ws[0], client=False, settings=cloud_settings)
        node = TunnelSession(client_ws, client=True, settings=node_settings)

        async def hello(side: str, session: TunnelSession) -> None:
            try:
                await session.handshake()
            except TunnelError as exc:
                failed[side] = exc

        async with trio.open_nursery() as hellos:
            hellos.start_soon(hello, "cloud", cloud)
            hellos.start_soon(hello, "node", node)
        if failed:
            nursery.cancel_scope.cancel()
        else:
            await nursery.start(lambda task_status: cloud.run(task_status=task_status))
            await nursery.start(
                lambda task_status: node.run(stream_handler=handler, task_status=task_status))
            try:
                yield cloud, node
            finally:
                nursery.cancel_scope.cancel()
    if failed:  # raised outside the nursery, so that it is not wrapped in an exception group
        raise HandshakeFailed(failed.get("cloud"), failed.get("node"))
