"""Vocabulary shared by the tunnel, the cloud side and the node: targets and error codes.

Kept free of trio and sockets so the sans-I/O protocol core can import it.
"""

from __future__ import annotations

import enum

import attrs


class ErrorCode(enum.IntEnum):
    """Why a stream was reset or a tunnel went away; carried on the wire as a u32."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1  # the peer broke the tunnel protocol
    FLOW_CONTROL_ERROR = 2  # the peer sent more than its credit allowed
    CANCEL = 3  # the opener gave up (client went away)
    NO_MAPPING = 4  # no mapping for the virtual host:port on this node
    DENIED = 5  # the allow-list refused the request
    CONNECT_FAILED = 6  # internal host refused or unreachable
    CONNECT_TIMEOUT = 7  # internal host did not answer in time
    BACKEND_RESET = 8  # internal host reset the connection mid-stream
    INTERNAL_ERROR = 9  # a bug or resource exhaustion on the resetting side
    GOING_AWAY = 10  # the tunnel is closing (shutdown, handover)
    NOT_MASTER = 11  # this node is not the master and serves no traffic
    STALE_EPOCH = 12  # a registration with a lower epoch than the cloud has seen
    FRAME_TOO_LARGE = 13
    UNSUPPORTED_VERSION = 14
    BACKEND_TLS_ERROR = 15  # TLS to the internal host failed verification
    TUNNEL_LOST = 16  # the tunnel carrying the stream died (master crashed)
    REFUSED = 17  # the acceptor did not process the stream at all (not master, draining): replayable

    @classmethod
    def parse(cls, value: int) -> ErrorCode:
        """Map an on-wire code to the enum; unknown codes become INTERNAL_ERROR, not a crash."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL_ERROR


class StreamResetError(Exception):
    """Raised by stream I/O when the peer (or the tunnel) reset the stream."""

    def __init__(self, code: ErrorCode, reason: str = "") -> None:
        super().__init__(f"{code.name}: {reason}" if reason else code.name)
        self.code = code
        self.reason = reason


class StreamProtocol(enum.StrEnum):
    """What the opener will speak on a stream: HTTP requests, or raw TCP bytes."""

    HTTP = "http"
    TCP = "tcp"


@attrs.frozen
class Target:
    """The virtual endpoint a stream is opened to, as the cloud application named it."""

    virtual_host: str
    port: int
    protocol: StreamProtocol = StreamProtocol.HTTP

    def __str__(self) -> str:
        return f"{self.protocol}://{self.virtual_host}:{self.port}"
