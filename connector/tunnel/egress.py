"""Egress through an HTTP proxy: which proxy the node's tunnels go through, and the CONNECT.

Theory of operation: a node in a network that reaches the internet only through an HTTP proxy
opens each tunnel as ``CONNECT host:port`` to that proxy, then does TLS (the same context, server
name and verification as a direct dial) and the WebSocket upgrade inside the tunnel the proxy
opened. The proxy sees only the cloud's host and port; it cannot read or alter the tunnel.

Which proxy (`egress_policy`, pure): ``[tunnel] proxy`` when the key is present (a URL, or
``"none"``/``""`` for a direct connection whatever the environment says); otherwise the
environment's ``https_proxy`` (or ``HTTPS_PROXY``) with the exemptions of ``no_proxy`` (or
``NO_PROXY``), read as curl and requests read them (`bypasses`). A proxy from the environment is
never used for a loopback destination (``localhost``, 127.0.0.0/8, ::1), as Go's net/http does:
a proxy exported for a whole machine must not capture a node and cloud on one host (the demo,
the tests); the explicit key applies to every destination. The proxy URL is
``http://[USER:PASSWORD@]HOST:PORT``; the credentials are sent as HTTP Basic and shown nowhere:
`EgressProxy.__str__` and every message masks the password.

The CONNECT (`open_connect_tunnel`): h11 writes the request and parses the answer; a 2xx hands
back the TCP stream, anything else is an `EgressError` naming the proxy, its status and reason,
and what to check. Unreachable, silent and hanging-up proxies each get their own message. The
caller's deadline bounds it (the node's ``tunnel.connect_timeout`` covers the whole dial).
"""

from __future__ import annotations

import base64
import ipaddress
import urllib.parse
from collections.abc import Iterable, Mapping

import attrs
import h11
import trio

KEY_SOURCE = "[tunnel] proxy"
DIRECT = ("none", "")  # values of [tunnel] proxy meaning "no proxy, whatever the environment says"
MAX_ANSWER_HEAD = 16 * 1024  # bytes of the proxy's answer head we read before calling it broken
RECEIVE_SIZE = 4096


class EgressError(Exception):
    """The proxy did not open the tunnel; the message says which proxy, its answer and what to check."""


@attrs.frozen
class EgressProxy:
    """An HTTP proxy the node reaches the cloud through, and where it was configured."""

    host: str
    port: int
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)  # never in a log line or /status
    source: str = KEY_SOURCE  # "[tunnel] proxy", or the environment variable's name

    @property
    def url(self) -> str:
        """The proxy's URL with the password masked: safe for logs, messages and /status."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        auth = f"{urllib.parse.quote(self.user, safe='')}:***@" if self.user is not None else ""
        return f"http://{auth}{host}:{self.port}"

    def __str__(self) -> str:
        return self.url

    def authorization(self) -> str | None:
        """The Proxy-Authorization header value (Basic), or None without credentials."""
        if self.user is None:
            return None
        pair = f"{self.user}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


@attrs.frozen
class EgressPolicy:
    """Which tunnel URLs go through which proxy: `proxy` except the hosts `no_proxy` exempts."""

    proxy: EgressProxy | None = None
    no_proxy: tuple[str, ...] = ()
    loopback_direct: bool = False  # the environment's proxy: loopback is never sent through it

    def proxy_for(self, host: str, port: int) -> EgressProxy | None:
        """The proxy to dial `host`:`port` through, None for a direct connection."""
        if self.proxy is None or bypasses(self.no_proxy, host, port):
            return None
        if self.loopback_direct and is_loopback(host):
            return None
        return self.proxy

    def describe(self) -> str:
        """One line for `connector node --check` and the start-up log."""
        if self.proxy is None:
            return "tunnels connect directly (no proxy)"
        exempt = [f"no_proxy {','.join(self.no_proxy)}"] if self.no_proxy else []
        exempt += ["loopback"] if self.loopback_direct else []
        return (f"tunnels connect through proxy {self.proxy} ({self.proxy.source})"
                + (f", except {' and '.join(exempt)}" if exempt else ""))


def parse_proxy_url(text: str, source: str) -> EgressProxy:
    """``http://[USER:PASSWORD@]HOST:PORT`` (a bare ``HOST:PORT`` is read as http://, as curl does);
    ValueError naming what is wrong, never the password."""
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    parsed = urllib.parse.urlsplit(url)
    masked = EgressProxy(parsed.hostname or "?", 0, parsed.username).url.rsplit(":", 1)[0]
    if parsed.scheme != "http":
        raise ValueError(f"must be an http:// proxy URL (the tunnel's own TLS runs inside the proxy's "
                         f"CONNECT), got scheme {parsed.scheme!r}")
    if not parsed.hostname:
        raise ValueError(f"names no proxy host: {masked}")
    try:
        port = parsed.port
    except ValueError:
        raise ValueError(f"has an invalid port: {masked}") from None
    if port is None:
        raise ValueError(f"needs the proxy's port, as in http://HOST:3128: {masked}")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise ValueError(f"must be http://[USER:PASSWORD@]HOST:PORT with no path: {masked}")
    user = urllib.parse.unquote(parsed.username) if parsed.username is not None else None
    password = urllib.parse.unquote(parsed.password) if parsed.password is not None else None
    return EgressProxy(parsed.hostname, port, user, password, source)


def _environment(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """The first non-empty of `name` and `NAME`, with the variable's name (curl's precedence)."""
    for variable in (name, name.upper()):
        value = environ.get(variable, "").strip()
        if value:
            return variable, value
    return None


def egress_policy(key: str | None, environ: Mapping[str, str]) -> EgressPolicy:
    """The node's egress from ``[tunnel] proxy`` (None: absent) and the environment. The key wins
    when present; ``"none"`` or ``""`` means direct. ValueError (from `parse_proxy_url`) on a bad URL,
    prefixed with the environment variable's name when it came from there."""
    if key is not None:
        return EgressPolicy() if key.strip().lower() in DIRECT else EgressPolicy(parse_proxy_url(key, KEY_SOURCE))
    found = _environment(environ, "https_proxy")
    if found is None:
        return EgressPolicy()
    variable, value = found
    try:
        proxy = parse_proxy_url(value, variable)
    except ValueError as exc:
        raise ValueError(f"{variable} (environment) {exc}") from None
    exempt = _environment(environ, "no_proxy")
    entries = tuple(e.strip().lower() for e in exempt[1].split(",") if e.strip()) if exempt else ()
    return EgressPolicy(proxy, entries, loopback_direct=True)


def is_loopback(host: str) -> bool:
    """``localhost`` (and its subdomains) or a loopback address: this machine, never behind a proxy."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _split_entry(entry: str) -> tuple[str, int | None]:
    """A no_proxy entry as (host, port or None): ``host``, ``host:port``, ``[v6]:port``, ``v6``."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None


def bypasses(no_proxy: Iterable[str], host: str, port: int) -> bool:
    """Whether `no_proxy` exempts `host`:`port`, as curl and requests read it: ``*`` exempts all; a
    name exempts itself and its subdomains (a leading ``.`` or ``*.`` changes nothing); an IP address
    or CIDR network exempts the addresses in it (names are not resolved for that); ``:PORT`` limits
    an entry to that port. Case-insensitive; a trailing dot on `host` is ignored."""
    name = host.strip("[]").rstrip(".").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
    except ValueError:
        address = None
    for entry in no_proxy:
        if entry == "*":
            return True
        pattern, entry_port = _split_entry(entry.lower())
        if entry_port is not None and entry_port != port:
            continue
        try:
            network = ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            network = None
        if network is not None:
            if address is not None and address in network:
                return True
            continue
        pattern = pattern.removeprefix("*").lstrip(".").rstrip(".")
        if pattern and (name == pattern or name.endswith("." + pattern)):
            return True
    return False


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _refusal_hint(proxy: EgressProxy, answer: h11.Response, target: str) -> str:
    status = answer.status_code
    if status in (401, 407):  # 407 is the standard answer; tinyproxy says 401 to wrong credentials
        schemes = [value.split(b" ", 1)[0].decode("latin-1") for name, value in answer.headers
                   if name == b"proxy-authenticate"]
        if schemes and not any(scheme.lower() == "basic" for scheme in schemes):
            return (f"the proxy asks for {' or '.join(schemes)} authentication; the node speaks Basic "
                    "only: ask for a Basic account, or an exemption for the cloud's host")
        if proxy.user is None:
            return (f"the proxy wants credentials: give them in {proxy.source} as "
                    "http://USER:PASSWORD@HOST:PORT")
        return f"check {proxy.source} credentials"
    if status == 403:
        return (f"the proxy's rules forbid CONNECT to {target}: allow that host and port there "
                "(squid: http_access and SSL_ports; tinyproxy: ConnectPort)")
    if status >= 500:
        return f"the proxy could not reach {target}: is the tunnel URL right, and may the proxy reach it?"
    return "is it an HTTP proxy that supports CONNECT?"


async def _connect(stream: trio.SocketStream, proxy: EgressProxy, target: str) -> h11.Response:
    """Send CONNECT `target`, return the proxy's final answer; EgressError on a hang-up."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_HEAD)
    headers = [("Host", target)]
    authorization = proxy.authorization()
    if authorization is not None:
        headers.append(("Proxy-Authorization", authorization))
    await stream.send_all(conn.send(h11.Request(method="CONNECT", target=target, headers=headers))
                          + (conn.send(h11.EndOfMessage()) or b""))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise EgressError(f"proxy {proxy} ({proxy.source}) closed the connection without answering "
                                  f"CONNECT {target}: is {proxy.port} the proxy's port, and does it allow this node?")
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            if 200 <= event.status_code < 300 and conn.trailing_data[0]:
                raise EgressError(f"proxy {proxy} ({proxy.source}) sent data after its {event.status_code} "
                                  f"answer to CONNECT {target}, before the TLS handshake: not a CONNECT tunnel")
            return event
        # an InformationalResponse (1xx) comes before the final answer: keep reading


async def open_connect_tunnel(proxy: EgressProxy, host: str, port: int, *, deadline: float,
                              timeout: float) -> trio.SocketStream:  # noqa: ASYNC109 - named in the messages
    """TCP to `proxy` and ``CONNECT host:port`` by `deadline` (`timeout` seconds after the dial
    began); the stream, now a tunnel to `host`:`port`, or EgressError saying why not. The stream
    is closed on every other way out (a refusal, an error, the caller's cancellation)."""
    target = _authority(host, port)
    named = f"proxy {proxy} ({proxy.source})"
    try:
        with trio.fail_at(deadline):
            stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    except trio.TooSlowError:
        raise EgressError(f"no TCP connection to {named} within {timeout:g} s (proxy down, or a firewall "
                          "dropping packets?)") from None
    except OSError as exc:
        cause = exc.__cause__
        detail = "; ".join(str(e) for e in getattr(cause, "exceptions", ())) or str(exc)
        raise EgressError(f"cannot reach {named}: {detail}") from None
    try:
        with trio.fail_at(deadline):
            answer = await _connect(stream, proxy, target)
        if not 200 <= answer.status_code < 300:
            reason = answer.reason.decode("latin-1", "replace")
            raise EgressError(f"proxy {proxy} refused CONNECT {target}: {answer.status_code} {reason} "
                              f"({_refusal_hint(proxy, answer, target)})")
    except BaseException as exc:
        await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.TooSlowError):
            raise EgressError(f"{named} did not answer CONNECT {target} within {timeout:g} s") from None
        if isinstance(exc, trio.BrokenResourceError):
            raise EgressError(f"{named} broke the connection during CONNECT {target}: "
                              f"{exc.__cause__ or exc}") from None
        if isinstance(exc, h11.RemoteProtocolError):
            raise EgressError(f"{named} answered CONNECT {target} with something that is not HTTP ({exc}): "
                              f"is {proxy.port} an HTTP proxy's port?") from None
        raise
    return stream
