"""The sans-I/O tunnel core: two Connections wired with bytes, no sockets, no trio."""

from __future__ import annotations

import json
import struct

import pytest

from connector.tunnel.heads import RequestHead, ResponseHead, Trailers, encode_head
from connector.tunnel.protocol import (
    FLAG_FIN,
    FLAG_LAST_ID,
    HEADER,
    NEED_DATA,
    RECENT_RESETS,
    AcceptStream,
    Connection,
    ConnectionClosed,
    Control,
    Data,
    Event,
    FrameType,
    GoAway,
    Headers,
    Hello,
    LocalProtocolError,
    OpenStream,
    Ping,
    Pong,
    RemoteProtocolError,
    ResetStream,
    WindowUpdate,
)
from connector.tunnel.types import ErrorCode, StreamProtocol, Target

TARGET = Target("erp.internal", 443, StreamProtocol.TCP)  # a byte pipe
HTTP = Target("erp.internal", 8080)  # an HTTP target: an exchange stream
GET = RequestHead(b"GET", b"/orders", [(b"host", b"erp.internal")])
POST = RequestHead(b"POST", b"/orders", [(b"content-length", b"4")])
OK = ResponseHead(200, b"OK", [(b"content-type", b"text/plain")])


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(ftype, flags, stream_id, len(payload)) + payload


def drain(conn: Connection) -> list[Event]:
    return list(conn.events())


def handshaken(**server_kwargs: int) -> tuple[Connection, Connection]:
    """(node, cloud) after a completed handshake."""
    node, cloud = Connection(client=True), Connection(client=False, **server_kwargs)
    cloud.receive_data(node.send(node.make_hello({"node": "n1"})))
    assert drain(cloud) == [Hello((2,), 65536, 256 * 1024, 1024, {"node": "n1"})]
    node.receive_data(cloud.send(cloud.make_hello({"cloud": True})))
    [hello] = drain(node)
    assert isinstance(hello, Hello) and hello.info == {"cloud": True}
    assert node.handshake_complete and cloud.handshake_complete
    return node, cloud


def remote_error(conn: Connection, data: bytes) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        drain(conn)
    return info.value


# --- handshake and version negotiation ---------------------------------------------------------


def test_server_picks_highest_common_version() -> None:
    node = Connection(client=True, versions=(1, 2, 3))
    cloud = Connection(client=False, versions=(2, 3, 5))
    cloud.receive_data(node.send(node.make_hello()))
    [hello] = drain(cloud)
    assert isinstance(hello, Hello) and hello.versions == (1, 2, 3)
    assert cloud.version == 3
    node.receive_data(cloud.send(cloud.make_hello()))
    [answer] = drain(node)
    assert isinstance(answer, Hello) and answer.versions == (3,)
    assert node.version == 3


def test_no_common_version_is_unsupported_version_and_goaway_can_still_be_sent() -> None:
    node = Connection(client=True, versions=(7,))
    cloud = Connection(client=False, versions=(1,))
    err = remote_error(cloud, node.send(node.make_hello()))
    assert err.code == ErrorCode.UNSUPPORTED_VERSION
    with pytest.raises(RemoteProtocolError):  # sticky
        cloud.next_event()
    node.receive_data(cloud.send(GoAway(err.code, str(err))))
    [goaway] = drain(node)
    assert isinstance(goaway, GoAway) and goaway.code == ErrorCode.UNSUPPORTED_VERSION
    assert goaway.reason == ("no common tunnel protocol version: the node speaks 7, the cloud "
                             "speaks 1; upgrade the cloud to a release that speaks version 7")


@pytest.mark.parametrize(("node_versions", "cloud_versions", "message"), [
    ((1,), (2,), "the node speaks 1, the cloud speaks 2; upgrade the node to a release that "
                 "speaks version 2"),
    ((1,), (2, 3), "the node speaks 1, the cloud speaks 2 and 3; upgrade the node to a release "
                   "that speaks version 3"),
    ((3, 4), (1, 2), "the node speaks 3 and 4, the cloud speaks 1 and 2; upgrade the cloud to a "
                     "release that speaks version 4"),
    ((1, 3), (2,), "the node speaks 1 and 3, the cloud speaks 2; upgrade the older side"),
])
def test_the_version_refusal_says_what_each_side_speaks_and_what_to_upgrade(
    node_versions: tuple[int, ...], cloud_versions: tuple[int, ...], message: str,
) -> None:
    node = Connection(client=True, versions=node_versions)
    cloud = Connection(client=False, versions=cloud_versions)
    err = remote_error(cloud, node.send(node.make_hello()))
    assert err.code == ErrorCode.UNSUPPORTED_VERSION
    assert str(err) == "no common tunnel protocol version: " + message


def test_client_refuses_a_version_it_did_not_offer() -> None:
    node = Connection(client=True, versions=(1,))
    node.send(node.make_hello())
    hello = json.dumps({"versions": [2], "max_frame_size": 65536, "initial_window": 1,
                        "max_streams": 1, "info": {}}).encode()
    err = remote_error(node, frame(FrameType.HELLO, 0, 0, hello))
    assert err.code == ErrorCode.UNSUPPORTED_VERSION
    assert str(err) == "the cloud chose tunnel protocol version [2], but this node speaks 1"


@pytest.mark.parametrize("doc", [
    b"not json", b"\xff\xfe", b"[1]", b'{"versions": []}',
    b'{"versions": [1], "max_frame_size": 100, "initial_window": 1, "max_streams": 1}',
    b'{"versions": [1], "max_frame_size": 65536, "initial_window": 0, "max_streams": 1}',
    b'{"versions": [1], "max_frame_size": 65536, "initial_window": 1, "max_streams": true}',
    b'{"versions": [1], "max_frame_size": 65536, "initial_window": 1, "max_streams": 1, "info": 3}',
])
def test_bad_hello_is_a_protocol_error(doc: bytes) -> None:
    cloud = Connection(client=False)
    assert remote_error(cloud, frame(FrameType.HELLO, 0, 0, doc)).code == ErrorCode.PROTOCOL_ERROR


def test_frames_before_hello_are_refused_both_ways() -> None:
    node, cloud = Connection(client=True), Connection(client=False)
    with pytest.raises(LocalProtocolError):
        node.send(Control("register", {}))
    with pytest.raises(LocalProtocolError):
        cloud.send(cloud.make_hello())  # the server answers; it does not start
    assert "before HELLO" in str(remote_error(cloud, frame(FrameType.PING, 0, 0, bytes(8))))
    fresh = Connection(client=True)
    assert "before the client" in str(remote_error(fresh, frame(FrameType.HELLO, 0, 0, b"{}")))


def test_hello_must_match_the_connection_settings() -> None:
    node = Connection(client=True)
    with pytest.raises(LocalProtocolError):
        node.send(Hello((1,), 16384, 1, 1, {}))
    with pytest.raises(LocalProtocolError):
        node.send(node.make_hello({"bad": object()}))
    node.send(node.make_hello())
    with pytest.raises(LocalProtocolError):
        node.send(node.make_hello())


def test_constructor_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        Connection(client=True, max_frame_size=100)
    with pytest.raises(ValueError):
        Connection(client=True, initial_window=0)
    with pytest.raises(ValueError):
        Connection(client=True, versions=())


# --- every frame type round-trips ------------------------------------------------------------


def test_every_frame_type_round_trips() -> None:
    node, cloud = handshaken()
    sent: list[Event] = [
        OpenStream(2, TARGET),
        OpenStream(4, Target("wiki", 80)),
        Data(2, b"hello"),
        ResetStream(4, ErrorCode.CANCEL, "client went away \u2603"),
        OpenStream(6, Target("wiki", 80)),
        Headers(6, RequestHead(b"GET", b"/", [(b"host", b"wiki")]), end_stream=True),
        Ping(b"12345678"),
        Pong(b"abcdefgh"),
        Control("drain", {"deadline": 3, "nested": {"a": [1, 2]}}),
    ]
    node.receive_data(b"".join(cloud.send(e) for e in sent))
    assert drain(node) == sent
    back: list[Event] = [
        AcceptStream(2),
        WindowUpdate(2, 5),
        Data(2, b"world", end_stream=True),
        Data(2, b"", end_stream=True),
        Control("master-lost", {}),
        Headers(6, ResponseHead(204, b"No Content", []), end_stream=True),
        GoAway(ErrorCode.GOING_AWAY, "handover", last_stream_id=6),
    ]
    wire = b""
    for e in back:  # the cloud's FIN (the second Data) goes the other way, in between
        if isinstance(e, Data) and not e.data:
            node.receive_data(cloud.send(e))
            assert drain(node) == [e]
        else:
            wire += node.send(e)
    cloud.receive_data(wire)
    assert drain(cloud) == [e for e in back if not (isinstance(e, Data) and not e.data)]
    assert not cloud.stream_is_open(2) and not node.stream_is_open(2)  # FIN both ways


def test_eof_at_a_frame_boundary_is_connection_closed_and_mid_frame_is_an_error() -> None:
    node, cloud = handshaken()
    node.receive_data(cloud.send(Ping(bytes(8))))
    node.receive_data(b"")
    assert drain(node) == [Ping(bytes(8)), ConnectionClosed()]
    node2, cloud2 = handshaken()
    node2.receive_data(cloud2.send(Ping(bytes(8)))[:-1])
    node2.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        drain(node2)
    with pytest.raises(LocalProtocolError):
        node2.receive_data(b"x")


# --- any split of the byte stream ----------------------------------------------------------------


def _sample_stream() -> tuple[bytes, list[int], list[Event]]:
    """Wire bytes of a varied sequence, the offsets where frames end, and the events."""
    _, cloud = handshaken()
    events: list[Event] = [
        OpenStream(2, TARGET), Data(2, b"a" * 300), Control("register", {"epoch": 7}),
        OpenStream(4, HTTP), Headers(4, POST), Data(4, b"body"),
        Ping(b"pingpong"), Data(2, b"b", end_stream=True), ResetStream(2, ErrorCode.DENIED, "no"),
        Headers(4, Trailers([(b"x-sum", b"9")]), end_stream=True),
    ]
    wire = b""
    ends = []
    for e in events:
        wire += cloud.send(e)
        ends.append(len(wire))
    return wire, ends, events


def test_split_at_every_offset_yields_the_same_events() -> None:
    wire, _, events = _sample_stream()
    for cut in range(len(wire) + 1):
        node, _ = handshaken()
        got: list[Event] = []
        for piece in (wire[:cut], wire[cut:]):
            if piece:
                node.receive_data(piece)
            got += drain(node)
        assert got == events, cut


def test_nothing_is_emitted_before_a_frame_is_whole() -> None:
    wire, ends, events = _sample_stream()
    node, _ = handshaken()
    got: list[Event] = []
    for i in range(len(wire)):
        node.receive_data(wire[i:i + 1])
        got += drain(node)
        whole = sum(1 for end in ends if end <= i + 1)
        assert len(got) == whole, i
    assert got == events


def test_bytearray_and_memoryview_input_are_accepted() -> None:
    wire, _, events = _sample_stream()
    node, _ = handshaken()
    node.receive_data(bytearray(wire[:7]))
    node.receive_data(memoryview(wire)[7:])
    assert drain(node) == events


# --- flow control ------------------------------------------------------------------------------


def test_sending_beyond_the_window_is_a_local_error_until_credit_returns() -> None:
    node = Connection(client=True, initial_window=1000)
    cloud = Connection(client=False)
    cloud.receive_data(node.send(node.make_hello()))
    drain(cloud)
    node.receive_data(cloud.send(cloud.make_hello()))
    drain(node)
    node.receive_data(cloud.send(OpenStream(2, TARGET)))
    drain(node)
    assert cloud.send_window(2) == 1000
    wire = cloud.send(Data(2, b"x" * 1000))
    with pytest.raises(LocalProtocolError) as info:
        cloud.send(Data(2, b"y"))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR
    node.receive_data(wire)
    assert drain(node) == [Data(2, b"x" * 1000)]
    cloud.receive_data(node.send(WindowUpdate(2, 400)))
    assert drain(cloud) == [WindowUpdate(2, 400)]
    assert cloud.send_window(2) == 400
    node.receive_data(cloud.send(Data(2, b"z" * 400)))
    assert drain(node) == [Data(2, b"z" * 400)]


def test_receiving_beyond_the_window_is_flow_control_error() -> None:
    node = Connection(client=True, initial_window=1000)
    cloud = Connection(client=False)
    cloud.receive_data(node.send(node.make_hello()))
    drain(cloud)
    node.receive_data(cloud.send(cloud.make_hello()) + cloud.send(OpenStream(2, TARGET)))
    drain(node)
    node.receive_data(frame(FrameType.DATA, 0, 2, b"a" * 600))
    assert drain(node) == [Data(2, b"a" * 600)]
    err = remote_error(node, frame(FrameType.DATA, 0, 2, b"b" * 401))
    assert err.code == ErrorCode.FLOW_CONTROL_ERROR


def test_window_update_overflow_and_zero_increment_are_errors() -> None:
    node, cloud = handshaken()
    node.receive_data(cloud.send(OpenStream(2, TARGET)))
    drain(node)
    assert remote_error(cloud, frame(FrameType.WINDOW_UPDATE, 0, 2, struct.pack(">I", 2**31))
                        ).code == ErrorCode.FLOW_CONTROL_ERROR
    node2, cloud2 = handshaken()
    node2.receive_data(cloud2.send(OpenStream(2, TARGET)))
    drain(node2)
    assert "increment 0" in str(
        remote_error(cloud2, frame(FrameType.WINDOW_UPDATE, 0, 2, bytes(4))))
    with pytest.raises(LocalProtocolError):
        node2.send(WindowUpdate(2, 0))


def test_data_larger_than_the_frame_size_is_split() -> None:
    node, cloud = handshaken()
    cloud.receive_data(node.send(OpenStream(1, TARGET)))  # the node may open too (odd ids)
    drain(cloud)
    payload = bytes(range(256)) * 1000  # 256,000 bytes, four frames of at most 64 KiB
    wire = node.send(Data(1, payload, end_stream=True))
    cloud.receive_data(wire)
    got = drain(cloud)
    assert [len(e.data) for e in got if isinstance(e, Data)] == [65536, 65536, 65536, 59392]
    assert [e.end_stream for e in got if isinstance(e, Data)] == [False, False, False, True]
    assert b"".join(e.data for e in got if isinstance(e, Data)) == payload


def test_frame_over_the_maximum_is_frame_too_large_before_its_payload_arrives() -> None:
    node, _ = handshaken()
    header = HEADER.pack(FrameType.DATA, 0, 2, 65537)
    assert remote_error(node, header).code == ErrorCode.FRAME_TOO_LARGE


# --- stream rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(("wire", "message"), [
    (frame(99, 0, 0), "unknown frame type"),
    (frame(FrameType.PING, 0, 0, b"short"), "8 bytes"),
    (frame(FrameType.PING, 0, 2, bytes(8)), "belongs on stream 0"),
    (frame(FrameType.DATA, 0, 2, b"x"), "never opened"),
    (frame(FrameType.DATA, 0, 0, b"x"), "stream 0"),
    (frame(FrameType.DATA, 4, 2, b"x"), "unknown flags"),
    (frame(FrameType.OPEN, 0, 3, b"\x00\x50\x04http" + b"h"), "may not use"),
    (frame(FrameType.OPEN, 0, 2, b"\x00\x50\x04ftp!h"), "unknown protocol"),
    (frame(FrameType.OPEN, 0, 2, b"\x00\x50\x04http"), "virtual host"),
    (frame(FrameType.OPEN, 0, 2, b"\x00\x50\x09http"), "too short"),
    (frame(FrameType.OPEN, 0, 2, b"\x00\x50\x04http\xff"), "UTF-8"),
    (frame(FrameType.RESET, 0, 2, b"\x00"), "4-byte code"),
    (frame(FrameType.GOAWAY, 0, 0, b"\x00\x00\x00\x00\xc3"), "UTF-8"),
    (frame(FrameType.CONTROL, 0, 0, b"{not json"), "JSON"),
    (frame(FrameType.CONTROL, 0, 0, b'{"op": 3}'), "string op"),
    (frame(FrameType.CONTROL, 0, 0, b'{"op": "x", "body": []}'), "object body"),
    (frame(FrameType.ACCEPT, 0, 1, b""), "never opened"),
    (frame(FrameType.HELLO, 0, 0, b"{}"), "second HELLO"),
])
def test_malformed_frames_are_remote_protocol_errors(wire: bytes, message: str) -> None:
    node, _ = handshaken()
    err = remote_error(node, wire)
    assert message in str(err)
    assert err.code == ErrorCode.PROTOCOL_ERROR


def test_stream_ids_must_increase_and_respect_max_streams() -> None:
    node, cloud = handshaken(max_streams=2)
    node.receive_data(cloud.send(OpenStream(4, TARGET)))
    drain(node)
    assert "ids must increase" in str(remote_error(node, frame(
        FrameType.OPEN, 0, 2, b"\x00\x50\x04httph")))
    cloud.receive_data(node.send(OpenStream(1, TARGET)) + node.send(OpenStream(3, TARGET)))
    assert len(drain(cloud)) == 2
    with pytest.raises(LocalProtocolError, match="at most 2"):
        node.send(OpenStream(5, TARGET))
    with pytest.raises(LocalProtocolError, match="not usable"):
        node.send(OpenStream(2, TARGET))
    assert "max_streams" in str(remote_error(cloud, frame(
        FrameType.OPEN, 0, 5, b"\x00\x50\x04httph")))


def test_data_after_fin_and_on_streams_the_peer_closed_are_errors() -> None:
    node, cloud = handshaken()
    node.receive_data(cloud.send(OpenStream(2, TARGET)) + cloud.send(Data(2, b"", True)))
    drain(node)
    assert "after FIN" in str(remote_error(node, frame(FrameType.DATA, 0, 2, b"x")))
    node, cloud = handshaken()
    node.receive_data(cloud.send(OpenStream(2, TARGET)) + cloud.send(ResetStream(2, 3)))
    assert drain(node) == [OpenStream(2, TARGET), ResetStream(2, ErrorCode.CANCEL, "")]
    assert "closed stream" in str(remote_error(node, frame(FrameType.DATA, 0, 2, b"x")))


def test_late_frames_after_our_own_reset_are_dropped() -> None:
    node, cloud = handshaken()
    node.receive_data(cloud.send(OpenStream(2, TARGET)))
    drain(node)
    late = node.send(AcceptStream(2)) + node.send(Data(2, b"in flight")) + node.send(
        WindowUpdate(2, 10)) + node.send(ResetStream(2, ErrorCode.BACKEND_RESET))
    cloud.send(ResetStream(2, ErrorCode.CANCEL, "gave up"))  # crosses them on the wire
    assert cloud.send(ResetStream(2, ErrorCode.CANCEL)) == b""  # idempotent
    cloud.receive_data(late + node.send(Ping(bytes(8))))
    assert drain(cloud) == [Ping(bytes(8))]


def test_own_reset_memory_is_bounded() -> None:
    node = Connection(client=True)
    cloud = Connection(client=False)
    cloud.receive_data(node.send(node.make_hello()))
    drain(cloud)
    cloud.send(cloud.make_hello())
    for sid in range(2, 2 * RECENT_RESETS + 6, 2):
        cloud.send(OpenStream(sid, TARGET))
        cloud.send(ResetStream(sid, ErrorCode.CANCEL))
    assert "closed stream" in str(remote_error(cloud, frame(FrameType.DATA, 0, 2, b"x")))


def test_window_update_and_reset_crossing_a_graceful_close_are_dropped() -> None:
    node, cloud = handshaken()
    node.receive_data(cloud.send(OpenStream(2, TARGET)) + cloud.send(Data(2, b"q", True)))
    drain(node)
    late = node.send(WindowUpdate(2, 1))
    cloud.receive_data(node.send(Data(2, b"", True)) + late + frame(
        FrameType.RESET, 0, 2, struct.pack(">I", 3)))
    assert drain(cloud) == [Data(2, b"", True)]
    assert node.send(WindowUpdate(2, 1)) == b""  # credit for a closed stream is moot


def test_local_misuse_is_local_protocol_error() -> None:
    node, cloud = handshaken()
    with pytest.raises(LocalProtocolError):
        cloud.send(Data(2, b"x"))  # never opened
    cloud.send(OpenStream(2, TARGET))
    with pytest.raises(LocalProtocolError):
        cloud.send(AcceptStream(2))  # only the acceptor accepts
    cloud.send(Data(2, b"", True))
    with pytest.raises(LocalProtocolError):
        cloud.send(Data(2, b"x"))  # after FIN
    with pytest.raises(LocalProtocolError):
        cloud.send(Ping(b"short"))
    with pytest.raises(LocalProtocolError):
        cloud.send(Control("x", {"not json": object()}))
    with pytest.raises(LocalProtocolError):
        cloud.send(ConnectionClosed())
    cloud.send(OpenStream(4, TARGET))
    assert cloud.send(Data(4, b"")) == b""  # nothing to say: no empty frame on the wire
    with pytest.raises(LocalProtocolError):
        cloud.send(Data(4, "text"))  # type: ignore[arg-type]
    cloud.send(GoAway(ErrorCode.NO_ERROR))
    with pytest.raises(LocalProtocolError, match="GOAWAY"):
        cloud.send(Ping(bytes(8)))


def test_unknown_error_codes_become_internal_error() -> None:
    node, cloud = handshaken()
    node.receive_data(frame(FrameType.GOAWAY, 0, 0, struct.pack(">I", 999) + b"why"))
    assert drain(node) == [GoAway(ErrorCode.INTERNAL_ERROR, "why")]


def test_next_event_is_need_data_on_an_empty_buffer() -> None:
    node, _ = handshaken()
    assert node.next_event() is NEED_DATA
    node.receive_data(frame(FrameType.PING, 0, 0, bytes(8))[:3])
    assert node.next_event() is NEED_DATA


def test_fin_flag_constant_matches_the_wire() -> None:
    node, cloud = handshaken()
    wire = cloud.send(OpenStream(2, TARGET)) + cloud.send(Data(2, b"", True))
    assert wire[-HEADER.size + 1] == FLAG_FIN


# --- exchange streams: HEADERS ------------------------------------------------------------------

def exchange(head: RequestHead | None = None, fin: bool = False) -> tuple[Connection, Connection]:
    """(node, cloud) with exchange stream 2 open on both, its request head sent if given."""
    node, cloud = handshaken()
    wire = cloud.send(OpenStream(2, HTTP))
    if head is not None:
        wire += cloud.send(Headers(2, head, fin))
    node.receive_data(wire)
    drain(node)
    return node, cloud


def test_an_exchange_round_trips_with_bodies_1xx_and_trailers_both_ways() -> None:
    node, cloud = handshaken()
    request: list[Event] = [
        OpenStream(2, HTTP), Headers(2, POST), Data(2, b"body"),
        Headers(2, Trailers([(b"x-checksum", b"1")]), end_stream=True)]
    node.receive_data(b"".join(cloud.send(e) for e in request))
    assert drain(node) == request
    response: list[Event] = [
        Headers(2, ResponseHead(100, b"Continue", [])), Headers(2, ResponseHead(103, b"", [])),
        Headers(2, OK), Data(2, b"done"), Headers(2, Trailers([]), end_stream=True)]
    cloud.receive_data(b"".join(node.send(e) for e in response))
    assert drain(cloud) == response
    assert not cloud.stream_is_open(2) and not node.stream_is_open(2)


def test_fin_on_a_head_ends_the_message_without_a_body() -> None:
    node, cloud = exchange(GET, fin=True)  # a GET: the request ends with its head
    assert node.stream_is_open(2) and cloud.stream_is_open(2)  # the response is to come
    with pytest.raises(LocalProtocolError, match="not open for sending"):
        cloud.send(Data(2, b"x"))
    cloud.receive_data(node.send(Headers(2, ResponseHead(204, b"No Content", []), end_stream=True)))
    assert drain(cloud) == [Headers(2, ResponseHead(204, b"No Content", []), True)]
    assert not cloud.stream_is_open(2) and not node.stream_is_open(2)


def test_a_switch_makes_both_directions_a_byte_pipe() -> None:
    upgrade = RequestHead(b"GET", b"/ws", [(b"upgrade", b"websocket")])
    node, cloud = exchange(upgrade)  # no FIN: the request direction stays open for raw bytes
    switch = ResponseHead(101, b"Switching Protocols", [(b"upgrade", b"websocket")])
    cloud.receive_data(node.send(Headers(2, switch)) + node.send(Data(2, b"server first")))
    assert drain(cloud) == [Headers(2, switch), Data(2, b"server first")]
    node.receive_data(cloud.send(Data(2, b"frames", end_stream=True)))
    assert drain(node) == [Data(2, b"frames", True)]
    with pytest.raises(LocalProtocolError, match="TRAILERS head is not allowed"):
        node.send(Headers(2, Trailers([]), end_stream=True))  # a pipe has no trailers


@pytest.mark.parametrize(("setup", "event", "message"), [
    (None, Data(2, b"body"), "DATA is not allowed in the request's state HEAD"),
    (None, Headers(2, OK), "a RESPONSE head is not allowed in the request's state HEAD"),
    (POST, Headers(2, POST), "a REQUEST head is not allowed in the request's state BODY"),
    (POST, Headers(2, Trailers([])), "a TRAILERS head must end the request (FIN)"),
    (GET, Data(2, b"late"), "not open for sending"),
    (GET, Headers(2, Trailers([]), end_stream=True), "not open for sending"),
])
def test_heads_out_of_order_are_refused_on_the_opener(
    setup: RequestHead | None, event: Event, message: str,
) -> None:
    node, cloud = handshaken()
    cloud.send(OpenStream(2, HTTP))
    if setup is not None:
        cloud.send(Headers(2, setup, end_stream=setup is GET))
    with pytest.raises(LocalProtocolError) as info:
        cloud.send(event)
    assert message in str(info.value)


@pytest.mark.parametrize(("request_head", "event", "message"), [
    (None, Headers(2, OK), "a response before the request head"),
    (None, Data(2, b"x"), "DATA is not allowed in the response's state HEAD"),
    (POST, Data(2, b"x"), "DATA is not allowed in the response's state HEAD"),
    (POST, Headers(2, GET), "a REQUEST head is not allowed in the response's state HEAD"),
    (POST, Headers(2, ResponseHead(100, b"", []), end_stream=True), "INFORMATIONAL head cannot end"),
    (POST, Headers(2, ResponseHead(101, b"", []), end_stream=True), "SWITCH head cannot end"),
    (POST, Headers(2, Trailers([])), "TRAILERS head is not allowed in the response's state HEAD"),
])
def test_heads_out_of_order_are_refused_on_the_acceptor(
    request_head: RequestHead | None, event: Event, message: str,
) -> None:
    node, _ = exchange(request_head)
    with pytest.raises(LocalProtocolError) as info:
        node.send(event)
    assert message in str(info.value)
    assert node.stream_is_open(2)


def test_heads_on_a_tcp_stream_are_refused_both_ways() -> None:
    node, cloud = handshaken()
    node.receive_data(cloud.send(OpenStream(2, TARGET)))
    drain(node)
    with pytest.raises(LocalProtocolError, match="REQUEST head is not allowed in the request's state RAW"):
        cloud.send(Headers(2, GET))
    err = remote_error(node, frame(FrameType.HEADERS, 0, 2, encode_head(GET)))
    assert "REQUEST head is not allowed in the request's state RAW" in str(err)
    assert err.code == ErrorCode.PROTOCOL_ERROR


def test_a_head_larger_than_the_peers_frame_size_is_refused_locally() -> None:
    node, cloud = exchange()
    huge = RequestHead(b"GET", b"/", [(b"cookie", b"c" * 65000), (b"x-more", b"m" * 1000)])
    assert len(encode_head(huge)) > 65536
    with pytest.raises(LocalProtocolError) as info:
        cloud.send(Headers(2, huge))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert "exceeds the peer's frame size 65536" in str(info.value)
    node.receive_data(cloud.send(Headers(2, GET, end_stream=True)))  # nothing changed: still HEAD
    assert drain(node) == [Headers(2, GET, True)]


def test_a_field_over_65535_bytes_is_refused_locally() -> None:
    _, cloud = exchange()
    with pytest.raises(LocalProtocolError, match="65535"):
        cloud.send(Headers(2, RequestHead(b"GET", b"/" * 70000, [])))


@pytest.mark.parametrize(("wire", "message"), [
    (frame(FrameType.DATA, 0, 2, b"body"), "stream 2: DATA is not allowed in the request's state HEAD"),
    (frame(FrameType.HEADERS, 0, 2, encode_head(OK)), "a RESPONSE head is not allowed in the request's"),
    (frame(FrameType.HEADERS, 0, 2, encode_head(Trailers([]))), "TRAILERS head is not allowed"),
    (frame(FrameType.HEADERS, 2, 2, encode_head(GET)), "HEADERS with unknown flags 0x2"),
    (frame(FrameType.HEADERS, 0, 2, b"\x01\x00"), "HEADERS on stream 2: HEADERS payload too short"),
    (frame(FrameType.HEADERS, 0, 2, b"\x09\x00\x00"), "unknown head kind 9"),
    (frame(FrameType.HEADERS, 0, 4, encode_head(GET)), "HEADERS on stream 4, which was never opened"),
    (frame(FrameType.HEADERS, 0, 0, encode_head(GET)), "HEADERS on stream 0"),
])
def test_heads_out_of_order_or_malformed_are_remote_errors_on_the_acceptor(
    wire: bytes, message: str,
) -> None:
    node, _ = exchange()
    err = remote_error(node, wire)
    assert message in str(err)
    assert err.code == ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(("wire", "message"), [
    (frame(FrameType.DATA, 0, 2, b"body"), "DATA is not allowed in the response's state HEAD"),
    (frame(FrameType.HEADERS, 0, 2, encode_head(GET)), "a REQUEST head is not allowed in the response's"),
    (frame(FrameType.HEADERS, FLAG_FIN, 2, encode_head(ResponseHead(100, b"", []))),
     "an INFORMATIONAL head cannot end the response"),
    (frame(FrameType.HEADERS, FLAG_FIN, 2, encode_head(ResponseHead(101, b"", []))),
     "a SWITCH head cannot end the response"),
    (frame(FrameType.HEADERS, 0, 2, encode_head(OK)) + frame(
        FrameType.HEADERS, 0, 2, encode_head(Trailers([]))), "a TRAILERS head must end the response (FIN)"),
    (frame(FrameType.HEADERS, FLAG_FIN, 2, encode_head(OK)) + frame(
        FrameType.DATA, 0, 2, b"x"), "DATA after FIN"),
    (frame(FrameType.HEADERS, FLAG_FIN, 2, encode_head(OK)) + frame(
        FrameType.HEADERS, FLAG_FIN, 2, encode_head(Trailers([]))), "closed stream 2"),
])
def test_heads_out_of_order_are_remote_errors_on_the_opener(wire: bytes, message: str) -> None:
    node, cloud = exchange(GET, fin=True)
    if "DATA after FIN" in message or "closed stream" in message:
        message = "closed stream 2"  # the GET ended with its head: the stream closed with the FIN
    err = remote_error(cloud, wire)
    assert message in str(err)
    assert err.code == ErrorCode.PROTOCOL_ERROR


def test_a_response_before_the_request_head_is_a_remote_error() -> None:
    node, cloud = exchange()
    assert "a response before the request head" in str(
        remote_error(cloud, frame(FrameType.HEADERS, 0, 2, encode_head(OK))))


# --- GOAWAY ------------------------------------------------------------------------------------


@pytest.mark.parametrize("goaway", [
    GoAway(ErrorCode.NO_ERROR),
    GoAway(ErrorCode.GOING_AWAY, "handover \u2603"),
    GoAway(ErrorCode.GOING_AWAY, "", last_stream_id=0),
    GoAway(ErrorCode.NOT_MASTER, "demoted", last_stream_id=7),
    GoAway(ErrorCode.PROTOCOL_ERROR, "x", last_stream_id=2**32 - 1),
])
def test_goaway_round_trips_with_and_without_last_stream_id(goaway: GoAway) -> None:
    node, cloud = handshaken()
    wire = node.send(goaway)
    assert bool(wire[1] & FLAG_LAST_ID) == (goaway.last_stream_id is not None)
    cloud.receive_data(wire)
    assert drain(cloud) == [goaway]


@pytest.mark.parametrize(("wire", "message"), [
    (frame(FrameType.GOAWAY, FLAG_LAST_ID, 0, struct.pack(">I", 0) + b"\x00\x00"), "needs 8 bytes"),
    (frame(FrameType.GOAWAY, 0, 0, b"\x00\x00"), "needs 4 bytes"),
    (frame(FrameType.GOAWAY, 4, 0, bytes(8)), "unknown flags 0x4"),
    (frame(FrameType.GOAWAY, FLAG_LAST_ID, 2, bytes(8)), "belongs on stream 0"),
])
def test_malformed_goaway_is_a_remote_error(wire: bytes, message: str) -> None:
    node, _ = handshaken()
    assert message in str(remote_error(node, wire))


def test_a_goaway_last_stream_id_out_of_range_is_refused_locally_and_changes_nothing() -> None:
    node, cloud = handshaken()
    for bad in (-1, 2**32):
        with pytest.raises(LocalProtocolError, match="out of range"):
            node.send(GoAway(ErrorCode.GOING_AWAY, "", last_stream_id=bad))
    cloud.receive_data(node.send(Ping(bytes(8))))  # GOAWAY was not sent: the connection lives
    assert drain(cloud) == [Ping(bytes(8))]


def test_protocol_re_exports_the_events_and_the_wire_format() -> None:
    from connector.tunnel import events, frames
    from connector.tunnel import protocol as p

    for name in p.__all__:
        assert hasattr(p, name), name
    assert p.Data is events.Data and p.RemoteProtocolError is events.RemoteProtocolError
    assert p.HEADER is frames.HEADER and p.FrameType is frames.FrameType
