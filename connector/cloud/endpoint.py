"""The tunnel endpoint: where connector nodes dial in (WebSocket over mutual TLS).

Theory of operation: a TCP listener; each connection gets a TLS handshake that requires a client
certificate chaining to one of the configured subaccount CAs. On top of the handshake's chain check,
the certificate must name (in O=) a configured subaccount and be issued by *that* subaccount's CA,
so one subaccount's CA can never vouch for another's nodes. Then a WebSocket on path ``/tunnel``,
the tunnel handshake (version negotiation; the node announces its location and cluster), and the
session runs with the registry as its control handler: ``register`` (with the fencing epoch), ``drain``
(graceful handover) and ``unregister`` (lost leadership). Wrong certificates are refused during the
TLS handshake or right after it with a log line naming the reason; nothing else is affected.

Deadlines: a connection holds a task and a socket from its first byte, so every phase before
the tunnel runs has one, and a peer that is silent or gone in any phase is dropped when it
expires: the TLS handshake (`EndpointSettings.tls_handshake_timeout`), the WebSocket upgrade,
request in and 101 out (`upgrade_timeout`), and the tunnel's HELLO (`TunnelSettings.hello_timeout`). Once the tunnel runs, its keepalive drops a
dead peer within `ping_timeout`. A peer that closes is dropped at once in every phase (during
the upgrade `_ReaderWatch` sees to it: trio-websocket alone would wait for the request of a
closed peer until the deadline). `statistics()` counts the connections being handled and
`wait_connections` waits for a count.

Replicas: the cloud may be several replicas (see `connector.cloud.replicas`). The HELLO names this
one (``replica``), and once a tunnel is admitted the endpoint announces the replica set to the node
(``replicas`` control op, the directory's `current()`), again on every change, so nodes find
replicas added and drop removed ones without a configuration change. Without a directory (a
single replica) neither is sent and nodes key the tunnel by the address they dialled.

Identity: the node id is the certificate's CN (a HELLO naming another node is logged and ignored).
The node's cluster is the one its certificate names in OU= (a HELLO claiming another is refused),
else the one its HELLO claims, else, for a standalone node, ``node:<CN>``. The registry admits a
tunnel only from the cluster that owns its location (see `connector.cloud.registry`); any other is
told why (``refused`` with reason ``wrong_cluster``) and closed.

Certificates (`connector.tlsreload`): the server certificate, its key and the subaccount CAs are
read again when their files change (checked every few seconds) or on `reload_certificates`
(SIGHUP); new handshakes use what was read, tunnels already up stay, and unusable new files are
logged and leave the old ones in use. A client certificate whose serial is on the deny-list
(`connector.cloud.revocation`, `revoked`) is refused right after its HELLO with
GOAWAY(DENIED, "certificate_revoked: ..."), and a tunnel whose serial is revoked while it is up is
closed the same way, at once. A node may renew its certificate on its tunnel (CONTROL ``renew``
{"csr"}): with its subaccount's CA key configured the endpoint signs a certificate naming what the
tunnel's certificate names, valid as long (``renewed`` {"cert"}; see `connector.agent.renew`),
else it answers ``renew_refused`` with the reason.

Going away (a replica's graceful shutdown, `connector.cloud.drain`): `go_away` closes every
tunnel with GOAWAY(GOING_AWAY) once the application requests finished and closes the listener
(a node that redials is refused and backs off; one caught in its handshake gets GOAWAY after its
HELLO). A node keeps its tunnels to the other replicas and redials this one with its usual backoff.
"""

from __future__ import annotations

import datetime
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import attrs
import trio
import trio_websocket
from cryptography import x509

from connector import metrics, pki
from connector.agent.renew import RENEW_OP, RENEW_REFUSED_OP, RENEWED_OP
from connector.cloud.registry import Registry, TunnelHandle, refuse_tunnel
from connector.cloud.replicas import HELLO_REPLICA_KEY, REPLICAS_OP, ReplicaDirectory, to_body
from connector.cloud.revocation import RevokedSerials, format_serial
from connector.listen import serve_tcp
from connector.tlsreload import CHECK_INTERVAL, TlsReloader
from connector.tunnel.session import TunnelError, TunnelSession, TunnelSettings
from connector.tunnel.types import ErrorCode

log = logging.getLogger(__name__)

WS_RECEIVE_BUFFER = 262144  # trio-websocket's default 4 KiB halves throughput (see ARCHITECTURE.md)
WS_MAX_MESSAGE = 4 << 20
TUNNEL_PATH = "/tunnel"
DEFAULT_SETTINGS = TunnelSettings()


@attrs.frozen
class EndpointSettings:
    """Deadlines of the phases before HELLO, in seconds of trio time (see the module docstring)."""

    tls_handshake_timeout: float = 5.0
    upgrade_timeout: float = 5.0


@attrs.frozen
class ServerTls:
    """What the endpoint's handshakes use, read from the files together (see `server_tls`)."""

    context: ssl.SSLContext
    cas: dict[str, list[x509.Certificate]]  # subaccount -> its CA(s), which alone may vouch for its nodes


def server_tls(cert: Path, key: Path, subaccount_cas: dict[str, Path]) -> ServerTls:
    """Read the server certificate, its key and the subaccount CAs; CertificateError names the file."""
    pki.check_key_pair(cert, key)
    for path in subaccount_cas.values():
        pki.check_trust_store(path)
    return ServerTls(pki.server_context(cert, key, list(subaccount_cas.values())),
                     {sub: pki.load_certificates(path) for sub, path in subaccount_cas.items()})


@attrs.frozen
class PeerCertificate:
    subaccount: str
    node: str  # the CN
    cluster: str | None  # the OU, when the certificate binds the node to a cluster
    serial: int
    subject: x509.Name  # what a renewed certificate names again
    lifetime: datetime.timedelta  # how long it was valid for: a renewed one is valid as long


RENEW_INTERVAL = 60.0  # seconds of trio time between two renewals signed on one tunnel


@attrs.frozen
class EndpointStatistics:
    connections: int  # being handled: from TCP accept until the tunnel (or its handshake) ended
    refused: int  # refused for certificate reasons since start


class TunnelEndpoint:
    def __init__(
        self,
        registry: Registry,
        *,
        cert: Path,
        key: Path,
        subaccount_cas: dict[str, Path],
        settings: TunnelSettings = DEFAULT_SETTINGS,
        endpoint_settings: EndpointSettings = EndpointSettings(),
        replicas: ReplicaDirectory | None = None,
        revoked: RevokedSerials | None = None,
        subaccount_ca_keys: dict[str, Path] | None = None,
        reload_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.registry = registry
        self.replicas = replicas  # announced to every node; None: a single replica, nothing announced
        self.settings = settings
        self.endpoint_settings = endpoint_settings
        self.tls = TlsReloader("tunnel endpoint", [cert, key, *subaccount_cas.values()],
                               functools.partial(server_tls, cert, key, dict(subaccount_cas)),
                               interval=reload_interval)
        self.revoked = revoked if revoked is not None else RevokedSerials()
        # subaccount -> (its CA, the CA's key): the cloud renews the certificates of those nodes
        self._signers = {sub: pki.Issued(subaccount_cas[sub], key) for sub, key in (subaccount_ca_keys or {}).items()}
        self._renewed_at: dict[TunnelSession, float] = {}  # the last renewal signed on each tunnel
        self.refused = 0  # connections refused for certificate reasons (tests and status read it)
        self._connections = 0
        self._connections_lot = trio.lowlevel.ParkingLot()
        self._sessions: set[TunnelSession] = set()  # tunnels admitted to the registry
        self.going_away: str | None = None  # the GOAWAY reason once `go_away` ran
        self._accepting = trio.CancelScope()

    async def run(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as connections:
            with self._accepting:  # `go_away` closes the listener; the tunnels close themselves
                async with trio.open_nursery() as listening:
                    listening.start_soon(self.tls.run)
                    await serve_tcp(self._handle, host, port, name="tunnel endpoint", handler_nursery=connections,
                                    task_status=task_status)

    def reload_certificates(self) -> bool:
        """Read the certificate, key and CAs again now (SIGHUP); False: unusable, logged, old kept."""
        return self.tls.reload()

    async def go_away(self, reason: str) -> None:
        """Close the listener, and every tunnel with GOAWAY(GOING_AWAY, reason) (one still in its
        handshake gets it after its HELLO); a node's redial is refused, so it backs off."""
        self.going_away = reason
        self._accepting.cancel()
        async with trio.open_nursery() as nursery:
            for session in list(self._sessions):
                nursery.start_soon(session.aclose, ErrorCode.GOING_AWAY, reason)

    def statistics(self) -> EndpointStatistics:
        return EndpointStatistics(self._connections, self.refused)

    async def wait_connections(self, count: int) -> None:
        """Return once exactly `count` connections are being handled."""
        while self._connections != count:
            await self._connections_lot.park()
        await trio.lowlevel.checkpoint()

    async def _handle(self, tcp: trio.SocketStream) -> None:
        self._connections += 1
        self._connections_lot.unpark_all()
        try:
            await self._handle_connection(tcp)
        finally:
            self._connections -= 1
            self._connections_lot.unpark_all()

    async def _handle_connection(self, tcp: trio.SocketStream) -> None:
        server = self.tls.current  # read once: a reload meanwhile is for the next connection
        tls = trio.SSLStream(tcp, server.context, server_side=True, https_compatible=True)
        subaccount = "?"
        try:
            try:
                with trio.fail_after(self.endpoint_settings.tls_handshake_timeout):
                    await tls.do_handshake()
                peer = self._identify(tls, server.cas)
                subaccount = peer.subaccount
            except (trio.BrokenResourceError, ssl.SSLError, trio.TooSlowError, pki.CertificateError) as exc:
                self.refused += 1
                metrics.TUNNELS_REFUSED.labels("certificate").inc()
                log.warning("tunnel connection refused: %s", _describe(exc))
                return
            async with trio.open_nursery() as nursery:
                try:
                    ws = await self._upgrade(nursery, tls, subaccount, peer.node)
                    if ws is not None:
                        await self._serve(ws, peer)
                finally:
                    # the websocket's reader task runs in this nursery: it ends with the connection
                    nursery.cancel_scope.cancel()
        except (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError, trio.BrokenResourceError) as exc:
            log.info("tunnel connection of %s ended: %s", subaccount, exc)
        finally:
            await trio.aclose_forcefully(tls)

    async def _upgrade(
        self, nursery: trio.Nursery, tls: trio.SSLStream[Any], subaccount: str, node_cn: str
    ) -> trio_websocket.WebSocketConnection | None:
        """The WebSocket upgrade on TUNNEL_PATH within `upgrade_timeout`; None if refused, late or
        the peer closed first."""
        timeout = self.endpoint_settings.upgrade_timeout
        with trio.move_on_after(timeout) as scope:
            watch = _ReaderWatch(nursery, scope)
            request = await trio_websocket.wrap_server_stream(
                cast(trio.Nursery, watch), tls, max_message_size=WS_MAX_MESSAGE, receive_buffer_size=WS_RECEIVE_BUFFER
            )
            if request.path != TUNNEL_PATH:
                await request.reject(404, body=b"unknown path")
                return None
            return await request.accept()
        if watch.reader_ended:
            log.info("tunnel connection of %s/%s closed before its WebSocket upgrade", subaccount, node_cn)
        else:
            log.warning("tunnel connection of %s/%s dropped: no WebSocket upgrade within %g s", subaccount,
                        node_cn, timeout)
        return None

    @staticmethod
    def _identify(tls: trio.SSLStream[Any], cas: dict[str, list[x509.Certificate]]) -> PeerCertificate:
        der = tls.getpeercert(binary_form=True)
        if not der:
            raise pki.CertificateError("no client certificate")
        cert = x509.load_der_x509_certificate(der)
        subaccount = pki.subaccount_of(cert)
        ca = cas.get(subaccount)
        if ca is None:
            raise pki.CertificateError(f"certificate names unknown subaccount {subaccount!r}")
        pki.verify_issued_by(cert, ca)
        node_cn = pki.common_name_of(cert)
        if not node_cn:
            raise pki.CertificateError("client certificate names no node in CN=")
        return PeerCertificate(subaccount, node_cn, pki.cluster_of(cert), cert.serial_number, cert.subject,
                               cert.not_valid_after_utc - cert.not_valid_before_utc)

    async def _serve(self, ws: trio_websocket.WebSocketConnection, peer_cert: PeerCertificate) -> None:
        subaccount, node_cn, cert_cluster = peer_cert.subaccount, peer_cert.node, peer_cert.cluster
        hello_info = {"role": "cloud"}
        if self.replicas is not None:
            hello_info[HELLO_REPLICA_KEY] = self.replicas.me.id
        session = TunnelSession(ws, client=False, settings=self.settings, hello_info=hello_info)
        try:
            peer = await session.handshake()
        except TunnelError as exc:
            log.warning("tunnel handshake with %s/%s failed: %s", subaccount, node_cn, exc)
            return
        if self.going_away is not None:
            await session.aclose(ErrorCode.GOING_AWAY, self.going_away)
            return
        location_id = str(peer.get("location_id", ""))
        if peer_cert.serial in self.revoked:
            # after the HELLO rather than at TLS, so the node is told why (a TLS alert says little)
            self.refused += 1
            metrics.TUNNELS_REFUSED.labels("revoked").inc()
            message = _revoked_message(peer_cert)
            log.error("tunnel of %s/%r refused: %s", subaccount, location_id, message)
            self._audit_revoked(peer_cert, location_id, str(peer.get("cluster") or "") or f"node:{node_cn}", live=False)
            await session.aclose(ErrorCode.DENIED, f"{REVOKED_REASON}: {message}")
            return
        node = node_cn
        if peer.get("node") not in (None, node_cn):
            log.warning("node %s of %s says it is %r: using the certificate's CN", node_cn, subaccount, peer.get("node"))
        claimed = str(peer.get("cluster") or "")
        if cert_cluster is not None and claimed != cert_cluster:
            self.refused += 1
            message = f"node {node_cn} claims cluster {claimed!r} but its certificate binds it to {cert_cluster!r}"
            log.error("tunnel of %s/%r refused: %s", subaccount, location_id, message)
            await refuse_tunnel(session, {"reason": "certificate_cluster", "cluster": cert_cluster, "message": message})
            return
        handle = TunnelHandle(session, subaccount, location_id, node, cluster=claimed or f"node:{node_cn}")
        verdict = self.registry.admit(handle)
        if not verdict.accepted:
            await refuse_tunnel(session, verdict.control_body())
            return
        self.registry.add(handle)
        self._sessions.add(session)
        log.info("tunnel up: node %s of %s/%r", node, subaccount, location_id)
        try:
            async with trio.open_nursery() as nursery:
                if self.replicas is not None:
                    nursery.start_soon(self._announce_replicas, session, self.replicas)
                nursery.start_soon(self._close_when_revoked, session, handle, peer_cert)
                await session.run(control_handler=functools.partial(self._on_control, handle, peer_cert))
                nursery.cancel_scope.cancel()
        finally:
            self._sessions.discard(session)
            self._renewed_at.pop(session, None)
            self.registry.remove(handle)
            log.info("tunnel down: node %s of %s/%r (%s)", node, subaccount, location_id, session.close_reason)

    @staticmethod
    async def _announce_replicas(session: TunnelSession, replicas: ReplicaDirectory) -> None:
        """The replica set now, then after every change, until the tunnel closes."""
        version = replicas.version
        try:
            while True:
                await session.send_control(REPLICAS_OP, to_body(replicas.current()))
                version = await replicas.wait_changed(version)
        except TunnelError:
            pass  # the tunnel closed: `run` returns too

    async def _close_when_revoked(self, session: TunnelSession, handle: TunnelHandle,
                                  peer_cert: PeerCertificate) -> None:
        await self.revoked.wait_revoked(peer_cert.serial)
        message = _revoked_message(peer_cert)
        log.error("closing the tunnel of %s/%s: %s", peer_cert.subaccount, peer_cert.node, message)
        self._audit_revoked(peer_cert, handle.location_id, handle.cluster, live=True)
        await session.aclose(ErrorCode.DENIED, f"{REVOKED_REASON}: {message}")

    def _audit_revoked(self, peer: PeerCertificate, location_id: str, cluster: str | None, *, live: bool) -> None:
        """The cloud audit's record of a revoked certificate refused (at its HELLO, or live)."""
        self.registry.audit.tunnel_refused(subaccount=peer.subaccount, location=location_id, node=peer.node,
                                           cluster=cluster, reason="revoked", serial=format_serial(peer.serial),
                                           tunnel_closed=live)

    def _renew(self, session: TunnelSession, peer: PeerCertificate, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Sign a node's CSR with its subaccount's CA: the reply op and body. The new certificate
        names what the tunnel's certificate names (never the CSR's names) and is valid as long."""
        def refused(reason: str, message: str) -> tuple[str, dict[str, Any]]:
            log.warning("renewal for node %s of %s refused: %s", peer.node, peer.subaccount, message)
            return RENEW_REFUSED_OP, {"reason": reason, "message": message}

        signer = self._signers.get(peer.subaccount)
        if signer is None:
            return refused("offline_ca", f"the cloud holds no CA key for subaccount {peer.subaccount!r}: an "
                                         "operator renews this node's certificate (docs/operations.md)")
        now = trio.current_time()
        last = self._renewed_at.get(session)
        if last is not None and now - last < RENEW_INTERVAL:
            return refused("too_soon", f"a certificate was renewed on this tunnel {now - last:.0f} s ago; "
                                       f"at most one every {RENEW_INTERVAL:g} s")
        csr_text = body.get("csr")
        try:
            if not isinstance(csr_text, str):
                raise pki.CertificateError("the body names no csr")
            csr = pki.load_csr(csr_text.encode())
        except pki.CertificateError as exc:
            return refused("bad_csr", str(exc))
        try:
            cert = pki.sign_client_csr(signer, csr, peer.subject, lifetime=peer.lifetime)
        except pki.CertificateError as exc:  # the CA's files, replaced or broken since start
            log.error("cannot sign with the CA of subaccount %s: %s", peer.subaccount, exc)
            return refused("ca_unusable", "the cloud cannot use its CA for this subaccount now; try later")
        self._renewed_at[session] = now
        log.info("renewed the certificate of node %s of %s (was serial %s, valid %s)", peer.node, peer.subaccount,
                 format_serial(peer.serial), peer.lifetime)
        return RENEWED_OP, {"cert": cert.decode()}

    async def _on_control(self, handle: TunnelHandle, peer: PeerCertificate, op: str, body: dict[str, Any]) -> None:
        if op == "register":
            epoch = body.get("epoch")
            if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
                await handle.session.send_control("refused", {"reason": "bad_epoch", "epoch": epoch})
                return
            result = self.registry.register(handle, epoch)
            if result.reason == "wrong_cluster":
                await refuse_tunnel(handle.session, result.control_body())
                return
            reply = "registered" if result.accepted else "refused"
            await handle.session.send_control(
                reply, {"epoch": epoch, "reason": result.reason, "highest_epoch": result.highest_epoch}
            )
        elif op == "drain":
            self.registry.unregister(handle, draining=True)
            await handle.session.send_control("drained", {})
        elif op == "unregister":
            self.registry.unregister(handle, draining=False)
        elif op == RENEW_OP:
            await handle.session.send_control(*self._renew(handle.session, peer, body))
        else:
            log.warning("unknown control op %r from %s", op, handle.node)


class _ReaderWatch:
    """The nursery handed to `trio_websocket.wrap_server_stream`: starts the websocket's reader
    task in `nursery` and cancels `upgrade` once that task ended, which it does when the peer
    closes. (trio-websocket itself keeps waiting for the upgrade request of a closed peer.)
    Anything else is the real nursery's; cancelling an upgrade scope that already exited does
    nothing, so a reader ending later, with the tunnel, is harmless."""

    def __init__(self, nursery: trio.Nursery, upgrade: trio.CancelScope) -> None:
        self._nursery = nursery
        self._upgrade = upgrade
        self.reader_ended = False

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object, name: object = None) -> None:
        async def watched() -> None:
            try:
                await fn(*args)
            finally:
                self.reader_ended = True
                self._upgrade.cancel()

        self._nursery.start_soon(watched, name=name or fn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nursery, name)


REVOKED_REASON = "certificate_revoked"  # the GOAWAY reason a node of a revoked certificate gets


def _revoked_message(peer: PeerCertificate) -> str:
    return (f"the certificate of node {peer.node} (serial {format_serial(peer.serial)}) is revoked "
            "(`connector cloud-revoke`): issue the node a new one")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        return f"TLS handshake failed: {exc.__cause__}"
    if isinstance(exc, trio.TooSlowError):
        return "TLS handshake timed out"
    return str(exc)


