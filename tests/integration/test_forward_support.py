"""Real backends and an HTTP client over a memory tunnel stream, for the forwarder's tests.

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
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connector.tunnel.streams import TunnelStream

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

    /echo...          -> 200 JSON {method, target, headers, body_len, sha256}; body read in chunks
    /download?n=N[&chunked=1] -> N bytes of b"x" in CHUNK pieces, with Content-Length or chunked
    /slow             -> never answers
    /cut              -> head with Content-Length 100000, 10 bytes, then the connection is dropped
    /close            -> 200 with Connection: close
    """

    connections: int = 0
    requests: list[dict[str, Any]] = attrs.Factory(list)
    largest_receive: int = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self._next(conn, stream)
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                assert isinstance(event, h11.Request)
                if not await self._answer(conn, stream, event):
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

    async def _answer(self, conn: h11.Connection, stream: trio.abc.Stream, request: h11.Request) -> bool:
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
        }
        self.requests.append(record)
        path, _, query = request.target.partition(b"?")
        if path == b"/slow":
            await trio.sleep_forever()
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


# --- client over the memory tunnel stream ------------------------------------------------------


@attrs.define
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    body_len: int

    def json(self) -> Any:
        return json.loads(self.body)


class HttpClient:
    """An h11 client playing the cloud proxy on the opener end of a memory stream pair."""

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def _next(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(CHUNK))

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | AsyncIterator[bytes] = b"",
        keep_body: bool = True,
    ) -> Reply:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [(b"host", b"ignored.example"), *(headers or [])]
        names = {k.lower() for k, _ in headers}
        if isinstance(body, bytes) and body and b"content-length" not in names and b"transfer-encoding" not in names:
            headers.append((b"content-length", str(len(body)).encode()))
        await self._send(h11.Request(method=method, target=target, headers=headers))
        if isinstance(body, bytes):
            if body:
                await self._send(h11.Data(data=body))
        else:
            async for piece in body:
                await self._send(h11.Data(data=piece))
        await self._send(h11.EndOfMessage())
        return await self.read_response(keep_body)

    async def read_response(self, keep_body: bool = True) -> Reply:
        event = await self._next()
        while isinstance(event, h11.InformationalResponse):
            event = await self._next()
        assert isinstance(event, h11.Response), event
        reply = Reply(event.status_code, dict(event.headers), b"", 0)
        parts = []
        while True:
            item = await self._next()
            if isinstance(item, h11.Data):
                reply.body_len += len(item.data)
                if keep_body:
                    parts.append(bytes(item.data))
            elif isinstance(item, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {item!r}")
        reply.body = b"".join(parts)
        return reply


async def read_raw_until_closed(stream: TunnelStream, limit: int = 1 << 20, within: float = 5.0) -> bytes:
    """Everything the node sends until it closes the stream (fails after `within` seconds)."""
    data = b""
    with trio.fail_after(within):
        while len(data) < limit:
            piece = await stream.receive_some(CHUNK)
            if not piece:
                break
            data += piece
    return data
