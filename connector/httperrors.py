"""Error responses shared by the connectivity proxy and the node: a status and a short JSON body.

Clients of SAP's proxy see plain status codes; we add a machine-readable reason so an operator can
tell "denied by the allow-list" from "internal host unreachable" without reading logs.

What an application is told comes from one table (`ERRORS`): a reason and a generic sentence.
Nothing in it comes from the on-premise side (internal host names and addresses, resolver and TLS
errors, file paths of trust stores): the node writes that detail to its log and audit line only,
and resets streams with the same generic sentences (`reset_error`), so the cloud never holds it.
"""

from __future__ import annotations

import json

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

# The reason an application is given for a stream reset with each code.
RESET_REASONS: dict[ErrorCode, str] = {
    ErrorCode.NO_MAPPING: "no_mapping",
    ErrorCode.DENIED: "denied_by_allowlist",
    ErrorCode.CONNECT_FAILED: "internal_host_unreachable",
    ErrorCode.CONNECT_TIMEOUT: "internal_host_timeout",
    ErrorCode.BACKEND_TLS_ERROR: "backend_tls_error",
    ErrorCode.BACKEND_RESET: "backend_reset",
    ErrorCode.TUNNEL_LOST: "connector_connection_lost",
}


def reset_error(code: ErrorCode) -> tuple[int, str, str]:
    """(status, reason, generic message) for a stream reset with `code`; the reset's own reason
    text is never part of it (an older node may put on-premise detail there)."""
    reason = RESET_REASONS.get(code)
    if reason is None:
        return 502, code.name.lower(), f"stream to the connector failed ({code.name})"
    status, message = ERRORS[reason]
    return status, reason, message


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
