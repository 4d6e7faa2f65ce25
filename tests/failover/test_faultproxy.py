"""FaultProxy on loopback: pass forwards both ways, blackhole stalls, reset cuts and refuses."""

from __future__ import annotations

import functools

import pytest
import trio

from tests.failover.faultproxy import FaultProxy


async def echo_server(nursery: trio.Nursery) -> int:
    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_pass_blackhole_pass_reset() -> None:
    async with trio.open_nursery() as nursery:
        proxy = FaultProxy("127.0.0.1", await echo_server(nursery))
        port = await nursery.start(proxy.run)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await client.send_all(b"one")
        assert await client.receive_some(10) == b"one"

        proxy.set_mode("blackhole")
        await client.send_all(b"two")
        with trio.move_on_after(0.3) as stalled:
            await client.receive_some(10)
        assert stalled.cancelled_caught  # nothing comes through, and nothing fails either

        proxy.set_mode("pass")  # what was held is delivered
        with trio.fail_after(2):
            assert await client.receive_some(10) == b"two"

        proxy.set_mode("reset")
        with trio.fail_after(2):
            assert await client.receive_some(10) == b""  # cut
        fresh = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(2):
            try:
                assert await fresh.receive_some(10) == b""  # refused at once
            except trio.BrokenResourceError:
                pass
        nursery.cancel_scope.cancel()


def test_unknown_mode_is_refused() -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(ValueError):
        proxy.set_mode("drop")
    assert proxy.mode == "pass"
