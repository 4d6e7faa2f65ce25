"""Redirects from an internal host, rewritten so that its host:port never reaches the application.

An internal host that builds absolute URLs from its own name (it was sent `host_in_header =
"internal"`, or it knows its name from its own configuration) answers `Location:
https://erp-internal:44300/next`. The application cannot reach that address and should not learn
it: the node rewrites `Location` and `Content-Location` whose authority is the mapping's internal
host and port to the virtual host, `http://<virtual_host>:<virtual_port>` (the application talks
plain HTTP to the proxy, whatever the node speaks to the internal host), keeping userinfo, path,
query and fragment as they are. The host compares case-insensitively, brackets of an IPv6 literal
aside; a URL without a port means the scheme's default (80, 443). A network-path reference
(`//host:port/path`, the scheme of the internal host's connection) keeps its form with the virtual
authority. Relative paths, other hosts and anything that does not parse as an http(s) URL are left
untouched.
"""

from __future__ import annotations

from connector.agent.acl import Mapping

REWRITTEN_HEADERS = (b"location", b"content-location")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _bare(host: str) -> str:
    """A host for comparison: lower case, without the brackets of an IPv6 literal."""
    host = host.lower()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def rewrite_location(value: bytes, mapping: Mapping) -> bytes:
    """`value` with an authority of the internal host[:port] replaced by the virtual host:port;
    unchanged if it names anything else or does not parse."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return value
    if text.startswith("//"):  # a network-path reference: the scheme is the internal host's own
        scheme, rest, prefix = ("https" if mapping.protocol.uses_tls else "http"), text[2:], "//"
    else:
        scheme, sep, rest = text.partition("://")
        scheme, prefix = scheme.lower(), "http://"
        if not sep or scheme not in _DEFAULT_PORTS:
            return value
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    userinfo, at, hostport = authority.rpartition("@")
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            return value
        host, port_text = hostport[: end + 1], hostport[end + 1:]
        if port_text and not port_text.startswith(":"):
            return value
        port_text = port_text[1:]
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        return value
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return value
        port = int(port_text)
    else:
        port = _DEFAULT_PORTS[scheme]
    if _bare(host) != _bare(mapping.internal_host) or port != mapping.internal_port:
        return value
    virtual = f"{_bracketed(mapping.virtual_host)}:{mapping.virtual_port}"
    return f"{prefix}{userinfo}{at}{virtual}{tail}".encode("ascii")


def rewrite_locations(headers: list[tuple[bytes, bytes]], mapping: Mapping) -> list[tuple[bytes, bytes]]:
    """The response headers with `Location` and `Content-Location` rewritten (`rewrite_location`);
    names are lower case as h11 gives them."""
    return [(name, rewrite_location(value, mapping) if name in REWRITTEN_HEADERS else value)
            for name, value in headers]
