"""Error responses shared by the connectivity proxy and the node: a status and a short JSON body.

Clients of SAP's proxy see plain status codes; we add a machine-readable reason so an operator can
tell "denied by the allow-list" from "internal host unreachable" without reading logs.

What an application is told comes from one table (`ERRORS`): a reason and a generic sentence.
A stream reset is told through `RESETS`, one row per `ErrorCode`: its reason, the HTTP status
and the SOCKS5 reply, so the two proxies cannot disagree.
Nothing in it comes from the on-premise side (internal host names and addresses, resolver and TLS
errors, file paths of trust stores): the node writes that detail to its log and audit line only,
and resets streams with the same generic sentences (`reset_error`), so the cloud never holds it.
"""

from __future__ import annotations

import json

import attrs

from connector.tunnel.types import ErrorCode

REASON_PHRASES = {
    400: b"Bad Request",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    407: b"Proxy Authentication Required",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

# reason -> (status, what the application is told)
ERRORS: dict[str, tuple[int, str]] = {
    "no_mapping": (403, "the connector has no mapping for this virtual host and port"),
    "denied_by_allowlist": (403, "the connector's access control denied this request"),
    "internal_host_unreachable": (502, "the internal host refused or is unreachable"),
    "internal_host_timeout": (504, "the internal host did not answer in time"),
    "backend_tls_error": (502, "TLS to the internal host failed"),
    "backend_reset": (502, "the internal host reset the connection"),
    "internal_host_protocol_error": (502, "the internal host broke HTTP"),
    "connector_connection_lost": (502, "connector connection lost"),
    "request_head_timeout": (408, "the request head did not arrive in time"),
    "request_body_too_slow": (408, "the request body arrived too slowly"),
}

# SOCKS5 reply codes (RFC 1928 section 6), for the table below and `connector.cloud.socks5`
SOCKS5_SUCCEEDED = 0x00
SOCKS5_GENERAL_FAILURE = 0x01
SOCKS5_NOT_ALLOWED = 0x02  # "connection not allowed by ruleset"
SOCKS5_NETWORK_UNREACHABLE = 0x03  # SAP: "Cloud Connector not connected"
SOCKS5_HOST_UNREACHABLE = 0x04
SOCKS5_CONNECTION_REFUSED = 0x05
SOCKS5_COMMAND_NOT_SUPPORTED = 0x07
SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED = 0x08


@attrs.frozen
class ResetAnswer:
    """What an application is told about a stream reset with one code, on either proxy."""

    reason: str  # stable token: X-Connector-Error, the error body, the audit reason
    status: int  # HTTP status (the connectivity proxy)
    socks5: int  # SOCKS5 reply code (the SOCKS5 proxy, while the connect is unanswered)
    message: str  # the generic sentence (never the reset's own reason text)


def _known(reason: str, socks5: int) -> ResetAnswer:
    status, message = ERRORS[reason]
    return ResetAnswer(reason, status, socks5, message)


def _failed(code: ErrorCode, socks5: int = SOCKS5_GENERAL_FAILURE) -> ResetAnswer:
    """A code the application has no better word for: the stream to the connector failed."""
    return ResetAnswer(code.name.lower(), 502, socks5, f"stream to the connector failed ({code.name})")


# The one table of stream resets: every ErrorCode has its row (tests/unit/test_httperrors.py);
# the HTTP side reads it through `reset_error`, the SOCKS5 proxy directly.
RESETS: dict[ErrorCode, ResetAnswer] = {
    ErrorCode.NO_ERROR: _failed(ErrorCode.NO_ERROR),
    ErrorCode.PROTOCOL_ERROR: _failed(ErrorCode.PROTOCOL_ERROR),
    ErrorCode.FLOW_CONTROL_ERROR: _failed(ErrorCode.FLOW_CONTROL_ERROR),
    ErrorCode.CANCEL: _failed(ErrorCode.CANCEL),
    ErrorCode.NO_MAPPING: _known("no_mapping", SOCKS5_NOT_ALLOWED),
    ErrorCode.DENIED: _known("denied_by_allowlist", SOCKS5_NOT_ALLOWED),
    ErrorCode.CONNECT_FAILED: _known("internal_host_unreachable", SOCKS5_CONNECTION_REFUSED),
    ErrorCode.CONNECT_TIMEOUT: _known("internal_host_timeout", SOCKS5_HOST_UNREACHABLE),
    ErrorCode.BACKEND_RESET: _known("backend_reset", SOCKS5_GENERAL_FAILURE),
    ErrorCode.INTERNAL_ERROR: _failed(ErrorCode.INTERNAL_ERROR),
    ErrorCode.GOING_AWAY: _failed(ErrorCode.GOING_AWAY),
    ErrorCode.NOT_MASTER: _failed(ErrorCode.NOT_MASTER),
    ErrorCode.STALE_EPOCH: _failed(ErrorCode.STALE_EPOCH),
    ErrorCode.FRAME_TOO_LARGE: _failed(ErrorCode.FRAME_TOO_LARGE),
    ErrorCode.UNSUPPORTED_VERSION: _failed(ErrorCode.UNSUPPORTED_VERSION),
    ErrorCode.BACKEND_TLS_ERROR: _known("backend_tls_error", SOCKS5_GENERAL_FAILURE),
    # the connector is gone or serves nothing (what remains once the replays are spent):
    # SOCKS5's word for "Cloud Connector not connected"
    ErrorCode.TUNNEL_LOST: _known("connector_connection_lost", SOCKS5_NETWORK_UNREACHABLE),
    ErrorCode.REFUSED: _failed(ErrorCode.REFUSED, SOCKS5_NETWORK_UNREACHABLE),
}

# reset code -> reason token: a view of `RESETS` for the node's own answers
RESET_REASONS: dict[ErrorCode, str] = {code: answer.reason for code, answer in RESETS.items()}


def reset_error(code: ErrorCode) -> tuple[int, str, str]:
    """(status, reason, generic message) for a stream reset with `code`; the reset's own reason
    text is never part of it (an older node may put on-premise detail there)."""
    answer = RESETS[code]
    return answer.status, answer.reason, answer.message


def error_parts(
    status: int, reason: str, message: str = "", extra_headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Return (status, headers, body) for an error response; send it with your own h11 connection.

    `reason` is a short stable token (``denied_by_allowlist``, ``internal_host_unreachable``...);
    `message` is a human sentence. The response always closes the connection's framing cleanly
    (explicit Content-Length), so a keep-alive connection may continue after it.
    """
    body = json.dumps({"error": reason, "message": message or reason.replace("_", " ")}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-connector-error", reason.encode()),
    ]
    if extra_headers:
        headers.extend(extra_headers)
    return status, headers, body
