"""`rewrite_location`: a redirect naming the internal host points the application at the virtual host."""

from __future__ import annotations

import pytest

from connector.agent.acl import BackendProtocol, Mapping
from connector.agent.redirects import rewrite_location, rewrite_locations

HTTP = Mapping("erp.virtual", 8000, "erp-internal.corp", 8080)
HTTPS_DEFAULT = Mapping("erp.virtual", 8000, "ERP-Internal.corp", 443, protocol=BackendProtocol.HTTPS)
HTTP_DEFAULT = Mapping("erp.virtual", 8000, "erp-internal.corp", 80)
IPV6 = Mapping("erp.virtual", 8000, "::1", 8443, protocol=BackendProtocol.HTTPS)
IPV6_BRACKETED = Mapping("erp.virtual", 8000, "[::1]", 8443, protocol=BackendProtocol.HTTPS)


@pytest.mark.parametrize(("mapping", "location", "expected"), [
    # explicit port, path and query kept
    (HTTP, b"http://erp-internal.corp:8080/sap/next?x=1", b"http://erp.virtual:8000/sap/next?x=1"),
    # authority only; query or fragment right after the authority
    (HTTP, b"http://erp-internal.corp:8080", b"http://erp.virtual:8000"),
    (HTTP, b"http://erp-internal.corp:8080?a=b", b"http://erp.virtual:8000?a=b"),
    (HTTP, b"http://erp-internal.corp:8080#top", b"http://erp.virtual:8000#top"),
    # host and scheme compare case-insensitively
    (HTTP, b"HTTP://ERP-INTERNAL.Corp:8080/a", b"http://erp.virtual:8000/a"),
    (HTTPS_DEFAULT, b"https://erp-internal.corp:443/a", b"http://erp.virtual:8000/a"),
    # default ports: https 443 and http 80 when no port is written
    (HTTPS_DEFAULT, b"https://erp-internal.corp/a", b"http://erp.virtual:8000/a"),
    (HTTP_DEFAULT, b"http://erp-internal.corp/a", b"http://erp.virtual:8000/a"),
    # the default port of the other scheme is another port: not the internal host's
    (HTTPS_DEFAULT, b"http://erp-internal.corp/a", b"http://erp-internal.corp/a"),
    (HTTP_DEFAULT, b"https://erp-internal.corp/a", b"https://erp-internal.corp/a"),
    # https internal host, http to the application (it speaks plain HTTP to the proxy)
    (IPV6, b"https://[::1]:8443/x", b"http://erp.virtual:8000/x"),
    (IPV6_BRACKETED, b"https://[::1]:8443/x", b"http://erp.virtual:8000/x"),
    (IPV6, b"https://[::2]:8443/x", b"https://[::2]:8443/x"),
    # userinfo is kept; the host after it decides
    (HTTP, b"http://user:pw@erp-internal.corp:8080/a", b"http://user:pw@erp.virtual:8000/a"),
    (HTTP, b"http://erp-internal.corp:8080@evil.example/a", b"http://erp-internal.corp:8080@evil.example/a"),
    # other hosts, other ports, other schemes, relative references: untouched
    (HTTP, b"http://other.corp:8080/a", b"http://other.corp:8080/a"),
    (HTTP, b"http://erp-internal.corp:8081/a", b"http://erp-internal.corp:8081/a"),
    (HTTP, b"http://erp-internal.corp.evil:8080/a", b"http://erp-internal.corp.evil:8080/a"),
    (HTTP, b"ftp://erp-internal.corp:8080/a", b"ftp://erp-internal.corp:8080/a"),
    (HTTP, b"/sap/next", b"/sap/next"),
    (HTTP, b"next?x=1", b"next?x=1"),
    # a network-path reference: the internal host's own scheme gives the default port
    (HTTP, b"//erp-internal.corp:8080/a?b", b"//erp.virtual:8000/a?b"),
    (HTTPS_DEFAULT, b"//erp-internal.corp/a", b"//erp.virtual:8000/a"),
    (HTTP_DEFAULT, b"//erp-internal.corp/a", b"//erp.virtual:8000/a"),
    (HTTPS_DEFAULT, b"//erp-internal.corp:80/a", b"//erp-internal.corp:80/a"),
    (HTTP, b"//other.corp:8080/a", b"//other.corp:8080/a"),
    # malformed values are left as they are
    (HTTP, b"http://erp-internal.corp:80x80/a", b"http://erp-internal.corp:80x80/a"),
    (HTTP, b"http://erp-internal.corp:99999/a", b"http://erp-internal.corp:99999/a"),
    (HTTP, b"http://:8080/a", b"http://:8080/a"),
    (IPV6, b"https://[::1:8443/x", b"https://[::1:8443/x"),
    (IPV6, b"https://[::1]x:8443/x", b"https://[::1]x:8443/x"),
    (HTTP, "http://erp-internal.corp:8080/ä".encode(), "http://erp-internal.corp:8080/ä".encode()),
    (HTTP, b"", b""),
])
def test_rewrite_location(mapping: Mapping, location: bytes, expected: bytes) -> None:
    assert rewrite_location(location, mapping) == expected


def test_ipv6_virtual_host_is_bracketed() -> None:
    mapping = Mapping("::2", 8000, "erp-internal.corp", 8080)
    assert rewrite_location(b"http://erp-internal.corp:8080/a", mapping) == b"http://[::2]:8000/a"


def test_only_location_headers_are_rewritten() -> None:
    headers = [(b"location", b"http://erp-internal.corp:8080/a"),
               (b"content-location", b"http://erp-internal.corp:8080/b"),
               (b"link", b"<http://erp-internal.corp:8080/c>"),
               (b"refresh", b"0; url=http://erp-internal.corp:8080/d")]
    assert rewrite_locations(headers, HTTP) == [
        (b"location", b"http://erp.virtual:8000/a"),
        (b"content-location", b"http://erp.virtual:8000/b"),
        (b"link", b"<http://erp-internal.corp:8080/c>"),
        (b"refresh", b"0; url=http://erp-internal.corp:8080/d"),
    ]
