"""Error responses shared by the connectivity proxy and the node: a status and a short JSON body.

Clients of SAP's proxy see plain status codes; we add a machine-readable reason so an operator can
tell "denied by the allow-list" from "internal host unreachable" without reading logs.
"""

from __future__ import annotations

import json

REASON_PHRASES = {
    400: b"Bad Request",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    407: b"Proxy Authentication Required",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


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
