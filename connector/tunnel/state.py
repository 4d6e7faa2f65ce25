"""The per-stream message state machine of protocol version 2, as one table (sans-I/O).

Modelled on h11's `_state.py`: each stream carries two messages, the *request* (opener to
acceptor) and the *response* (acceptor to opener), and each is in one state:

    HEAD  waiting for its head          BODY  head sent, DATA may follow
    RAW   a byte pipe (TCP streams, and both directions after a 101)      DONE  FIN seen

`TRANSITIONS` lists every legal (message, state, frame) and the state it leads to; anything else
is a protocol error, raised by the caller as local (we tried it) or remote (the peer did). A FIN
flag on the frame then moves the message to DONE where the new state allows an end (BODY, RAW; a
head without a body). Two rules span both messages: the response may not start before the request
head, and a `101` turns the request into a byte pipe too (the opener sends no FIN after an upgrade
request's head, exactly so that its direction stays open for the raw bytes).
"""

from __future__ import annotations

import enum

from connector.tunnel.heads import HeadKind

__all__ = ["Message", "MessageState", "DATA", "TRANSITIONS", "StreamState", "StateError"]


class StateError(ValueError):
    """A frame the stream's state does not allow; the message says which and why."""


class Message(enum.Enum):
    REQUEST = "request"
    RESPONSE = "response"


class MessageState(enum.Enum):
    HEAD = "HEAD"
    BODY = "BODY"
    RAW = "RAW"
    DONE = "DONE"


class _Data:
    def __repr__(self) -> str:
        return "DATA"


DATA = _Data()  # the DATA frame, beside the head kinds of HEADERS frames
Frame = HeadKind | _Data

H, B, R, D = MessageState.HEAD, MessageState.BODY, MessageState.RAW, MessageState.DONE
REQUEST, RESPONSE = Message.REQUEST, Message.RESPONSE

TRANSITIONS: dict[tuple[Message, MessageState, Frame], MessageState] = {
    (REQUEST, H, HeadKind.REQUEST): B,
    (REQUEST, B, DATA): B,
    (REQUEST, B, HeadKind.TRAILERS): D,
    (REQUEST, R, DATA): R,
    (RESPONSE, H, HeadKind.INFORMATIONAL): H,
    (RESPONSE, H, HeadKind.RESPONSE): B,
    (RESPONSE, H, HeadKind.SWITCH): R,
    (RESPONSE, B, DATA): B,
    (RESPONSE, B, HeadKind.TRAILERS): D,
    (RESPONSE, R, DATA): R,
}
_MAY_END = frozenset({B, R})  # where a FIN flag ends the message
_MUST_END = frozenset({HeadKind.TRAILERS})  # frames that always carry FIN
_NEVER_END = frozenset({HeadKind.INFORMATIONAL, HeadKind.SWITCH})


def _name(frame: Frame) -> str:
    if isinstance(frame, HeadKind):
        return f"{'an' if frame.name[0] in 'AEIOU' else 'a'} {frame.name} head"
    return "DATA"


class StreamState:
    """Both messages of one stream; `raw` streams (TCP) start as byte pipes."""

    __slots__ = ("request", "response")

    def __init__(self, *, raw: bool) -> None:
        start = R if raw else H
        self.request = start
        self.response = start

    def process(self, message: Message, frame: Frame, fin: bool) -> None:
        """Apply one frame of `message`; StateError if the table does not allow it."""
        current = self.request if message is REQUEST else self.response
        new = TRANSITIONS.get((message, current, frame))
        if new is None:
            raise StateError(f"{_name(frame)} is not allowed in the {message.value}'s state {current.value}")
        if message is RESPONSE and self.request is H:
            raise StateError("a response before the request head")
        if fin and frame in _NEVER_END:
            raise StateError(f"{_name(frame)} cannot end the {message.value}")
        if not fin and frame in _MUST_END:
            raise StateError(f"{_name(frame)} must end the {message.value} (FIN)")
        if fin:
            if new not in _MAY_END and new is not D:
                raise StateError(f"FIN not allowed in the {message.value}'s state {new.value}")
            new = D
        if message is REQUEST:
            self.request = new
        else:
            self.response = new
            if frame is HeadKind.SWITCH and self.request is B:
                self.request = R

    def expects_head(self, message: Message) -> bool:
        return (self.request if message is REQUEST else self.response) is H
