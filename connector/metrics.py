"""Every Prometheus metric the connector exports, in one place under the `connector_` namespace.

Label sets are bounded: mapping names come from configuration, reasons and protocols from enums;
never a path, a client address or a stream id. Served from the application's own trio HTTP
handler (see `connector.admin`), not prometheus-client's threaded server.
"""

from __future__ import annotations

import functools
import platform
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info

import connector

NS = "connector"

# Request durations through the tunnel: loopback is sub-millisecond, the internal host may be slow.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FAILOVER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30)

BUILD_INFO = Info(NS + "_build", "Version of the connector and the Python it runs on")
BUILD_INFO.info({"version": connector.__version__, "python": platform.python_version()})

# --- cluster role (node) --------------------------------------------------------------------
NODE_ROLE = Gauge(
    NS + "_node_role",
    "1 for the role this node is in now (master, shadow, starting), 0 for the others",
    ["cluster", "location", "node", "role"],
)
NODE_EPOCH = Gauge(
    NS + "_node_epoch", "Fencing epoch this node holds as master; 0 when not master",
    ["cluster", "location", "node"],
)
LEADER_CHANGES = Counter(
    NS + "_leader_changes_total", "Times this node saw the master of its cluster change",
    ["cluster", "location"],
)
ETCD_OPERATION_SECONDS = Histogram(
    NS + "_etcd_operation_duration_seconds", "Latency of etcd operations", ["operation"],
    buckets=LATENCY_BUCKETS,
)
ETCD_ERRORS = Counter(NS + "_etcd_errors_total", "etcd operations that failed", ["operation"])
ETCD_UP = Gauge(NS + "_etcd_up", "1 if the last etcd operation of this node succeeded")
LEASE_RENEWAL_FAILURES = Counter(
    NS + "_lease_renewal_failures_total", "Lease keep-alives that failed or found the lease gone"
)
CERT_EXPIRY = Gauge(
    NS + "_certificate_expiry_timestamp_seconds", "notAfter of a certificate this process uses",
    ["certificate"],
)
CERT_RELOAD_FAILURES = Counter(
    NS + "_certificate_reload_failures_total",
    "Certificate, key or CA files that changed but could not be loaded (the old ones stay in use)", ["what"],
)

# --- tunnel (both ends) --------------------------------------------------------------------
TUNNEL_CONNECTED = Gauge(
    NS + "_tunnel_connected", "1 while this node's tunnel to the cloud is up (any role)",
    ["location", "node"],
)
TUNNELS_REFUSED = Counter(
    NS + "_tunnels_refused_total", "Tunnel connections the cloud refused for their certificate, by reason",
    ["reason"],
)
TUNNEL_RECONNECTS = Counter(
    NS + "_tunnel_reconnects_total", "Tunnel connection attempts after the first", ["location", "node"]
)
TUNNEL_PING_RTT = Histogram(
    NS + "_tunnel_ping_rtt_seconds", "Round-trip time of tunnel keepalive pings", ["side"],
    buckets=LATENCY_BUCKETS,
)
STREAMS_OPEN = Gauge(NS + "_streams_open", "Streams currently open on tunnels", ["side"])
STREAMS_OPENED = Counter(
    NS + "_streams_opened_total", "Streams opened, by protocol", ["side", "protocol"]
)

# --- traffic and access control (node) ---------------------------------------------------------
BYTES = Counter(
    NS + "_bytes_total", "Payload bytes carried per mapping; direction is in (to the internal host) or out",
    ["mapping", "direction"],
)
REQUEST_SECONDS = Histogram(
    NS + "_request_duration_seconds", "Duration of requests and TCP sessions per mapping",
    ["mapping", "protocol"], buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter(
    NS + "_requests_total", "Requests and TCP sessions handled, by decision", ["mapping", "decision"]
)
DENIALS = Counter(NS + "_denials_total", "Requests refused by the allow-list, by reason", ["reason"])
BACKEND_ERRORS = Counter(
    NS + "_internal_host_errors_total", "Errors reaching the internal host, by reason", ["mapping", "reason"]
)
AUDIT_WRITE_ERRORS = Counter(NS + "_audit_write_errors_total", "Audit lines that could not be written")

# --- cloud side ------------------------------------------------------------------------------
CLOUD_TUNNELS = Gauge(
    NS + "_cloud_tunnels", "Tunnels connected to the cloud endpoint, by role (master, standby)",
    ["subaccount", "location", "role"],
)
CLOUD_MASTER_EPOCH = Gauge(
    NS + "_cloud_master_epoch", "Highest fencing epoch the cloud has accepted", ["subaccount", "location"]
)
CLOUD_REGISTRATIONS = Counter(
    NS + "_cloud_registrations_total", "Master registrations and tunnels, by result (accepted, stale_epoch, wrong_cluster)",
    ["subaccount", "location", "result"],
)
CLOUD_NO_MASTER_SECONDS = Counter(
    NS + "_cloud_no_master_seconds_total", "Seconds a known location spent with no master tunnel",
    ["subaccount", "location"],
)
CLOUD_STATE_PERSISTED = Gauge(
    NS + "_cloud_state_persisted",
    "1 while state_file holds the highest epochs the cloud knows, 0 after a write failed (the fence "
    "still works from memory, but a restart would forget epochs). Only a cloud with a state_file has it.",
    ["state_file"],
)
CLOUD_SHARED_LOADED = Gauge(
    NS + "_cloud_shared_fence_loaded",
    "1 once this replica read the shared fence from the cloud's etcd ([shared]; until then it "
    "admits no tunnel and routes nothing); 1 without [shared]. `fence` is shared or local: a cloud has "
    "it, a node does not (an unlabelled gauge would show a node's 0)",
    ["fence"],
)
CLOUD_SHARED_WRITES_PENDING = Gauge(
    NS + "_cloud_shared_writes_pending",
    "Locations whose fence advance, accepted by this replica, is not yet written to the cloud's etcd "
    "(only a cloud with [shared] has it)",
    ["fence"],
)
CLOUD_HAS_MASTER = Gauge(
    NS + "_cloud_location_has_master", "1 while a known location has a master tunnel", ["subaccount", "location"]
)
PROXY_REQUESTS = Counter(
    NS + "_proxy_requests_total", "Requests and connections through the connectivity proxy, by status",
    ["proxy", "status"],
)
PROXY_REQUEST_SECONDS = Histogram(
    NS + "_proxy_request_duration_seconds", "Duration of proxied requests as the application sees it",
    ["proxy"], buckets=LATENCY_BUCKETS,
)
HELD_REQUESTS = Gauge(NS + "_held_requests_waiting", "Requests waiting for a master right now")
HELD_TOTAL = Counter(
    NS + "_held_requests_total", "Requests held while no master was connected, by outcome (released, timeout, overflow)",
    ["outcome"],
)
HELD_SECONDS = Histogram(
    NS + "_held_request_duration_seconds", "How long requests were held waiting for a master",
    buckets=FAILOVER_BUCKETS,
)
PROXY_STREAM_WAITING = Gauge(
    NS + "_proxy_stream_waiting",
    "Requests waiting for a free stream on their master's tunnel (all its max_streams in use)",
)
PROXY_STREAMS_ADMITTED = Gauge(
    NS + "_proxy_streams_admitted",
    "Tunnel streams held or awaited by applications, by subaccount (what per-token limits count)",
    ["subaccount"],
)
PROXY_STREAM_HOLDERS = Gauge(
    NS + "_proxy_stream_holders", "Distinct tokens and client addresses holding streams, by kind (token, client_address)",
    ["kind"],
)
PROXY_STREAM_REFUSALS = Counter(
    NS + "_proxy_stream_refusals_total",
    "Requests given no stream, by reason (stream_limit_token, stream_limit_client, tunnel_busy, client_gone)",
    ["subaccount", "reason"],
)
PROXY_AUTH_FAILURES = Counter(
    NS + "_proxy_auth_failures_total", "Application credentials the connectivity proxies refused"
)
PROXY_AUTH_DELAYED = Counter(
    NS + "_proxy_auth_failures_delayed_total",
    "Refusals answered late because their client address failed too often (AuthThrottle)",
)
PROXY_CONNECTIONS = Gauge(
    NS + "_proxy_connections", "Application connections the connectivity proxies hold (HTTP and SOCKS5)"
)
PROXY_CONNECTIONS_REFUSED = Counter(
    NS + "_proxy_connections_refused_total",
    "Application connections closed at once: a connection limit was reached", ["reason"],
)
TRUSTED_ISSUER_KEY_FETCHES = Counter(
    NS + "_trusted_issuer_key_fetches_total",
    "Fetches of a trusted identity provider's JWKS (jwks_uri), by URL and result (ok, failed: the last keys kept)",
    ["uri", "result"],
)
PROXY_AUTH_FAILING_ADDRESSES = Gauge(
    NS + "_proxy_auth_failing_addresses", "Client addresses with remembered authentication failures"
)

# --- cloud replicas (issue 10) ------------------------------------------------------------------
# Every cloud series also carries the scrape's `replica` target label (docs/metrics.md); the info
# metric's label is `id`, not `replica`, so that it never collides with that target label.
CLOUD_REPLICA = Info(NS + "_cloud_replica", "This cloud replica's id ([replica] id), as label `id`")
CLOUD_READY = Gauge(
    NS + "_cloud_ready", "1 while this cloud replica's /readyz says ready, 0 while not (draining, ...)"
)
CLOUD_DRAIN_CONNECTIONS = Gauge(
    NS + "_cloud_drain_connections",
    "Application connections (HTTP proxy, SOCKS5, destinations) this replica serves; a draining replica exits at 0",
)
ORIGIN_IDLE = Gauge(
    NS + "_origin_pool_idle_connections", "Idle kept-alive connections to internal hosts, per mapping", ["mapping"]
)
ORIGIN_CONNECTIONS = Counter(
    NS + "_origin_connections_total",
    "Connections to internal hosts taken for HTTP requests: new, reused from the pool, or given up "
    "(expired idle, closed by the internal host, pool full)",
    ["mapping", "outcome"],
)


@functools.lru_cache(maxsize=4096)
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: a labels() call takes a lock and builds a key,
    which the per-request paths paid several times per request. (No child here is ever removed.)"""
    return metric.labels(*labels)
