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
   (`wait_accepted`), so success is only reported once the internal host answered. A connect
   the node refused (reset REFUSED: not the master, handing over) or lost with its tunnel before
   it was accepted is opened once more through the router, avoiding the refusing tunnel (the
   registry holds it for the next master), as `connector.cloud.replay.may_replay` allows: a
   connect is idempotent and carries no application byte, since nothing is read from the
   client after its request until success is reported (bytes it pipelined behind the request
   are kept and sent first). Every attempt runs under the one `connect_timeout`. A failure
   is answered from the table of `connector.httperrors.RESETS` (its `socks5` column):
   NO_MAPPING/DENIED -> 0x02 (not allowed by ruleset), CONNECT_FAILED -> 0x05 (refused),
   CONNECT_TIMEOUT or no answer within `connect_timeout` -> 0x04 (host unreachable),
   NoConnectorError, no stream within `connect_timeout`, or REFUSED / TUNNEL_LOST once the
   replays are spent -> 0x03 (network unreachable, SAP's "Cloud Connector not connected"),
   anything else -> 0x01.
5. Bytes are relayed both ways by `connector.relay.relay` with half-close: EOF from one side
   becomes `send_eof` on the other; the connection ends when both directions finished. Reads
   take up to `chunk` (256 KiB: at full speed a quarter of the syscalls and loop turns of 64 KiB
   reads); each direction holds at most one read, so a connection buffers at most 512 KiB here
   besides the stream's window. A stream reset ends the client connection with a TCP RST so the
   application sees an error, not a clean end of data; a broken client connection resets the
   stream (CANCEL).

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
from connector.cloud.replay import Facts, Failure, may_replay
from connector.cloud.router import NoConnectorError, ProxyService, Router
from connector.httperrors import (
    RESETS,
    SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED,
    SOCKS5_COMMAND_NOT_SUPPORTED,
    SOCKS5_CONNECTION_REFUSED,
    SOCKS5_GENERAL_FAILURE,
    SOCKS5_HOST_UNREACHABLE,
    SOCKS5_NETWORK_UNREACHABLE,
    SOCKS5_NOT_ALLOWED,
    SOCKS5_SUCCEEDED,
)
from connector.metrics import PROXY_REQUEST_SECONDS, PROXY_REQUESTS
from connector.relay import relay
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

REP_SUCCEEDED = SOCKS5_SUCCEEDED
REP_GENERAL_FAILURE = SOCKS5_GENERAL_FAILURE
REP_NOT_ALLOWED = SOCKS5_NOT_ALLOWED
REP_NETWORK_UNREACHABLE = SOCKS5_NETWORK_UNREACHABLE
REP_HOST_UNREACHABLE = SOCKS5_HOST_UNREACHABLE
REP_CONNECTION_REFUSED = SOCKS5_CONNECTION_REFUSED
REP_COMMAND_NOT_SUPPORTED = SOCKS5_COMMAND_NOT_SUPPORTED
REP_ADDRESS_TYPE_NOT_SUPPORTED = SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED

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
    connect_timeout: float = 30.0  # a stream, and the node reaching the internal host (every attempt)
    chunk: int = 262144  # largest read from the application or the stream (see step 5)


class _HandshakeError(Exception):
    """The handshake cannot continue; `status` is the metric label."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Reader:
    """Exact-length reads over a socket stream, keeping any surplus for the relay (bytes the
    client sent behind its request: held, not sent, until the connect succeeded)."""

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
                await self._relay(sock, stream, pending)
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

        status, stream = await self._connect(sock, subaccount, location_id, target)
        return status, stream, bytes(reader.buffer)

    async def _connect(self, sock: trio.SocketStream, subaccount: str, location_id: str,
                       target: Target) -> tuple[str, TunnelStream | None]:
        """Open a stream to `target` and wait until the node accepted it, replaying a connect the
        node refused or lost (`may_replay`), all within `connect_timeout`; then report success.
        Returns (metric status, the accepted stream, or None once the client got a failure)."""

        def refused(reason: str, code: int) -> None:
            self._audit_refusal(sock, reason, code, subaccount=subaccount, location=location_id,
                                virtual_target=str(target))

        timeout = self.settings.connect_timeout
        deadline = trio.current_time() + timeout
        avoid: TunnelStream | None = None
        attempts = 0
        while True:
            stream: TunnelStream | None = None
            try:
                with trio.move_on_at(deadline):
                    stream = await self.router.open_stream(subaccount, location_id, target, avoid=avoid)
                if stream is None:  # held for a master past the deadline
                    raise NoConnectorError(f"no stream to the connector within {timeout:g} s")
            except NoConnectorError as exc:
                log.info("SOCKS5 %s for subaccount %s: no connector: %s", target, subaccount, exc.reason)
                refused(exc.code, REP_NETWORK_UNREACHABLE)
                return await self._refuse(sock, REP_NETWORK_UNREACHABLE), None
            except StreamResetError as exc:  # a router that knew the answer before opening
                answer = RESETS[exc.code]
                refused(answer.reason, answer.socks5)
                return await self._refuse(sock, answer.socks5), None
            # From here until it is returned, the stream is ours to close on every exit (the last
            # clause): the client may reset before our reply, or this task may be cancelled.
            attempts += 1
            accepted = False
            try:
                with trio.move_on_at(deadline):
                    await stream.wait_accepted()
                    accepted = True
                if accepted:
                    await sock.send_all(reply(REP_SUCCEEDED))
                    return REPLY_NAMES[REP_SUCCEEDED], stream
                log.info("SOCKS5 %s: the connector did not connect within %.1f s", target, timeout)
                answer = RESETS[ErrorCode.CONNECT_TIMEOUT]
                refused(answer.reason, answer.socks5)
                await self._close_stream(stream, ErrorCode.CONNECT_TIMEOUT)
                return await self._refuse(sock, answer.socks5), None
            except StreamResetError as exc:
                await self._close_stream(stream, None)
                facts = Facts(failure=Failure.of(exc.code), idempotent=True, response_started=False,
                              body_consumed=False, body_kept=True, attempts=attempts)
                if may_replay(facts):
                    log.info("SOCKS5 %s: connect %s (attempt %d); opening it once more", target, exc, attempts)
                    avoid = stream
                    continue
                log.info("SOCKS5 %s refused by the connector: %s", target, exc)
                answer = RESETS[exc.code]
                refused(answer.reason, answer.socks5)
                return await self._refuse(sock, answer.socks5), None
            except BaseException:
                await self._close_stream(stream, None)
                raise

    async def _refuse(self, sock: trio.SocketStream, code: int) -> str:
        await sock.send_all(reply(code))
        return REPLY_NAMES[code]

    async def _close_stream(self, stream: TunnelStream, code: ErrorCode | None,
                            reason: str = "socks5 connect abandoned") -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await stream.reset(code or ErrorCode.CANCEL, reason)
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

    async def _relay(self, sock: trio.SocketStream, stream: TunnelStream, pending: bytes) -> None:
        """Bytes both ways (`pending`: what the client sent behind its request, first)."""
        result = await relay(sock, stream, chunk=self.settings.chunk, a_first=pending)
        if result.failed is None:
            return
        log.info("SOCKS5 session to %s ended abnormally (%s failed, %d bytes up, %d down): %r", stream.target,
                 "the client" if result.failed == "a" else "the stream", result.a_to_b, result.b_to_a, result.error)
        await self._close_stream(stream, ErrorCode.CANCEL, "socks5 client connection broken")
        if isinstance(result.error, StreamResetError):
            # abortive close: the application sees a reset, not a clean end of data
            sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
