"""What the cloud replicas share, in the cloud's own etcd ([shared]): fence, tokens, replica set.

Theory of operation
-------------------
Several `connector cloud` processes serve the same subaccounts at once. What they must agree on
lives in the cloud's etcd (never the on-premise one: the cloud cannot reach it), under the
``[shared] prefix``, through the same `ha.store.Store` client the nodes use::

    fence/<subaccount>/<location>   {"epoch", "cluster"}   the highest epoch any replica accepted,
                                    and the cluster the location is bound to (`registry.Fence`)
    tokens/<sha256>                 {"subaccount", "kind", "label", "created"}   live credentials
    subaccounts/<subaccount>        {"locations", "clusters", "max_streams_per_token"}   live settings
    replicas/<id>                   {"id", "tunnel_url", "admin_url", "ready", "reason",
                                     "locations"}   bound to the replica's lease
    destinations/<sub>/<Name>       see `destination_store.EtcdDestinationStore`
    destinations-key                proves every replica holds the same secrets key
    revoked/<serial>                {"serial", "reason", "created"}   revoked node certificates
    oauth/keyring, oauth/bindings/  the token service's keys and bindings (`oauth_shared`)

(subaccount and location percent-encoded.) Each part is a thin shell around a pure decision:

* **Fence** (`FenceSync`). At start the registry admits and routes nothing (fail closed) until
  every fence was read; `Registry.load_shared_fences` then opens it. A watch on ``fence/`` feeds
  what other replicas accepted to `Registry.apply_shared_fence` (merge by `registry.merge_fence`:
  epochs only rise), which fences a master the new fence outdates at once. What this replica
  accepts is queued (`Registry.fence_listener`) and written by compare-and-set on the key's
  mod revision, merged with what etcd holds, so a write never lowers a fence another replica
  raised meanwhile. While etcd is unreachable the cached fence goes on serving, higher epochs are
  still accepted, and the queue is retried every ``RETRY`` seconds until etcd takes it.
* **Tokens** (`TokenSync`). Proxy and destination-admin token digests added by
  ``connector cloud-token`` are followed through a watch and handed to the live `Authenticator`s,
  united with those of cloud.toml: an added token works, a revoked one is refused, within the
  watch's delay, on every replica, without a restart.
* **Subaccount settings** (`SettingsSync`). Locations held for, pins (which cluster alone may
  serve a location) and the per-token stream limit, set by ``connector cloud-subaccount``, override
  cloud.toml's (locations are united) on every replica at once; a pin moved in etcd refuses the
  old cluster's tunnels at once on every replica, the way a pin in cloud.toml does at a restart.
* **Revoked certificates** (`RevocationSync`). Serials added by ``connector cloud-revoke`` are
  followed into the endpoint's `RevokedSerials`: refused at the next handshake, and a tunnel of a
  newly revoked serial is closed at once, on every replica (`connector.cloud.revocation`).
* **Replica set** (`ReplicaSync`). Each replica writes its entry under its own lease (``[replica]
  lease_ttl``), refreshes it, and rewrites it when its readiness or tunnels change; a replica
  that dies is dropped when its lease expires, one that stops revokes it at once. A watch feeds
  the set to the `ReplicaDirectory` (which the tunnel endpoint announces to the nodes) and to
  `connector status` (through the admin API's ``/status``).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from connector import metrics
from connector.cloud.admission import StreamAdmission
from connector.cloud.auth import Authenticator
from connector.cloud.registry import Fence, LocationKey, Registry
from connector.cloud.replicas import Replica, ReplicaDirectory
from connector.cloud.revocation import RevokedSerials, format_serial
from ha.store import KeyValue, LeaseExpired, RevisionCompacted, Store, StoreUnavailable, WatchEvent

if TYPE_CHECKING:
    from connector.cloud.oauth_shared import OAuthSync

log = logging.getLogger(__name__)

FENCE_PREFIX = "fence/"
TOKENS_PREFIX = "tokens/"
REPLICAS_PREFIX = "replicas/"
SUBACCOUNTS_PREFIX = "subaccounts/"
REVOKED_PREFIX = "revoked/"
TOKEN_KINDS = ("proxy", "destination_admin")
RETRY = 0.5  # seconds between attempts while the cloud's etcd is unreachable
REPLICA_PUBLISH_INTERVAL = 1.0  # how often a replica compares its entry with what it published


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="").replace(".", "%2E") or "%00"


def _unquote(text: str) -> str:
    return "" if text == "%00" else urllib.parse.unquote(text)


def fence_key(key: LocationKey) -> str:
    """The etcd key of a location's fence (relative to the prefix); an empty location is ``%00``."""
    return f"{FENCE_PREFIX}{_quote(key[0])}/{_quote(key[1])}"


def parse_fence_key(key: str) -> LocationKey | None:
    sub, sep, loc = key[len(FENCE_PREFIX):].partition("/")
    if not key.startswith(FENCE_PREFIX) or not sep or not sub or not loc or "/" in loc:
        return None
    return _unquote(sub), _unquote(loc)


def parse_fence(kv_key: str, value: bytes) -> tuple[LocationKey, Fence] | None:
    """A fence key and value read from etcd; None (logged) if either is not ours."""
    location = parse_fence_key(kv_key)
    try:
        if location is None:
            raise ValueError("not a fence key")
        return location, Fence.from_json(json.loads(value))
    except ValueError as exc:
        log.error("shared state: %s is not a fence (%s); ignored", kv_key, exc)
        return None


def encode(data: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(data), sort_keys=True, separators=(",", ":")).encode()


class Reachability:
    """Whether the last operation on the cloud's etcd succeeded, shared by the parts (readiness)."""

    def __init__(self) -> None:
        self.reachable = False
        self._logged_down = False
        self._changed = trio.Event()

    def up(self) -> None:
        if not self.reachable and self._logged_down:
            log.warning("the cloud's etcd answers again")
        self._set(True)
        self._logged_down = False

    def down(self, exc: Exception) -> None:
        if not self._logged_down:
            log.error("the cloud's etcd is unreachable: %s (serving from what this replica knows)", exc)
        self._set(False)
        self._logged_down = True

    def _set(self, reachable: bool) -> None:
        if reachable != self.reachable:
            self.reachable = reachable
            self._changed.set()
            self._changed = trio.Event()

    async def wait(self, reachable: bool) -> None:
        """Return once the cloud's etcd is (or is not) reachable, as last seen (for tests)."""
        while self.reachable != reachable:
            await self._changed.wait()


# --- the fence --------------------------------------------------------------------------------

class FenceSync:
    """Keeps the registry's fence and the shared one equal (see the module docstring)."""

    def __init__(self, store: Store, registry: Registry, reach: Reachability) -> None:
        self.store = store
        self.registry = registry
        self.reach = reach
        self._pending: dict[LocationKey, int] = {}  # location -> how many advances (a write clears its own)
        self._pending_changed = trio.Event()
        self._written = trio.Event()  # set while nothing is pending
        self._written.set()
        registry.fence_listener = self.advanced
        self.on_loaded: Callable[[], None] = lambda: None  # the replica's readiness changed

    @property
    def pending(self) -> int:
        return len(self._pending)

    def advanced(self, key: LocationKey, fence: Fence) -> None:
        """The registry accepted a higher epoch (or bound a location): write it back."""
        self._pending[key] = self._pending.get(key, 0) + 1
        self._changed()

    def _changed(self) -> None:
        metrics.CLOUD_SHARED_WRITES_PENDING.labels("shared").set(len(self._pending))
        if self._pending:
            if self._written.is_set():
                self._written = trio.Event()
            self._pending_changed.set()
        else:
            self._written.set()

    async def wait_written(self) -> None:
        """Return once every fence advance accepted here is in etcd (for tests: no polling)."""
        while self._pending:
            await self._written.wait()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            await self._follow()

    async def _follow(self) -> None:
        while True:
            try:
                snapshot = await self.store.get_prefix(FENCE_PREFIX)
            except StoreUnavailable as exc:
                self.reach.down(exc)
                await trio.sleep(RETRY)
                continue
            self.reach.up()
            fences = dict(filter(None, (parse_fence(kv.key, kv.value) for kv in snapshot.kvs.values())))
            self.registry.load_shared_fences(fences)
            self.on_loaded()
            for key in self.registry.fences():  # etcd behind us (accepted during an outage): write back
                if fences.get(key) != self.registry.fence_of(key):
                    self.advanced(key, self.registry.fence_of(key))
            try:
                async with self.store.watch(FENCE_PREFIX, snapshot.revision + 1) as events:
                    async for event in events:
                        self._apply(event)
            except RevisionCompacted:
                log.info("shared fence: watch compacted away; reading the fence again")
            except StoreUnavailable as exc:  # gone between the read and the watch's start: read again
                self.reach.down(exc)
                await trio.sleep(RETRY)

    def _apply(self, event: WatchEvent) -> None:
        self.reach.up()  # an event arrived: etcd answers
        if event.kind != "put":
            return  # fences are never deleted; a deleted one is forgotten by no replica
        parsed = parse_fence(event.key, event.value)
        if parsed is not None:
            key, fence = parsed
            merged = self.registry.apply_shared_fence(key, fence)
            # Differing here means our own advance is still pending (the writer merges it), or a
            # pin in this cloud.toml contradicts another replica's: writing it back now would start
            # a write war between the two, so it is only said.
            if merged.cluster != fence.cluster and fence.cluster is not None and key not in self._pending:
                log.warning("shared fence of %s names cluster %r but this replica's configuration pins %r: "
                            "keep [[subaccounts]] clusters the same on every replica", key, fence.cluster,
                            merged.cluster)

    async def _writer(self) -> None:
        while True:
            if not self._pending:
                self._pending_changed = trio.Event()
                await self._pending_changed.wait()
                continue
            key = min(self._pending)
            advances = self._pending[key]
            try:
                await self._write(key)
            except StoreUnavailable as exc:
                self.reach.down(exc)
                await trio.sleep(RETRY)
            else:
                self.reach.up()
                if self._pending.get(key) == advances:  # else it advanced meanwhile: write again
                    del self._pending[key]
            self._changed()

    async def _write(self, key: LocationKey) -> None:
        """Compare-and-set the merge of etcd's fence and ours until etcd holds it (never lower)."""
        while True:
            kv = await self.store.get(fence_key(key))
            shared = Fence()
            if kv is not None:
                parsed = parse_fence(kv.key, kv.value)
                shared = parsed[1] if parsed is not None else Fence()
            merged = self.registry.apply_shared_fence(key, shared)
            if merged == shared:
                return
            data = {**merged.to_json(), "subaccount": key[0], "location_id": key[1]}
            if await self.store.put(fence_key(key), encode(data),
                                    prev_revision=kv.mod_revision if kv is not None else 0) is not None:
                log.info("shared fence of %s: epoch %d of cluster %r", key, merged.epoch, merged.cluster)
                return


# --- tokens -----------------------------------------------------------------------------------

def token_key(digest: str) -> str:
    return TOKENS_PREFIX + digest


def tokens_from(kvs: Mapping[str, KeyValue]) -> dict[str, dict[str, Any]]:
    """digest -> record of the tokens in etcd; records that are not ours are left out (logged)."""
    found: dict[str, dict[str, Any]] = {}
    for key, kv in kvs.items():
        digest = key[len(TOKENS_PREFIX):]
        try:
            record = json.loads(kv.value)
            if not isinstance(record, dict) or record.get("kind") not in TOKEN_KINDS \
                    or not isinstance(record.get("subaccount"), str) or not record["subaccount"]:
                raise ValueError("expected {subaccount, kind}")
            Authenticator({record["subaccount"]: [digest]})  # validates the digest
        except ValueError as exc:
            log.error("shared tokens: %s is not a token record (%s); ignored", key, exc)
            continue
        found[digest] = record
    return found


def merge_tokens(configured: Mapping[str, Mapping[str, tuple[str, ...]]],
                 shared: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """kind -> subaccount -> digests: the configured ones united with the shared ones.

    `configured` is kind -> subaccount -> digests (cloud.toml). A shared digest that cloud.toml (or
    another shared record) already gives to another subaccount or kind is left out: one token
    never acts for two subaccounts, and a proxy token never manages destinations."""
    result: dict[str, dict[str, list[str]]] = {kind: {} for kind in TOKEN_KINDS}
    owner: dict[str, tuple[str, str]] = {}
    for kind, by_subaccount in configured.items():
        for subaccount, digests in by_subaccount.items():
            for digest in digests:
                owner[digest] = (kind, subaccount)
                result[kind].setdefault(subaccount, []).append(digest)
    for digest, record in sorted(shared.items()):
        claim = (record["kind"], record["subaccount"])
        if owner.setdefault(digest, claim) != claim:
            log.error("shared tokens: %s... is already a %s token of %r; the shared record is ignored",
                      digest[:8], *owner[digest])
            continue
        if digest not in result[claim[0]].get(claim[1], []):
            result[claim[0]].setdefault(claim[1], []).append(digest)
    return result


async def follow_prefix(store: Store, prefix: str, reach: Reachability, what: str,
                        install: Callable[[Mapping[str, KeyValue], int], None]) -> None:
    """Keep `install` fed with every key under `prefix` as etcd has it: read them all, then follow
    the watch from the next revision; read them again after a compaction, or when etcd went away
    before the watch started (a started watch resumes by itself).
    `install(kvs, revision)` gets the whole current map after the read and after each event."""
    while True:
        try:
            snapshot = await store.get_prefix(prefix)
        except StoreUnavailable as exc:
            reach.down(exc)
            await trio.sleep(RETRY)
            continue
        kvs = dict(snapshot.kvs)
        install(kvs, snapshot.revision)
        try:
            async with store.watch(prefix, snapshot.revision + 1) as events:
                async for event in events:
                    if event.kind == "put":
                        kvs[event.key] = KeyValue(event.key, event.value, event.create_revision, event.revision)
                    else:
                        kvs.pop(event.key, None)
                    install(kvs, event.revision)
        except RevisionCompacted:
            log.info("%s: watch compacted away; reading again", what)
        except StoreUnavailable as exc:  # gone between the read and the watch's start: read again
            reach.down(exc)
            await trio.sleep(RETRY)


class _Revisions:
    """The etcd revision a follower has applied, and a way to wait for one (tests: no polling)."""

    def __init__(self) -> None:
        self.revision = 0
        self._revision_changed = trio.Event()

    def _applied(self, revision: int) -> None:
        self.revision = revision
        self._revision_changed.set()
        self._revision_changed = trio.Event()

    async def wait_revision(self, revision: int) -> None:
        """Return once what etcd held at `revision` is applied."""
        while self.revision < revision:
            await self._revision_changed.wait()


class TokenSync(_Revisions):
    """Follows ``tokens/`` into the live authenticators (proxy tokens, destination-admin tokens)."""

    def __init__(self, store: Store, configured: Mapping[str, Mapping[str, tuple[str, ...]]],
                 authenticators: Mapping[str, Authenticator], reach: Reachability) -> None:
        self.store = store
        self.configured = configured
        self.authenticators = authenticators
        self.reach = reach
        super().__init__()

    async def run(self) -> None:
        await follow_prefix(self.store, TOKENS_PREFIX, self.reach, "shared tokens", self._install)

    def _install(self, kvs: Mapping[str, KeyValue], revision: int) -> None:
        merged = merge_tokens(self.configured, tokens_from(kvs))
        for kind, authenticator in self.authenticators.items():
            authenticator.replace(merged[kind])
        self._applied(revision)


async def add_token(store: Store, digest: str, *, subaccount: str, kind: str, label: str = "") -> int:
    """Record a token digest (`connector cloud-token add`); ValueError if it exists. The revision."""
    if kind not in TOKEN_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TOKEN_KINDS)}")
    Authenticator({subaccount: [digest]})  # validates subaccount and digest
    record = {"subaccount": subaccount, "kind": kind, "label": label, "created": int(time.time())}
    revision = await store.put(token_key(digest), encode(record), prev_revision=0)
    if revision is None:
        raise ValueError("this token's digest is recorded already")
    return revision


async def revoke_tokens(store: Store, digest_prefix: str, *, subaccount: str) -> list[str]:
    """Delete the subaccount's shared tokens whose digest starts with `digest_prefix` (at least
    8 characters; ValueError if none or several match). The digests revoked."""
    if len(digest_prefix) < 8:
        raise ValueError("give at least 8 characters of the token's SHA-256 (see `list`)")
    snapshot = await store.get_prefix(TOKENS_PREFIX)
    tokens = tokens_from(snapshot.kvs)
    matching = [d for d, r in tokens.items() if d.startswith(digest_prefix.lower()) and r["subaccount"] == subaccount]
    if len(matching) != 1:
        raise ValueError(f"{len(matching)} shared tokens of {subaccount!r} match {digest_prefix!r}: give exactly one")
    await store.delete(token_key(matching[0]))
    return matching


async def list_tokens(store: Store, *, subaccount: str | None = None) -> list[dict[str, Any]]:
    snapshot = await store.get_prefix(TOKENS_PREFIX)
    return [{"sha256": digest, **record} for digest, record in sorted(tokens_from(snapshot.kvs).items())
            if subaccount is None or record["subaccount"] == subaccount]


# --- the replica set --------------------------------------------------------------------------

def replicas_from(kvs: Mapping[str, KeyValue]) -> dict[str, dict[str, Any]]:
    """id -> entry of the replicas in etcd (entries that are not ours left out, logged)."""
    found: dict[str, dict[str, Any]] = {}
    for key, kv in kvs.items():
        try:
            entry = json.loads(kv.value)
            Replica.from_json(entry)
            if entry["id"] != key[len(REPLICAS_PREFIX):]:
                raise ValueError("the id differs from the key")
        except (ValueError, KeyError, TypeError) as exc:
            log.error("replica set: %s is not a replica entry (%s); ignored", key, exc)
            continue
        found[entry["id"]] = entry
    return found


class ReplicaSync:
    """Publishes this replica under its lease and follows the set (see the module docstring)."""

    def __init__(self, store: Store, directory: ReplicaDirectory, entry: Callable[[], dict[str, Any]],
                 *, lease_ttl: int, reach: Reachability) -> None:
        self.store = store
        self.directory = directory
        self.entry = entry  # this replica's entry now (id, urls, ready, locations)
        self.lease_ttl = lease_ttl
        self.reach = reach
        self.replicas: dict[str, dict[str, Any]] = {}  # the set as last read (this replica included)
        self.version = 0  # bumped whenever `replicas` changed
        self._replicas_changed = trio.Event()
        self._lease: int | None = None
        self._changed = trio.Event()

    def poke(self) -> None:
        """This replica's entry may have changed: publish it now rather than at the next tick."""
        self._changed.set()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publish)
                await self._follow()
        finally:
            lease, self._lease = self._lease, None
            if lease is not None:  # a stopping replica leaves the set at once, not after its ttl
                with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                    try:
                        await self.store.revoke_lease(lease)
                    except StoreUnavailable:
                        pass

    async def _publish(self) -> None:
        published: dict[str, Any] | None = None
        refreshed = -float("inf")
        while True:
            try:
                if self._lease is None:
                    self._lease, published = await self.store.grant_lease(self.lease_ttl), None
                    refreshed = trio.current_time()
                entry = self.entry()
                if entry != published:
                    await self.store.put(REPLICAS_PREFIX + entry["id"], encode(entry), lease=self._lease)
                    published = entry
                if trio.current_time() - refreshed >= self.lease_ttl / 3:
                    await self.store.refresh_lease(self._lease)
                    refreshed = trio.current_time()
                self.reach.up()
            except LeaseExpired:
                log.warning("replica set: our lease expired (the cloud's etcd was away longer than %d s); "
                            "registering again", self.lease_ttl)
                self._lease = None
                continue
            except StoreUnavailable as exc:
                self.reach.down(exc)
            self._changed = trio.Event()
            with trio.move_on_after(min(REPLICA_PUBLISH_INTERVAL, self.lease_ttl / 3)):
                await self._changed.wait()

    async def _follow(self) -> None:
        await follow_prefix(self.store, REPLICAS_PREFIX, self.reach, "replica set", self._install)

    async def wait_changed(self, seen_version: int) -> int:
        """Return the version of `replicas` once it differs from `seen_version` (for tests and tools)."""
        while self.version == seen_version:
            await self._replicas_changed.wait()
        return self.version

    def _install(self, kvs: Mapping[str, KeyValue], revision: int) -> None:
        replicas = replicas_from(kvs)
        if replicas != self.replicas:
            self.replicas = replicas
            self.version += 1
            self._replicas_changed.set()
            self._replicas_changed = trio.Event()
        if self.directory.update(Replica.from_json(e) for e in self.replicas.values()):
            log.info("replica set: %s", ", ".join(r.id for r in self.directory.current()))


# --- subaccount settings ----------------------------------------------------------------------

@attrs.frozen
class SubaccountSettings:
    """What may change about a subaccount live: locations held for, pins, the per-token limit."""

    locations: tuple[str, ...] = ()
    clusters: Mapping[str, str] = attrs.field(factory=dict)  # location -> the one cluster serving it
    max_streams_per_token: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"locations": list(self.locations), "clusters": dict(self.clusters),
                "max_streams_per_token": self.max_streams_per_token}

    @classmethod
    def from_json(cls, data: Any) -> SubaccountSettings:
        """ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("subaccount settings must be an object")
        unknown = sorted(set(data) - {"locations", "clusters", "max_streams_per_token"})
        if unknown:
            raise ValueError(f"unknown subaccount settings {unknown}")
        locations, clusters = data.get("locations", []), data.get("clusters", {})
        limit = data.get("max_streams_per_token")
        if not isinstance(locations, list) or not all(isinstance(x, str) for x in locations):
            raise ValueError("locations must be a list of strings")
        if not isinstance(clusters, dict) or not all(isinstance(v, str) and v for v in clusters.values()):
            raise ValueError("clusters must map locations to cluster names")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise ValueError("max_streams_per_token must be an integer >= 0 (0: no limit) or null")
        return cls(tuple(locations), dict(clusters), limit)


def subaccount_key(subaccount: str) -> str:
    return SUBACCOUNTS_PREFIX + _quote(subaccount)


def effective_settings(configured: Mapping[str, SubaccountSettings],
                       shared: Mapping[str, SubaccountSettings]) -> dict[str, SubaccountSettings]:
    """cloud.toml's settings with the shared ones applied: locations united, pins and the limit
    of etcd override those of cloud.toml. Subaccounts not in cloud.toml are left out (a
    subaccount needs its CA there)."""
    result = {}
    for subaccount, mine in configured.items():
        theirs = shared.get(subaccount, SubaccountSettings())
        result[subaccount] = SubaccountSettings(
            tuple(dict.fromkeys([*mine.locations, *theirs.locations])),
            {**mine.clusters, **theirs.clusters},
            theirs.max_streams_per_token if theirs.max_streams_per_token is not None else mine.max_streams_per_token,
        )
    return result


class SettingsSync(_Revisions):
    """Follows ``subaccounts/`` into the registry (locations, pins) and the stream admission."""

    def __init__(self, store: Store, configured: Mapping[str, SubaccountSettings], registry: Registry,
                 admission: StreamAdmission, reach: Reachability) -> None:
        self.store = store
        self.configured = configured
        self.registry = registry
        self.admission = admission
        self.reach = reach
        super().__init__()

    async def run(self) -> None:
        await follow_prefix(self.store, SUBACCOUNTS_PREFIX, self.reach, "subaccount settings", self._install)

    def _install(self, kvs: Mapping[str, KeyValue], revision: int) -> None:
        shared: dict[str, SubaccountSettings] = {}
        for key, kv in kvs.items():
            try:
                shared[_unquote(key[len(SUBACCOUNTS_PREFIX):])] = SubaccountSettings.from_json(json.loads(kv.value))
            except ValueError as exc:
                log.error("subaccount settings: %s is unusable (%s); ignored", key, exc)
        settings = effective_settings(self.configured, shared)
        for subaccount, effective in settings.items():
            for location in effective.locations:
                self.registry.know((subaccount, location))
            configured_pins = self.configured[subaccount].clusters
            for location in {*configured_pins, *effective.clusters}:
                self.registry.pin((subaccount, location), effective.clusters.get(location))
        self.admission.limits = attrs.evolve(self.admission.limits, per_token_by_subaccount={
            s: e.max_streams_per_token for s, e in settings.items() if e.max_streams_per_token is not None})
        self._applied(revision)


async def update_subaccount(store: Store, subaccount: str, change: Callable[[SubaccountSettings], SubaccountSettings]) -> tuple[SubaccountSettings, int]:
    """Read-modify-write one subaccount's shared settings by compare-and-set (`connector
    cloud-subaccount`); the settings written and the revision."""
    while True:
        kv = await store.get(subaccount_key(subaccount))
        current = SubaccountSettings.from_json(json.loads(kv.value)) if kv is not None else SubaccountSettings()
        new = change(current)
        revision = await store.put(subaccount_key(subaccount), encode(new.to_json()),
                                   prev_revision=kv.mod_revision if kv is not None else 0)
        if revision is not None:
            return new, revision


# --- revoked certificates ---------------------------------------------------------------------

def revoked_key(serial: int) -> str:
    return REVOKED_PREFIX + format_serial(serial)


def revoked_from(kvs: Mapping[str, KeyValue]) -> dict[int, dict[str, Any]]:
    """serial -> record of the revoked serials in etcd; records that are not ours left out (logged)."""
    found: dict[int, dict[str, Any]] = {}
    for key, kv in kvs.items():
        try:
            record = json.loads(kv.value)
            serial = record.get("serial") if isinstance(record, dict) else None
            if not isinstance(serial, int) or isinstance(serial, bool) or key != revoked_key(serial):
                raise ValueError("expected {serial} matching the key")
        except ValueError as exc:
            log.error("revoked certificates: %s is not a revocation record (%s); ignored", key, exc)
            continue
        found[serial] = record
    return found


class RevocationSync(_Revisions):
    """Follows ``revoked/`` into the endpoint's deny-list (see the module docstring)."""

    def __init__(self, store: Store, revoked: RevokedSerials, reach: Reachability) -> None:
        self.store = store
        self.revoked = revoked
        self.reach = reach
        super().__init__()

    async def run(self) -> None:
        await follow_prefix(self.store, REVOKED_PREFIX, self.reach, "revoked certificates", self._install)

    def _install(self, kvs: Mapping[str, KeyValue], revision: int) -> None:
        added = self.revoked.replace(revoked_from(kvs))
        if added:
            log.warning("revoked certificates: %s now refused", ", ".join(format_serial(s) for s in sorted(added)))
        self._applied(revision)


async def revoke_certificate(store: Store, serial: int, *, reason: str = "") -> int:
    """Put `serial` on the deny-list (`connector cloud-revoke`); the revision. Revoking a serial
    that is on the list already keeps the first record and returns the current revision."""
    record = {"serial": serial, "reason": reason, "created": int(time.time())}
    revision = await store.put(revoked_key(serial), encode(record), prev_revision=0)
    if revision is None:
        return (await store.get_prefix(REVOKED_PREFIX)).revision
    return revision


async def unrevoke_certificate(store: Store, serial: int) -> None:
    """Take `serial` off the deny-list (a revocation made by mistake); ValueError if absent."""
    if await store.get(revoked_key(serial)) is None:
        raise ValueError(f"serial {format_serial(serial)} is not revoked")
    await store.delete(revoked_key(serial))


async def list_revoked(store: Store) -> list[dict[str, Any]]:
    snapshot = await store.get_prefix(REVOKED_PREFIX)
    return [{**record, "serial_hex": format_serial(serial)} for serial, record in sorted(revoked_from(snapshot.kvs).items())]


# --- all of it --------------------------------------------------------------------------------

class SharedState:
    """The parts above over one store, run together by `CloudServer`."""

    def __init__(self, store: Store, *, registry: Registry, directory: ReplicaDirectory,
                 entry: Callable[[], dict[str, Any]], lease_ttl: int,
                 configured_tokens: Mapping[str, Mapping[str, tuple[str, ...]]],
                 authenticators: Mapping[str, Authenticator], destinations: Any = None,
                 settings: Mapping[str, SubaccountSettings] | None = None,
                 admission: StreamAdmission | None = None, revoked: RevokedSerials | None = None,
                 oauth: OAuthSync | None = None) -> None:
        self.store = store
        self.reach = Reachability()
        self.fence = FenceSync(store, registry, self.reach)
        self.tokens = TokenSync(store, configured_tokens, authenticators, self.reach)
        self.replicas = ReplicaSync(store, directory, entry, lease_ttl=lease_ttl, reach=self.reach)
        self.fence.on_loaded = self.replicas.poke
        self.settings = SettingsSync(store, settings or {}, registry, admission or registry.admission, self.reach)
        self.destinations = destinations  # an EtcdDestinationStore, or None
        self.revocations = RevocationSync(store, revoked if revoked is not None else RevokedSerials(), self.reach)
        self.oauth = oauth  # the token service's ring and bindings, or None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.fence.run)
                nursery.start_soon(self.tokens.run)
                nursery.start_soon(self.replicas.run)
                nursery.start_soon(self.settings.run)
                nursery.start_soon(self.revocations.run)
                if self.destinations is not None:
                    await nursery.start(self.destinations.run)
                if self.oauth is not None:
                    await nursery.start(self.oauth.run, self.reach)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.store.aclose()
