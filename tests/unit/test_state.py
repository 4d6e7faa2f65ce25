"""The per-stream message state table (`connector.tunnel.state`) as a table test."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.tunnel.heads import HeadKind
from connector.tunnel.state import (
    DATA,
    TRANSITIONS,
    Message,
    MessageState,
    StateError,
    StreamState,
)

H, B, R, D = MessageState.HEAD, MessageState.BODY, MessageState.RAW, MessageState.DONE
REQUEST, RESPONSE = Message.REQUEST, Message.RESPONSE
FRAMES = [*HeadKind, DATA]
EVERY = list(itertools.product(Message, MessageState, FRAMES))


def stream_in(message: Message, state: MessageState) -> StreamState:
    """A stream whose `message` is in `state`; a response under test has a request under way."""
    stream = StreamState(raw=False)
    if message is REQUEST:
        stream.request = state
    else:
        stream.request = B
        stream.response = state
    return stream


def current(stream: StreamState, message: Message) -> MessageState:
    return stream.request if message is REQUEST else stream.response


def test_the_table_covers_what_an_exchange_and_a_byte_pipe_need() -> None:
    assert len(TRANSITIONS) == 10
    assert all(new is not H or frame is HeadKind.INFORMATIONAL
               for (_, _, frame), new in TRANSITIONS.items())  # only a 1xx leaves a head to come


@pytest.mark.parametrize(("message", "state", "frame"), EVERY)
def test_every_listed_transition_is_allowed_and_every_other_refused(
    message: Message, state: MessageState, frame: object,
) -> None:
    stream = stream_in(message, state)
    fin = frame is HeadKind.TRAILERS  # trailers always end the message; nothing else must
    before = (stream.request, stream.response)
    expected = TRANSITIONS.get((message, state, frame))  # type: ignore[call-overload]
    if expected is None:
        with pytest.raises(StateError, match=f"is not allowed in the {message.value}'s state {state.value}"):
            stream.process(message, frame, fin)  # type: ignore[arg-type]
        assert (stream.request, stream.response) == before  # a refused frame changes nothing
    else:
        stream.process(message, frame, fin)  # type: ignore[arg-type]
        assert current(stream, message) is (D if fin else expected)


@pytest.mark.parametrize(("message", "state", "frame"), [
    key for key, new in TRANSITIONS.items() if new in (B, R) and key[2] is not HeadKind.SWITCH])
def test_fin_ends_a_message_wherever_a_body_or_pipe_could_follow(
    message: Message, state: MessageState, frame: object,
) -> None:
    stream = stream_in(message, state)
    stream.process(message, frame, True)  # type: ignore[arg-type]
    assert current(stream, message) is D


@pytest.mark.parametrize(("message", "state", "frame"), [
    (RESPONSE, H, HeadKind.INFORMATIONAL), (RESPONSE, H, HeadKind.SWITCH)])
def test_fin_cannot_end_a_message_on_a_1xx_or_a_101(
    message: Message, state: MessageState, frame: HeadKind,
) -> None:
    stream = stream_in(message, state)
    with pytest.raises(StateError, match=f"an? {frame.name} head cannot end the response"):
        stream.process(message, frame, True)
    assert current(stream, message) is state


@pytest.mark.parametrize("message", list(Message))
def test_trailers_must_carry_fin(message: Message) -> None:
    stream = stream_in(message, B)
    with pytest.raises(StateError, match=rf"a TRAILERS head must end the {message.value} \(FIN\)"):
        stream.process(message, HeadKind.TRAILERS, False)
    assert current(stream, message) is B


@pytest.mark.parametrize("frame", [HeadKind.INFORMATIONAL, HeadKind.RESPONSE, HeadKind.SWITCH, DATA])
def test_no_response_before_the_request_head(frame: object) -> None:
    stream = StreamState(raw=False)
    with pytest.raises(StateError):
        stream.process(RESPONSE, frame, False)  # type: ignore[arg-type]
    assert (stream.request, stream.response) == (H, H)
    stream.process(REQUEST, HeadKind.REQUEST, False)
    stream.process(RESPONSE, HeadKind.INFORMATIONAL, False)
    stream.process(RESPONSE, HeadKind.RESPONSE, False)
    assert (stream.request, stream.response) == (B, B)


def test_a_response_head_before_the_request_head_says_so() -> None:
    stream = StreamState(raw=False)
    with pytest.raises(StateError, match="a response before the request head"):
        stream.process(RESPONSE, HeadKind.RESPONSE, False)


def test_switch_turns_the_request_into_a_byte_pipe_too() -> None:
    stream = StreamState(raw=False)
    stream.process(REQUEST, HeadKind.REQUEST, False)  # an upgrade request: no FIN after its head
    stream.process(RESPONSE, HeadKind.SWITCH, False)
    assert (stream.request, stream.response) == (R, R)
    stream.process(REQUEST, DATA, False)
    stream.process(RESPONSE, DATA, True)
    stream.process(REQUEST, DATA, True)
    assert (stream.request, stream.response) == (D, D)


def test_switch_leaves_a_finished_request_finished() -> None:
    stream = StreamState(raw=False)
    stream.process(REQUEST, HeadKind.REQUEST, True)
    stream.process(RESPONSE, HeadKind.SWITCH, False)
    assert (stream.request, stream.response) == (D, R)
    with pytest.raises(StateError):
        stream.process(REQUEST, DATA, False)


def test_a_whole_exchange_with_a_body_and_trailers_both_ways() -> None:
    stream = StreamState(raw=False)
    steps: list[tuple[Message, object, bool]] = [
        (REQUEST, HeadKind.REQUEST, False), (REQUEST, DATA, False),
        (RESPONSE, HeadKind.INFORMATIONAL, False), (REQUEST, DATA, False),
        (REQUEST, HeadKind.TRAILERS, True), (RESPONSE, HeadKind.RESPONSE, False),
        (RESPONSE, DATA, False), (RESPONSE, HeadKind.TRAILERS, True)]
    for message, frame, fin in steps:
        stream.process(message, frame, fin)  # type: ignore[arg-type]
    assert (stream.request, stream.response) == (D, D)


def test_a_tcp_stream_is_a_byte_pipe_from_the_start_and_takes_no_heads() -> None:
    stream = StreamState(raw=True)
    assert (stream.request, stream.response) == (R, R)
    assert not stream.expects_head(REQUEST) and not stream.expects_head(RESPONSE)
    stream.process(RESPONSE, DATA, False)  # the acceptor may speak first (server-first protocols)
    for kind in HeadKind:
        with pytest.raises(StateError):
            stream.process(REQUEST, kind, kind is HeadKind.TRAILERS)
    stream.process(REQUEST, DATA, True)
    assert stream.request is D


def test_expects_head_follows_the_state() -> None:
    stream = StreamState(raw=False)
    assert stream.expects_head(REQUEST) and stream.expects_head(RESPONSE)
    stream.process(REQUEST, HeadKind.REQUEST, True)
    assert not stream.expects_head(REQUEST) and stream.expects_head(RESPONSE)
    stream.process(RESPONSE, HeadKind.INFORMATIONAL, False)
    assert stream.expects_head(RESPONSE)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(st.tuples(st.sampled_from(list(Message)), st.sampled_from(FRAMES),
                                         st.booleans()), max_size=12))
def test_any_sequence_raises_nothing_but_state_error_and_refusals_change_nothing(
    raw: bool, steps: list[tuple[Message, object, bool]],
) -> None:
    stream = StreamState(raw=raw)
    for message, frame, fin in steps:
        before = (stream.request, stream.response)
        try:
            stream.process(message, frame, fin)  # type: ignore[arg-type]
        except StateError:
            assert (stream.request, stream.response) == before
        else:
            assert before[0 if message is REQUEST else 1] is not D  # nothing follows a FIN
