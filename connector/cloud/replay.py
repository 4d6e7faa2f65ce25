"""When a request may be sent to the connector once more: one rule, as a pure function.

HTTP/2's guarantee (RFC 9113 section 8.7), applied to the tunnel: a stream the node *refused*
(reset REFUSED before reading anything: not the master, handing over) or that lies above the last
stream id of the node's GOAWAY was provably never processed, so it can be replayed, through the
failover hold, whatever its method, POST included, provided the proxy still holds every body byte
it took from the application. A stream lost with its tunnel (the master crashed) may or may not
have reached the internal host: only a request that is safe to repeat is replayed (an idempotent
method, RFC 9110 section 9.2.2, and no body byte taken from the application). Nothing is
replayed once any part of the response went to the application, and never more than
`MAX_ATTEMPTS` times.

SOCKS5 connects follow the same rule with ``idempotent=True`` and no body: a connect that never
reported success carried no application byte.
"""

from __future__ import annotations

import enum

import attrs

from connector.tunnel.types import ErrorCode

__all__ = ["Failure", "Facts", "may_replay", "IDEMPOTENT_METHODS", "MAX_ATTEMPTS"]

# Methods a client may send twice without changing the outcome (RFC 9110 section 9.2.2).
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
MAX_ATTEMPTS = 4  # a request is sent at most this often (the hold's deadline bounds it too)


class Failure(enum.Enum):
    REFUSED = "refused"  # the node provably never processed the stream
    TUNNEL_LOST = "tunnel_lost"  # the tunnel died under the stream: processed or not, unknown
    OTHER = "other"  # the node answered with a reset (denied, internal host failed...)

    @classmethod
    def of(cls, code: ErrorCode) -> Failure:
        """The failure a stream reset with `code` is."""
        return {ErrorCode.REFUSED: cls.REFUSED, ErrorCode.TUNNEL_LOST: cls.TUNNEL_LOST}.get(code, cls.OTHER)


@attrs.frozen
class Facts:
    failure: Failure
    idempotent: bool  # the method may be repeated (IDEMPOTENT_METHODS; a SOCKS5 connect)
    response_started: bool  # a byte of the response went to the application
    body_consumed: bool  # body bytes were read from the application
    body_kept: bool  # ... and every one of them is still held, ready to be sent again
    attempts: int  # sends so far, this one included


def may_replay(facts: Facts) -> bool:
    """True if the request may be sent once more (through the hold, to the current master)."""
    if facts.response_started or facts.attempts >= MAX_ATTEMPTS:
        return False
    if facts.failure is Failure.REFUSED:
        return not facts.body_consumed or facts.body_kept
    if facts.failure is Failure.TUNNEL_LOST:
        return facts.idempotent and not facts.body_consumed
    return False
