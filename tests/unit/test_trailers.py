"""Which trailer fields are forwarded: one rule (RFC 9110 section 6.5.1) for both hops."""

from __future__ import annotations

import pytest

from connector.http1 import HOP_BY_HOP, NOT_IN_TRAILERS, trailer_fields


@pytest.mark.parametrize("name", sorted(NOT_IN_TRAILERS | HOP_BY_HOP))
def test_fields_that_must_not_be_trailers_are_dropped(name: bytes) -> None:
    assert trailer_fields([(name, b"x"), (b"x-checksum", b"1")]) == [(b"x-checksum", b"1")]


def test_application_trailers_pass_in_order() -> None:
    fields = [(b"x-checksum", b"1"), (b"server-timing", b"db;dur=53"), (b"content-digest", b"sha-256=:x:"),
              (b"grpc-status", b"0"), (b"x-checksum", b"2")]
    assert trailer_fields(fields) == fields


def test_fields_named_by_connection_and_the_callers_own_are_dropped() -> None:
    fields = [(b"connection", b"x-hop"), (b"x-hop", b"1"), (b"sap-connectivity-scc-location_id", b"loc"),
              (b"x-ok", b"1")]
    assert trailer_fields(fields, frozenset({b"sap-connectivity-scc-location_id"})) == [(b"x-ok", b"1")]
