"""Exchange streams, refusal and version negotiation on a real session pair (protocol version 2).

`connector.tunnel.testing.session_pair` runs two real TunnelSessions over trio-websocket on an
in-memory byte stream: the framing, flow control and state rules are production's.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from connector.tunnel.heads import RequestHead, ResponseHead
from connector.tunnel.session import SessionStream
from connector.tunnel.testing import HandshakeFailed, session_pair
from connector.tunnel.types import ErrorCode, StreamProtocol, StreamResetError, Target

HTTP = Target("erp.internal", 8080)  # an exchange stream
TCP = Target("db.internal", 5432, StreamProtocol.TCP)  # a byte pipe
POST = RequestHead(b"POST", b"/orders", [(b"host", b"erp.internal"), (b"transfer-encoding", b"chunked")])
GET = RequestHead(b"GET", b"/orders", [(b"host", b"erp.internal")])
OK = ResponseHead(200, b"OK", [(b"content-type", b"text/plain")])
TEST_DEADLINE = 20.0


async def read_all(stream: SessionStream) -> bytes:
    parts = []
    while chunk := await stream.receive_some(65536):
        parts.append(chunk)
    return b"".join(parts)


async def never(stream: SessionStream) -> None:
    raise AssertionError("no stream expected")


async def test_an_exchange_carries_heads_bodies_and_trailers_both_ways() -> None:
    seen: list[object] = []

    async def origin(stream: SessionStream) -> None:
        seen.append(await stream.receive_head())
        seen.append(await read_all(stream))
        seen.append(stream.trailers)
        await stream.send_head(ResponseHead(100, b"Continue", []))
        await stream.send_head(OK)
        await stream.send_all(b"created")
        await stream.send_eof([(b"x-served-by", b"n1")])

    with trio.fail_after(TEST_DEADLINE):
        async with session_pair(origin) as (cloud, _):
            stream = await cloud.open_stream(HTTP)
            await stream.send_head(POST)
            await stream.send_all(b"order 1")
            await stream.send_eof([(b"x-checksum", b"42")])
            assert await stream.receive_head() == ResponseHead(100, b"Continue", [])
            assert await stream.receive_head() == OK
            assert await read_all(stream) == b"created"
            assert stream.trailers == [(b"x-served-by", b"n1")]
            assert seen == [POST, b"order 1", [(b"x-checksum", b"42")]]


async def test_a_head_with_fin_ends_the_message_without_a_body() -> None:
    async def origin(stream: SessionStream) -> None:
        assert await stream.receive_head() == GET
        assert await stream.receive_some() == b""
        await stream.send_head(ResponseHead(204, b"No Content", []), end_stream=True)

    with trio.fail_after(TEST_DEADLINE):
        async with session_pair(origin) as (cloud, _):
            stream = await cloud.open_stream(HTTP)
            await stream.send_head(GET, end_stream=True)
            assert await stream.receive_head() == ResponseHead(204, b"No Content", [])
            assert await stream.receive_some() == b""
            assert stream.trailers is None
            await cloud.wait_no_streams()


async def test_data_before_the_request_head_is_refused_locally_and_the_stream_stays_usable() -> None:
    async def origin(stream: SessionStream) -> None:
        assert await stream.receive_head() == POST
        assert await read_all(stream) == b"body"
        await stream.send_head(OK, end_stream=True)

    with trio.fail_after(TEST_DEADLINE):
        async with session_pair(origin) as (cloud, node):
            stream = await cloud.open_stream(HTTP)
            with pytest.raises(ValueError, match="DATA is not allowed in the request's state HEAD"):
                await stream.send_all(b"body")
            with pytest.raises(ValueError, match="TRAILERS head is not allowed in the request's state HEAD"):
                await stream.send_eof([(b"x", b"1")])
            await stream.send_head(POST)
            await stream.send_all(b"body")
            await stream.send_eof()
            assert await stream.receive_head() == OK
            assert not cloud.closed and not node.closed


async def test_a_refused_final_head_leaves_the_message_open() -> None:
    """A head the protocol refuses (here: larger than the peer's frame size) changes nothing,
    even one that would have ended the message: a smaller head can still be sent."""
    async def origin(stream: SessionStream) -> None:
        assert await stream.receive_head() == GET
        await stream.send_head(OK, end_stream=True)

    huge = RequestHead(b"GET", b"/", [(b"cookie", b"c" * 65000), (b"x-more", b"m" * 1000)])
    with trio.fail_after(TEST_DEADLINE):
        async with session_pair(origin) as (cloud, _):
            stream = await cloud.open_stream(HTTP)
            with pytest.raises(ValueError, match="exceeds the peer's frame size"):
                await stream.send_head(huge, end_stream=True)
            await stream.send_head(GET, end_stream=True)
            assert await stream.receive_head() == OK


async def test_heads_on_a_byte_pipe_are_refused_locally() -> None:
    async def echo(stream: SessionStream) -> None:
        await stream.send_all(await read_all(stream))

    with trio.fail_after(TEST_DEADLINE):
        async with session_pair(echo) as (cloud, _):
            stream = await cloud.open_stream(TCP)
            with pytest.raises(ValueError, match="REQUEST head is not allowed in the request's state RAW"):
                await stream.send_head(GET)
            await stream.send_all(b"raw bytes")
            await stream.send_eof()
            assert await read_all(stream) == b"raw bytes"


async def test_goaway_fails_streams_above_its_last_id_with_refused_and_others_with_tunnel_lost() -> None:
    """The node's GOAWAY names the last stream it handed to its handler; the cloud's streams
    above it were provably never processed (REFUSED: replayable), those at or below were."""
    handled: list[int] = []
    arrived = trio.Event()

    async def hold(stream: SessionStream) -> None:
        handled.append(stream.stream_id)
        if len(handled) == 2:
            arrived.set()
        await trio.sleep_forever()

    with trio.fail_after(TEST_DEADLINE):
        async with session_pair(hold) as (cloud, node):
            first = await cloud.open_stream(HTTP)
            second = await cloud.open_stream(TCP)
            await arrived.wait()
            # opened, and the node closes before its reader sees the OPEN: no checkpoint between
            late = [cloud.open_stream_nowait(HTTP), cloud.open_stream_nowait(TCP)]
            await node.aclose(ErrorCode.GOING_AWAY, "handover")
            await cloud.wait_closed()
            assert cloud.close_reason == (ErrorCode.GOING_AWAY, "handover")
            assert sorted(handled) == [first.stream_id, second.stream_id]  # not the late ones
            for stream, code in [(first, ErrorCode.TUNNEL_LOST), (second, ErrorCode.TUNNEL_LOST),
                                 (late[0], ErrorCode.REFUSED), (late[1], ErrorCode.REFUSED)]:
                with pytest.raises(StreamResetError) as info:
                    await stream.receive_some()
                assert info.value.code == code, stream.stream_id
            with pytest.raises(StreamResetError) as info:
                await late[0].receive_head()
            assert "went away before it processed the stream (GOING_AWAY: handover)" in info.value.reason


async def test_a_goaway_before_any_stream_was_processed_refuses_them_all() -> None:
    async def hold(stream: SessionStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(TEST_DEADLINE):
        async with session_pair(hold) as (cloud, node):
            streams = [cloud.open_stream_nowait(HTTP) for _ in range(3)]
            await node.aclose(ErrorCode.NOT_MASTER, "demoted")
            await cloud.wait_closed()
            for stream in streams:
                with pytest.raises(StreamResetError) as info:
                    await stream.send_head(GET)
                assert info.value.code == ErrorCode.REFUSED
                assert not stream.peer_started


async def test_refused_reaches_the_opener_and_peer_started_stays_false() -> None:
    async def refuse(stream: SessionStream) -> None:
        await stream.reset(ErrorCode.REFUSED, "not master")

    with trio.fail_after(TEST_DEADLINE):
        async with session_pair(refuse) as (cloud, node):
            stream = await cloud.open_stream(HTTP)
            await stream.send_head(POST)
            with pytest.raises(StreamResetError) as info:
                await stream.receive_head()
            assert (info.value.code, info.value.reason) == (ErrorCode.REFUSED, "not master")
            assert not stream.peer_started  # a refusal is not processing: the request may be replayed
            assert not cloud.closed and not node.closed


@pytest.mark.parametrize("first_frame", ["head", "accept", "data", "window_update"])
async def test_peer_started_turns_true_on_the_first_frame_from_the_peer(first_frame: str) -> None:
    go = trio.Event()

    async def origin(stream: SessionStream) -> None:
        if stream.target.protocol is StreamProtocol.HTTP:
            await stream.receive_head()
        await go.wait()
        if first_frame == "head":
            await stream.send_head(OK)
        elif first_frame == "accept":
            await stream.accept()
        elif first_frame == "data":
            await stream.send_all(b"server speaks first")
        else:  # consuming half a window grants credit back: a WINDOW_UPDATE
            assert len(await stream.receive_some()) >= 1
            while stream.statistics().buffered:
                await stream.receive_some()
        await trio.sleep_forever()

    with trio.fail_after(TEST_DEADLINE):
        async with session_pair(origin) as (cloud, _):
            target = HTTP if first_frame == "head" else TCP
            stream = await cloud.open_stream(target)
            if first_frame == "head":
                await stream.send_head(GET, end_stream=True)
            elif first_frame == "window_update":
                await stream.send_all(bytes(cloud.settings.initial_window // 2 + 1))
            await trio.testing.wait_all_tasks_blocked()
            assert not stream.peer_started
            go.set()
            await trio.testing.wait_all_tasks_blocked()  # in memory: the frame has arrived
            assert stream.peer_started
            await stream.reset(ErrorCode.CANCEL)
            assert stream.peer_started  # it stays true


async def test_on_reset_callbacks_fire_on_peer_reset_and_on_tunnel_loss() -> None:
    async def origin(stream: SessionStream) -> None:
        head = await stream.receive_head()
        assert isinstance(head, RequestHead)
        if head.target == b"/reset":
            await stream.reset(ErrorCode.DENIED, "no")
        else:
            await trio.sleep_forever()

    fired: list[str] = []
    with trio.fail_after(TEST_DEADLINE):
        async with session_pair(origin) as (cloud, node):
            reset = await cloud.open_stream(HTTP)
            lost = await cloud.open_stream(HTTP)
            reset.on_reset(lambda: fired.append("reset"))
            lost.on_reset(lambda: fired.append("lost"))
            await reset.send_head(RequestHead(b"GET", b"/reset", []), end_stream=True)
            await lost.send_head(RequestHead(b"GET", b"/hold", []), end_stream=True)
            await reset.wait_reset()
            assert fired == ["reset"]
            reset.on_reset(lambda: fired.append("late"))  # after the reset: called at once
            assert fired == ["reset", "late"]
            await node.aclose(ErrorCode.GOING_AWAY, "bye")
            await lost.wait_reset()
            assert fired == ["reset", "late", "lost"]


# --- version negotiation ----------------------------------------------------------------------


async def test_a_version_1_node_is_refused_with_a_message_saying_to_upgrade_the_node() -> None:
    with trio.fail_after(TEST_DEADLINE), pytest.raises(HandshakeFailed) as info:
        async with session_pair(never, versions=((2,), (1,))):
            raise AssertionError("the handshake must fail")
    cloud, node = info.value.cloud, info.value.node
    assert cloud is not None and node is not None
    expected = ("no common tunnel protocol version: the node speaks 1, the cloud speaks 2; "
                "upgrade the node to a release that speaks version 2")
    assert (cloud.code, cloud.reason) == (ErrorCode.UNSUPPORTED_VERSION, expected)  # its GOAWAY
    assert (node.code, node.reason) == (ErrorCode.UNSUPPORTED_VERSION, expected)  # received
    assert str(node) == f"UNSUPPORTED_VERSION: {expected}"  # what the node logs


async def test_a_version_1_cloud_refuses_a_version_2_node_saying_to_upgrade_the_cloud() -> None:
    with trio.fail_after(TEST_DEADLINE), pytest.raises(HandshakeFailed) as info:
        async with session_pair(never, versions=((1,), (2,))):
            raise AssertionError("the handshake must fail")
    assert info.value.node is not None
    assert info.value.node.code == ErrorCode.UNSUPPORTED_VERSION
    assert info.value.node.reason == (
        "no common tunnel protocol version: the node speaks 2, the cloud speaks 1; "
        "upgrade the cloud to a release that speaks version 2")


async def test_a_node_speaking_both_versions_gets_version_2() -> None:
    async def origin(stream: SessionStream) -> None:
        assert await stream.receive_head() == GET
        await stream.send_head(OK, end_stream=True)

    with trio.fail_after(TEST_DEADLINE):
        async with session_pair(origin, versions=((2,), (1, 2))) as (cloud, node):
            assert cloud._conn.version == node._conn.version == 2
            stream = await cloud.open_stream(HTTP)
            await stream.send_head(GET, end_stream=True)
            assert await stream.receive_head() == OK


async def test_closing_an_exchange_stream_before_its_head_resets_it_and_keeps_the_tunnel() -> None:
    """aclose() half-closes with an empty FIN, which an exchange message cannot carry before its
    head: the stream is reset (CANCEL) instead, and the tunnel lives on. A handler that returns
    without answering is closed this way by the session."""
    refused: list[StreamResetError] = []
    handler_done = trio.Event()

    async def origin(stream: SessionStream) -> None:
        try:
            await stream.receive_head()  # and then return without a response head
        except StreamResetError as exc:
            refused.append(exc)
            handler_done.set()
            raise

    with trio.fail_after(TEST_DEADLINE):
        async with session_pair(origin) as (cloud, node):
            answered = await cloud.open_stream(HTTP)
            await answered.send_head(GET, end_stream=True)
            with pytest.raises(StreamResetError) as info:
                await answered.receive_head()
            assert (info.value.code, info.value.reason) == (
                ErrorCode.CANCEL, "stream closed before its head was sent")
            unsent = await cloud.open_stream(HTTP)
            await unsent.aclose()  # the client went away before the request head
            await handler_done.wait()
            assert [(e.code, e.reason) for e in refused] == [
                (ErrorCode.CANCEL, "stream closed before its head was sent")]
            await cloud.wait_no_streams()
            await node.wait_no_streams()
            assert not cloud.closed and not node.closed
