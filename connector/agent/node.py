"""A connector node: dials the cloud, serves allow-listed resources while it is the fenced master.

Theory of operation
-------------------
The node always keeps one tunnel to the cloud (reconnecting with full-jitter backoff). While the
HA layer says it is master, it *registers* that tunnel with its fencing epoch; the cloud accepts the
highest epoch only. A shadow's tunnel is a standby connection: promotion is one ``register``
message, and the cloud tells standbys at once when the master's tunnel drops (``master_lost``),
which the node passes to the elector as a hint. Streams are served only while the cloud has
confirmed our registration (``registered_epoch``); anything else is reset with NOT_MASTER.

Without a ``[cluster]`` section the node runs standalone: always master, epoch 0.

Identity: the cloud knows the node by its certificate (subaccount in O=, node id in CN=, cluster in
OU= when `connector certs` put one there); a configuration that disagrees with the certificate is
refused at start. The HELLO names the node's cluster: the cloud serves a location from one cluster
only, and refuses another with ``wrong_cluster`` and a message, which the node logs as an error,
shows in `/status` and `/readyz`, and answers by reconnecting only every ``REFUSED_RETRY`` seconds
(no fencing, no flapping; a pin in the cloud's configuration moves a location).

The admin API's `/status`, `/switch` and `/audit` need the bearer token of ``[admin] token_file``;
`/healthz` (the shadows' probe), `/readyz` and `/metrics` stay open (see `connector.admin`).

Shutdown (SIGTERM) is a graceful handover: tell the cloud we drain (new requests are held there),
resign the leader key so a shadow takes over at once, let in-flight streams finish (bounded by
``drain_seconds``), then close.
"""

from __future__ import annotations

import logging
import os
import ssl
from typing import Any

import trio
import trio_websocket

import connector
from connector import metrics, pki
from connector.admin import LOCAL_HOSTS, AdminGuard, AdminRequest, AdminServer, Reply, http_request
from connector.agent.acl import AccessControl
from connector.agent.audit import AuditLog
from connector.agent.forward import ForwardSettings, StreamContext, serve_stream
from connector.backoff import Backoff
from connector.config import NodeConfig, check_node_certificate
from connector.readiness import NodeState, readiness
from connector.tunnel.dial import DialError, describe_failure, open_tunnel_websocket
from connector.tunnel.session import TunnelError, TunnelSession, TunnelSettings
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode
from ha.monitor import MasterProbe
from ha.store import StoreError

log = logging.getLogger(__name__)

# Refusals that concern the node's cluster rather than its epoch (see connector.cloud.registry).
CLUSTER_REFUSALS = frozenset({"wrong_cluster", "certificate_cluster"})

WS_RECEIVE_BUFFER = 262144
WS_MAX_MESSAGE = 4 << 20
REGISTER_TIMEOUT = 2.0
REFUSED_RETRY = 10.0  # seconds between tunnels while the cloud refuses this node's cluster


class Node:
    def __init__(self, config: NodeConfig, *, elector: Any = None, config_source: Any = None) -> None:
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
            keepalive_timeout=config.keepalive_timeout,
        )
        self.tunnel_settings = TunnelSettings(ping_interval=config.ping_interval, ping_timeout=config.ping_timeout)
        self.session: TunnelSession | None = None
        self.registered_epoch: int | None = None
        self.cloud_refusal: str | None = None  # why the cloud refuses our cluster, until it accepts us
        self._refused_session: TunnelSession | None = None  # no registering again on this tunnel
        self.admin_port: int | None = None
        self.stopping = False
        self._handing_over = False
        self._draining: trio.Event | None = None  # set while handing over; streams end between requests
        self._mastership_drain: trio.Event | None = None
        self._drained = trio.Event()
        self._changed = trio.Event()
        self.tunnel_failure: str | None = None  # why the last attempt to open the tunnel failed
        self._tunnel_failed = trio.Event()
        self._ssl = pki.client_context(config.tunnel_ca, config.tunnel_cert, config.tunnel_key)
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

    def state(self) -> NodeState:
        return NodeState(
            role=self.role,
            tunnel_connected=self.session is not None,
            tunnel_registered=self.registered_epoch is not None,
            cloud_refusal=self.cloud_refusal,
            etcd_reachable=bool(getattr(self.elector, "etcd_reachable", True)),
            config_loaded=True,
        )

    # --- main ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        cert_expiry = pki.expiry_timestamp(self.config.tunnel_cert)
        metrics.CERT_EXPIRY.labels("tunnel-client").set(cert_expiry)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
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
            if self.config_source is not None:
                await nursery.start(self.config_source.run, self._apply_mappings)
            nursery.start_soon(self._tunnel_loop)
            nursery.start_soon(self._reconcile_loop)
            task_status.started(self.admin_port)

    async def shutdown(self) -> None:
        """Graceful handover: drain at the cloud, resign, finish in-flight streams, close."""
        was_master = self.registered_epoch is not None
        self.stopping = True
        session = self.session
        if was_master and session is not None:
            log.info("handing over: draining at the cloud and resigning the leader key")
            await self._begin_drain(session)
        if self.elector is not None:
            with trio.move_on_after(2.0):
                await self.elector.resign(hold_off=60.0)
        if session is not None:
            with trio.move_on_after(self.config.drain_seconds):
                await session.wait_no_streams()
            with trio.move_on_after(1.0):
                await session.aclose(ErrorCode.GOING_AWAY, "node shutting down")
        if self.elector is not None and self.elector.lease is not None:
            with trio.move_on_after(1.0):
                try:  # leave the member list now rather than when the lease expires
                    await self.elector.store.revoke_lease(self.elector.lease)
                except StoreError as exc:
                    log.info("could not revoke our lease on the way out: %s", exc)
        self._nursery.cancel_scope.cancel()

    # --- tunnel ----------------------------------------------------------------------------

    async def _tunnel_loop(self) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        first = True
        while not self.stopping:
            if not first:
                metrics.TUNNEL_RECONNECTS.labels(*self._labels).inc()
            first = False
            try:
                await self._connect_once(backoff)
            except* (OSError, ssl.SSLError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed,
                     TunnelError, trio.BrokenResourceError, trio.TooSlowError, DialError) as group:
                self._tunnel_failed_because("; ".join(describe_failure(e, self.config.tunnel_url)
                                                      for e in group.exceptions))
            if self.stopping:
                return
            delay = backoff.next_delay()
            if self.cloud_refusal is not None:
                delay = max(delay, REFUSED_RETRY)
            log.info("reconnecting in %.2f s", delay)
            await trio.sleep(delay)

    def _tunnel_failed_because(self, reason: str) -> None:
        log.warning("tunnel to %s failed: %s", self.config.tunnel_url, reason)
        self.tunnel_failure = reason
        self._tunnel_failed.set()
        self._tunnel_failed = trio.Event()

    async def wait_tunnel_failure(self) -> str:
        """Wait for the next failed attempt to open the tunnel; return its cause."""
        await self._tunnel_failed.wait()
        return self.tunnel_failure or ""

    async def _connect_once(self, backoff: Backoff) -> None:
        async with trio.open_nursery() as nursery:
            # TCP, TLS and the WebSocket upgrade each report their own cause (`tunnel.dial`); the
            # tunnel's HELLO gets what is left of the same budget (tunnel.connect_timeout).
            timeout = self.config.tunnel_connect_timeout
            deadline = trio.current_time() + timeout
            ws = await open_tunnel_websocket(
                nursery, self.config.tunnel_url, self._ssl, timeout=timeout, client_cert=self.config.tunnel_cert,
                max_message_size=WS_MAX_MESSAGE, receive_buffer_size=WS_RECEIVE_BUFFER,
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
                await session.handshake()
            if hello.cancelled_caught:
                raise DialError(f"the cloud at {self.config.tunnel_url} did not answer the tunnel handshake "
                                f"(HELLO) within {timeout:g} s")
            backoff.reset()
            self.session = session
            self.registered_epoch = None
            metrics.TUNNEL_CONNECTED.labels(*self._labels).set(1)
            log.info("tunnel up to %s", self.config.tunnel_url)
            self.poke()
            try:
                await session.run(stream_handler=self._serve_stream, control_handler=self._on_control)
            finally:
                code, reason = session.close_reason or (ErrorCode.NO_ERROR, "")
                if code == ErrorCode.DENIED and reason.partition(":")[0] in CLUSTER_REFUSALS:
                    self._refused_by_cloud(reason)  # said in the GOAWAY when refused at connection
                self.session = None
                self.registered_epoch = None
                metrics.TUNNEL_CONNECTED.labels(*self._labels).set(0)
                self.poke()
                nursery.cancel_scope.cancel()
            log.warning("tunnel closed: %s", session.close_reason)

    async def _on_control(self, op: str, body: dict[str, Any]) -> None:
        if op == "registered":
            self.registered_epoch = int(body["epoch"])
            self.cloud_refusal = None
            log.info("cloud accepted registration with epoch %d", self.registered_epoch)
            self.poke()
        elif op == "refused" and body.get("reason") in CLUSTER_REFUSALS:
            self._refused_by_cloud(f"{body.get('reason')}: {body.get('message')}")
        elif op in ("refused", "fenced"):
            self.registered_epoch = None
            log.warning("cloud %s us: %s (highest epoch %s)", op, body.get("reason"), body.get("highest_epoch", body.get("epoch")))
            if self.elector is not None:
                self.elector.force_shadow(f"cloud {op} our registration: {body.get('reason', 'newer epoch')}")
            self.poke()
        elif op == "master_lost":
            if self.elector is not None and body.get("epoch") is not None:
                self.elector.hint_master_lost(int(body["epoch"]), "cloud")
        elif op == "drained":
            self._drained.set()
            self._drained = trio.Event()
        else:
            log.warning("unknown control op %r from the cloud", op)

    def _refused_by_cloud(self, why: str) -> None:
        """Another cluster owns our location (or our certificate names another cluster). Not a newer
        master of our cluster: resigning would only hand the refusal to the next node of our
        cluster. The cloud closes the tunnel; we reconnect slowly and register no more on it."""
        self.registered_epoch = None
        if why != self.cloud_refusal:
            log.error("the cloud refuses this node (cluster %r): %s", self._cluster, why)
        self.cloud_refusal = why
        self._refused_session = self.session
        self.poke()

    async def _reconcile_loop(self) -> None:
        """Keep the cloud's view of us equal to the elector's: register, or unregister."""
        while True:
            changed = self._changed
            session = self.session
            desired = self.desired_epoch
            if session is not None and desired != self.registered_epoch and session is not self._refused_session:
                try:
                    if desired is not None:
                        await session.send_control("register", {"epoch": desired})
                    else:
                        self.registered_epoch = None
                        await session.send_control("unregister", {})
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

    async def _serve_stream(self, stream: TunnelStream) -> None:
        if self.registered_epoch is None and self._draining is None:
            await stream.reset(ErrorCode.NOT_MASTER, f"node {self.config.node_id} is not the master")
            return
        # A stream the cloud routed to us before it processed our drain is still ours to serve:
        # the cloud's fence, not this check, is what keeps a replaced master from serving.
        context = StreamContext(
            subaccount=self.config.subaccount,
            location_id=self.config.location_id,
            audit=self.audit,
            settings=self.forward_settings,
            draining=self._draining_event(),
        )
        await serve_stream(stream, self.acl, context)

    def _draining_event(self) -> trio.Event:
        """One event per mastership: set when we hand over, fresh when we register again."""
        if self._draining is not None:
            return self._draining
        if self._mastership_drain is None or self._mastership_drain.is_set():
            self._mastership_drain = trio.Event()
        return self._mastership_drain

    async def _begin_drain(self, session: TunnelSession | None) -> None:
        """Tell the cloud to route no new streams to us, and end idle kept-alive streams."""
        self._draining = self._draining_event()
        if session is not None:
            drained = self._drained  # captured first: the reply may come before we wait
            with trio.move_on_after(REGISTER_TIMEOUT):
                try:
                    await session.send_control("drain", {})
                    await drained.wait()
                except TunnelError:
                    pass
        self._draining.set()
        self.registered_epoch = None

    def _apply_mappings(self, mappings: Any, revision: int) -> None:
        self.acl = AccessControl(mappings)
        self.audit.config_change(action="apply", revision=revision, mappings=[m.name for m in mappings])
        log.info("applied shared configuration revision %d: %d mappings", revision, len(mappings))

    # --- admin -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        session = self.session
        stats = session.statistics() if session is not None else None
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
                "refused" if self.cloud_refusal else ("standby" if session else "down")),
            "cloud_refusal": self.cloud_refusal,
            "tunnel_failure": None if session else self.tunnel_failure,
            "streams_open": stats.streams_open if stats else 0,
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
            await self._begin_drain(self.session)
            await self.elector.resign(hold_off=5.0)
        finally:
            self._handing_over = False
            self._draining = None
            self.poke()
