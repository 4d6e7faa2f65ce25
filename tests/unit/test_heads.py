"""HEADERS payloads (`connector.tunnel.heads`): round trips, malformed input, and a fuzz."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.tunnel.heads import (
    PRINCIPAL_FIELD,
    Head,
    HeadError,
    HeadKind,
    Principal,
    RequestHead,
    ResponseHead,
    Trailers,
    decode_head,
    encode_head,
)

COUNT = struct.Struct(">BH")


def payload(kind: int, *fields: bytes) -> bytes:
    """A HEADERS payload built by hand, so that it can be wrong in exactly one way."""
    return COUNT.pack(kind, len(fields)) + b"".join(struct.pack(">H", len(f)) + f for f in fields)


@pytest.mark.parametrize("head", [
    RequestHead(b"GET", b"/", []),
    RequestHead(b"POST", b"/orders?id=1", [(b"host", b"erp"), (b"content-length", b"3"),
                                           (b"x-empty", b"")]),
    RequestHead(b"M" * 20, b"/" + b"p" * 65534, [(b"n" * 65535, b"v" * 65535)]),
    ResponseHead(100, b"Continue", []),
    ResponseHead(101, b"Switching Protocols", [(b"upgrade", b"websocket")]),
    ResponseHead(200, b"", [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]),
    ResponseHead(599, b"Odd", []),
    Trailers([]),
    Trailers([(b"grpc-status", b"0"), (b"\xff", b"\x00\xfe")]),
])
def test_every_kind_round_trips(head: Head) -> None:
    assert decode_head(encode_head(head)) == head


@pytest.mark.parametrize(("head", "kind"), [
    (RequestHead(b"GET", b"/", []), HeadKind.REQUEST),
    (ResponseHead(103, b"Early Hints", []), HeadKind.INFORMATIONAL),
    (ResponseHead(101, b"", []), HeadKind.SWITCH),
    (ResponseHead(204, b"", []), HeadKind.RESPONSE),
    (Trailers([]), HeadKind.TRAILERS),
])
def test_the_kind_on_the_wire_follows_the_head(head: Head, kind: HeadKind) -> None:
    assert head.kind is kind
    assert encode_head(head)[0] == kind


@pytest.mark.parametrize(("head", "message"), [
    (ResponseHead(99, b"", []), "out of range"),
    (ResponseHead(600, b"", []), "out of range"),
    (RequestHead(b"GET", b"/" * 65536, []), "65535"),
    (Trailers([(b"x", b"v" * 65536)]), "65535"),
])
def test_heads_that_cannot_be_encoded_are_head_errors(head: Head, message: str) -> None:
    with pytest.raises(HeadError, match=message):
        encode_head(head)


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "too short"),
    (b"\x01\x00", "too short"),
    (payload(HeadKind.REQUEST, b"GET", b"/")[:-1], "truncated"),
    (COUNT.pack(HeadKind.REQUEST, 2) + b"\x00\x03GET\x00", "truncated"),  # a length cut in half
    (COUNT.pack(HeadKind.REQUEST, 3) + b"\x00\x03GET\x00\x01/", "truncated"),  # a field missing
    (payload(HeadKind.REQUEST, b"GET", b"/") + b"x", "after the last"),
    (payload(0, b"GET", b"/"), "unknown head kind 0"),
    (payload(6), "unknown head kind 6"),
    (payload(255, b"GET", b"/"), "unknown head kind 255"),
    (payload(HeadKind.REQUEST, b"GET"), "name/value pairs"),
    (payload(HeadKind.REQUEST, b"GET", b"/", b"host"), "name/value pairs"),
    (payload(HeadKind.RESPONSE, b"200", b"OK", b"a", b"1", b"b"), "name/value pairs"),
    (payload(HeadKind.TRAILERS, b"grpc-status"), "name/value pairs"),
    (payload(HeadKind.REQUEST, b"", b"/"), "method and a target"),
    (payload(HeadKind.REQUEST, b"GET", b""), "method and a target"),
    (payload(HeadKind.RESPONSE, b"20", b"OK"), "three-digit status"),
    (payload(HeadKind.RESPONSE, b"2000", b"OK"), "three-digit status"),
    (payload(HeadKind.RESPONSE, b"2x0", b"OK"), "three-digit status"),
    (payload(HeadKind.RESPONSE, b"+20", b"OK"), "three-digit status"),
    (payload(HeadKind.RESPONSE, b"\xd9\xa2\xd9", b"OK"), "three-digit status"),
    (payload(HeadKind.RESPONSE, b"101", b""), "does not match head kind RESPONSE"),
    (payload(HeadKind.RESPONSE, b"100", b""), "does not match head kind RESPONSE"),
    (payload(HeadKind.RESPONSE, b"099", b""), "out of range"),
    (payload(HeadKind.INFORMATIONAL, b"099", b""), "out of range"),
    (payload(HeadKind.INFORMATIONAL, b"000", b""), "out of range"),
    (payload(HeadKind.INFORMATIONAL, b"200", b""), "does not match head kind INFORMATIONAL"),
    (payload(HeadKind.INFORMATIONAL, b"101", b""), "does not match head kind INFORMATIONAL"),
    (payload(HeadKind.SWITCH, b"100", b""), "does not match head kind SWITCH"),
    (payload(HeadKind.SWITCH, b"200", b""), "does not match head kind SWITCH"),
    (payload(HeadKind.RESPONSE, b"600", b""), "out of range"),
    (payload(HeadKind.RESPONSE, b"999", b""), "out of range"),
])
def test_malformed_payloads_are_head_errors(raw: bytes, message: str) -> None:
    with pytest.raises(HeadError, match=message):
        decode_head(raw)


fields = st.binary(max_size=12)
names = fields.filter(lambda name: not name.startswith(b":"))  # reserved for the head's own fields
text = st.text(max_size=8)
principals = st.none() | st.builds(Principal, st.sampled_from(["user", "technical"]), text.filter(bool),
                                   st.dictionaries(text, text, max_size=3))
heads = st.one_of(
    st.builds(RequestHead, st.binary(min_size=1, max_size=8), st.binary(min_size=1, max_size=20),
              st.lists(st.tuples(names, fields), max_size=4), principals),
    st.builds(ResponseHead, st.integers(100, 599), fields,
              st.lists(st.tuples(names, fields), max_size=4)),
    st.builds(Trailers, st.lists(st.tuples(names, fields), max_size=4)),
)


@settings(max_examples=300, deadline=None)
@given(heads)
def test_any_head_round_trips(head: Head) -> None:
    assert decode_head(encode_head(head)) == head


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64) | heads.map(encode_head).flatmap(
    lambda good: st.tuples(st.integers(0, len(good)), st.binary(max_size=3)).map(
        lambda cut: good[:cut[0]] + cut[1] + good[cut[0] + len(cut[1]):])))
def test_decode_raises_nothing_but_head_error(raw: bytes) -> None:
    """Random bytes, and valid payloads with a few bytes overwritten: a head or HeadError."""
    try:
        head = decode_head(raw)
    except HeadError:
        return
    assert decode_head(encode_head(head)) == head  # whatever decodes is a head that re-encodes


# --- the validated principal (principal propagation) ------------------------------------------

ALICE = Principal("user", "alice", {"user_name": "alice", "email": "alice@example.com"})


def test_a_principal_round_trips_apart_from_the_headers() -> None:
    head = RequestHead(b"GET", b"/", [(b"host", b"erp")], ALICE)
    decoded = decode_head(encode_head(head))
    assert decoded == head
    assert isinstance(decoded, RequestHead) and decoded.headers == [(b"host", b"erp")]


def test_a_header_with_a_reserved_name_cannot_be_encoded() -> None:
    with pytest.raises(HeadError, match="reserved"):
        encode_head(RequestHead(b"GET", b"/", [(PRINCIPAL_FIELD, ALICE.encode())]))


@pytest.mark.parametrize(("raw", "message"), [
    # a second principal, one after a header, one in a response or trailers: never where a header is
    (payload(HeadKind.REQUEST, b"GET", b"/", PRINCIPAL_FIELD, ALICE.encode(), PRINCIPAL_FIELD, ALICE.encode()),
     "reserved"),
    (payload(HeadKind.REQUEST, b"GET", b"/", b"host", b"erp", PRINCIPAL_FIELD, ALICE.encode()), "reserved"),
    (payload(HeadKind.RESPONSE, b"200", b"", PRINCIPAL_FIELD, ALICE.encode()), "reserved"),
    (payload(HeadKind.TRAILERS, PRINCIPAL_FIELD, ALICE.encode()), "reserved"),
    (payload(HeadKind.REQUEST, b"GET", b"/", b":authority", b"erp"), "reserved"),
    (payload(HeadKind.REQUEST, b"GET", b"/", PRINCIPAL_FIELD, b"alice"), "not JSON"),
    (payload(HeadKind.REQUEST, b"GET", b"/", PRINCIPAL_FIELD, b"[" * 60000), "not JSON"),
    (payload(HeadKind.REQUEST, b"GET", b"/", PRINCIPAL_FIELD, b'{"kind":"admin","name":"a","claims":{}}'),
     "kind or name"),
    (payload(HeadKind.REQUEST, b"GET", b"/", PRINCIPAL_FIELD, b'{"kind":"user","name":"","claims":{}}'),
     "kind or name"),
    (payload(HeadKind.REQUEST, b"GET", b"/", PRINCIPAL_FIELD, b'{"kind":"user","name":"a","claims":{"n":1}}'),
     "strings"),
    (payload(HeadKind.REQUEST, b"GET", b"/", PRINCIPAL_FIELD, b'{"kind":"user","name":"a"}'), "exactly"),
])
def test_a_principal_out_of_place_or_malformed_is_a_head_error(raw: bytes, message: str) -> None:
    with pytest.raises(HeadError, match=message):
        decode_head(raw)
