"""Typed HTTP message heads carried by HEADERS frames of protocol version 2 (sans-I/O).

An exchange stream carries one HTTP exchange: the cloud sends a `RequestHead` (method, the
canonical origin-form target, the headers as the proxy parsed them), the node answers with zero or
more informational `ResponseHead`s (1xx), then a final one (or a `101`, after which the stream is a
raw byte pipe), and either side may end its message with `Trailers`. h11 parsed each head at the
edge it came from; this module only moves the fields, it never re-parses HTTP.

Encoding of a HEADERS payload::

    kind u8 | field count u16 | (field length u16 | field bytes) * count

A request's fields are ``method, target, name, value, name, value...``; a response's are
``status (ASCII digits), reason, name, value...``; trailers are ``name, value...``. Lengths are
bounded by the frame size, so a head is at most one frame: the proxy refuses heads that would not
fit (431) before it opens a stream.

A request head may carry the `Principal` the cloud validated for it (principal propagation: the
user of `SAP-Connectivity-Authentication`). It travels as the first name/value pair with the
reserved name ``:principal`` (a JSON object as value): HTTP/1.1 field names are tokens and can
never contain ``:``, so no header an application sends can pose as it. Decoding refuses any other
name starting with ``:``, a second ``:principal``, one anywhere but first or outside a request.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Sequence

import attrs

__all__ = ["HeadKind", "Principal", "RequestHead", "ResponseHead", "Trailers", "Head", "encode_head", "decode_head",
           "HeadError"]

Headers = Sequence[tuple[bytes, bytes]]
_COUNT = struct.Struct(">BH")
_LEN = struct.Struct(">H")
MAX_FIELD = 0xFFFF
PRINCIPAL_FIELD = b":principal"
PRINCIPAL_KINDS = ("user", "technical")


class HeadError(ValueError):
    """A HEADERS payload that does not decode, or a head that cannot be encoded."""


class HeadKind(enum.IntEnum):
    REQUEST = 1
    INFORMATIONAL = 2  # 1xx other than 101: more heads follow
    RESPONSE = 3  # the final response head (status 200..599)
    SWITCH = 4  # 101 Switching Protocols: the stream becomes a raw byte pipe both ways
    TRAILERS = 5  # ends a message after its body (always with FIN)


@attrs.frozen
class Principal:
    """Who a request acts for, as the cloud validated it: `kind` "user" (from
    SAP-Connectivity-Authentication) or "technical" (SAP-Connectivity-Technical-Authentication),
    `name` (the user name, or a technical user's client id) and the token's string claims."""

    kind: str
    name: str
    claims: dict[str, str] = attrs.field(factory=dict, hash=False)

    def encode(self) -> bytes:
        return json.dumps({"kind": self.kind, "name": self.name, "claims": self.claims},
                          separators=(",", ":"), sort_keys=True).encode("utf-8")

    @classmethod
    def decode(cls, value: bytes) -> Principal:
        """Strict: a JSON object of exactly kind, name (non-empty) and claims (strings); HeadError."""
        try:
            data = json.loads(value)
        except (ValueError, RecursionError):  # RecursionError: brackets nested thousands deep
            raise HeadError("the principal is not JSON") from None
        if not isinstance(data, dict) or set(data) != {"kind", "name", "claims"}:
            raise HeadError("the principal needs exactly kind, name and claims")
        kind, name, claims = data["kind"], data["name"], data["claims"]
        if kind not in PRINCIPAL_KINDS or not isinstance(name, str) or not name:
            raise HeadError("the principal's kind or name is invalid")
        if not isinstance(claims, dict) or not all(isinstance(v, str) for v in claims.values()):
            raise HeadError("the principal's claims must be strings")
        return cls(kind, name, claims)


@attrs.frozen
class RequestHead:
    method: bytes
    target: bytes  # origin-form, as the proxy checked it
    headers: list[tuple[bytes, bytes]]
    principal: Principal | None = None  # validated by the cloud; never from an application's header

    @property
    def kind(self) -> HeadKind:
        return HeadKind.REQUEST


@attrs.frozen
class ResponseHead:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]

    @property
    def kind(self) -> HeadKind:
        if self.status == 101:
            return HeadKind.SWITCH
        return HeadKind.INFORMATIONAL if self.status < 200 else HeadKind.RESPONSE


@attrs.frozen
class Trailers:
    headers: list[tuple[bytes, bytes]]

    @property
    def kind(self) -> HeadKind:
        return HeadKind.TRAILERS


Head = RequestHead | ResponseHead | Trailers


def _check_status(status: int) -> int:
    """The one range rule of both directions: what decodes can be encoded again."""
    if not 100 <= status <= 599:
        raise HeadError(f"status {status} out of range 100..599")
    return status


def encode_head(head: Head) -> bytes:
    """The HEADERS payload of `head`; HeadError if a field is longer than 65535 bytes."""
    if isinstance(head, RequestHead):
        fields: list[bytes] = [head.method, head.target]
        if head.principal is not None:
            fields += [PRINCIPAL_FIELD, head.principal.encode()]
    elif isinstance(head, ResponseHead):
        _check_status(head.status)
        fields = [b"%d" % head.status, head.reason]
    else:
        fields = []
    for name, value in head.headers:
        if name.startswith(b":"):
            raise HeadError("header names starting with ':' are reserved")
        fields.append(name)
        fields.append(value)
    parts = [_COUNT.pack(head.kind, len(fields))]
    pack = _LEN.pack
    for field in fields:
        if len(field) > MAX_FIELD:
            raise HeadError("a header field is longer than 65535 bytes")
        parts.append(pack(len(field)))
        parts.append(field)
    return b"".join(parts)


def decode_head(payload: bytes) -> Head:
    """The head in a HEADERS payload; HeadError (the peer broke the protocol) if malformed."""
    if len(payload) < _COUNT.size:
        raise HeadError("HEADERS payload too short")
    kind_value, count = _COUNT.unpack_from(payload)
    try:
        kind = HeadKind(kind_value)
    except ValueError:
        raise HeadError(f"unknown head kind {kind_value}") from None
    fields: list[bytes] = []
    pos, end = _COUNT.size, len(payload)
    unpack = _LEN.unpack_from
    for _ in range(count):
        if pos + 2 > end:
            raise HeadError("HEADERS payload truncated")
        (size,) = unpack(payload, pos)
        pos += 2
        if pos + size > end:
            raise HeadError("HEADERS payload truncated")
        fields.append(payload[pos:pos + size])
        pos += size
    if pos != end:
        raise HeadError("bytes after the last HEADERS field")
    fixed = 2 if kind in (HeadKind.REQUEST, HeadKind.INFORMATIONAL, HeadKind.RESPONSE, HeadKind.SWITCH) else 0
    if len(fields) < fixed or (len(fields) - fixed) % 2:
        raise HeadError("HEADERS needs name/value pairs after its fixed fields")
    it = iter(fields[fixed:])
    headers = list(zip(it, it, strict=True))
    principal = None
    if kind is HeadKind.REQUEST and headers and headers[0][0] == PRINCIPAL_FIELD:
        principal = Principal.decode(headers.pop(0)[1])
    if any(name.startswith(b":") for name, _ in headers):
        raise HeadError("a reserved field name (':...') where none may be")
    if kind is HeadKind.REQUEST:
        if not fields[0] or not fields[1]:
            raise HeadError("a request head needs a method and a target")
        return RequestHead(fields[0], fields[1], headers, principal)
    if kind is HeadKind.TRAILERS:
        return Trailers(headers)
    status_text = fields[0]
    if not (len(status_text) == 3 and status_text.isdigit()):
        raise HeadError("a response head needs a three-digit status")
    head = ResponseHead(_check_status(int(status_text)), fields[1], headers)
    if head.kind is not kind:
        raise HeadError(f"status {head.status} does not match head kind {kind.name}")
    return head
