"""The node's side of opening a tunnel: TCP, TLS, WebSocket upgrade, each failure in plain words.

Theory of operation: `open_tunnel_websocket` takes the steps one at a time under one deadline
(`tunnel.connect_timeout`), so a failure says which step failed and why, instead of a bare
timeout. trio-websocket alone cannot: when the TLS stream breaks before the upgrade answer
(under TLS 1.3 the cloud refuses a client certificate only *after* the client finished its
handshake) its reader task swallows the error and the connect waits for the deadline. So the
TLS handshake is done here explicitly, and the upgrade watches the stream for the first receive
failure, which carries ssl's reason (the alert the cloud sent).

Every failure is a `DialError` whose message names the host:port dialled and the cause an
operator can act on: the cloud's certificate failed verification (with the name dialled, the
names and issuer the certificate carries, and the CA the node trusts), the port answered plain
HTTP, the cloud refused the node's certificate, the connection was refused or timed out.
The certificate of a server that failed verification is fetched for that message over a second,
non-verifying connection that presents no client certificate and sends nothing.

Where to dial (`DialTarget`, `dial_targets`): the cloud is several replicas and the node holds a
tunnel to each. It finds them as the union of the configured URLs (``[tunnel] url``, one or a
list), each address a configured host name resolves to (a Kubernetes headless service names every
replica's pod; each address is dialled with the TLS server name and ``Host`` of the name, so one
certificate for the name serves), and the replicas the cloud announces. `dial_targets` is that
union as a pure function; `resolve_addresses` is the resolver the node calls periodically, and
tests inject their own.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

import attrs
import trio
import trio_websocket
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from connector.tunnel.egress import EgressError, EgressProxy, open_connect_tunnel

# ssl's reasons for a TLS alert the cloud sends when it refuses the node's certificate
_REFUSED_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "unknown ca: the cloud does not trust the CA that issued it",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "certificate required: the node sent none",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate revoked",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake failure",
}
# ssl's reasons when the bytes that came back are not TLS at all
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE",
            "UNKNOWN_PROTOCOL", "RECORD_TOO_LARGE"}
_PROBE_BYTES = 64


class DialError(Exception):
    """One attempt to open the tunnel failed; the message is the cause, in an operator's words."""


@attrs.frozen
class DialTarget:
    """One place to dial: a tunnel URL, optionally at one address of its host name."""

    url: str
    address: str | None = None  # connect here; TLS server name and Host stay the URL's host

    @property
    def key(self) -> str:
        return self.url if self.address is None else f"{self.url}@{self.address}"

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or ""

    def __str__(self) -> str:
        return self.key


Resolver = Callable[[str, int], Awaitable[list[str]]]
Opener = Callable[[], Awaitable[trio.SocketStream]]  # a new TCP stream to where a dial goes


def is_address(host: str) -> bool:
    """Whether `host` is an IP literal (nothing to resolve) rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def url_port(url: str) -> int:
    return urllib.parse.urlsplit(url).port or 443


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to for TCP, sorted; OSError (socket.gaierror) when it does not."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def dial_targets(configured: Iterable[str], resolved: Mapping[str, list[str]],
                 announced: Iterable[str]) -> frozenset[DialTarget]:
    """Where the node dials: each configured URL whose host is an address, or whose host name has
    no resolution yet, as is; one target per address of a host name in `resolved` (keyed by the
    URL); each announced URL as is. Pure: the caller resolves and remembers announcements."""
    targets: set[DialTarget] = set()
    for url in configured:
        addresses = resolved.get(url)
        if addresses:
            targets.update(DialTarget(url, address) for address in addresses)
        else:
            targets.add(DialTarget(url))
    targets.update(DialTarget(url) for url in announced)
    return frozenset(targets)


async def open_tunnel_websocket(
    nursery: trio.Nursery,
    url: str,
    ssl_context: ssl.SSLContext,
    *,
    address: str | None = None,  # connect to this address of the URL's host (TLS still verifies the host)
    timeout: float,  # noqa: ASYNC109 - one budget for all steps; the failure names it
    client_cert: Path | None = None,
    max_message_size: int,
    receive_buffer_size: int,
    proxy: EgressProxy | None = None,  # reach the cloud through this HTTP proxy's CONNECT
) -> trio_websocket.WebSocketConnection:
    """TCP (or a proxy's CONNECT), TLS and WebSocket upgrade to `url` (wss://) within `timeout`
    seconds; DialError says why not."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    port = parsed.port or 443
    where = f"{host}:{port}" + (f" (at {address})" if address is not None else "") + (
        f" through proxy {proxy}" if proxy is not None else "")
    resource = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
    deadline = trio.current_time() + timeout

    async def reopen() -> trio.SocketStream:
        """The TCP connection the TLS handshake runs over: direct, or the proxy's CONNECT tunnel."""
        return await _open_tcp(host, port, address, proxy, deadline, timeout, where)

    tcp = await reopen()
    tls = trio.SSLStream(tcp, ssl_context, server_hostname=host, https_compatible=True)
    try:
        with trio.fail_at(deadline):
            await tls.do_handshake()
    except trio.TooSlowError:
        await trio.aclose_forcefully(tls)
        raise DialError(f"no TLS handshake with {where} within {timeout:g} s: is {port} the cloud's "
                        "tunnel port (a TLS port)?") from None
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tls)
        raise DialError(await _describe_tls_failure(exc.__cause__, host, port, ssl_context, client_cert,
                                                    deadline, where, reopen)) from None

    failure: list[BaseException | None] = []
    broken = trio.Event()
    stock_receive = tls.receive_some

    async def watched_receive(max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await stock_receive(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failure.append(exc.__cause__)
            broken.set()
            raise
        if not data:
            failure.append(None)
            broken.set()
        return data

    tls.receive_some = watched_receive  # type: ignore[method-assign]
    ws: trio_websocket.WebSocketConnection | None = None
    try:
        with trio.fail_at(deadline):
            async with trio.open_nursery() as watch:
                async def upgrade() -> None:
                    nonlocal ws
                    ws = await trio_websocket.wrap_client_stream(
                        nursery, tls, f"{host}:{port}" if port != 443 else host, resource,
                        max_message_size=max_message_size, receive_buffer_size=receive_buffer_size,
                    )
                    watch.cancel_scope.cancel()

                async def stream_failed() -> None:
                    await broken.wait()
                    watch.cancel_scope.cancel()

                watch.start_soon(upgrade)
                watch.start_soon(stream_failed)
    except trio.TooSlowError:
        await trio.aclose_forcefully(tls)
        raise DialError(f"the cloud at {where} did not answer the WebSocket upgrade to {parsed.path} "
                        f"within {timeout:g} s") from None
    finally:
        del tls.receive_some  # back to trio's own (the tunnel's fast path wraps that one)
    if ws is None:
        await trio.aclose_forcefully(tls)
        cause = failure[0] if failure else None
        if isinstance(cause, ssl.SSLError) and cause.reason in _REFUSED_ALERTS:
            raise DialError(_refused(cause.reason, where, client_cert))
        raise DialError(f"the cloud at {where} closed the connection right after the TLS handshake: it "
                        f"refused this node's certificate{_issuer(client_cert)} (the cloud logs 'tunnel "
                        "connection refused' with the reason: its [[subaccounts]] ca must be that issuer, "
                        "and the certificate's O= that subaccount)")
    return ws


async def _open_tcp(host: str, port: int, address: str | None, proxy: EgressProxy | None, deadline: float,
                    timeout: float, where: str) -> trio.SocketStream:  # noqa: ASYNC109 - named in messages
    """A TCP stream to the cloud by `deadline`: directly, or through `proxy` (`egress`); DialError if not."""
    if proxy is not None:
        try:
            return await open_connect_tunnel(proxy, address or host, port, deadline=deadline, timeout=timeout)
        except EgressError as exc:
            raise DialError(str(exc)) from None
    try:
        with trio.fail_at(deadline):
            return await trio.open_tcp_stream(address or host, port)
    except trio.TooSlowError:
        raise DialError(f"no TCP connection to {where} within {timeout:g} s (host down, or a firewall "
                        "dropping packets?)") from None
    except OSError as exc:
        cause = exc.__cause__
        detail = "; ".join(str(e) for e in getattr(cause, "exceptions", ())) or str(exc)
        raise DialError(f"cannot connect to {where}: {detail}") from None


def describe_failure(exc: BaseException, url: str) -> str:
    """A failed attempt's exception in words. trio-websocket raises a refused upgrade
    (`ConnectionRejected`) from its reader task, so it reaches the caller's nursery, not us."""
    if isinstance(exc, trio_websocket.ConnectionRejected):
        parsed = urllib.parse.urlsplit(url)
        body = bytes(exc.body or b"").decode("utf-8", "replace")[:200]
        return (f"the cloud at {parsed.hostname}:{parsed.port or 443} refused the WebSocket upgrade to "
                f"{parsed.path} with HTTP {exc.status_code}" + (f" ({body})" if body else "")
                + ": is the URL's path /tunnel?")
    return str(exc) or type(exc).__name__


def _issuer(client_cert: Path | None) -> str:
    if client_cert is None:
        return ""
    try:
        cert = x509.load_pem_x509_certificate(client_cert.read_bytes())
    except (OSError, ValueError):
        return ""
    return f" ({client_cert}, issued by {cert.issuer.rfc4514_string()!r})"


def _refused(reason: str, where: str, client_cert: Path | None) -> str:
    return (f"the cloud at {where} refused this node's certificate{_issuer(client_cert)}: TLS alert "
            f"{_REFUSED_ALERTS[reason]}; the cloud's [[subaccounts]] ca must be that issuer")


async def _describe_tls_failure(cause: BaseException | None, host: str, port: int, context: ssl.SSLContext,
                                client_cert: Path | None, deadline: float, where: str, reopen: Opener) -> str:
    """The failed handshake's cause in words; the probes go where it went (`reopen`: direct or via the proxy)."""
    if isinstance(cause, ssl.SSLCertVerificationError):
        message = f"the cloud's certificate at {where} failed verification: {cause.verify_message}"
        trusted = ", ".join(repr(x509.load_der_x509_certificate(der).subject.rfc4514_string())
                            for der in context.get_ca_certs(binary_form=True)) or "the system's CAs"
        with trio.move_on_at(deadline):
            der = await _unverified_certificate(host, reopen)
            if der is not None:
                cert = x509.load_der_x509_certificate(der)
                message += (f"; the node dialled {host!r}, the certificate names {_names(cert)} and is issued "
                            f"by {cert.issuer.rfc4514_string()!r}; the node trusts {trusted} (tunnel.ca)")
                return message
        return message + f"; the node dialled {host!r} and trusts {trusted} (tunnel.ca)"
    if isinstance(cause, ssl.SSLError) and cause.reason in _REFUSED_ALERTS:
        return _refused(cause.reason, where, client_cert)
    if isinstance(cause, ssl.SSLError) and cause.reason in _NOT_TLS:
        answer = b""
        with trio.move_on_at(deadline):
            answer = await _first_bytes(host, reopen)
        if answer.startswith(b"HTTP/"):
            line = answer.split(b"\r\n")[0].decode("ascii", "replace")
            return (f"{where} answered plain HTTP ({line!r}) to the TLS handshake: the tunnel URL points at "
                    "an HTTP port (the proxy's or admin's?) instead of the cloud's TLS tunnel port")
        return f"{where} does not speak TLS (ssl: {cause.reason}): is {port} the cloud's tunnel port?"
    if cause is None or isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return (f"{where} closed the connection during the TLS handshake without an answer: is {port} the "
                "cloud's tunnel port?")
    return f"TLS handshake with {where} failed: {cause}"


async def _unverified_certificate(host: str, reopen: Opener) -> bytes | None:
    """The certificate the server `reopen` reaches presents for `host`, fetched without verifying it or
    showing ours. Used only after verification of the real tunnel failed, to name in the log what
    the server presented; nothing is sent on this connection and it is closed at once."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        tls = trio.SSLStream(await reopen(), context, server_hostname=host)
    except (OSError, DialError):
        return None
    try:
        await tls.do_handshake()
        return tls.getpeercert(binary_form=True)
    except trio.BrokenResourceError:
        return None
    finally:
        await trio.aclose_forcefully(tls)


async def _first_bytes(host: str, reopen: Opener) -> bytes:
    """What the server answers to a TLS ClientHello (made by ssl itself), as raw bytes."""
    hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                                  server_hostname=host)
    try:
        hello.do_handshake()
    except ssl.SSLWantReadError:
        pass
    try:
        tcp = await reopen()
    except (OSError, DialError):
        return b""
    try:
        await tcp.send_all(outgoing.read())
        return await tcp.receive_some(_PROBE_BYTES)
    except trio.BrokenResourceError:
        return b""
    finally:
        await trio.aclose_forcefully(tcp)


def _names(cert: x509.Certificate) -> str:
    try:
        alt = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names = [str(n.value) for n in alt]  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        names = []
    return ", ".join(repr(n) for n in names) if names else f"no names (subject {cert.subject.rfc4514_string()})"
