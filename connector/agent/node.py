"""A connector node: dials the cloud, serves allow-listed resources while it is the fenced master.

Theory of operation
-------------------
The cloud is one or more replicas behind a load balancer, and the node keeps one tunnel to *each*
(`ReplicaTunnel`, keyed by the replica id the cloud's HELLO names; a cloud that names none is keyed
by the address dialled). Where to dial is the union of the configured URLs, the addresses their
host names resolve to (re-resolved every ``RESOLVE_INTERVAL``) and the replicas the cloud announces
(``replicas`` control op); see `connector.tunnel.dial.dial_targets`. Each target has its own dial
loop with its own full-jitter backoff; two targets that reach the same replica keep one tunnel
(the second waits until the first ends). A replica's announcement of itself is not counted (the
node reached it already, and a replica without shared state knows no address of its own that
nodes can dial), so a target is retired, its tunnel drained and closed, once no configured name
and no *other* replica names it: a replica removed from the cloud's etcd is dropped within
seconds, and the addresses of replicas that are gone (a pod's old IP) are not dialled forever.

While the HA layer says it is master, the node *registers* on every tunnel with its fencing epoch;
each replica accepts the highest epoch only. A shadow's tunnels are standby connections: promotion
is one ``register`` message per replica. The cloud tells standbys at once when the master's tunnel
drops (``master_lost``); the node passes that to the elector as a hint once every replica it holds
a tunnel to has said so, so a path from the master to one replica that breaks (a partition) does
not depose a master the other replicas still reach. Streams are served on a tunnel only while that
replica has confirmed our registration; anything else is reset with NOT_MASTER.

Without a ``[cluster]`` section the node runs standalone: always master, epoch 0.

Identity: the cloud knows the node by its certificate (subaccount in O=, node id in CN=, cluster in
OU= when `connector certs` put one there); a configuration that disagrees with the certificate is
refused at start. The HELLO names the node's cluster: the cloud serves a location from one cluster
only, and refuses another with ``wrong_cluster`` and a message, which the node logs as an error,
shows in `/status` and `/readyz`, and answers by reconnecting only every ``REFUSED_RETRY`` seconds
(no fencing, no flapping; a pin in the cloud's configuration moves a location).

The admin API's `/status`, `/switch` and `/audit` need the bearer token of ``[admin] token_file``;
`/healthz` (the shadows' probe), `/readyz` and `/metrics` stay open (see `connector.admin`).

Shutdown (SIGTERM) is a graceful handover: tell every replica we drain (new requests are held
there), resign the leader key so a shadow takes over at once, let in-flight streams finish
(bounded by ``drain_seconds``), then close.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
from typing import Any

import attrs
import trio
import trio_websocket

import connector
from connector import metrics, pki
from connector.admin import LOCAL_HOSTS, AdminGuard, AdminRequest, AdminServer, Reply, http_request
from connector.agent.acl import AccessControl
from connector.agent.audit import AuditLog
from connector.agent.forward import ForwardSettings, StreamContext, serve_stream
from connector.agent.origin import OriginPool, PoolSettings
from connector.agent.principal import PrincipalPropagator
from connector.agent.renew import RENEW_REFUSED_OP, RENEWED_OP, RenewalError, Renewer
from connector.backoff import Backoff
from connector.cloud.replicas import HELLO_REPLICA_KEY, REPLICAS_OP, Replica, from_body
from connector.config import NodeConfig, check_node_certificate
from connector.readiness import NodeState, readiness
from connector.tlsreload import TlsReloader
from connector.tunnel.dial import (
    DialError,
    DialTarget,
    Resolver,
    describe_failure,
    dial_targets,
    is_address,
    open_tunnel_websocket,
    resolve_addresses,
    url_port,
)
from connector.tunnel.session import TunnelError, TunnelSession, TunnelSettings
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, Target
from ha.monitor import MasterProbe
from ha.store import StoreError

log = logging.getLogger(__name__)

# Refusals that concern the node's cluster rather than its epoch (see connector.cloud.registry).
CLUSTER_REFUSALS = frozenset({"wrong_cluster", "certificate_cluster"})
CERTIFICATE_REVOKED = "certificate_revoked"  # the cloud's GOAWAY reason for a revoked certificate

WS_RECEIVE_BUFFER = 262144
WS_MAX_MESSAGE = 4 << 20
REGISTER_TIMEOUT = 2.0
REFUSED_RETRY = 10.0  # seconds between tunnels while the cloud refuses this node's cluster
RESOLVE_INTERVAL = 5.0  # seconds between resolutions of the configured host names
LOST_EPOCHS_KEPT = 4  # epochs whose master_lost reports are remembered (bounded: the cloud sends them)
LOST_REPORT_WINDOW = 10.0  # seconds a replica's master_lost counts towards a hint
MAX_REPLICAS = 32  # replicas announced, or addresses of one name, the node dials at most


class MasterLostReports:
    """The replicas' ``master_lost`` reports per epoch: a hint once every replica we hold agrees.

    A crash or a freeze of the master is seen by every replica within a ping interval or so; one
    replica alone losing the master means that path broke while the others still route to it.
    Reports older than `window` say nothing about now (the master may have re-registered there
    since), so they do not count. Pure: the caller passes trio's clock.
    """

    def __init__(self, window: float = LOST_REPORT_WINDOW, epochs_kept: int = LOST_EPOCHS_KEPT) -> None:
        self.window = window
        self.epochs_kept = epochs_kept
        self.reports: dict[int, dict[str, float]] = {}  # epoch -> replica -> when it reported

    def report(self, epoch: int, replica: str, now: float) -> None:
        self.reports.setdefault(epoch, {})[replica] = now
        for old in sorted(self.reports)[:-self.epochs_kept]:
            del self.reports[old]

    def agreed(self, replicas: set[str], now: float) -> list[int]:
        """The epochs every one of `replicas` reported within the window (forgotten once returned)."""
        epochs = []
        for epoch, by_replica in list(self.reports.items()):
            recent = {r for r, at in by_replica.items() if now - at <= self.window}
            if recent and replicas <= recent:
                epochs.append(epoch)
                del self.reports[epoch]
        return epochs


@attrs.define(eq=False)
class ReplicaTunnel:
    """The node's tunnel to one cloud replica, and what that replica told us on it."""

    target: DialTarget
    session: TunnelSession
    replica: str  # the id the replica's HELLO names, or the target's key for a cloud naming none
    registered_epoch: int | None = None  # the epoch this replica accepted from us
    refused: bool = False  # the replica refuses our cluster: register no more on this tunnel
    announced: tuple[Replica, ...] = ()  # the replica set it announced last
    drained: trio.Event = attrs.field(factory=trio.Event)  # its answer to our `drain`
    tls_version: int = 0  # which of the node's certificates (`Node.tls` version) it was opened with

    def describe(self) -> dict[str, Any]:
        state = "refused" if self.refused else ("registered" if self.registered_epoch is not None else "standby")
        return {"replica": self.replica, "url": self.target.key, "state": state, "epoch": self.registered_epoch,
                "streams_open": self.session.statistics().streams_open}


class Node:
    def __init__(self, config: NodeConfig, *, elector: Any = None, config_source: Any = None,
                 resolver: Resolver = resolve_addresses) -> None:
        for warning in check_node_certificate(config):  # ConfigError when subaccount or cluster differ
            log.warning("%s", warning)
        self.config = config
        self.elector = elector  # ha.election.Elector, or None when standalone
        self.config_source = config_source  # shared configuration from etcd, or None
        self.acl = AccessControl(config.mappings)
        self.audit = AuditLog(str(config.audit_log) if config.audit_log else None)
        self.forward_settings = ForwardSettings(
            connect_timeout=config.connect_timeout, response_timeout=config.response_timeout,
            request_head_timeout=config.request_head_timeout, min_request_body_rate=config.min_request_body_rate,
            request_body_grace=config.request_body_grace, response_write_timeout=config.response_write_timeout,
        )
        self.origins = OriginPool(PoolSettings(max_idle=config.pool_max_idle, idle_seconds=config.pool_idle_seconds))
        self.principals = PrincipalPropagator(config.principal_propagation)
        self.tunnel_settings = TunnelSettings(ping_interval=config.ping_interval, ping_timeout=config.ping_timeout)
        self.tunnels: dict[str, ReplicaTunnel] = {}  # by replica id: the tunnels that passed HELLO
        self.cloud_refusal: str | None = None  # why the cloud refuses our cluster, until it accepts us
        self._resolver = resolver
        self._resolved: dict[str, list[str]] = {}  # configured URL -> addresses of its host name
        self._dialers: dict[DialTarget, trio.CancelScope] = {}
        self._lost_reports = MasterLostReports()
        self._lost_heard = 0  # master_lost reports received (`wait_master_lost_reports`)
        self._lost_heard_lot = trio.lowlevel.ParkingLot()
        self.admin_port: int | None = None
        self.stopping = False
        self._handing_over = False
        self._draining = False  # handing over: the cloud routes us nothing new, in-flight streams finish
        self._changed = trio.Event()
        self.tunnel_failure: str | None = None  # why the last attempt to open a tunnel failed
        self.tunnel_failures: dict[str, str] = {}  # target -> why its last attempt failed
        self._tunnel_failed = trio.Event()
        self._failed_attempts = 0  # attempts to open a tunnel that failed since start
        self._mappings_changed = trio.Event()  # set (and replaced) when `acl` is replaced
        # read again when the files change or on SIGHUP: new dials use it, tunnels up stay
        self.tls = TlsReloader("tunnel client", [p for p in (config.tunnel_ca, config.tunnel_cert, config.tunnel_key)
                                                 if p is not None], self._client_context)
        self.tls.on_reload = lambda _: self._certificate_reloaded()
        self.renewer = Renewer(config.tunnel_cert, config.tunnel_key, self.tls, renew_at=config.tunnel_renew_at,
                               send_control=self._send_to_any_replica)
        self._labels = (config.location_id, config.node_id)
        self._cluster = config.cluster.name if config.cluster else "standalone"

    # --- role ------------------------------------------------------------------------------

    @property
    def role(self) -> str:
        if self.elector is None:
            return "master"
        return str(self.elector.role)

    @property
    def desired_epoch(self) -> int | None:
        """The epoch to register with the cloud, or None when this node must not serve."""
        if self.stopping or self._handing_over:
            return None
        if self.elector is None:
            return 0
        return self.elector.epoch if self.elector.role == "master" else None

    def poke(self) -> None:
        """Something changed (role, tunnel, registration): wake the reconciler."""
        self._changed.set()
        self._changed = trio.Event()

    @property
    def session(self) -> TunnelSession | None:
        """One tunnel's session (the first replica's by id), or None without any tunnel."""
        return self.tunnels[min(self.tunnels)].session if self.tunnels else None

    @property
    def registered_epoch(self) -> int | None:
        """The epoch the cloud accepted from us on at least one replica, or None."""
        epochs = [t.registered_epoch for t in self.tunnels.values() if t.registered_epoch is not None]
        return max(epochs) if epochs else None

    def targets(self) -> frozenset[DialTarget]:
        """Where the node dials now (one dial loop each)."""
        return frozenset(self._dialers)

    def state(self) -> NodeState:
        tunnels = list(self.tunnels.values())
        return NodeState(
            role=self.role,
            tunnel_connected=bool(tunnels),
            tunnel_registered=self.registered_epoch is not None,
            replicas_connected=len(tunnels),
            replicas_registered=sum(t.registered_epoch is not None for t in tunnels),
            cloud_refusal=self.cloud_refusal,
            etcd_reachable=bool(getattr(self.elector, "etcd_reachable", True)),
            config_loaded=True,
        )

    # --- main ------------------------------------------------------------------------------

    def _client_context(self) -> ssl.SSLContext:
        """The tunnel's TLS client context; CertificateError naming the file that is unusable."""
        config = self.config
        pki.check_key_pair(config.tunnel_cert, config.tunnel_key)
        if config.tunnel_ca is not None:
            pki.check_trust_store(config.tunnel_ca)
        return pki.client_context(config.tunnel_ca, config.tunnel_cert, config.tunnel_key)

    def _export_expiry(self) -> None:
        metrics.CERT_EXPIRY.labels("tunnel-client").set(pki.expiry_timestamp(self.config.tunnel_cert))

    def _certificate_reloaded(self) -> None:
        self._export_expiry()
        if (self.cloud_refusal or "").startswith(CERTIFICATE_REVOKED):
            self.cloud_refusal = None  # the new certificate may well be accepted: no slow redial for it

    async def _send_to_any_replica(self, op: str, body: dict[str, Any]) -> None:
        """A control message on one tunnel (the first replica's); RenewalError without any."""
        session = self.session
        if session is None:
            raise RenewalError("no tunnel to the cloud")
        try:
            await session.send_control(op, body)
        except TunnelError as exc:
            raise RenewalError(f"the tunnel closed: {exc}") from None

    def reload_certificates(self) -> None:
        """SIGHUP: read the tunnel certificate, key and CA again now (see `connector.tlsreload`)."""
        self.tls.reload()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        self._export_expiry()
        log.info("%s", self.config.egress.describe())
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.tls.run)
            if self.config.tunnel_renew_at > 0:
                nursery.start_soon(self.renewer.run)
            admin = AdminServer(self._admin_routes(), guarded=self._guarded_routes(), guard=self._admin_guard())
            self.admin_port = await nursery.start(admin.run, self.config.admin_listen.host, self.config.admin_listen.port)
            if self.elector is not None:
                self.elector.update_member_data(
                    admin_url=self.config.admin_advertise_url
                    or f"http://{self.config.admin_listen.host}:{self.admin_port}",
                    subaccount=self.config.subaccount,
                )
                await nursery.start(self.elector.run)
                nursery.start_soon(self._follow_elector)
                nursery.start_soon(self._probe_master)
            else:
                nursery.start_soon(self._export_role)
            if self.origins.secrets is not None:
                await nursery.start(self.origins.secrets.run)
            if self.config_source is not None:
                await nursery.start(self.config_source.run, self._apply_mappings)
            await nursery.start(self._resolve_loop)
            nursery.start_soon(self.origins.run)
            task_status.started(self.admin_port)

    async def shutdown(self) -> None:
        """Graceful handover: drain at the cloud, resign, finish in-flight streams, close."""
        was_master = self.registered_epoch is not None
        self.stopping = True
        if was_master:
            log.info("handing over: draining at every replica and resigning the leader key")
            await self._begin_drain()
        if self.elector is not None:
            with trio.move_on_after(2.0):
                await self.elector.resign(hold_off=60.0)
        sessions = [t.session for t in self.tunnels.values()]
        with trio.move_on_after(self.config.drain_seconds):
            async with trio.open_nursery() as waits:
                for session in sessions:
                    waits.start_soon(session.wait_no_streams)
        with trio.move_on_after(1.0):
            async with trio.open_nursery() as closes:
                for session in sessions:
                    closes.start_soon(session.aclose, ErrorCode.GOING_AWAY, "node shutting down")
        if self.elector is not None and self.elector.lease is not None:
            with trio.move_on_after(1.0):
                try:  # leave the member list now rather than when the lease expires
                    await self.elector.store.revoke_lease(self.elector.lease)
                except StoreError as exc:
                    log.info("could not revoke our lease on the way out: %s", exc)
        self._nursery.cancel_scope.cancel()

    # --- where to dial ---------------------------------------------------------------------

    async def _resolve_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resolve the configured host names now and every RESOLVE_INTERVAL; dial what they name.
        A failed resolution keeps the addresses known before (a DNS hiccup drops no tunnel). A name
        reached through a proxy is not resolved here: the proxy resolves it (its rules may allow the
        name only, and the node may have no DNS for it), so it is CONNECTed by name."""
        names = [url for url in self.config.tunnel_urls if not is_address(DialTarget(url).host)
                 and self.config.egress.proxy_for(DialTarget(url).host, url_port(url)) is None]
        while True:
            for url in names:
                host = DialTarget(url).host
                try:
                    with trio.fail_after(self.config.tunnel_connect_timeout):
                        addresses = await self._resolver(host, url_port(url))
                except (OSError, trio.TooSlowError) as exc:
                    log.warning("cannot resolve %s (tunnel.url %s): %s; keeping %s", host, url, exc or "timeout",
                                ", ".join(self._resolved.get(url, [])) or "the name itself")
                    continue
                if len(addresses) > MAX_REPLICAS:
                    log.warning("%s resolves to %d addresses: dialling the first %d", host, len(addresses),
                                MAX_REPLICAS)
                    addresses = addresses[:MAX_REPLICAS]
                if addresses != self._resolved.get(url):
                    log.info("%s resolves to %s", host, ", ".join(addresses) or "nothing")
                    self._resolved[url] = addresses
            self._update_targets()
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            if not names:
                return
            await trio.sleep(RESOLVE_INTERVAL)

    def _update_targets(self) -> None:
        """Dial every target of `dial_targets` and retire those no longer in it."""
        announced = {r.tunnel_url for t in self.tunnels.values() for r in t.announced if r.id != t.replica}
        wanted = dial_targets(self.config.tunnel_urls, self._resolved, announced)
        if self.stopping:
            return
        for target in sorted(wanted - self._dialers.keys(), key=str):
            scope = trio.CancelScope()
            self._dialers[target] = scope
            self._nursery.start_soon(self._dial_loop, target, scope, name=f"tunnel {target}")
        for target in sorted(self._dialers.keys() - wanted, key=str):
            log.info("dropping %s: neither configured nor announced by the cloud any more", target)
            self._nursery.start_soon(self._retire, target, self._dialers.pop(target))

    async def _retire(self, target: DialTarget, scope: trio.CancelScope) -> None:
        """Close a dropped target's tunnel gracefully (drain, streams finish), then stop dialling it."""
        tunnel = next((t for t in self.tunnels.values() if t.target == target), None)
        if tunnel is not None:
            if tunnel.registered_epoch is not None:
                await self._drain_tunnel(tunnel)
            with trio.move_on_after(self.config.drain_seconds):
                await tunnel.session.wait_no_streams()
            with trio.move_on_after(1.0):
                await tunnel.session.aclose(ErrorCode.GOING_AWAY, "replica no longer announced")
        scope.cancel()
        self.tunnel_failures.pop(target.key, None)

    # --- tunnels ---------------------------------------------------------------------------

    async def _dial_loop(self, target: DialTarget, scope: trio.CancelScope) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        first = True
        with scope:
            while self._dialing(target, scope):
                if not first:
                    metrics.TUNNEL_RECONNECTS.labels(*self._labels).inc()
                first = False
                try:
                    await self._connect_once(target, backoff)
                except* (OSError, ssl.SSLError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed,
                         TunnelError, trio.BrokenResourceError, trio.TooSlowError, DialError) as group:
                    self._tunnel_failed_because(target, "; ".join(describe_failure(e, target.url)
                                                                 for e in group.exceptions))
                if not self._dialing(target, scope):
                    return  # stopping, or retired: `_retire` closes the tunnel, nothing redials it
                delay = backoff.next_delay()
                if self.cloud_refusal is not None:
                    delay = max(delay, REFUSED_RETRY)
                log.info("reconnecting to %s in %.2f s", target, delay)
                await trio.sleep(delay)

    def _dialing(self, target: DialTarget, scope: trio.CancelScope) -> bool:
        return not self.stopping and self._dialers.get(target) is scope

    def _tunnel_failed_because(self, target: DialTarget, reason: str) -> None:
        log.warning("tunnel to %s failed: %s", target, reason)
        self.tunnel_failure = reason
        self.tunnel_failures[target.key] = reason
        self._failed_attempts += 1
        self._tunnel_failed.set()
        self._tunnel_failed = trio.Event()

    async def wait_tunnel_failure(self) -> str:
        """Wait for the next failed attempt to open a tunnel; return its cause."""
        await self._tunnel_failed.wait()
        return self.tunnel_failure or ""

    async def wait_tunnel_failures(self, count: int) -> str:
        """Return once `count` attempts to open a tunnel failed since start (at once if they
        did); the cause of the last one."""
        await trio.lowlevel.checkpoint()
        while self._failed_attempts < count:
            await self._tunnel_failed.wait()
        return self.tunnel_failure or ""

    async def wait_tunnels(self, count: int, *, registered: bool = False) -> None:
        """Return once the node holds `count` tunnels (registered ones, if `registered`)."""
        while True:
            changed = self._changed
            tunnels = [t for t in self.tunnels.values() if not registered or t.registered_epoch is not None]
            if len(tunnels) == count:
                return
            await changed.wait()

    async def wait_registered(self) -> int:
        """Return once a replica accepted our registration (at once if one has); the epoch."""
        await trio.lowlevel.checkpoint()
        while True:
            changed = self._changed  # every acceptance pokes
            if self.registered_epoch is not None:
                return self.registered_epoch
            await changed.wait()

    async def wait_session(self, *, other_than: TunnelSession | None = None) -> TunnelSession:
        """Return our tunnel's session (`session`) once it is registered and is not `other_than`
        (a session the caller saw close): a new tunnel up and accepted."""
        await trio.lowlevel.checkpoint()
        while True:
            changed = self._changed  # tunnels coming and going and registrations poke
            session = self.session
            if session is not None and session is not other_than and self.registered_epoch is not None:
                return session
            await changed.wait()

    async def wait_refused(self) -> str:
        """Return once the cloud refuses our cluster (at once if it does); why (`cloud_refusal`)."""
        await trio.lowlevel.checkpoint()
        while True:
            changed = self._changed  # `_refused_by_cloud` pokes
            if self.cloud_refusal is not None:
                return self.cloud_refusal
            await changed.wait()

    async def wait_mapping(self, target: Target, *, present: bool = True) -> None:
        """Return once the access control serves `target` (with `present` False: no longer
        serves it), at once if it does already; woken by each applied configuration."""
        await trio.lowlevel.checkpoint()
        while True:
            changed = self._mappings_changed
            if (self.acl.find_mapping(target) is not None) == present:
                return
            await changed.wait()

    async def wait_master_lost_reports(self, count: int) -> None:
        """Return once `count` ``master_lost`` reports arrived from the replicas since start
        (whether or not they made a hint), at once if they have."""
        await trio.lowlevel.checkpoint()
        while self._lost_heard < count:
            await self._lost_heard_lot.park()

    async def _connect_once(self, target: DialTarget, backoff: Backoff) -> None:
        holder: ReplicaTunnel | None = None
        async with trio.open_nursery() as nursery:
            # TCP, TLS and the WebSocket upgrade each report their own cause (`tunnel.dial`); the
            # tunnel's HELLO gets what is left of the same budget (tunnel.connect_timeout).
            timeout = self.config.tunnel_connect_timeout
            deadline = trio.current_time() + timeout
            tls_version = self.tls.version
            ws = await open_tunnel_websocket(
                nursery, target.url, self.tls.current, address=target.address, timeout=timeout,
                client_cert=self.config.tunnel_cert, max_message_size=WS_MAX_MESSAGE,
                receive_buffer_size=WS_RECEIVE_BUFFER,
                proxy=self.config.egress.proxy_for(target.host, url_port(target.url)),
            )
            session = TunnelSession(
                ws, client=True, settings=self.tunnel_settings,
                hello_info={
                    "node": self.config.node_id,
                    "cluster": self.config.cluster.name if self.config.cluster else "",
                    "location_id": self.config.location_id,
                    "version": connector.__version__,
                    "pid": os.getpid(),
                },
            )
            with trio.move_on_at(deadline) as hello:
                peer = await session.handshake()
            if hello.cancelled_caught:
                raise DialError(f"the cloud at {target} did not answer the tunnel handshake "
                                f"(HELLO) within {timeout:g} s")
            backoff.reset()
            self.tunnel_failures.pop(target.key, None)
            replica = str(peer.get(HELLO_REPLICA_KEY) or target.key)
            holder = self.tunnels.get(replica)
            if holder is not None:  # two addresses of one replica: keep the tunnel we have
                log.info("%s reaches replica %s, already held through %s: dialling it again when that ends",
                         target, replica, holder.target)
                await session.aclose(ErrorCode.GOING_AWAY, "this node holds a tunnel to this replica already")
                nursery.cancel_scope.cancel()
            else:
                await self._hold(nursery, ReplicaTunnel(target, session, replica, tls_version=tls_version))
        if holder is not None:
            await holder.session.wait_closed()

    async def _hold(self, nursery: trio.Nursery, tunnel: ReplicaTunnel) -> None:
        """Run one replica's tunnel until it closes: register, serve, follow its announcements."""
        self.tunnels[tunnel.replica] = tunnel
        metrics.TUNNEL_CONNECTED.labels(*self._labels).set(1)
        log.info("tunnel up to replica %s at %s", tunnel.replica, tunnel.target)
        self.poke()
        session = tunnel.session
        try:
            nursery.start_soon(self._reconcile, tunnel)
            await session.run(stream_handler=functools.partial(self._serve_stream, tunnel),
                              control_handler=functools.partial(self._on_control, tunnel))
        finally:
            code, reason = session.close_reason or (ErrorCode.NO_ERROR, "")
            why = reason.partition(":")[0] if code == ErrorCode.DENIED else ""
            if why in CLUSTER_REFUSALS:
                self._refused_by_cloud(tunnel, reason)  # said in the GOAWAY when refused at connection
            elif why == CERTIFICATE_REVOKED and tunnel.tls_version == self.tls.version:
                self._refused_by_cloud(tunnel, reason)  # until a new certificate is read
            elif why == CERTIFICATE_REVOKED:
                log.warning("the certificate this tunnel was opened with is revoked: dialling with the one read since")
            del self.tunnels[tunnel.replica]
            metrics.TUNNEL_CONNECTED.labels(*self._labels).set(1 if self.tunnels else 0)
            self._update_targets()  # what only this replica announced is dropped with it
            self._hint_master_lost()  # the replicas left may all have reported already
            self.poke()
            nursery.cancel_scope.cancel()
        log.warning("tunnel to replica %s closed: %s", tunnel.replica, session.close_reason)

    async def _on_control(self, tunnel: ReplicaTunnel, op: str, body: dict[str, Any]) -> None:
        if op == "registered":
            tunnel.registered_epoch = int(body["epoch"])
            self.cloud_refusal = None
            log.info("replica %s accepted registration with epoch %d", tunnel.replica, tunnel.registered_epoch)
            self.poke()
        elif op == "refused" and body.get("reason") in CLUSTER_REFUSALS:
            self._refused_by_cloud(tunnel, f"{body.get('reason')}: {body.get('message')}")
        elif op in ("refused", "fenced"):
            tunnel.registered_epoch = None
            log.warning("replica %s %s us: %s (highest epoch %s)", tunnel.replica, op, body.get("reason"),
                        body.get("highest_epoch", body.get("epoch")))
            if self.elector is not None:
                self.elector.force_shadow(f"cloud {op} our registration: {body.get('reason', 'newer epoch')}")
            self.poke()
        elif op == "master_lost":
            if body.get("epoch") is not None:
                self._master_lost(tunnel, int(body["epoch"]))
        elif op in (RENEWED_OP, RENEW_REFUSED_OP):
            self.renewer.answer(op, body)
        elif op == "drained":
            tunnel.drained.set()
            tunnel.drained = trio.Event()
        elif op == REPLICAS_OP:
            try:
                announced = from_body(body)
                if len(announced) > MAX_REPLICAS:
                    raise ValueError(f"{len(announced)} replicas, more than the {MAX_REPLICAS} a node dials")
            except ValueError as exc:
                log.warning("ignoring a malformed replica set from replica %s: %s", tunnel.replica, exc)
                return
            tunnel.announced = announced
            log.info("replica %s announces replicas %s", tunnel.replica,
                     ", ".join(f"{r.id} ({r.tunnel_url})" for r in tunnel.announced))
            self._update_targets()
        else:
            log.warning("unknown control op %r from replica %s", op, tunnel.replica)

    def _master_lost(self, tunnel: ReplicaTunnel, epoch: int) -> None:
        """A replica lost the master's tunnel: a hint for the elector once every replica we hold
        said so (`MasterLostReports`); one replica alone may only be cut off from the master."""
        self._lost_reports.report(epoch, tunnel.replica, trio.current_time())
        self._hint_master_lost()
        self._lost_heard += 1
        self._lost_heard_lot.unpark_all()

    def _hint_master_lost(self) -> None:
        for epoch in self._lost_reports.agreed(set(self.tunnels), trio.current_time()):
            if self.elector is not None:
                self.elector.hint_master_lost(epoch, "cloud")

    def _refused_by_cloud(self, tunnel: ReplicaTunnel, why: str) -> None:
        """Another cluster owns our location (or our certificate names another cluster). Not a newer
        master of our cluster: resigning would only hand the refusal to the next node of our
        cluster. The cloud closes the tunnel; we reconnect slowly and register no more on it."""
        tunnel.registered_epoch = None
        if why != self.cloud_refusal:
            log.error("the cloud refuses this node (cluster %r): %s", self._cluster, why)
        self.cloud_refusal = why
        tunnel.refused = True
        self.poke()

    async def _reconcile(self, tunnel: ReplicaTunnel) -> None:
        """Keep one replica's view of us equal to the elector's: register, or unregister. One task
        per tunnel, so a replica that stalls holds up no other."""
        while True:
            changed = self._changed
            desired = self.desired_epoch
            if desired != tunnel.registered_epoch and not tunnel.refused:
                try:
                    if desired is not None:
                        await tunnel.session.send_control("register", {"epoch": desired})
                    else:
                        tunnel.registered_epoch = None
                        await tunnel.session.send_control("unregister", {})
                except TunnelError:
                    pass
                # wait for the reply (or any change) but retry if the cloud never answers
                with trio.move_on_after(REGISTER_TIMEOUT):
                    await changed.wait()
                continue
            await changed.wait()

    async def _follow_elector(self) -> None:
        version = 0
        while True:
            change = await self.elector.wait_role_change(version)
            version = change.version
            log.info("role is now %s (epoch %s): %s", change.role, change.epoch, change.reason)
            self.poke()

    async def _probe_master(self) -> None:
        """Shadows probe the master's admin /healthz (see `ha.monitor.MasterProbe`)."""

        async def healthz(url: str, timeout: float) -> bool:  # noqa: ASYNC109 - MasterProbe.Check signature
            host, _, port = url.removeprefix("http://").partition(":")
            try:
                status, _ = await http_request(host, int(port), "/healthz", timeout=timeout)
            except (OSError, trio.TooSlowError, ValueError):
                return False
            return status == 200

        await MasterProbe(self.elector, healthz).run()

    async def _export_role(self) -> None:
        node = self.config.node_id
        while True:
            role = self.role
            for candidate in ("master", "shadow", "starting"):
                metrics.NODE_ROLE.labels(self._cluster, self.config.location_id, node, candidate).set(
                    1 if role == candidate else 0
                )
            metrics.NODE_EPOCH.labels(self._cluster, self.config.location_id, node).set(self.registered_epoch or 0)
            changed = self._changed
            with trio.move_on_after(1.0):
                await changed.wait()

    # --- streams ---------------------------------------------------------------------------

    async def _serve_stream(self, tunnel: ReplicaTunnel, stream: TunnelStream) -> None:
        if tunnel.registered_epoch is None and not self._draining:
            # REFUSED before anything is read: the cloud may replay the request on the master
            await stream.reset(ErrorCode.REFUSED, f"node {self.config.node_id} is not the master")
            return
        # A stream the cloud routed to us before it processed our drain is still ours to serve:
        # the cloud's fence, not this check, is what keeps a replaced master from serving.
        await serve_stream(stream, self.acl, self._stream_context)

    @functools.cached_property
    def _stream_context(self) -> StreamContext:
        return StreamContext(subaccount=self.config.subaccount, location_id=self.config.location_id,
                             audit=self.audit, settings=self.forward_settings, pool=self.origins,
                             principals=self.principals)

    async def _begin_drain(self) -> None:
        """Tell every replica to route no new streams to us; in-flight streams finish."""
        self._draining = True
        async with trio.open_nursery() as nursery:
            for tunnel in list(self.tunnels.values()):
                nursery.start_soon(self._drain_tunnel, tunnel)
        for tunnel in self.tunnels.values():
            tunnel.registered_epoch = None

    @staticmethod
    async def _drain_tunnel(tunnel: ReplicaTunnel) -> None:
        """`drain` on one replica and its `drained` answer, within REGISTER_TIMEOUT."""
        drained = tunnel.drained  # captured first: the reply may come before we wait
        with trio.move_on_after(REGISTER_TIMEOUT):
            try:
                await tunnel.session.send_control("drain", {})
                await drained.wait()
            except TunnelError:
                pass
        tunnel.registered_epoch = None

    def _apply_mappings(self, mappings: Any, revision: int) -> None:
        self.acl = AccessControl(mappings)
        self._mappings_changed.set()
        self._mappings_changed = trio.Event()
        self.audit.config_change(action="apply", revision=revision, mappings=[m.name for m in mappings])
        log.info("applied shared configuration revision %d: %d mappings", revision, len(mappings))

    # --- admin -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        tunnels = [self.tunnels[replica].describe() for replica in sorted(self.tunnels)]
        return {
            "node": self.config.node_id,
            "cluster": self._cluster,
            "subaccount": self.config.subaccount,
            "location_id": self.config.location_id,
            "role": self.role,
            "epoch": self.registered_epoch,
            "elected_epoch": getattr(self.elector, "epoch", 0) if self.elector else 0,
            "pid": os.getpid(),
            "tunnel": "registered" if self.registered_epoch is not None else (
                "refused" if self.cloud_refusal else ("standby" if tunnels else "down")),
            "tunnels": tunnels,  # one per replica
            "proxy": self.config.egress.proxy.url if self.config.egress.proxy else None,  # password masked
            "cloud_refusal": self.cloud_refusal,
            "tunnel_failure": None if tunnels else self.tunnel_failure,
            "tunnel_failures": dict(sorted(self.tunnel_failures.items())),  # targets without a tunnel
            "streams_open": sum(t["streams_open"] for t in tunnels),
            "mappings": [m.name for m in self.acl.mappings] if hasattr(self.acl, "mappings") else [],
            "ready": readiness(self.state()).ready,
        }

    def _admin_routes(self) -> dict[tuple[str, str], Any]:
        async def readyz(request: AdminRequest) -> Reply:
            try:
                result = readiness(self.state(), want=request.query.get("want", "master"))
            except ValueError as exc:
                return Reply.json(400, {"error": "bad_request", "message": str(exc)})
            return Reply.json(200 if result.ready else 503, {"ready": result.ready, "reason": result.reason})

        return {("GET", "/readyz"): readyz}

    def _guarded_routes(self) -> dict[tuple[str, str], Any]:
        """Routes that need the admin token (see `connector.admin.admit`)."""

        async def status(request: AdminRequest) -> Reply:
            return Reply.json(200, self.status())

        async def switch(request: AdminRequest) -> Reply:
            if self.registered_epoch is None or self.elector is None:
                return Reply.json(409, {"error": "not_master", "message": "only the master can hand over"})
            await self.handover()
            return Reply.json(200, {"status": "handed_over", "node": self.config.node_id})

        async def recent_audit(request: AdminRequest) -> Reply:
            return Reply.json(200, list(getattr(self.audit, "recent", [])))

        return {
            ("GET", "/status"): status,
            ("POST", "/switch"): switch,
            ("GET", "/audit"): recent_audit,
        }

    def _admin_guard(self) -> AdminGuard:
        """The token, and the names this admin API answers to: loopback, its listen address, the
        host of its advertised URL, and `[admin] allowed_hosts`."""
        config = self.config
        hosts = set(LOCAL_HOSTS) | set(config.admin_allowed_hosts)
        if config.admin_listen.host not in ("0.0.0.0", "::", ""):
            hosts.add(config.admin_listen.host.lower())
        if config.admin_advertise_url:
            hosts.add(config.admin_advertise_url.removeprefix("http://").rpartition(":")[0].strip("[]").lower())
        return AdminGuard(config.admin_token, frozenset(hosts))

    async def handover(self) -> None:
        """`connector switch`: stop serving, let a shadow take over, stay in the cluster as shadow."""
        self._handing_over = True
        try:
            await self._begin_drain()
            await self.elector.resign(hold_off=5.0)
        finally:
            self._handing_over = False
            self._draining = False
            self.poke()
