"""`connector cloud`: the cloud side as one process: tunnel endpoint, proxies, destinations, admin.

Each service is a `run(host, port, *, task_status)` started in one nursery; `CloudServer.run`
reports the bound ports (so tests and the demo can use port 0). `CloudServer.shutdown` is the
graceful end of a replica (SIGTERM): not ready, listeners closed, requests finished, GOAWAY to the
nodes (see `connector.cloud.drain`).
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from connector import metrics, pki
from connector.admin import AdminRequest, AdminServer, Reply
from connector.cloud.admission import StreamAdmission
from connector.cloud.audit import CloudAudit
from connector.cloud.auth import Authenticator
from connector.cloud.clients import AuthThrottle
from connector.cloud.destinations import DestinationService, DestinationSettings
from connector.cloud.drain import Drain
from connector.cloud.endpoint import EndpointSettings, TunnelEndpoint
from connector.cloud.proxy import HttpProxy, ProxySettings
from connector.cloud.registry import Registry
from connector.cloud.socks5 import Socks5Proxy
from connector.config import CloudConfig
from connector.datarate import MinDataRate
from connector.readiness import CloudState, Readiness, cloud_readiness
from connector.tunnel.session import TunnelSettings

log = logging.getLogger(__name__)


@attrs.frozen
class CloudPorts:
    tunnel: int
    http_proxy: int
    socks5_proxy: int
    admin: int
    destinations: int | None


def proxy_settings(config: CloudConfig) -> ProxySettings:
    """The HTTP proxy's limits from [proxy]."""
    return ProxySettings(
        request_head_timeout=config.request_head_timeout,
        idle_timeout=config.idle_timeout,
        stream_idle_timeout=config.stream_idle_timeout,
        request_body_rate=MinDataRate(config.min_request_body_rate, config.request_body_grace),
        response_write_timeout=config.response_write_timeout,
    )


class CloudServer:
    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        self.registry = Registry(
            hold_seconds=config.hold_seconds,
            hold_max=config.hold_max,
            known_locations=[(s.id, loc) for s in config.subaccounts for loc in s.locations],
            pinned_clusters={(s.id, loc): cluster for s in config.subaccounts for loc, cluster in s.clusters.items()},
            state_file=config.state_file,
            stream_wait_seconds=config.stream_wait_seconds,
            admission=StreamAdmission(config.stream_limits),
        )
        self.authenticator = Authenticator(
            {s.id: s.token_sha256 for s in config.subaccounts}, throttle=AuthThrottle(config.auth_throttle)
        )
        self.audit = CloudAudit.open(str(config.audit_log) if config.audit_log else None)
        self.endpoint = TunnelEndpoint(
            self.registry,
            cert=config.tunnel_cert,
            key=config.tunnel_key,
            subaccount_cas={s.id: s.ca for s in config.subaccounts},
            settings=TunnelSettings(ping_interval=config.ping_interval, ping_timeout=config.ping_timeout,
                                    hello_timeout=config.hello_timeout),
            endpoint_settings=EndpointSettings(tls_handshake_timeout=config.tls_handshake_timeout,
                                               upgrade_timeout=config.upgrade_timeout),
        )
        self.ports: CloudPorts | None = None
        self.drain = Drain()
        metrics.CLOUD_REPLICA.info({"id": config.replica_id})
        metrics.CLOUD_READY.set_function(lambda: float(self.readiness().ready))
        metrics.CLOUD_DRAIN_CONNECTIONS.set_function(lambda: self.drain.statistics().connections)

    def readiness(self) -> Readiness:
        return cloud_readiness(CloudState(draining=self.drain.draining))

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

    async def run(self, *, task_status: trio.TaskStatus[CloudPorts] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        metrics.CERT_EXPIRY.labels("tunnel-server").set(pki.expiry_timestamp(config.tunnel_cert))
        for sub in config.subaccounts:
            metrics.CERT_EXPIRY.labels(f"ca-{sub.id}").set(pki.expiry_timestamp(sub.ca))
        try:
            await self._serve(task_status)
        finally:
            self.audit.close()

    async def _serve(self, task_status: trio.TaskStatus[CloudPorts]) -> None:
        config = self.config
        async with trio.open_nursery() as nursery:
            await nursery.start(self.registry.run)
            tunnel = await nursery.start(self.endpoint.run, config.tunnel_listen.host, config.tunnel_listen.port)
            http_proxy = HttpProxy(self.registry, self.authenticator, settings=proxy_settings(config), audit=self.audit,
                                   drain=self.drain)
            http = await nursery.start(http_proxy.run, config.http_listen.host, config.http_listen.port)
            socks_proxy = Socks5Proxy(self.registry, self.authenticator, audit=self.audit, drain=self.drain)
            socks = await nursery.start(socks_proxy.run, config.socks5_listen.host, config.socks5_listen.port)
            destinations = None
            if config.destinations_listen is not None and config.destinations_store is not None:
                store = config.destinations_store
                service = DestinationService(
                    self.authenticator,
                    Authenticator({s.id: s.destination_admin_sha256 for s in config.subaccounts}),
                    settings=DestinationSettings(
                        path=store, key_path=store.with_name(store.name + ".key"), limits=config.destination_limits
                    ),
                    drain=self.drain,
                )
                destinations = await nursery.start(
                    service.run, config.destinations_listen.host, config.destinations_listen.port
                )
            admin = await nursery.start(
                AdminServer(self._admin_routes()).run, config.admin_listen.host, config.admin_listen.port
            )
            self.ports = CloudPorts(tunnel, http, socks, admin, destinations)
            log.info("cloud side up: %s", self.ports)
            task_status.started(self.ports)

    def _admin_routes(self) -> dict[tuple[str, str], Any]:
        async def locations(request: AdminRequest) -> Reply:
            return Reply.json(200, {"locations": self.registry.snapshot(), "refused_connections": self.endpoint.refused})

        async def readyz(request: AdminRequest) -> Reply:
            result = self.readiness()
            return Reply.json(200 if result.ready else 503, {"ready": result.ready, "reason": result.reason,
                                                             "replica": self.config.replica_id})

        return {("GET", "/status"): locations, ("GET", "/readyz"): readyz}
