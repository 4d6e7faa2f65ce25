"""Keepalive timing under `autojump_clock`, over trio-websocket on in-memory streams.

The socket is not the point here, the clock is: exact virtual times are asserted.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from connector.tunnel.session import TunnelError, TunnelSession, TunnelSettings
from connector.tunnel.types import ErrorCode

CLOUD = TunnelSettings(ping_interval=1.0, ping_timeout=3.0)


async def connected(
    nursery: trio.Nursery, cloud_settings: TunnelSettings, node_settings: TunnelSettings
) -> tuple[TunnelSession, TunnelSession]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    results: dict[str, TunnelSession] = {}

    async def server_side() -> None:
        request = await trio_websocket.wrap_server_stream(nursery, server_stream)
        ws = await request.accept()
        results["cloud"] = session = TunnelSession(ws, client=False, settings=cloud_settings)
        await session.handshake()

    async def client_side() -> None:
        ws = await trio_websocket.wrap_client_stream(nursery, client_stream, "localhost", "/t")
        results["node"] = session = TunnelSession(ws, client=True, settings=node_settings)
        await session.handshake()

    async with trio.open_nursery() as both:
        both.start_soon(server_side)
        both.start_soon(client_side)
    return results["cloud"], results["node"]


async def test_ping_timeout_fires_exactly_one_timeout_after_the_first_unanswered_ping(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def stuck(op: str, body: dict[str, Any]) -> None:
        await trio.sleep_forever()  # the node's reader never reads again

    # the node keeps sending its own pings every 0.5 s: frames that must not count as answers
    node_settings = TunnelSettings(ping_interval=0.5, ping_timeout=1000.0)
    async with trio.open_nursery() as nursery:
        cloud, node = await connected(nursery, CLOUD, node_settings)
        await nursery.start(cloud.run)
        await nursery.start(lambda task_status: node.run(control_handler=stuck,
                                                         task_status=task_status))
        start = trio.current_time()
        await cloud.send_control("freeze", {})
        await cloud.wait_closed()
        assert trio.current_time() - start == 4.0  # first ping at +1, unanswered for 3
        assert cloud.close_reason == (ErrorCode.TUNNEL_LOST, "ping timeout")
        nursery.cancel_scope.cancel()


async def test_healthy_tunnel_stays_up_and_measures_rtt(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        cloud, node = await connected(nursery, CLOUD, CLOUD)
        await nursery.start(cloud.run)
        await nursery.start(node.run)
        assert cloud.statistics().last_rtt is None
        await trio.sleep(60.0)
        assert not cloud.closed and not node.closed
        assert cloud.statistics().last_rtt == 0.0  # virtual time stands still in between
        assert node.statistics().last_rtt == 0.0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("settings", "deadline"),
    [(CLOUD, CLOUD.ping_timeout), (TunnelSettings(ping_interval=1.0, ping_timeout=3.0, hello_timeout=7.0), 7.0)],
    ids=["ping_timeout", "hello_timeout"],
)
async def test_handshake_without_answer_times_out_after_hello_timeout(
    autojump_clock: trio.abc.Clock, settings: TunnelSettings, deadline: float,
) -> None:
    """HELLO's deadline is `hello_timeout`, or `ping_timeout` when that is not set."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def silent_server() -> None:
            request = await trio_websocket.wrap_server_stream(nursery, server_stream)
            await request.accept()  # ... and never says HELLO
            await trio.sleep_forever()

        nursery.start_soon(silent_server)
        ws = await trio_websocket.wrap_client_stream(nursery, client_stream, "localhost", "/t")
        node = TunnelSession(ws, client=True, settings=settings)
        start = trio.current_time()
        with pytest.raises(TunnelError) as info:
            await node.handshake()
        assert (info.value.code, info.value.reason) == (ErrorCode.TUNNEL_LOST, "handshake timeout")
        assert trio.current_time() - start == deadline
        nursery.cancel_scope.cancel()
