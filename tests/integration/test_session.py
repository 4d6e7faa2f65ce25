"""TunnelSession over real trio-websocket connections on 127.0.0.1 (plain ws, port 0).

Tests about bytes use streams to TCP targets (byte pipes); tests about HTTP heads use streams to
HTTP targets (exchange streams: the request head comes first).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio_websocket

from connector import metrics
from connector.tunnel.session import SessionStream, TunnelError, TunnelSession, TunnelSettings
from connector.tunnel.types import ErrorCode, StreamProtocol, StreamResetError, Target

TARGET = Target("erp.internal", 8080, StreamProtocol.TCP)
FAST = TunnelSettings(ping_interval=0.05, ping_timeout=2.0)
RECEIVE_BUFFER = 262144
TEST_DEADLINE = 30.0  # no test here may hang longer than this (real seconds)


@attrs.define
class Pair:
    cloud: TunnelSession
    node: TunnelSession
    node_scope: trio.CancelScope  # cancel it to make the node vanish (crash-like)


async def read_all(stream: SessionStream) -> bytes:
    parts = []
    while chunk := await stream.receive_some(65536):
        parts.append(chunk)
    return b"".join(parts)


async def echo(stream: SessionStream) -> None:
    await stream.accept()
    while chunk := await stream.receive_some():
        await stream.send_all(chunk)
    await stream.send_eof()


async def start_pair(
    nursery: trio.Nursery,
    *,
    node_handler: Callable[[SessionStream], Awaitable[None]] | None = echo,
    node_control: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None,
    cloud_control: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None,
    cloud_settings: TunnelSettings = FAST,
    node_settings: TunnelSettings = FAST,
) -> Pair:
    """A cloud (websocket server) and a node (client) session, both running in `nursery`."""
    send, receive = trio.open_memory_channel[TunnelSession | TunnelError](1)

    async def serve(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        session = TunnelSession(ws, client=False, settings=cloud_settings,
                                hello_info={"side": "cloud"})
        try:
            await session.handshake()
        except TunnelError as exc:
            await send.send(exc)
            return
        await send.send(session)
        await session.run(control_handler=cloud_control)

    server = await nursery.start(partial(
        trio_websocket.serve_websocket, serve, "127.0.0.1", 0, ssl_context=None,
        receive_buffer_size=RECEIVE_BUFFER))
    node_scope = trio.CancelScope()

    async def node_main(*, task_status: trio.TaskStatus[TunnelSession]) -> None:
        with node_scope:
            async with trio_websocket.open_websocket(
                    "127.0.0.1", server.port, "/tunnel", use_ssl=False,
                    receive_buffer_size=RECEIVE_BUFFER) as ws:
                session = TunnelSession(ws, client=True, settings=node_settings,
                                        hello_info={"side": "node", "location_id": "loc1"})
                await session.handshake()
                task_status.started(session)
                await session.run(stream_handler=node_handler, control_handler=node_control)

    node = await nursery.start(node_main)
    cloud = await receive.receive()
    assert isinstance(cloud, TunnelSession)
    assert node.peer_info == {"side": "cloud"}
    assert cloud.peer_info == {"side": "node", "location_id": "loc1"}
    return Pair(cloud, node, node_scope)


async def test_open_echo_and_half_close() -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery)
            opened_before = metrics.STREAMS_OPENED.labels("cloud", "tcp")._value.get()
            stream = await pair.cloud.open_stream(TARGET)
            await stream.wait_accepted()
            payload = bytes(range(256)) * 4000  # ~1 MB: several windows' worth
            async with trio.open_nursery() as inner:
                inner.start_soon(stream.send_all, payload)
                received = bytearray()
                while len(received) < len(payload):
                    received += await stream.receive_some()
            assert bytes(received) == payload
            await stream.send_eof()  # half-close: the echo handler sees EOF, answers with its own
            assert await stream.receive_some() == b""
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"after eof")
            await pair.cloud.wait_no_streams()
            stats = pair.cloud.statistics()
            assert stats.streams_open == 0 and stats.streams_opened == 1
            assert stats.bytes_sent > len(payload) and stats.bytes_received > len(payload)
            assert metrics.STREAMS_OPENED.labels("cloud", "tcp")._value.get() == opened_before + 1
            await pair.cloud.aclose()
            nursery.cancel_scope.cancel()


async def test_empty_fin_only_stream_and_target_reaches_the_handler() -> None:
    seen: list[Target] = []

    async def handler(stream: SessionStream) -> None:
        seen.append(stream.target)
        await stream.accept()
        assert await stream.receive_some() == b""
        await stream.send_all(b"bye")

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery, node_handler=handler)
            target = Target("db.virtual", 5432, StreamProtocol.TCP)
            stream = await pair.cloud.open_stream(target)
            await stream.send_eof()
            await stream.wait_accepted()
            assert await read_all(stream) == b"bye"  # the handler's return closes its side
            assert seen == [target]
            nursery.cancel_scope.cancel()


async def test_thousand_concurrent_streams_on_one_tunnel() -> None:
    n_streams = 1000
    results: dict[int, bool] = {}

    async def one(i: int) -> None:
        stream = await pair.cloud.open_stream(Target(f"host{i % 7}", 80, StreamProtocol.TCP))
        payload = i.to_bytes(4, "big") * 512  # 2 KiB each
        await stream.send_all(payload)
        await stream.send_eof()
        results[i] = await read_all(stream) == payload
        await stream.aclose()

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery)
            async with trio.open_nursery() as clients:
                for i in range(n_streams):
                    clients.start_soon(one, i)
            assert len(results) == n_streams and all(results.values())
            assert pair.cloud.statistics().streams_opened == n_streams
            with trio.fail_after(5):
                await pair.cloud.wait_no_streams()
                await pair.node.wait_no_streams()
            nursery.cancel_scope.cancel()


async def test_slow_reader_does_not_stall_another_stream_and_buffers_stay_bounded() -> None:
    window = 64 * 1024
    settings = attrs.evolve(FAST, initial_window=window, max_frame_size=16 * 1024)
    release = trio.Event()
    slow_streams: list[SessionStream] = []
    slow_received = bytearray()
    slow_done = trio.Event()

    async def handler(stream: SessionStream) -> None:
        await stream.accept()
        if stream.target.virtual_host == "slow":
            slow_streams.append(stream)
            await release.wait()  # the application does not read for a while
            slow_received.extend(await read_all(stream))
            slow_done.set()
        else:
            await echo(stream)

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery, node_handler=handler, cloud_settings=settings,
                                    node_settings=settings)
            slow = await pair.cloud.open_stream(Target("slow", 1, StreamProtocol.TCP))
            big = bytes(range(251)) * 8000  # ~2 MB, 30 windows
            sender_done = trio.Event()

            async def send_big() -> None:
                await slow.send_all(big)
                await slow.send_eof()
                sender_done.set()

            nursery.start_soon(send_big)
            await trio.sleep(0.2)
            assert not sender_done.is_set()  # blocked on credit, not buffering the rest
            fast = await pair.cloud.open_stream(Target("fast", 2, StreamProtocol.TCP))
            data = b"x" * (1024 * 1024)
            async with trio.open_nursery() as inner:
                inner.start_soon(fast.send_all, data)
                got = bytearray()
                while len(got) < len(data):
                    got += await fast.receive_some()
            assert got == data  # 16 windows through the other stream while `slow` is stuck
            assert slow.statistics().max_unacknowledged <= window
            assert slow.statistics().unacknowledged == window  # exactly one window in flight
            assert slow_streams[0].statistics().max_buffered <= window
            release.set()
            await sender_done.wait()
            await slow_done.wait()
            assert bytes(slow_received) == big
            assert slow.statistics().max_unacknowledged <= window
            assert slow_streams[0].statistics().max_buffered <= window
            nursery.cancel_scope.cancel()


async def test_reset_propagates_both_ways() -> None:
    node_saw: list[StreamResetError] = []
    handler_done = trio.Event()

    async def handler(stream: SessionStream) -> None:
        if stream.target.virtual_host == "denied":
            await stream.reset(ErrorCode.DENIED, "path not allowed")
            return
        await stream.accept()
        try:
            while await stream.receive_some():
                pass
        except StreamResetError as exc:
            node_saw.append(exc)
            with pytest.raises(StreamResetError):
                await stream.send_all(b"late")
        finally:
            handler_done.set()

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery, node_handler=handler)
            denied = await pair.cloud.open_stream(Target("denied", 80))
            with pytest.raises(StreamResetError) as info:
                await denied.wait_accepted()
            assert (info.value.code, info.value.reason) == (ErrorCode.DENIED, "path not allowed")
            with pytest.raises(StreamResetError):
                await denied.receive_some()

            stream = await pair.cloud.open_stream(TARGET)
            await stream.wait_accepted()
            await stream.send_all(b"some request")
            await stream.reset(ErrorCode.CANCEL, "client went away")
            await stream.reset(ErrorCode.CANCEL, "again")  # idempotent
            await handler_done.wait()
            assert [(e.code, e.reason) for e in node_saw] == [
                (ErrorCode.CANCEL, "client went away")]
            with pytest.raises(StreamResetError) as info:
                await stream.send_all(b"x")
            assert info.value.code == ErrorCode.CANCEL
            await pair.cloud.wait_no_streams()
            assert not pair.cloud.closed and not pair.node.closed  # only the streams died
            nursery.cancel_scope.cancel()


async def test_ping_timeout_when_the_peer_stops_reading() -> None:
    blocked = trio.Event()

    async def stuck_control(op: str, body: dict[str, Any]) -> None:
        blocked.set()
        await trio.sleep_forever()  # blocks the node's reader task: it reads nothing more

    cloud_settings = TunnelSettings(ping_interval=0.05, ping_timeout=0.3)
    node_settings = TunnelSettings(ping_interval=0.05, ping_timeout=30.0)  # it keeps pinging
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery, node_control=stuck_control,
                                    cloud_settings=cloud_settings, node_settings=node_settings)
            await trio.sleep(0.2)
            assert pair.cloud.statistics().last_rtt is not None  # healthy pings measured
            await pair.cloud.send_control("block", {})
            await blocked.wait()
            started = time.monotonic()
            with trio.fail_after(2.0):
                await pair.cloud.wait_closed()
            elapsed = time.monotonic() - started
            assert pair.cloud.close_reason == (ErrorCode.TUNNEL_LOST, "ping timeout")
            assert 0.25 <= elapsed <= 1.0, elapsed  # timeout 0.3 after a ping within 0.05
            with trio.fail_after(2.0):  # the node notices the dropped connection too
                await pair.node.wait_closed()
            nursery.cancel_scope.cancel()


async def test_handshake_version_mismatch_is_a_tunnel_error_on_both_ends() -> None:
    outcome: list[TunnelError] = []
    server_done = trio.Event()

    async def serve(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        session = TunnelSession(ws, client=False, settings=TunnelSettings(versions=(1,)))
        with pytest.raises(TunnelError) as info:
            await session.handshake()
        outcome.append(info.value)
        assert session.closed
        server_done.set()

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(
                trio_websocket.serve_websocket, serve, "127.0.0.1", 0, ssl_context=None))
            async with trio_websocket.open_websocket(
                    "127.0.0.1", server.port, "/tunnel", use_ssl=False) as ws:
                node = TunnelSession(ws, client=True, settings=TunnelSettings(versions=(2, 3)))
                with pytest.raises(TunnelError) as info:
                    await node.handshake()
            assert info.value.code == ErrorCode.UNSUPPORTED_VERSION
            assert info.value.reason == (
                "no common tunnel protocol version: the node speaks 2 and 3, the cloud speaks 1; "
                "upgrade the cloud to a release that speaks version 3")
            assert node.closed and node.close_reason is not None
            await server_done.wait()
            assert outcome[0].code == ErrorCode.UNSUPPORTED_VERSION
            with pytest.raises(RuntimeError):
                await node.run()
            nursery.cancel_scope.cancel()


async def test_tunnel_death_makes_open_streams_raise_tunnel_lost() -> None:
    node_errors: list[StreamResetError] = []

    async def handler(stream: SessionStream) -> None:
        await stream.accept()
        try:
            await stream.receive_some()
            await trio.sleep_forever()
        except StreamResetError as exc:  # pragma: no cover - the node is cancelled instead
            node_errors.append(exc)
            raise

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery, node_handler=handler)
            reading = await pair.cloud.open_stream(TARGET)
            idle = await pair.cloud.open_stream(TARGET)
            await reading.wait_accepted()
            await idle.wait_accepted()
            await idle.send_all(b"x")
            failures: list[StreamResetError] = []
            reader_failed = trio.Event()

            async def blocked_reader() -> None:
                with pytest.raises(StreamResetError) as info:
                    await reading.receive_some()
                failures.append(info.value)
                reader_failed.set()

            nursery.start_soon(blocked_reader)
            await trio.sleep(0.05)
            pair.node_scope.cancel()  # the node vanishes: its websocket drops without GOAWAY
            with trio.fail_after(5):
                await pair.cloud.wait_closed()
            assert pair.cloud.close_reason is not None
            assert pair.cloud.close_reason[0] == ErrorCode.TUNNEL_LOST
            await reader_failed.wait()
            assert failures[0].code == ErrorCode.TUNNEL_LOST
            for op in (idle.receive_some(), idle.send_all(b"y")):
                with pytest.raises(StreamResetError) as info:
                    await op
                assert info.value.code == ErrorCode.TUNNEL_LOST
            with pytest.raises(TunnelError):
                await pair.cloud.open_stream(TARGET)
            with pytest.raises(TunnelError):
                await pair.cloud.send_control("drain", {})
            assert pair.cloud.statistics().streams_open == 0
            nursery.cancel_scope.cancel()


async def test_goaway_closes_the_peer_with_its_code_and_fails_its_streams() -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery)
            stream = await pair.cloud.open_stream(TARGET)
            await stream.wait_accepted()
            await pair.node.aclose(ErrorCode.GOING_AWAY, "handover to shadow")
            with trio.fail_after(5):
                await pair.cloud.wait_closed()
            assert pair.cloud.close_reason == (ErrorCode.GOING_AWAY, "handover to shadow")
            assert pair.node.close_reason == (ErrorCode.GOING_AWAY, "handover to shadow")
            with pytest.raises(StreamResetError) as info:
                await stream.receive_some()
            assert info.value.code == ErrorCode.TUNNEL_LOST
            nursery.cancel_scope.cancel()


async def test_control_messages_are_delivered_in_order_both_ways() -> None:
    to_node: list[tuple[str, dict[str, Any]]] = []
    to_cloud: list[tuple[str, dict[str, Any]]] = []
    all_in = trio.Event()
    cloud_got = trio.Event()

    async def on_node(op: str, body: dict[str, Any]) -> None:
        to_node.append((op, body))
        await trio.lowlevel.checkpoint()  # a handler that yields must still see them in order
        if len(to_node) == 200:
            all_in.set()

    async def on_cloud(op: str, body: dict[str, Any]) -> None:
        to_cloud.append((op, body))
        cloud_got.set()

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery, node_control=on_node, cloud_control=on_cloud)
            await pair.node.send_control("register", {"epoch": 41, "node": "n1"})
            for i in range(200):
                await pair.cloud.send_control("drain" if i % 2 else "master-lost", {"seq": i})
            with pytest.raises(ValueError):
                await pair.cloud.send_control("bad", {"x": object()})
            await all_in.wait()
            await cloud_got.wait()
            assert [body["seq"] for _, body in to_node] == list(range(200))
            assert to_node[0][0] == "master-lost" and to_node[1][0] == "drain"
            assert to_cloud == [("register", {"epoch": 41, "node": "n1"})]
            nursery.cancel_scope.cancel()


async def test_streams_wait_for_the_peers_max_streams() -> None:
    hold = trio.Event()

    async def handler(stream: SessionStream) -> None:
        await stream.accept()
        await hold.wait()

    node_settings = attrs.evolve(FAST, max_streams=2)
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery, node_handler=handler, node_settings=node_settings)
            first = await pair.cloud.open_stream(TARGET)
            await pair.cloud.open_stream(TARGET)
            with trio.move_on_after(0.2) as waited:
                await pair.cloud.open_stream(TARGET)
            assert waited.cancelled_caught  # a third stream waits for a free slot
            await first.reset(ErrorCode.CANCEL)
            with trio.fail_after(2):
                third = await pair.cloud.open_stream(TARGET)
            await third.wait_accepted()
            hold.set()
            nursery.cancel_scope.cancel()


async def test_a_read_returns_every_buffered_chunk_that_fits_max_bytes() -> None:
    """Whatever the read size, one receive_some takes every buffered chunk that fits `max_bytes`
    (joined), splits the first one that does not, and None takes everything buffered."""
    sent = trio.Event()

    async def four_writes(stream: SessionStream) -> None:
        await stream.accept()
        for part in (b"a" * 10, b"b" * 20, b"c" * 30, b"d" * 40):
            await stream.send_all(part)  # one DATA frame each
        await stream.send_eof()
        sent.set()

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery, node_handler=four_writes)
            stream = await pair.cloud.open_stream(TARGET)
            await sent.wait()
            await stream.wait_buffered(100)
            assert await stream.receive_some(5) == b"a" * 5  # less than one chunk: split it
            assert await stream.receive_some(35) == b"a" * 5 + b"b" * 20 + b"c" * 10
            assert await stream.receive_some(65536) == b"c" * 20 + b"d" * 40  # small chunks join
            assert stream.statistics().buffered == 0
            assert await stream.receive_some(65536) == b""
            await stream.aclose()

            sent = trio.Event()
            stream = await pair.cloud.open_stream(TARGET)
            await sent.wait()
            await stream.wait_buffered(100)
            assert await stream.receive_some(None) == b"a" * 10 + b"b" * 20 + b"c" * 30 + b"d" * 40
            assert stream.statistics().buffered == 0
            await stream.aclose()
            await pair.cloud.aclose()
            nursery.cancel_scope.cancel()


async def test_a_read_splits_the_frame_that_does_not_fit() -> None:
    big = 64 * 1024
    sent = trio.Event()

    async def two_writes(stream: SessionStream) -> None:
        await stream.accept()
        await stream.send_all(b"x" * 1000)
        await stream.send_all(b"y" * big)
        await stream.send_eof()
        sent.set()

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery, node_handler=two_writes)
            stream = await pair.cloud.open_stream(TARGET)
            await sent.wait()
            await stream.wait_buffered(1000 + big)
            first = await stream.receive_some(big)
            assert first == b"x" * 1000 + b"y" * (big - 1000)
            assert await stream.receive_some(big) == b"y" * 1000
            assert stream.statistics().buffered == 0
            await stream.aclose()
            await pair.cloud.aclose()
            nursery.cancel_scope.cancel()


async def test_wait_reset_returns_on_a_peer_reset_and_on_tunnel_death() -> None:
    """A task that is not reading a stream learns that it is gone: the forwarder watches this to
    stop relaying for an application that went away."""
    node_streams: list[SessionStream] = []
    arrived = trio.Event()

    async def handler(stream: SessionStream) -> None:
        await stream.accept()
        node_streams.append(stream)
        arrived.set()
        await trio.sleep_forever()

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            pair = await start_pair(nursery, node_handler=handler)
            first = await pair.cloud.open_stream(TARGET)
            await first.wait_accepted()
            await arrived.wait()
            arrived = trio.Event()
            second = await pair.cloud.open_stream(TARGET)
            await second.wait_accepted()
            await arrived.wait()
            with trio.move_on_after(0.1) as idle:
                await node_streams[0].wait_reset()
            assert idle.cancelled_caught  # nothing happened: it keeps waiting
            await first.reset(ErrorCode.CANCEL, "client went away")
            with trio.fail_after(2):
                await node_streams[0].wait_reset()
            pair.node_scope.cancel()  # the node vanishes: the cloud's streams die with the tunnel
            with trio.fail_after(5):
                await second.wait_reset()
            nursery.cancel_scope.cancel()
