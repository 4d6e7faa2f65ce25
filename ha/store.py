"""The store interface the HA layer speaks (Patroni's DCS idea), and its immutable snapshots.

Theory of operation
-------------------
Everything the cluster agrees on lives in a small key space under ``/<cluster>/``::

    leader            {"node", "lease", ...}  bound to the master's lease; create_revision = EPOCH
    members/<node>    {"address", "admin_url", "priority", "health", "role", "epoch", "pid", ...}
                      bound to that node's own lease
    config/<kind>/<name>   shared configuration (mappings, resources, subaccount settings)
    secrets/<name>         encrypted secrets

Keys passed to and returned by a Store are *relative* to ``/<cluster>/`` (``"config/mapping/x"``).
Revisions are etcd's: one cluster-wide counter bumped by every write. A key's
``create_revision`` is the revision of the write that created it, so the leader key's
``create_revision`` strictly increases across elections: it is the fencing token (epoch).

Two implementations: ``ha.etcd.EtcdStore`` (real use, every integration test) and
``ha.memory.MemoryStore`` (leases follow ``trio.current_time()``, for unit tests of decisions
under ``autojump_clock``). Every method is ``async``; every snapshot is immutable.

Errors: ``StoreUnavailable`` is the ONE error meaning "the store could not be reached or did not
answer in time" (the caller may retry, nothing is known about whether a write happened);
``LeaseExpired`` means a lease is gone for good; ``RevisionCompacted`` means a watch cannot
replay from the requested revision (re-read the state and watch again).
"""

from __future__ import annotations

import abc
import json
import types
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import attrs

LEADER_KEY = "leader"
MEMBERS_PREFIX = "members/"
CONFIG_PREFIX = "config/"
SECRETS_PREFIX = "secrets/"


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreUnavailable(StoreError):
    """The store is unreachable or did not answer within the timeout (nothing is known)."""


class LeaseExpired(StoreError):
    """The lease is gone (expired or revoked); keys bound to it have been deleted."""


class RevisionCompacted(StoreError):
    """A watch cannot start at the requested revision: it was compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted; oldest available is {compact_revision}")
        self.compact_revision = compact_revision


def _freeze(data: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(data))


@attrs.frozen
class KeyValue:
    """One key as read: value bytes plus etcd's revision metadata (lease 0 = no lease)."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0

    def json(self) -> Any:
        """The value decoded as JSON (ValueError if it is not JSON)."""
        return json.loads(self.value)


@attrs.frozen
class Leader:
    """Who holds the leader key: the epoch is the key's create_revision."""

    node: str
    epoch: int
    lease: int
    data: Mapping[str, Any] = attrs.field(converter=_freeze, factory=dict)


@attrs.frozen
class Member:
    """One registered node; the key disappears when the node's lease does."""

    node: str
    data: Mapping[str, Any] = attrs.field(converter=_freeze, factory=dict)
    lease: int = 0
    mod_revision: int = 0

    @property
    def priority(self) -> int:
        try:
            return int(self.data.get("priority", 0))
        except (TypeError, ValueError):
            return 0

    @property
    def healthy(self) -> bool:
        """A member is healthy unless it says otherwise (health absent or "ok")."""
        return self.data.get("health", "ok") == "ok"


@attrs.frozen
class ClusterSnapshot:
    """Leader and members read atomically at one ``revision``."""

    leader: Leader | None
    members: Mapping[str, Member] = attrs.field(converter=_freeze, factory=dict)
    revision: int = 0


@attrs.frozen
class RangeSnapshot:
    """Keys under a prefix read atomically at one ``revision`` (watch from revision + 1)."""

    kvs: Mapping[str, KeyValue] = attrs.field(converter=_freeze, factory=dict)
    revision: int = 0


@attrs.frozen
class WatchEvent:
    """One change: ``revision`` is the write's revision (the key's mod_revision for a put)."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int
    create_revision: int = 0
    lease: int = 0


def leader_from_kv(kv: KeyValue) -> Leader:
    """Decode the leader key; a value that is not our JSON still yields a Leader (node "?")."""
    try:
        data = json.loads(kv.value)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError:
        data = {}
    return Leader(node=str(data.get("node", "?")), epoch=kv.create_revision, lease=kv.lease,
                  data=data)


def member_from_kv(kv: KeyValue) -> Member:
    node = kv.key[len(MEMBERS_PREFIX):]
    try:
        data = json.loads(kv.value)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError:
        data = {"health": "unreadable"}
    return Member(node=node, data=data, lease=kv.lease, mod_revision=kv.mod_revision)


def encode_json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(data), sort_keys=True, separators=(",", ":")).encode()


def check_key(key: str) -> str:
    """Relative keys only: no leading slash, no empty segment, no NUL."""
    if not key or key.startswith("/") or "//" in key or "\x00" in key:
        raise ValueError(f"invalid store key {key!r}: must be relative like 'config/kind/name'")
    return key


def check_node(node: str) -> str:
    if not node or "/" in node or "\x00" in node:
        raise ValueError(f"invalid node id {node!r}: must be non-empty without '/'")
    return node


class Watch(abc.ABC):
    """Async iterator of WatchEvents; use as ``async with store.watch(...) as events``.

    Events arrive in revision order, each once. If the store restarts, the watch resumes from
    the last delivered revision + 1, so nothing is lost. ``RevisionCompacted`` is raised from
    iteration if that revision is gone. With no start_revision, "now" is when the watch is
    entered (``begin``), so writes made after ``async with`` are always seen.
    """

    async def __aenter__(self) -> Watch:
        await self.begin()
        return self

    @abc.abstractmethod
    async def begin(self) -> None:
        """Pin the start ("now" when no start_revision was given) and start watching; entering
        the context does this. Raises StoreUnavailable if the store cannot be reached."""

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> WatchEvent: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...


class Store(abc.ABC):
    """Abstract store; ``cluster`` names the key space ``/<cluster>/``."""

    cluster: str

    # --- leases -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def grant_lease(self, ttl: int) -> int:
        """Grant a lease of ``ttl`` whole seconds; return its id (non-zero)."""

    @abc.abstractmethod
    async def refresh_lease(self, lease: int) -> float:
        """Keep the lease alive; return the remaining TTL in seconds.

        Raises LeaseExpired if the lease is gone (etcd answers a TTL of 0 without an error for
        an expired lease: that is LeaseExpired too)."""

    @abc.abstractmethod
    async def revoke_lease(self, lease: int) -> None:
        """Revoke the lease, deleting every key bound to it. A lease already gone is fine."""

    # --- election -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def get_cluster(self) -> ClusterSnapshot:
        """Leader and members, read atomically."""

    @abc.abstractmethod
    async def try_acquire_leader(self, node: str, lease: int, data: Mapping[str, Any]) -> int | None:
        """One transaction: create the leader key bound to ``lease`` only if it does not exist.

        Returns the new key's create_revision (the epoch), or None if the key already exists.
        The value is ``data`` plus ``node`` and ``lease``."""

    @abc.abstractmethod
    async def resign(self, node: str, epoch: int) -> bool:
        """Delete the leader key only if its create_revision is still ``epoch``.

        Returns True if deleted, False if the key is gone or belongs to a newer election."""

    @abc.abstractmethod
    async def depose(self, epoch: int) -> bool:
        """Remove the leader whose epoch is ``epoch``: delete the key if (and only if) its
        create_revision is ``epoch``, then revoke the lease it was bound to (so that master's
        member key and renewals die too). A newer leader is never touched.
        Returns True if the key was deleted."""

    @abc.abstractmethod
    async def put_member(self, node: str, data: Mapping[str, Any], lease: int) -> int:
        """Write ``members/<node>`` bound to ``lease``; return the write's revision.
        Raises LeaseExpired if the lease is gone."""

    # --- configuration --------------------------------------------------------------------
    @abc.abstractmethod
    async def get(self, key: str) -> KeyValue | None:
        """The key, or None."""

    @abc.abstractmethod
    async def get_prefix(self, prefix: str) -> RangeSnapshot:
        """Every key under ``prefix``, read atomically, with the revision of the read."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes | str, *, prev_revision: int | None = None,
                  lease: int | None = None) -> int | None:
        """Write the key; return the new revision.

        Compare-and-set: with ``prev_revision=None`` the write is unconditional; with
        ``prev_revision=0`` it happens only if the key does not exist; with ``prev_revision=N``
        only if the key's mod_revision is N. Returns None when the comparison fails."""

    @abc.abstractmethod
    async def delete(self, key: str, *, prev_revision: int | None = None) -> bool:
        """Delete the key (only if its mod_revision is ``prev_revision``, when given).
        Returns True if a key was deleted."""

    @abc.abstractmethod
    def watch(self, prefix: str, start_revision: int | None = None) -> Watch:
        """Watch every key under ``prefix`` (a full key watches just that key, plus any key it
        prefixes) from ``start_revision`` (None: from now). Nothing happens until entered or
        iterated; use ``async with store.watch(p, r) as events: async for event in events``."""

    async def aclose(self) -> None:
        """Release connections. Default: nothing to release."""
        return None
