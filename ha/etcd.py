"""The Store over a real etcd cluster, through the synchronous ``etcd3`` client (cslab-etcd3).

Theory of operation
-------------------
The client is synchronous gRPC, so every call runs in a worker thread through
``trio.to_thread.run_sync(fn, abandon_on_cancel=True, limiter=<this store's limiter>)`` under
``trio.fail_after``: the trio loop never blocks, and a frozen etcd (SIGSTOP) yields
``StoreUnavailable`` within the deadline instead of a hang. An abandoned call keeps its limiter
slot until its thread returns, which the client's own gRPC ``timeout`` bounds; the separate
limiter keeps that from starving other ``to_thread`` users.

Endpoints are tried in turn: the client marks an endpoint that failed (UNAVAILABLE,
DEADLINE_EXCEEDED, INTERNAL) and moves to the next. Its default is to skip a failed endpoint for
300 s, which would keep a restarted etcd unused for five minutes: we set ``time_retry`` to
``EtcdSettings.time_retry`` (0.5 s). Reads are retried on the next endpoint within one call; a
write is retried only when the connection failed (UNAVAILABLE: the request was not delivered),
never after a timeout (it may have been applied).

Every gRPC or client failure becomes ``StoreUnavailable``; a lease that is gone (refresh answers
TTL 0, or NOT_FOUND when binding a key) becomes ``LeaseExpired``. Metrics:
ETCD_OPERATION_SECONDS{operation}, ETCD_ERRORS{operation}, ETCD_UP.

Watches: the client runs one watch thread per gRPC stream and calls back from it. The callback
hands each response to trio with ``trio.from_thread.run_sync(..., trio_token=token)`` running a
non-blocking ``send_nowait`` into a bounded memory channel, so the watch thread only waits for
the trio loop to take the item, never for the consumer. When the stream dies (etcd restarted),
or the channel overflows, the watch is re-created from the last delivered revision + 1 and etcd
replays whatever happened meanwhile: nothing is lost, nothing is delivered twice.

With user/password authentication, a watch is created with the client's token, and etcd answers
a watch created with a token it no longer knows (it restarted) "created and canceled" at once,
which the client takes for success: the watch would never deliver. So each creation is followed
by a read on the same client; a stale token fails that read (UNAUTHENTICATED), the watch is
cancelled, the store authenticates again and creates it anew.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import attrs
import etcd3
import etcd3.etcdrpc as etcdrpc
import etcd3.events
import etcd3.exceptions as etcd_exc
import etcd3.transactions as tx
import grpc
import trio
from etcd3 import utils as etcd_utils

from connector import metrics
from ha.store import (
    LEADER_KEY,
    MEMBERS_PREFIX,
    ClusterSnapshot,
    KeyValue,
    LeaseExpired,
    RangeSnapshot,
    RevisionCompacted,
    Store,
    StoreUnavailable,
    Watch,
    WatchEvent,
    check_key,
    check_node,
    encode_json,
    leader_from_kv,
    member_from_kv,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

WATCH_BUFFER = 256
WATCH_RETRY_MIN = 0.1
WATCH_RETRY_MAX = 1.0
# A dead connection under a watch is noticed by keepalive pings; etcd refuses pings more often
# than every 5 s (GOAWAY "too_many_pings"), so ping every 10 s and give up after 5 s more.
# Reconnect within half a second of etcd coming back: gRPC's default backoff (1 s x 1.6^n, up
# to 120 s) kept a master disconnected for seconds after an outage, long enough for its lease
# (given a fresh ttl by the restarted etcd) to expire and cause a needless failover.
GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def _split_endpoint(endpoint: str) -> tuple[str | None, str, int]:
    scheme: str | None = None
    rest = endpoint.strip()
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        if scheme not in ("http", "https"):
            raise ValueError(f"etcd endpoint {endpoint!r}: scheme must be http or https")
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {endpoint!r}: expected [http(s)://]host:port")
    return scheme, host.strip("[]"), int(port)


@attrs.frozen
class EtcdSettings:
    """How to reach etcd. An endpoint without a scheme uses TLS when ``ca_file`` is set.

    ``timeout`` is the gRPC deadline of every call (a frozen etcd answers nothing);
    ``time_retry`` how long a failed endpoint is skipped before it is tried again."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    timeout: float = 1.0
    time_retry: float = 0.5

    def __attrs_post_init__(self) -> None:
        if isinstance(self.endpoints, str) or not self.endpoints:
            raise ValueError("etcd endpoints must be a non-empty list of [http(s)://]host:port")
        schemes = set()
        for endpoint in self.endpoints:
            scheme, _, _ = _split_endpoint(endpoint)
            schemes.add(scheme or ("https" if self.ca_file else "http"))
        if len(schemes) > 1:
            raise ValueError("etcd endpoints mix http and https: use one scheme for all")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("etcd client TLS needs both cert_file and key_file (or neither)")
        if (self.user is None) != (self.password is None):
            raise ValueError("etcd authentication needs both user and password (or neither)")
        if self.user is not None and schemes != {"https"}:
            # gRPC refuses to send call credentials on a plain channel, and a password must not
            # cross the network in clear text anyway
            raise ValueError("etcd user/password authentication needs https:// endpoints")
        if not self.timeout > 0 or not self.time_retry > 0:
            raise ValueError("etcd timeout and time_retry must be > 0")

    @property
    def secure(self) -> bool:
        scheme, _, _ = _split_endpoint(self.endpoints[0])
        return (scheme or ("https" if self.ca_file else "http")) == "https"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> EtcdSettings:
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown etcd setting(s) {unknown}; known: {sorted(known)}")
        values = dict(raw)
        if "endpoints" in values:
            endpoints = values["endpoints"]
            values["endpoints"] = (endpoints,) if isinstance(endpoints, str) else tuple(endpoints)
        return cls(**values)


class _Unauthenticated(Exception):
    pass


class EtcdStore(Store):
    """Store over etcd; keys live under ``/<cluster>/``."""

    def __init__(self, cluster: str, settings: EtcdSettings | None = None,
                 *, concurrency: int = 8) -> None:
        check_node(cluster)
        self.cluster = cluster
        self.settings = settings if settings is not None else EtcdSettings()
        self._root = f"/{cluster}/"
        self._limiter = trio.CapacityLimiter(concurrency)
        self._client: etcd3.MultiEndpointEtcd3Client | None = None
        # with retries over every endpoint, one call may take a deadline per endpoint
        self.call_deadline = self.settings.timeout * len(self.settings.endpoints) + 0.5

    # --- plumbing -------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        return self._root + key

    def _rel(self, key: bytes) -> str:
        return key.decode()[len(self._root):]

    def _make_client(self) -> etcd3.MultiEndpointEtcd3Client:
        s = self.settings
        creds = None
        if s.secure:
            def read(path: str | None) -> bytes | None:
                if path is None:
                    return None
                with open(path, "rb") as f:
                    return f.read()
            # ca None = the system's trust store: verification is never switched off
            creds = grpc.ssl_channel_credentials(read(s.ca_file), read(s.key_file), read(s.cert_file))
        endpoints = []
        for endpoint in s.endpoints:
            _, host, port = _split_endpoint(endpoint)
            endpoints.append(etcd3.Endpoint(host, port, secure=s.secure, creds=creds,
                                            time_retry=s.time_retry, opts=GRPC_OPTIONS))
        return etcd3.MultiEndpointEtcd3Client(endpoints=endpoints, timeout=s.timeout,
                                              user=s.user, password=s.password, failover=True)

    def _client_sync(self) -> etcd3.MultiEndpointEtcd3Client:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _run_blocking(self, fn: Callable[[Any], T], idempotent: bool) -> T:
        """In a worker thread: run fn(client), trying the endpoints in turn."""
        attempts = len(self.settings.endpoints) + 1  # +1: one re-authentication
        last: Exception | None = None
        for _ in range(attempts):
            try:
                return fn(self._client_sync())
            except (LeaseExpired, StoreUnavailable, RevisionCompacted):
                raise
            except etcd_exc.ConnectionFailedError as exc:
                last = exc  # not delivered: safe to retry on the next endpoint
            except (etcd_exc.ConnectionTimeoutError, etcd_exc.InternalServerError) as exc:
                last = exc
                if not idempotent:
                    break
            except etcd_exc.NoServerAvailableError as exc:
                last = last or exc  # the failure that marked the endpoints says more
                break
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                details = exc.details() if hasattr(exc, "details") else str(exc)
                if code == grpc.StatusCode.UNAUTHENTICATED or "auth token" in (details or ""):
                    self._client = None  # token expired: authenticate again
                    last = exc
                    continue
                raise StoreUnavailable(f"etcd error {code}: {details}") from exc
            except etcd_exc.Etcd3Exception as exc:
                last = exc
                break
            except ValueError as exc:  # e.g. unreadable TLS material
                raise StoreUnavailable(f"etcd client: {exc}") from exc
        raise StoreUnavailable(
            f"etcd unreachable at {', '.join(self.settings.endpoints)}: {self._describe(last)}")

    def _describe(self, exc: Exception | None) -> str:
        """A failure in an operator's words (the client's exceptions mostly carry no message)."""
        if isinstance(exc, etcd_exc.ConnectionFailedError):
            return "connection refused or lost (is etcd running there?)"
        if isinstance(exc, etcd_exc.ConnectionTimeoutError):
            return f"no answer within {self.settings.timeout:g} s"
        if isinstance(exc, etcd_exc.NoServerAvailableError):
            return (f"every endpoint failed within the last {self.settings.time_retry:g} s "
                    "(is etcd running there?)")
        if isinstance(exc, grpc.RpcError):
            return str(exc.details()) if hasattr(exc, "details") else str(exc)
        return str(exc) or type(exc).__name__ if exc is not None else "no endpoint"

    async def _call(self, operation: str, fn: Callable[[Any], T], *, idempotent: bool = True) -> T:
        start = trio.current_time()
        try:
            with trio.fail_after(self.call_deadline):
                result = await trio.to_thread.run_sync(
                    functools.partial(self._run_blocking, fn, idempotent),
                    abandon_on_cancel=True, limiter=self._limiter,
                )
        except trio.TooSlowError:
            metrics.ETCD_ERRORS.labels(operation).inc()
            metrics.ETCD_UP.set(0)
            raise StoreUnavailable(
                f"etcd {operation}: no answer within {self.call_deadline:g} s") from None
        except StoreUnavailable:
            metrics.ETCD_ERRORS.labels(operation).inc()
            metrics.ETCD_UP.set(0)
            raise
        metrics.ETCD_UP.set(1)
        metrics.ETCD_OPERATION_SECONDS.labels(operation).observe(trio.current_time() - start)
        return result

    @staticmethod
    def _txn(client: Any, compare: list[Any], success: list[Any],
             failure: list[Any] | None = None) -> Any:
        """A transaction returning the raw TxnResponse (header revision, kvs with metadata)."""
        request = etcdrpc.TxnRequest(
            compare=[c.build_message() for c in compare],
            success=client._ops_to_requests(success),
            failure=client._ops_to_requests(failure or []),
        )
        try:
            return client.kvstub.Txn(request, client.timeout, credentials=client.call_credentials,
                                     metadata=client.metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND and "lease" in (exc.details() or ""):
                raise LeaseExpired(exc.details()) from exc
            client._manage_grpc_errors(exc)  # marks the endpoint failed; raises a client error
            raise

    def _kv(self, kv: Any) -> KeyValue:
        return KeyValue(self._rel(kv.key), bytes(kv.value), kv.create_revision, kv.mod_revision,
                        kv.lease)

    # --- leases -----------------------------------------------------------------------------
    async def grant_lease(self, ttl: int) -> int:
        if int(ttl) != ttl or ttl < 1:
            raise ValueError(f"lease ttl must be a whole number of seconds >= 1, got {ttl!r}")
        lease = await self._call("grant_lease", lambda c: c.lease(int(ttl)))
        return int(lease.id)

    async def refresh_lease(self, lease: int) -> float:
        def refresh(client: Any) -> float:
            responses = list(client.refresh_lease(lease))
            ttl = responses[0].TTL if responses else 0
            if ttl <= 0:  # etcd answers TTL 0, not an error, for a lease that is gone
                raise LeaseExpired(f"lease {lease:x} is gone")
            return float(ttl)

        return await self._call("refresh_lease", refresh)

    async def revoke_lease(self, lease: int) -> None:
        def revoke(client: Any) -> None:
            try:
                client.revoke_lease(lease)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise

        await self._call("revoke_lease", revoke)

    # --- election -----------------------------------------------------------------------------
    async def get_cluster(self) -> ClusterSnapshot:
        leader_key = self._full(LEADER_KEY)
        members = self._full(MEMBERS_PREFIX)
        members_end = etcd_utils.prefix_range_end(members.encode())

        def read(client: Any) -> ClusterSnapshot:
            resp = self._txn(client, [], [tx.Get(leader_key), tx.Get(members, members_end)])
            leader_kvs = resp.responses[0].response_range.kvs
            member_kvs = resp.responses[1].response_range.kvs
            leader = leader_from_kv(self._kv(leader_kvs[0])) if leader_kvs else None
            found = {m.node: m for m in (member_from_kv(self._kv(kv)) for kv in member_kvs)}
            return ClusterSnapshot(leader=leader, members=found, revision=resp.header.revision)

        return await self._call("get_cluster", read)

    async def try_acquire_leader(self, node: str, lease: int, data: Mapping[str, Any]) -> int | None:
        check_node(node)
        key = self._full(LEADER_KEY)
        value = encode_json({**data, "node": node, "lease": lease})

        def acquire(client: Any) -> int | None:
            resp = self._txn(client, [tx.Create(key) == 0],
                             [tx.Put(key, value, lease=lease), tx.Get(key)])
            if not resp.succeeded:
                return None
            return int(resp.responses[1].response_range.kvs[0].create_revision)

        return await self._call("try_acquire_leader", acquire, idempotent=False)

    async def resign(self, node: str, epoch: int) -> bool:
        key = self._full(LEADER_KEY)

        def resign(client: Any) -> bool:
            return bool(self._txn(client, [tx.Create(key) == epoch], [tx.Delete(key)]).succeeded)

        return await self._call("resign", resign, idempotent=False)

    async def depose(self, epoch: int) -> bool:
        key = self._full(LEADER_KEY)

        def depose(client: Any) -> bool:
            resp = self._txn(client, [tx.Create(key) == epoch], [tx.Get(key), tx.Delete(key)])
            if not resp.succeeded:
                return False
            kvs = resp.responses[0].response_range.kvs
            if kvs and kvs[0].lease:
                try:
                    client.revoke_lease(kvs[0].lease)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
            return True

        return await self._call("depose", depose, idempotent=False)

    async def put_member(self, node: str, data: Mapping[str, Any], lease: int) -> int:
        check_node(node)
        key = self._full(MEMBERS_PREFIX + node)
        value = encode_json(data)

        def put(client: Any) -> int:
            return int(self._txn(client, [], [tx.Put(key, value, lease=lease)]).header.revision)

        return await self._call("put_member", put)

    # --- configuration --------------------------------------------------------------------
    async def get(self, key: str) -> KeyValue | None:
        full = self._full(check_key(key))

        def get(client: Any) -> KeyValue | None:
            kvs = self._txn(client, [], [tx.Get(full)]).responses[0].response_range.kvs
            return self._kv(kvs[0]) if kvs else None

        return await self._call("get", get)

    async def get_prefix(self, prefix: str) -> RangeSnapshot:
        full = self._full(prefix)
        end = etcd_utils.prefix_range_end(full.encode())

        def get(client: Any) -> RangeSnapshot:
            resp = self._txn(client, [], [tx.Get(full, end)])
            kvs = {kv.key: kv for kv in (self._kv(k) for k in resp.responses[0].response_range.kvs)}
            return RangeSnapshot(kvs=kvs, revision=resp.header.revision)

        return await self._call("get_prefix", get)

    async def put(self, key: str, value: bytes | str, *, prev_revision: int | None = None,
                  lease: int | None = None) -> int | None:
        full = self._full(check_key(key))
        raw = value.encode() if isinstance(value, str) else bytes(value)
        compare: list[Any] = []
        if prev_revision == 0:
            compare = [tx.Version(full) == 0]
        elif prev_revision is not None:
            compare = [tx.Mod(full) == prev_revision]

        def put(client: Any) -> int | None:
            resp = self._txn(client, compare, [tx.Put(full, raw, lease=lease or None)])
            return int(resp.header.revision) if resp.succeeded else None

        return await self._call("put", put, idempotent=prev_revision is None)

    async def delete(self, key: str, *, prev_revision: int | None = None) -> bool:
        full = self._full(check_key(key))
        compare = [tx.Mod(full) == prev_revision] if prev_revision is not None else []

        def delete(client: Any) -> bool:
            resp = self._txn(client, compare, [tx.Delete(full)])
            return bool(resp.succeeded and resp.responses[0].response_delete_range.deleted)

        return await self._call("delete", delete, idempotent=False)

    def watch(self, prefix: str, start_revision: int | None = None) -> Watch:
        return _EtcdWatch(self, prefix, start_revision)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await trio.to_thread.run_sync(client.close, abandon_on_cancel=True,
                                          limiter=self._limiter)


class _EtcdWatch(Watch):
    """One prefix watch, bridged from the client's watch thread into trio."""

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int | None) -> None:
        self._store = store
        self._full_prefix = store._full(prefix)
        self._next_revision = start_revision
        self._send, self._receive = trio.open_memory_channel[tuple[int, Any]](WATCH_BUFFER)
        self._generation = 0
        self._watch_id: int | None = None
        self._client: Any = None
        self._overflowed = False
        self._pending: deque[WatchEvent] = deque()
        self._closed = False
        self._retry = WATCH_RETRY_MIN
        self.restarts = 0  # re-creations after the first (etcd restart, overflow)

    # called in the trio thread (via from_thread.run_sync): never blocks
    def _deliver(self, generation: int, item: Any) -> None:
        if generation != self._generation or self._closed or self._overflowed:
            return  # a superseded watch, or dropping until the re-creation replays from here
        try:
            self._send.send_nowait((generation, item))
        except trio.WouldBlock:
            self._overflowed = True  # resume from the last delivered revision later

    async def _start(self) -> None:
        token = trio.lowlevel.current_trio_token()
        self._generation += 1
        generation = self._generation
        deliver = self._deliver

        def callback(item: Any) -> None:  # in the client's watch thread
            try:
                trio.from_thread.run_sync(deliver, generation, item, trio_token=token)
            except trio.RunFinishedError:
                pass

        if self._next_revision is None:
            # pin "now" so that a later restart replays from here
            snapshot = await self._store.get_prefix(self._full_prefix[len(self._store._root):])
            self._next_revision = snapshot.revision + 1
        start = self._next_revision
        end = etcd_utils.prefix_range_end(self._full_prefix.encode())

        def add(client: Any) -> tuple[Any, int]:
            try:
                watch_id = client.add_watch_callback(self._full_prefix, callback, range_end=end,
                                                     start_revision=start)
            except etcd_exc.RevisionCompactedError as exc:
                raise RevisionCompacted(exc.compacted_revision) from exc
            except etcd_exc.WatchTimedOut as exc:
                raise StoreUnavailable("etcd watch: not created within the timeout") from exc
            if self._store.settings.user is not None:
                # etcd answers a watch created with a token it no longer knows (it restarted)
                # "created" and "canceled" at once, which the client reports as a success: the
                # watch would stay silent for ever. A read on the same client proves the token;
                # if it is stale, that read fails UNAUTHENTICATED and _run_blocking
                # authenticates again and re-creates the watch.
                try:
                    client.get(self._full_prefix)
                except Exception:
                    with contextlib.suppress(Exception):  # its stream may be gone already
                        client.cancel_watch(watch_id)
                    raise
            return client, watch_id

        self._client, self._watch_id = await self._store._call("watch", add)
        if self._generation > 1:
            self.restarts += 1

    async def _cancel_current(self) -> None:
        self._generation += 1
        client, watch_id, self._watch_id = self._client, self._watch_id, None
        if watch_id is None or client is None:
            return

        def cancel() -> None:
            try:
                client.cancel_watch(watch_id)
            except Exception:  # the stream may be gone already: nothing to cancel
                pass

        with trio.move_on_after(self._store.settings.timeout):
            await trio.to_thread.run_sync(cancel, abandon_on_cancel=True,
                                          limiter=self._store._limiter)

    async def begin(self) -> None:
        if self._watch_id is None:
            await self._start()

    async def __anext__(self) -> WatchEvent:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._pending:
                event = self._pending.popleft()
                self._next_revision = event.revision + 1
                return event
            if self._watch_id is None:
                try:
                    await self._start()
                    self._retry = WATCH_RETRY_MIN
                except StoreUnavailable as exc:
                    log.debug("watch %s: %s; retrying in %.1f s", self._full_prefix, exc, self._retry)
                    await trio.sleep(self._retry)
                    self._retry = min(self._retry * 2, WATCH_RETRY_MAX)
                continue
            if self._overflowed and self._receive.statistics().current_buffer_used == 0:
                self._overflowed = False
                log.debug("watch %s overflowed; resuming from revision %s",
                          self._full_prefix, self._next_revision)
                await self._cancel_current()  # re-create from _next_revision: etcd replays
                continue
            generation, item = await self._receive.receive()
            if generation != self._generation:
                continue
            if isinstance(item, etcd_exc.RevisionCompactedError):
                await self._cancel_current()
                raise RevisionCompacted(item.compacted_revision)
            if item is None or isinstance(item, Exception):
                log.info("watch %s interrupted (%s); resuming from revision %s",
                         self._full_prefix, item, self._next_revision)
                self._watch_id = None
                self._generation += 1
                continue
            for event in item.events:
                kind: Literal["put", "delete"] = "delete" if isinstance(event, etcd3.events.DeleteEvent) else "put"
                self._pending.append(WatchEvent(
                    kind=kind, key=self._store._rel(event.key),
                    value=bytes(event.value) if kind == "put" else b"",
                    revision=int(event.mod_revision),
                    create_revision=int(event.create_revision), lease=int(event.lease),
                ))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._cancel_current()
