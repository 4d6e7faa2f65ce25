"""The SOCKS5 connectivity proxy: raw TCP from cloud applications to internal hosts (SAP's port 20004).

Theory of operation (RFC 1928, CONNECT only). The whole handshake runs under one deadline
(`handshake_timeout`), so a silent or slow client cannot hold a task:

1. Greeting: the client offers methods. We choose SAP's 0x80 if offered, else 0x02
   (username/password, RFC 1929); anything else gets 0xFF (no acceptable method) and a close.
   There is no anonymous method: default deny.
2. Authentication.
   * 0x80 (SAP): version 0x01, token length (4 bytes, big-endian), token, location id length
     (1 byte), location id *base64-encoded* (as SAP's documented clients send it; length 0 = the
     default location ""). Answer: 0x01 then 0x00 success / 0x01 failure.
   * 0x02 (RFC 1929): username = `<subaccount>` or `<subaccount>;<location_id>`, password = the
     token, which must belong to that subaccount. (`;` because `:` separates user and password in
     proxy URLs; curl: `--socks5-hostname 'sub;loc:TOKEN@host:port'`.) Answer: 0x01, 0x00 / 0x01.
3. Request: CONNECT to a domain name, IPv4 or IPv6 address; the "host" is a virtual host of a
   mapping, never resolved here. BIND and UDP ASSOCIATE get 0x07, unknown address types 0x08.
4. The proxy opens a tunnel stream Target(host, port, TCP) and waits for the node to accept it
   (`wait_accepted`), so success is only reported once the internal host answered. Replies:
   NO_MAPPING/DENIED -> 0x02 (not allowed by ruleset), CONNECT_FAILED -> 0x05 (refused),
   CONNECT_TIMEOUT or no answer within `connect_timeout` -> 0x04 (host unreachable),
   NoConnectorError -> 0x03 (network unreachable, SAP's "Cloud Connector not connected"),
   anything else -> 0x01.
5. Bytes are pumped both ways with half-close: EOF from one side becomes `send_eof` on the other;
   the connection ends when both directions finished. Reads take up to `chunk` (256 KiB: at full
   speed a quarter of the syscalls and loop turns of 64 KiB reads); each direction holds at most
   one read, so a connection buffers at most 512 KiB here besides the stream's window. A stream reset ends the client connection
   with a TCP RST so the application sees an error, not a clean end of data.

A draining replica (`connector.cloud.drain`) lets its SOCKS5 connections run to their end (at
most `[drain] drain_seconds` after its listener closed): a SOCKS5 connection carries one TCP
session, so there is no next request to turn away.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import socket
import struct

import attrs
import trio

from connector.cloud.audit import CloudAudit
from connector.cloud.auth import Authenticator
from connector.cloud.drain import Drain
from connector.cloud.router import NoConnectorError, ProxyService, Router
from connector.httperrors import reset_error
from connector.metrics import PROXY_REQUEST_SECONDS, PROXY_REQUESTS
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, StreamProtocol, StreamResetError, Target

log = logging.getLogger(__name__)

DEFAULT_SOCKS5_PORT = 20004
SOCKS_VERSION = 0x05
METHOD_USERNAME_PASSWORD = 0x02
METHOD_SAP_TOKEN = 0x80
METHOD_NONE_ACCEPTABLE = 0xFF
SUBNEGOTIATION_VERSION = 0x01
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

# metric label per reply code: a small fixed set
REPLY_NAMES = {
    REP_SUCCEEDED: "succeeded",
    REP_GENERAL_FAILURE: "general_failure",
    REP_NOT_ALLOWED: "not_allowed",
    REP_NETWORK_UNREACHABLE: "network_unreachable",
    REP_HOST_UNREACHABLE: "host_unreachable",
    REP_CONNECTION_REFUSED: "connection_refused",
    REP_COMMAND_NOT_SUPPORTED: "command_not_supported",
    REP_ADDRESS_TYPE_NOT_SUPPORTED: "address_type_not_supported",
}

MAX_TOKEN_BYTES = 16 * 1024


@attrs.frozen
class Socks5Settings:
    """Limits of the SOCKS5 proxy; times in seconds of trio time."""

    handshake_timeout: float = 10.0  # greeting + authentication + request
    connect_timeout: float = 30.0  # waiting for the node to reach the internal host
    chunk: int = 262144  # largest read from the application or the stream (see step 5)


class _HandshakeError(Exception):
    """The handshake cannot continue; `status` is the metric label."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Reader:
    """Exact-length reads over a socket stream, keeping any surplus for the pump."""

    def __init__(self, sock: trio.SocketStream) -> None:
        self.sock = sock
        self.buffer = bytearray()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = await self.sock.receive_some(65536)
            if not data:
                raise _HandshakeError("truncated_handshake", "client closed during the SOCKS5 handshake")
            self.buffer += data
        result = bytes(self.buffer[:n])
        del self.buffer[:n]
        return result


def reply(code: int) -> bytes:
    """A SOCKS5 reply; the bound address is not meaningful through a tunnel, so 0.0.0.0:0."""
    return bytes([SOCKS_VERSION, code, 0x00, ATYP_IPV4, 0, 0, 0, 0, 0, 0])


def reset_reply(error: StreamResetError) -> int:
    match error.code:
        case ErrorCode.NO_MAPPING | ErrorCode.DENIED:
            return REP_NOT_ALLOWED
        case ErrorCode.CONNECT_FAILED:
            return REP_CONNECTION_REFUSED
        case ErrorCode.CONNECT_TIMEOUT:
            return REP_HOST_UNREACHABLE
        case _:
            return REP_GENERAL_FAILURE


def parse_username(username: str) -> tuple[str, str]:
    """`<subaccount>` or `<subaccount>;<location_id>` -> (subaccount, location_id)."""
    subaccount, _, location_id = username.partition(";")
    return subaccount, location_id


class Socks5Proxy(ProxyService[Socks5Settings]):
    """Serves the SOCKS5 connectivity proxy."""

    name = "SOCKS5 connectivity proxy"
    default_port = DEFAULT_SOCKS5_PORT

    def __init__(
        self,
        router: Router,
        authenticator: Authenticator,
        *,
        settings: Socks5Settings = Socks5Settings(),
        audit: CloudAudit | None = None,
        drain: Drain | None = None,
    ) -> None:
        super().__init__(router, authenticator, settings=settings, drain=drain)
        self.audit = audit if audit is not None else CloudAudit()

    def _audit_refusal(
        self, sock: trio.SocketStream, reason: str, reply_code: int | None, *,
        subaccount: str | None = None, location: str | None = None, virtual_target: str | None = None,
    ) -> None:
        """One audit record per refused connection (`connector.cloud.audit`)."""
        try:
            host, port = sock.socket.getpeername()[:2]
            client = f"{host}:{port}"
        except OSError:
            client = "?"
        reply_name = REPLY_NAMES.get(reply_code) if reply_code is not None else None
        self.audit.refusal(proxy="socks5", client=client, reason=reason, reply=reply_name, subaccount=subaccount,
                           location=location, virtual_target=virtual_target)

    async def _handle(self, sock: trio.SocketStream) -> None:
        started = trio.current_time()
        status = "aborted"
        stream: TunnelStream | None = None
        try:
            status, stream, pending = await self._handshake(sock)
            if stream is not None:
                PROXY_REQUEST_SECONDS.labels("socks5").observe(trio.current_time() - started)
                await self._pump(sock, stream, pending)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("SOCKS5 connection failed")
        finally:
            PROXY_REQUESTS.labels("socks5", status).inc()
            with trio.CancelScope(shield=True):
                if stream is not None:
                    with trio.move_on_after(1):
                        try:
                            await stream.aclose()
                        except (StreamResetError, trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                await sock.aclose()

    async def _handshake(self, sock: trio.SocketStream) -> tuple[str, TunnelStream | None, bytes]:
        """Run the handshake; return (metric status, accepted stream or None, surplus bytes)."""
        reader = _Reader(sock)
        try:
            with trio.fail_after(self.settings.handshake_timeout):
                subaccount, location_id = await self._authenticate(sock, reader)
                target = await self._read_request(sock, reader)
        except _HandshakeError as exc:
            log.info("SOCKS5 handshake refused: %s", exc)
            if exc.status != "truncated_handshake":  # the client left (a TCP health check): nothing refused
                self._audit_refusal(sock, exc.status, None)
            return exc.status, None, b""
        except trio.TooSlowError:
            log.info("SOCKS5 handshake timed out after %.1f s", self.settings.handshake_timeout)
            self._audit_refusal(sock, "handshake_timeout", None)
            return "handshake_timeout", None, b""

        try:
            stream = await self.router.open_stream(subaccount, location_id, target)
        except NoConnectorError as exc:
            log.info("SOCKS5 %s for subaccount %s: no connector: %s", target, subaccount, exc.reason)
            self._audit_refusal(sock, exc.code, REP_NETWORK_UNREACHABLE, subaccount=subaccount,
                                location=location_id, virtual_target=str(target))
            return await self._refuse(sock, REP_NETWORK_UNREACHABLE), None, b""
        except StreamResetError as exc:
            self._audit_refusal(sock, reset_error(exc.code)[1], reset_reply(exc), subaccount=subaccount,
                                location=location_id, virtual_target=str(target))
            return await self._refuse(sock, reset_reply(exc)), None, b""
        # From here until it is returned, the stream is ours to close on every exit (the last
        # clause): the client may reset before our reply, or this task may be cancelled.
        try:
            with trio.fail_after(self.settings.connect_timeout):
                await stream.wait_accepted()
            await sock.send_all(reply(REP_SUCCEEDED))
        except StreamResetError as exc:
            log.info("SOCKS5 %s refused by the connector: %s", target, exc)
            self._audit_refusal(sock, reset_error(exc.code)[1], reset_reply(exc), subaccount=subaccount,
                                location=location_id, virtual_target=str(target))
            await self._close_stream(stream, None)
            return await self._refuse(sock, reset_reply(exc)), None, b""
        except trio.TooSlowError:
            log.info("SOCKS5 %s: the connector did not connect within %.1f s", target, self.settings.connect_timeout)
            self._audit_refusal(sock, reset_error(ErrorCode.CONNECT_TIMEOUT)[1], REP_HOST_UNREACHABLE,
                                subaccount=subaccount, location=location_id, virtual_target=str(target))
            await self._close_stream(stream, ErrorCode.CONNECT_TIMEOUT)
            return await self._refuse(sock, REP_HOST_UNREACHABLE), None, b""
        except BaseException:
            await self._close_stream(stream, None)
            raise
        return REPLY_NAMES[REP_SUCCEEDED], stream, bytes(reader.buffer)

    async def _refuse(self, sock: trio.SocketStream, code: int) -> str:
        await sock.send_all(reply(code))
        return REPLY_NAMES[code]

    async def _close_stream(self, stream: TunnelStream, code: ErrorCode | None) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await stream.reset(code or ErrorCode.CANCEL, "socks5 connect abandoned")
            except (StreamResetError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _authenticate(self, sock: trio.SocketStream, reader: _Reader) -> tuple[str, str]:
        version, count = await reader.read_exactly(2)
        if version != SOCKS_VERSION:
            raise _HandshakeError("bad_version", f"not SOCKS5 (version byte {version:#x})")
        methods = await reader.read_exactly(count)
        if METHOD_SAP_TOKEN in methods:
            await sock.send_all(bytes([SOCKS_VERSION, METHOD_SAP_TOKEN]))
            credentials = await self._read_sap_token(reader)
        elif METHOD_USERNAME_PASSWORD in methods:
            await sock.send_all(bytes([SOCKS_VERSION, METHOD_USERNAME_PASSWORD]))
            credentials = await self._read_username_password(reader)
        else:
            await sock.send_all(bytes([SOCKS_VERSION, METHOD_NONE_ACCEPTABLE]))
            raise _HandshakeError(
                "no_acceptable_method",
                f"client offered methods {list(methods)}; accepted are 0x80 (token) and 0x02 (username/password)",
            )
        token, claimed_subaccount, location_id = credentials
        subaccount = await self.authenticate_token(token, claimed_subaccount)
        if subaccount is None or (claimed_subaccount is not None and claimed_subaccount != subaccount):
            await sock.send_all(bytes([SUBNEGOTIATION_VERSION, 0x01]))
            raise _HandshakeError("auth_failed", "SOCKS5 credentials were not accepted")
        await sock.send_all(bytes([SUBNEGOTIATION_VERSION, 0x00]))
        return subaccount, location_id

    async def _read_sap_token(self, reader: _Reader) -> tuple[str, str | None, str]:
        version = (await reader.read_exactly(1))[0]
        if version != SUBNEGOTIATION_VERSION:
            raise _HandshakeError("bad_handshake", f"token authentication version {version} (expected 1)")
        (length,) = struct.unpack("!I", await reader.read_exactly(4))
        if length > MAX_TOKEN_BYTES:
            raise _HandshakeError("bad_handshake", f"token of {length} bytes is longer than {MAX_TOKEN_BYTES}")
        raw_token = await reader.read_exactly(length)
        location_length = (await reader.read_exactly(1))[0]
        raw_location = await reader.read_exactly(location_length)
        try:
            token = raw_token.decode("utf-8")
            location_id = base64.b64decode(raw_location, validate=True).decode("utf-8") if raw_location else ""
        except (UnicodeDecodeError, binascii.Error) as exc:
            raise _HandshakeError("bad_handshake", "token is not UTF-8 or location id is not base64") from exc
        return token, None, location_id

    async def _read_username_password(self, reader: _Reader) -> tuple[str, str | None, str]:
        version = (await reader.read_exactly(1))[0]
        if version != SUBNEGOTIATION_VERSION:
            raise _HandshakeError("bad_handshake", f"username/password version {version} (expected 1)")
        username = await reader.read_exactly((await reader.read_exactly(1))[0])
        password = await reader.read_exactly((await reader.read_exactly(1))[0])
        try:
            subaccount, location_id = parse_username(username.decode("utf-8"))
            token = password.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _HandshakeError("bad_handshake", "username or password is not UTF-8") from exc
        return token, subaccount, location_id

    async def _read_request(self, sock: trio.SocketStream, reader: _Reader) -> Target:
        version, command, _reserved, address_type = await reader.read_exactly(4)
        if version != SOCKS_VERSION:
            raise _HandshakeError("bad_version", f"request version byte {version:#x}")
        if address_type == ATYP_IPV4:
            host = str(ipaddress.IPv4Address(await reader.read_exactly(4)))
        elif address_type == ATYP_IPV6:
            host = str(ipaddress.IPv6Address(await reader.read_exactly(16)))
        elif address_type == ATYP_DOMAIN:
            raw = await reader.read_exactly((await reader.read_exactly(1))[0])
            try:
                host = raw.decode("ascii").lower()
            except UnicodeDecodeError:
                host = ""
            if not host or not all(c.isalnum() or c in ".-_" for c in host):
                await reader.read_exactly(2)
                await sock.send_all(reply(REP_ADDRESS_TYPE_NOT_SUPPORTED))
                raise _HandshakeError(REPLY_NAMES[REP_ADDRESS_TYPE_NOT_SUPPORTED], "malformed host name")
        else:
            await sock.send_all(reply(REP_ADDRESS_TYPE_NOT_SUPPORTED))
            raise _HandshakeError(REPLY_NAMES[REP_ADDRESS_TYPE_NOT_SUPPORTED], f"address type {address_type}")
        (port,) = struct.unpack("!H", await reader.read_exactly(2))
        if command != CMD_CONNECT:
            await sock.send_all(reply(REP_COMMAND_NOT_SUPPORTED))
            raise _HandshakeError(REPLY_NAMES[REP_COMMAND_NOT_SUPPORTED], f"command {command} (only CONNECT)")
        return Target(host, port, StreamProtocol.TCP)

    async def _pump(self, sock: trio.SocketStream, stream: TunnelStream, pending: bytes) -> None:
        chunk = self.settings.chunk
        broken: list[BaseException] = []

        async def client_to_stream() -> None:
            try:
                if pending:
                    await stream.send_all(pending)
                while data := await sock.receive_some(chunk):
                    await stream.send_all(data)
                await stream.send_eof()
            except (StreamResetError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                broken.append(exc)
                nursery.cancel_scope.cancel()

        async def stream_to_client() -> None:
            try:
                while data := await stream.receive_some(chunk):
                    await sock.send_all(data)
                await sock.send_eof()
            except (StreamResetError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                broken.append(exc)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_to_stream)
            nursery.start_soon(stream_to_client)
        if broken:
            log.info("SOCKS5 session to %s ended abnormally: %r", stream.target, broken[0])
            with trio.CancelScope(shield=True):
                try:
                    await stream.reset(ErrorCode.CANCEL, "socks5 client connection broken")
                except (StreamResetError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            if any(isinstance(exc, StreamResetError) for exc in broken):
                # abortive close: the application sees a reset, not a clean end of data
                sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
