"""Fuzzing the tunnel core: garbage and random valid sequences give events or RemoteProtocolError.

A valid sequence is generated as a list of operations on the cloud side, applied only when the
protocol allows them (windows, open streams, the exchange state), then fed to the node in random
splits; the node must report exactly what was sent, up to how DATA was cut into frames. Streams
to TCP targets are byte pipes; streams to HTTP targets are exchange streams, whose first frame
is the request head.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.tunnel.heads import RequestHead, ResponseHead, Trailers, encode_head
from connector.tunnel.protocol import (
    HEADER,
    Connection,
    Control,
    Data,
    Event,
    FrameType,
    Headers,
    OpenStream,
    Ping,
    RemoteProtocolError,
    ResetStream,
    WindowUpdate,
)
from connector.tunnel.types import ErrorCode, StreamProtocol, Target

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def handshaken(window: int = 4096) -> tuple[Connection, Connection]:
    node = Connection(client=True, initial_window=window, max_frame_size=16384)
    cloud = Connection(client=False, initial_window=window, max_frame_size=16384)
    cloud.receive_data(node.send(node.make_hello()))
    list(cloud.events())
    node.receive_data(cloud.send(cloud.make_hello()))
    list(node.events())
    return node, cloud


def feed_in_pieces(conn: Connection, data: bytes, cuts: list[int]) -> list[Event]:
    """Feed `data` split at `cuts`; return events; a RemoteProtocolError is the only other outcome."""
    got: list[Event] = []
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for a, b in zip(edges, edges[1:], strict=False):
        conn.receive_data(data[a:b])
        got += conn.events()
    return got


def assert_only_events_or_remote_error(conn: Connection, data: bytes, cuts: list[int]) -> None:
    try:
        events = feed_in_pieces(conn, data, cuts)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        return
    assert all(isinstance(e, Event) for e in events)


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6), st.booleans())
def test_garbage_gives_events_or_remote_protocol_error(
    garbage: bytes, cuts: list[int], after_handshake: bool
) -> None:
    conn = handshaken()[0] if after_handshake else Connection(client=False)
    assert_only_events_or_remote_error(conn, garbage, cuts)


frame_types = st.sampled_from([int(t) for t in FrameType] + [0, 12, 255])
stream_ids = st.sampled_from([0, 1, 2, 3, 4, 2**32 - 1])


@st.composite
def plausible_frames(draw: Any) -> bytes:
    """Frames with well-formed headers and arbitrary contents: they get past the header check."""
    payload = draw(st.binary(max_size=40) | st.sampled_from([
        b"\x00\x50\x04httpwiki", b"\x00\x50\x03tcpdb", b"\x00\x00\x00\x03", bytes(8),
        b'{"op":"x","body":{}}', encode_head(RequestHead(b"GET", b"/", [])),
        encode_head(ResponseHead(200, b"OK", [])), encode_head(Trailers([(b"x", b"1")]))]))
    return HEADER.pack(draw(frame_types), draw(st.sampled_from([0, 0, 1, 2])),
                       draw(stream_ids), len(payload)) + payload


@FUZZ
@given(st.lists(plausible_frames(), max_size=12), st.lists(st.integers(0, 600), max_size=4))
def test_plausible_frames_give_events_or_remote_protocol_error(
    frames: list[bytes], cuts: list[int]
) -> None:
    node, _ = handshaken()
    assert_only_events_or_remote_error(node, b"".join(frames), cuts)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.sampled_from(["a", "b.example"]),
                  st.sampled_from(list(StreamProtocol))),
        st.tuples(st.just("data"), st.integers(0, 3), st.integers(0, 20000), st.booleans()),
        st.tuples(st.just("reset"), st.integers(0, 3), st.sampled_from(list(ErrorCode))),
        st.tuples(st.just("credit"), st.integers(0, 3), st.integers(1, 9000)),
        st.tuples(st.just("ping"), st.binary(min_size=8, max_size=8)),
        st.tuples(st.just("control"), st.text(min_size=1, max_size=8),
                  st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)),
    ),
    max_size=30,
)


def coalesce(events: list[Event]) -> list[Event]:
    """Merge consecutive DATA of a stream: how a sender cut them into frames is not observable."""
    out: list[Event] = []
    for e in events:
        last = out[-1] if out else None
        if (isinstance(e, Data) and isinstance(last, Data) and last.stream_id == e.stream_id
                and not last.end_stream):
            out[-1] = Data(e.stream_id, last.data + e.data, e.end_stream)
        else:
            out.append(e)
    return [e for e in out if not (isinstance(e, Data) and not e.data and not e.end_stream)]


@FUZZ
@given(operations, st.lists(st.integers(0, 10**6), max_size=8))
def test_random_valid_sequences_round_trip_in_any_split(
    ops: list[tuple[Any, ...]], cuts: list[int]
) -> None:
    node, cloud = handshaken()
    opened: list[int] = []
    finished: set[int] = set()  # streams the cloud sent FIN on
    need_head: set[int] = set()  # exchange streams whose request head is not sent yet
    sent: list[Event] = []
    received: list[Event] = []
    wire = b""

    def flush() -> None:  # the node reads what is on the wire, cut at random offsets
        nonlocal wire
        received.extend(feed_in_pieces(node, wire, cuts))
        wire = b""

    for op in ops:
        live = [s for s in opened if cloud.stream_is_open(s)]
        kind = op[0]
        event: Event
        if kind == "open":
            event = OpenStream(cloud.next_stream_id(), Target(op[1], 80, op[2]))
            opened.append(event.stream_id)
            if op[2] is StreamProtocol.HTTP:
                need_head.add(event.stream_id)
        elif kind == "data" and set(live) - finished:
            sendable = [s for s in live if s not in finished]
            sid = sendable[op[1] % len(sendable)]
            if op[3]:
                finished.add(sid)
            if sid in need_head:  # an exchange stream starts with its request head
                need_head.discard(sid)
                event = Headers(sid, RequestHead(b"POST", b"/%d" % op[2], [(b"host", b"a")]), op[3])
            else:
                event = Data(sid, bytes([sid % 256]) * min(op[2], cloud.send_window(sid)), op[3])
        elif kind == "reset" and live:
            event = ResetStream(live[op[1] % len(live)], op[2], "r")
        elif kind == "credit" and live:
            flush()
            sid = live[op[1] % len(live)]
            credit = node.send(WindowUpdate(sid, op[2]))
            if credit:
                cloud.receive_data(credit)
            assert list(cloud.events()) == ([WindowUpdate(sid, op[2])] if credit else [])
            continue
        elif kind == "ping":
            event = Ping(op[1])
        elif kind == "control":
            event = Control(op[1], op[2])
        else:
            continue
        wire += cloud.send(event)
        sent.append(event)
    flush()
    assert coalesce(received) == coalesce(sent)
    for sid in opened:  # both ends agree on which streams are still open
        assert node.stream_is_open(sid) == cloud.stream_is_open(sid)


@FUZZ
@given(st.integers(1, 5000), st.integers(1, 5000), st.lists(st.integers(0, 10**4), max_size=4))
def test_any_overrun_of_the_window_is_caught_on_both_sides(
    window: int, extra: int, cuts: list[int]
) -> None:
    node, cloud = handshaken(window=window)
    node.receive_data(cloud.send(OpenStream(2, Target("h", 1, StreamProtocol.TCP))))
    list(node.events())
    assert cloud.send_window(2) == window
    try:
        cloud.send(Data(2, bytes(window + extra)))
    except Exception as exc:  # noqa: BLE001 - asserting the exact class below
        assert type(exc).__name__ == "LocalProtocolError"
        assert exc.code == ErrorCode.FLOW_CONTROL_ERROR  # type: ignore[attr-defined]
    else:
        raise AssertionError("sending beyond the window must fail")
    overrun = b"".join(
        HEADER.pack(FrameType.DATA, 0, 2, len(chunk)) + chunk
        for chunk in (bytes(window), bytes(extra)))
    try:
        feed_in_pieces(node, overrun, cuts)
    except RemoteProtocolError as exc:
        assert exc.code == ErrorCode.FLOW_CONTROL_ERROR
    else:
        raise AssertionError("receiving beyond the window must fail")
