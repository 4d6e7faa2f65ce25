"""The proxy's edge toward its target: what an application's request names, and what of it goes on.

`parse_proxy_target` splits an absolute-form request target (`GET http://erp.virtual:8000/path`)
into the virtual host, port and origin-form target, refusing what the proxy cannot route (origin
form, https://, user information, odd hosts and ports) with a sentence for the application.
`forwarded_headers` is the request's headers as the node gets them: without hop-by-hop headers,
the proxy's own routing header and the principal headers (validated by the proxy, never passed
on); Host kept; a WebSocket upgrade (and only that upgrade) forwarded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import h11

from connector.cloud.principal import PRINCIPAL_HEADERS
from connector.http1 import HOP_BY_HOP, header_tokens, strip_hop_by_hop

__all__ = ["LOCATION_HEADER", "PROXY_ONLY", "BadTargetError", "parse_proxy_target", "is_websocket_upgrade",
           "forwarded_headers", "response_headers"]

LOCATION_HEADER = b"sap-connectivity-scc-location_id"

# hop-by-hop for the proxy: also its own routing header, which the node must not see
PROXY_ONLY = frozenset({LOCATION_HEADER})
_NOT_FORWARDED = HOP_BY_HOP | PROXY_ONLY | PRINCIPAL_HEADERS
_HOST = re.compile(rb"[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\]")


class BadTargetError(ValueError):
    """The request line does not name an http:// URL the proxy can route."""


def parse_proxy_target(raw: bytes) -> tuple[str, int, bytes]:
    """Split an absolute-form target into (virtual_host, port, origin-form target)."""
    if raw.startswith(b"/") or raw == b"*":
        raise BadTargetError(
            "origin-form request sent to the proxy: send the absolute URL "
            "(GET http://virtual-host:port/path) as HTTP proxy clients do"
        )
    scheme, sep, rest = raw.partition(b"://")
    if not sep:
        raise BadTargetError("request target is not an absolute http:// URL")
    if scheme.lower() == b"https":
        raise BadTargetError(
            "https:// URLs are not proxied: send http://virtual-host:port/...; the connector node "
            "uses TLS to the internal host when its mapping says HTTPS"
        )
    if scheme.lower() != b"http":
        raise BadTargetError(f"unsupported URL scheme {scheme.decode('latin-1')!r}")
    split = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        index = rest.find(delimiter)
        if index != -1:
            split = min(split, index)
    authority, path = rest[:split], rest[split:]
    path = path.partition(b"#")[0]
    if not path.startswith(b"/"):
        path = b"/" + path
    if b"@" in authority:
        raise BadTargetError("user information in the URL is not allowed")
    if authority.startswith(b"["):
        host, _, port_part = authority.partition(b"]")
        host += b"]"
        if port_part and not port_part.startswith(b":"):
            raise BadTargetError("malformed IPv6 authority")
        port_text = port_part[1:]
    else:
        host, _, port_text = authority.partition(b":")
    if not host:
        raise BadTargetError("the URL names no host")
    if not _HOST.fullmatch(host):
        raise BadTargetError("the URL host contains characters not allowed in a host name")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise BadTargetError("the URL port is not a number between 1 and 65535")
        port = int(port_text)
    else:
        port = 80
    return host.decode("ascii").lower(), port, path


def is_websocket_upgrade(request: h11.Request) -> bool:
    """True for an HTTP/1.1 GET with `Connection: Upgrade` and `Upgrade: websocket` (RFC 6455 4.1)."""
    return (
        request.method == b"GET"
        and request.http_version == b"1.1"
        and b"upgrade" in header_tokens(request.headers, b"connection")
        and b"websocket" in header_tokens(request.headers, b"upgrade")
    )


# Framing headers: a Connection header naming one would have this hop drop it, and the node
# would frame the request differently from the application and from us.
def forwarded_headers(
    headers: Sequence[tuple[bytes, bytes]], host: str, port: int, *, websocket: bool = False
) -> list[tuple[bytes, bytes]]:
    """Request headers to send to the node: proxy and hop-by-hop headers removed, Host kept.

    With `websocket` the upgrade is forwarded (`Connection: upgrade`, `Upgrade: websocket`) and
    the Sec-WebSocket-* headers are kept even if the application listed them in Connection; every
    other upgrade (h2c, ...) is stripped like any hop-by-hop header.
    """
    listed = header_tokens(headers, b"connection")
    if websocket:
        listed = {token for token in listed if not token.startswith(b"sec-websocket-")}
    result = [(name, value) for name, value in headers if name not in _NOT_FORWARDED and name not in listed]
    if not any(name == b"host" for name, _ in result):
        authority = host if port == 80 else f"{host}:{port}"
        result.insert(0, (b"host", authority.encode("ascii")))
    if websocket:
        result += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    return result


def response_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Response headers to relay to the application: hop-by-hop headers removed."""
    return strip_hop_by_hop(headers, PROXY_ONLY)
