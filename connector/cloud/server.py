"""`connector cloud`: the cloud side as one process: tunnel endpoint, proxies, destinations, admin.

Each service is a `run(host, port, *, task_status)` started in one nursery; `CloudServer.run`
reports the bound ports (so tests and the demo can use port 0).

With ``[shared]`` the process is one replica of several: the fence, live tokens, destinations, the
token service's signing keys and bindings, and the replica set live in the cloud's etcd (`connector.cloud.shared`), and the replica stays not
ready (admitting and routing nothing) until it has read the shared fence. ``/readyz`` answers
`connector.readiness.cloud_readiness`; ``/status`` shows the replica set.
 `CloudServer.shutdown` is the graceful end of a replica (SIGTERM): not ready, listeners
closed, requests finished, GOAWAY to the nodes (see `connector.cloud.drain`).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import attrs
import trio
from cryptography.fernet import Fernet

from connector import metrics, pki
from connector.admin import AdminRequest, AdminServer, Reply
from connector.cloud.admission import StreamAdmission
from connector.cloud.audit import CloudAudit
from connector.cloud.auth import Authenticator
from connector.cloud.bindings import FileBindingStore
from connector.cloud.clients import AuthThrottle, ConnectionCounter
from connector.cloud.coverage import NoPeers, PeerMasters, SharedPeers, cloud_state
from connector.cloud.destination_store import EtcdDestinationStore, load_or_create_key
from connector.cloud.destinations import DestinationService, DestinationSettings
from connector.cloud.drain import Drain
from connector.cloud.endpoint import EndpointSettings, TunnelEndpoint
from connector.cloud.idp_keys import RemoteJwks
from connector.cloud.jwks import FileKeyStore
from connector.cloud.oauth import TokenService, WallClock, server_ssl_context, wall_clock
from connector.cloud.oauth_shared import OAuthSync
from connector.cloud.principal import PrincipalValidator
from connector.cloud.proxy import HttpProxy, ProxySettings
from connector.cloud.registry import Registry
from connector.cloud.replicas import Replica, ReplicaDirectory
from connector.cloud.revocation import RevokedSerials
from connector.cloud.shared import SharedState, SubaccountSettings
from connector.cloud.socks5 import Socks5Proxy
from connector.config import CloudConfig, ReplicaConfig, etcd_settings
from connector.datarate import MinDataRate
from connector.readiness import Readiness, cloud_readiness
from connector.tunnel.session import TunnelSettings
from ha.store import Store

log = logging.getLogger(__name__)


@attrs.frozen
class CloudPorts:
    tunnel: int
    http_proxy: int
    socks5_proxy: int
    admin: int
    destinations: int | None
    oauth: int | None = None


def proxy_settings(config: CloudConfig) -> ProxySettings:
    """The HTTP proxy's limits from [proxy]."""
    return ProxySettings(
        request_head_timeout=config.request_head_timeout,
        idle_timeout=config.idle_timeout,
        request_body_rate=MinDataRate(config.min_request_body_rate, config.request_body_grace),
        response_write_timeout=config.response_write_timeout,
    )


def token_service(config: CloudConfig, clock: WallClock, shared: OAuthSync | None = None) -> TokenService:
    """The token service of [oauth]: bindings and signing keys in their files, or with [shared]
    in the cloud's etcd (`shared`)."""
    assert config.oauth is not None
    oauth = config.oauth
    stores: dict[str, Any] = (
        {"bindings": shared.bindings, "keyring": shared.keys} if shared is not None
        else {"bindings": FileBindingStore(oauth.bindings), "keys": FileKeyStore(oauth.signing_keys)}
    )
    return TokenService(oauth.settings, **stores,
                        ssl_context=server_ssl_context(oauth.cert, oauth.key), clock=clock,
                        users={(u.subaccount, u.user_name): u for s in config.subaccounts for u in s.users},
                        trusted_issuers={(t.subaccount, t.issuer): t for s in config.subaccounts
                                         for t in s.trusted_issuers})


class CloudServer:
    def __init__(self, config: CloudConfig, *, clock: WallClock = wall_clock) -> None:
        self.config = config
        store: Store | None = None
        fernet: Fernet | None = None
        oauth_sync: OAuthSync | None = None
        if config.shared is not None:
            from ha.etcd import EtcdStore  # grpc: only for several replicas

            store = EtcdStore(config.shared.prefix.lstrip("/"), etcd_settings(config.shared.etcd))
            if config.shared.secrets_key is not None:
                fernet = load_or_create_key(config.shared.secrets_key)
            if config.oauth is not None and fernet is not None:
                oauth_sync = OAuthSync(store, fernet, keys_file=config.oauth.signing_keys,
                                       bindings_file=config.oauth.bindings,
                                       overlap=config.oauth.settings.key_overlap, clock=clock)
        self.oauth = token_service(config, clock, oauth_sync) if config.oauth is not None else None
        replica = config.replica or ReplicaConfig(id=socket.gethostname(), tunnel_url=None, admin_url=None)
        self.audit = CloudAudit.open(str(config.audit_log) if config.audit_log else None, replica=replica.id)
        self.registry = Registry(
            hold_seconds=config.hold_seconds,
            hold_max=config.hold_max,
            known_locations=[(s.id, loc) for s in config.subaccounts for loc in s.locations],
            pinned_clusters={(s.id, loc): cluster for s in config.subaccounts for loc, cluster in s.clusters.items()},
            state_file=config.state_file,
            stream_wait_seconds=config.stream_wait_seconds,
            admission=StreamAdmission(config.stream_limits),
            shared_fence=config.shared is not None,
            audit=self.audit,
        )
        self.authenticator = Authenticator(
            {s.id: s.token_sha256 for s in config.subaccounts}, throttle=AuthThrottle(config.auth_throttle),
            jwt=self.oauth.validator if self.oauth is not None else None,
        )
        self.principals = PrincipalValidator(
            self.oauth.validator if self.oauth is not None else None,
            {(t.subaccount, t.issuer): t for s in config.subaccounts for t in s.trusted_issuers}, clock=clock)
        self.admin_authenticator = Authenticator({s.id: s.destination_admin_sha256 for s in config.subaccounts})
        self.replicas = ReplicaDirectory(Replica(
            replica.id, replica.tunnel_url or f"wss://{config.tunnel_listen}/tunnel",
            replica.admin_url or f"http://{config.admin_listen}",
        ))
        self.revoked = RevokedSerials()  # followed from the cloud's etcd with [shared]
        self.shared: SharedState | None = None
        self.shared_destinations: EtcdDestinationStore | None = None
        if store is not None:
            if config.destinations_listen is not None and fernet is not None:
                self.shared_destinations = EtcdDestinationStore(store, fernet)
            self.shared = SharedState(
                store, registry=self.registry, directory=self.replicas, entry=self._replica_entry,
                lease_ttl=replica.lease_ttl,
                configured_tokens={
                    "proxy": {s.id: s.token_sha256 for s in config.subaccounts},
                    "destination_admin": {s.id: s.destination_admin_sha256 for s in config.subaccounts},
                },
                authenticators={"proxy": self.authenticator, "destination_admin": self.admin_authenticator},
                destinations=self.shared_destinations,
                settings={s.id: SubaccountSettings(s.locations, s.clusters, s.max_streams_per_token)
                          for s in config.subaccounts},
                revoked=self.revoked,
                oauth=oauth_sync,
            )
        self.connections = ConnectionCounter(config.connection_limits, gauge=metrics.PROXY_CONNECTIONS)  # both proxies'
        # the other replicas' masters, for readiness: from the shared state's replica records
        self.peer_masters: PeerMasters = (
            SharedPeers(self.shared.replicas, self.replicas) if self.shared is not None else NoPeers()
        )
        self.endpoint = TunnelEndpoint(
            self.registry,
            cert=config.tunnel_cert,
            key=config.tunnel_key,
            subaccount_cas={s.id: s.ca for s in config.subaccounts},
            settings=TunnelSettings(ping_interval=config.ping_interval, ping_timeout=config.ping_timeout,
                                    hello_timeout=config.hello_timeout),
            endpoint_settings=EndpointSettings(tls_handshake_timeout=config.tls_handshake_timeout,
                                               upgrade_timeout=config.upgrade_timeout),
            replicas=self.replicas,
            revoked=self.revoked,
            subaccount_ca_keys={s.id: s.ca_key for s in config.subaccounts if s.ca_key is not None},
        )
        self.endpoint.tls.on_reload = lambda _: self._export_expiry()
        self.ports: CloudPorts | None = None
        self.drain = Drain()
        metrics.CLOUD_REPLICA.info({"id": self.replicas.me.id})
        metrics.CLOUD_READY.set_function(lambda: float(self.readiness().ready))
        metrics.CLOUD_DRAIN_CONNECTIONS.set_function(lambda: self.drain.statistics().connections)

    async def shutdown(self) -> None:
        """Leave the rotation without failing a request, then GOAWAY to the nodes (see
        `connector.cloud.drain` for the phases); returns when the replica may exit."""
        settings = self.config.drain
        self.drain.begin()
        log.info("draining: not ready; accepting for %g s more while the load balancer notices",
                 settings.notice_seconds)
        await trio.sleep(settings.notice_seconds)  # the load balancer's time to notice, not a poll
        self.drain.stop_accepting()
        log.info("draining: listeners closed; waiting up to %g s for %d application connection(s)",
                 settings.drain_seconds, self.drain.statistics().connections)
        with trio.move_on_after(settings.drain_seconds):
            await self.drain.wait_connections(0)
        left = self.drain.statistics().connections
        if left:
            log.warning("draining: %d application connection(s) still open after %g s: closing them",
                        left, settings.drain_seconds)
        await self.endpoint.go_away("replica shutting down")
        log.info("drained: exiting")

    def _export_expiry(self) -> None:
        config = self.config
        metrics.CERT_EXPIRY.labels("tunnel-server").set(pki.expiry_timestamp(config.tunnel_cert))
        for sub in config.subaccounts:
            metrics.CERT_EXPIRY.labels(f"ca-{sub.id}").set(pki.expiry_timestamp(sub.ca))

    def reload_certificates(self) -> None:
        """SIGHUP: read the tunnel endpoint's certificate, key and subaccount CAs again (they are
        also read again when their files change); unusable files are logged and the old ones kept."""
        self.endpoint.reload_certificates()

    async def run(self, *, task_status: trio.TaskStatus[CloudPorts] = trio.TASK_STATUS_IGNORED) -> None:
        self._export_expiry()
        try:
            await self._serve(task_status)
        finally:
            self.audit.close()

    async def _serve(self, task_status: trio.TaskStatus[CloudPorts]) -> None:
        config = self.config
        async with trio.open_nursery() as nursery:
            await nursery.start(self.registry.run)
            for source in {id(t.keys): t.keys for s in config.subaccounts for t in s.trusted_issuers}.values():
                if isinstance(source, RemoteJwks):  # an identity provider's jwks_uri: fetched now and kept fresh
                    await nursery.start(source.run)
            tunnel = await nursery.start(self.endpoint.run, config.tunnel_listen.host, config.tunnel_listen.port)
            http_proxy = HttpProxy(self.registry, self.authenticator, settings=proxy_settings(config), audit=self.audit,
                                   drain=self.drain, principals=self.principals)
            http = await nursery.start(http_proxy.run, config.http_listen.host, config.http_listen.port)
            socks_proxy = Socks5Proxy(self.registry, self.authenticator, audit=self.audit, drain=self.drain)
            http_proxy.connections = socks_proxy.connections = self.connections
            socks = await nursery.start(socks_proxy.run, config.socks5_listen.host, config.socks5_listen.port)
            destinations = None
            if config.destinations_listen is not None and config.destinations_store is not None:
                store = config.destinations_store
                service = DestinationService(
                    self.authenticator,
                    self.admin_authenticator,
                    settings=DestinationSettings(
                        path=store, key_path=store.with_name(store.name + ".key"), limits=config.destination_limits,
                        tokens=config.destination_tokens,
                    ),
                    store=self.shared_destinations,
                    drain=self.drain,
                    jwt=self.oauth.validator if self.oauth is not None else None,
                )
                destinations = await nursery.start(
                    service.run, config.destinations_listen.host, config.destinations_listen.port
                )
            oauth = None
            if self.oauth is not None and config.oauth is not None:
                # its refusals and failed guesses count with the proxies'
                self.oauth.audit, self.oauth.throttle = self.audit, self.authenticator.throttle
                oauth = await nursery.start(self.oauth.run, config.oauth.listen.host, config.oauth.listen.port)
            admin = await nursery.start(
                AdminServer(self._admin_routes()).run, config.admin_listen.host, config.admin_listen.port
            )
            self.ports = CloudPorts(tunnel, http, socks, admin, destinations, oauth)
            self._announce_bound_ports()
            if self.shared is not None:
                await nursery.start(self.shared.run)
            log.info("cloud side up (replica %s): %s", self.replicas.me.id, self.ports)
            task_status.started(self.ports)

    def _announce_bound_ports(self) -> None:
        """The default URLs of this replica name the ports actually bound (port 0 in tests)."""
        assert self.ports is not None
        replica, me = self.config.replica, self.replicas.me
        tunnel_url = replica.tunnel_url if replica is not None else None
        admin_url = replica.admin_url if replica is not None else None

        def authority(host: str, port: int) -> str:
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

        self.replicas.me = Replica(
            me.id,
            tunnel_url or f"wss://{authority(self.config.tunnel_listen.host, self.ports.tunnel)}/tunnel",
            admin_url or f"http://{authority(self.config.admin_listen.host, self.ports.admin)}",
        )

    def readiness(self) -> Readiness:
        shared = self.shared
        return cloud_readiness(attrs.evolve(
            cloud_state(self.registry.snapshot(), self.peer_masters),
            draining=self.drain.draining,
            shared=shared is not None,
            fence_loaded=self.registry.fence_loaded,
            shared_reachable=shared.reach.reachable if shared is not None else True,
            writes_pending=shared.fence.pending if shared is not None else 0,
        ))

    def _replica_entry(self) -> dict[str, Any]:
        """This replica in the replica set (`connector status` shows it)."""
        ready = self.readiness()
        return {**self.replicas.me.to_json(), "ready": ready.ready, "reason": ready.reason,
                "locations": self.registry.summary()}

    def replica_set(self) -> list[dict[str, Any]]:
        """Every replica as the cloud's etcd has it (this one live); without [shared], this one."""
        replicas = dict(self.shared.replicas.replicas) if self.shared is not None else {}
        replicas[self.replicas.me.id] = self._replica_entry()
        return [replicas[rid] for rid in sorted(replicas)]

    def _admin_routes(self) -> dict[tuple[str, str], Any]:
        async def locations(request: AdminRequest) -> Reply:
            return Reply.json(200, {"locations": self.registry.snapshot(), "refused_connections": self.endpoint.refused,
                                    "replica": self.replicas.me.id, "replicas": self.replica_set()})

        async def readyz(request: AdminRequest) -> Reply:
            result = self.readiness()
            return Reply.json(200 if result.ready else 503, {"ready": result.ready, "reason": result.reason,
                                                             "replica": self.replicas.me.id})

        return {("GET", "/status"): locations, ("GET", "/readyz"): readyz}
