"""Real backends, and the node's end of a real tunnel session pair, for the forwarder's tests.

Not a test module (no tests here); named test_forward_* so it sits with the tests it serves.
Every backend listens on 127.0.0.1 port 0 and runs in the caller's nursery.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connector.agent.acl import AccessControl
from connector.agent.forward import StreamContext, serve_stream
from connector.tunnel.session import TunnelSession
from connector.tunnel.streams import TunnelStream
from tests.support.exchangeclient import start_pair

CHUNK = 65536


# --- certificates ------------------------------------------------------------------------------


@attrs.frozen
class BackendPKI:
    ca_file: str
    other_ca_file: str
    server_context: ssl.SSLContext


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_pki(directory: Path) -> BackendPKI:
    """A test CA with a server certificate for 127.0.0.1/localhost, and an unrelated second CA."""
    ca_key, ca_cert = _ca("forward-test-ca")
    _, other_cert = _ca("unrelated-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("internal-host")).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "other-ca.pem").write_bytes(other_cert.public_bytes(pem))
    (directory / "server.pem").write_bytes(cert.public_bytes(pem))
    (directory / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(directory / "server.pem", directory / "server.key")
    return BackendPKI(str(directory / "ca.pem"), str(directory / "other-ca.pem"), server_context)


# --- servers ---------------------------------------------------------------------------------


async def serve(
    nursery: trio.Nursery,
    handler: Callable[[trio.abc.Stream], Awaitable[None]],
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Serve `handler` on 127.0.0.1:0 (TLS if `ssl_context`); return the port."""
    if ssl_context is None:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    else:
        listeners = await nursery.start(
            functools.partial(trio.serve_ssl_over_tcp, handler, 0, ssl_context, host="127.0.0.1"))
    sock = listeners[0].socket if ssl_context is None else listeners[0].transport_listener.socket
    return int(sock.getsockname()[1])


async def free_port() -> int:
    """A port nobody listens on (bound then closed)."""
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


@attrs.define
class HttpBackend:
    """An h11 test server. Routes by path:

    /echo...          -> 200 JSON {method, target, headers, body_len, sha256, trailers, connection}
    /download?n=N[&chunked=1] -> N bytes of b"x" in CHUNK pieces, with Content-Length or chunked
    /slow             -> never answers (reads until the connection is closed)
    /cut              -> head with Content-Length 100000, 10 bytes, then the connection is dropped
    /close            -> 200 with Connection: close
    """

    connections: int = 0
    requests: list[dict[str, Any]] = attrs.Factory(list)
    largest_receive: int = 0
    open: int = 0  # connections not yet closed by either side
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def wait_open(self, count: int, within: float = 5.0) -> None:
        """Until at most `count` connections are open (the node closed the others)."""
        with trio.fail_after(within):
            while self.open > count:
                await self._changed.wait()

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        self.open += 1
        try:
            await self._serve(stream)
        finally:
            self.open -= 1
            self._changed.set()
            self._changed = trio.Event()

    async def _serve(self, stream: trio.abc.Stream) -> None:
        ordinal = self.connections
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self._next(conn, stream)
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                assert isinstance(event, h11.Request)
                if not await self._answer(conn, stream, event, ordinal):
                    return
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def _next(self, conn: h11.Connection, stream: trio.abc.Stream) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await stream.receive_some(CHUNK)
            self.largest_receive = max(self.largest_receive, len(data))
            conn.receive_data(data)

    async def _answer(self, conn: h11.Connection, stream: trio.abc.Stream, request: h11.Request, ordinal: int) -> bool:
        digest = hashlib.sha256()
        body_len = 0
        while True:
            event = await self._next(conn, stream)
            if isinstance(event, h11.Data):
                digest.update(event.data)
                body_len += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        record = {
            "method": request.method.decode(), "target": request.target.decode(),
            "headers": [[k.decode(), v.decode()] for k, v in request.headers],
            "body_len": body_len, "sha256": digest.hexdigest(),
            "trailers": [[k.decode(), v.decode()] for k, v in event.headers],
            "connection": ordinal,  # which accepted connection carried it (1, 2, ...)
        }
        self.requests.append(record)
        path, _, query = request.target.partition(b"?")
        if path == b"/slow":  # never answers; notices when the node gives up the connection
            while await stream.receive_some(CHUNK):
                pass
            return False
        if path == b"/cut":
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"100000")])))
            await stream.send_all(conn.send(h11.Data(data=b"0123456789")))
            return False
        if path == b"/download":
            params = dict(p.split(b"=") for p in query.split(b"&") if p)
            size = int(params[b"n"])
            framing = [(b"transfer-encoding", b"chunked")] if params.get(b"chunked") else [
                (b"content-length", str(size).encode())]
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=framing)))
            piece = b"x" * CHUNK
            left = size
            while left:
                n = min(left, CHUNK)
                await stream.send_all(conn.send(h11.Data(data=piece[:n])))
                left -= n
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return True
        body = json.dumps(record).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if path == b"/close":
            headers.append((b"connection", b"close"))
        data = conn.send(h11.Response(status_code=200, headers=headers))
        data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        return True


async def read_head(stream: trio.abc.Stream, buffered: bytes = b"") -> tuple[bytes, bytes] | None:
    """Read until a blank line ends an HTTP head: (head, the bytes after it), or None at EOF."""
    while b"\r\n\r\n" not in buffered:
        data = await stream.receive_some(CHUNK)
        if not data:
            return None
        buffered += data
    head, _, rest = buffered.partition(b"\r\n\r\n")
    return head, rest


async def websocket_backend(stream: trio.abc.Stream) -> None:
    """Answer an upgrade request with 101, then echo raw bytes upper-cased until EOF."""
    read = await read_head(stream)
    if read is None:
        return
    head, rest = read
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: test\r\n\r\n" + rest.upper()
    )
    while data := await stream.receive_some(CHUNK):
        await stream.send_all(data.upper())
    await stream.aclose()


async def echo_backend(stream: trio.abc.Stream) -> None:
    """Echo raw bytes until EOF, then close."""
    try:
        while data := await stream.receive_some(CHUNK):
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass
    await trio.aclose_forcefully(stream)


# --- the node's end of the tunnel ------------------------------------------------------------


class ForwardNode:
    """The node's stream handler (`serve_stream`, as production runs it) behind a session pair;
    counts the streams it finished, so a test waits for the audit line instead of polling."""

    def __init__(self, acl: AccessControl, ctx: StreamContext) -> None:
        self.acl = acl
        self.ctx = ctx
        self.finished = 0
        self._changed = trio.Event()

    async def handle(self, stream: TunnelStream) -> None:
        try:
            await serve_stream(stream, self.acl, self.ctx)
        finally:
            self.finished += 1
            self._changed.set()
            self._changed = trio.Event()

    async def wait_finished(self, count: int, within: float = 5.0) -> None:
        with trio.fail_after(within):
            while self.finished < count:
                await self._changed.wait()

    async def audit_lines(self, count: int) -> list[dict[str, Any]]:
        """The request lines once `count` streams are done: exactly one line per stream."""
        await self.wait_finished(count)
        lines = self.ctx.audit.records("request")
        assert len(lines) == count, lines
        return lines


async def start_node(nursery: trio.Nursery, acl: AccessControl, ctx: StreamContext) -> tuple[TunnelSession, ForwardNode]:
    """A session pair whose node end serves streams with `serve_stream`: (cloud session, node)."""
    node = ForwardNode(acl, ctx)
    return await start_pair(nursery, node.handle), node
