"""An in-memory Store whose lease TTLs follow ``trio.current_time()``: unit tests of HA decisions.

Theory of operation
-------------------
``MemoryBackend`` plays the etcd server: one revision counter bumped by every write, keys with
create/mod revisions and leases, a history of events for watches to replay. ``MemoryStore`` is
one client's view of it (several nodes share a backend), with a ``fault`` switch to simulate
that client losing the store: ``"error"`` makes every call raise StoreUnavailable at once,
``"hang"`` makes calls block (like a SIGSTOPped etcd) until the fault is cleared.

Leases expire lazily: every operation, and every watch waiting for events, first expires the
leases whose deadline has passed (a watch sleeps until the next deadline, so a deletion by
expiry is delivered at exactly the virtual instant the lease ran out). No background task.
TTLs are whole seconds, as etcd grants them. Not for production: nothing is persisted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import trio

from ha.store import (
    LEADER_KEY,
    MEMBERS_PREFIX,
    ClusterSnapshot,
    KeyValue,
    LeaseExpired,
    RangeSnapshot,
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

Fault = Literal["error", "hang"] | None


class MemoryBackend:
    """The shared "server": keys, leases, revision, event history."""

    def __init__(self) -> None:
        self.revision = 1  # etcd starts at 1
        self.kvs: dict[str, KeyValue] = {}
        self.leases: dict[int, tuple[int, float]] = {}  # id -> (granted ttl, deadline)
        self.history: list[WatchEvent] = []
        self._next_lease = 0x1000
        self._changed = trio.Event()

    # --- internals used by MemoryStore ------------------------------------------------------
    def expire(self) -> None:
        now = trio.current_time()
        for lease, (_, deadline) in sorted(self.leases.items()):
            if deadline <= now:
                self.drop_lease(lease)

    def next_deadline(self) -> float:
        return min((d for _, d in self.leases.values()), default=math.inf)

    def drop_lease(self, lease: int) -> None:
        if self.leases.pop(lease, None) is None:
            return
        doomed = [k for k, kv in self.kvs.items() if kv.lease == lease]
        if doomed:
            self.revision += 1  # etcd deletes a lease's keys in one revision
            for key in doomed:
                self._delete_at(key, self.revision)
            self._notify()

    def new_lease(self, ttl: int) -> int:
        self._next_lease += 1
        self.leases[self._next_lease] = (ttl, trio.current_time() + ttl)
        return self._next_lease

    def put(self, key: str, value: bytes, lease: int) -> int:
        self.revision += 1
        old = self.kvs.get(key)
        created = old.create_revision if old is not None else self.revision
        kv = KeyValue(key, value, created, self.revision, lease)
        self.kvs[key] = kv
        self.history.append(WatchEvent("put", key, value, self.revision, created, lease))
        self._notify()
        return self.revision

    def delete(self, key: str) -> None:
        self.revision += 1
        self._delete_at(key, self.revision)
        self._notify()

    def _delete_at(self, key: str, revision: int) -> None:
        self.kvs.pop(key)
        self.history.append(WatchEvent("delete", key, b"", revision, 0, 0))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed_or_deadline(self) -> None:
        with trio.move_on_at(self.next_deadline()):
            await self._changed.wait()


class _MemoryWatch(Watch):
    def __init__(self, store: MemoryStore, prefix: str, start_revision: int | None) -> None:
        self._store = store
        self._prefix = prefix
        self._start_revision = start_revision
        self._position: int | None = None  # index into the append-only history
        self._closed = False

    async def begin(self) -> None:
        await self._store._enter()
        self._pin()

    def _pin(self) -> None:
        backend = self._store.backend
        if self._position is None:
            start = self._start_revision or backend.revision + 1
            self._position = next(
                (i for i, e in enumerate(backend.history) if e.revision >= start),
                len(backend.history),
            )

    async def __anext__(self) -> WatchEvent:
        backend = self._store.backend
        self._pin()
        assert self._position is not None
        while not self._closed:
            if self._store.fault is not None:
                await self._store.wait_fault_cleared()
                continue
            backend.expire()
            while self._position < len(backend.history):
                event = backend.history[self._position]
                self._position += 1
                if event.key.startswith(self._prefix):
                    return event
            await backend.wait_changed_or_deadline()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._closed = True


class MemoryStore(Store):
    """One client's view of a MemoryBackend."""

    def __init__(self, cluster: str = "test", backend: MemoryBackend | None = None) -> None:
        self.cluster = cluster
        self.backend = backend if backend is not None else MemoryBackend()
        self.fault: Fault = None
        self._fault_cleared = trio.Event()
        self.calls = 0

    def view(self) -> MemoryStore:
        """Another client of the same backend (its own fault switch)."""
        return MemoryStore(self.cluster, self.backend)

    def set_fault(self, fault: Fault) -> None:
        """None: healthy; "error": calls raise StoreUnavailable; "hang": calls block."""
        if fault not in (None, "error", "hang"):
            raise ValueError(f"unknown fault {fault!r}: use None, 'error' or 'hang'")
        self.fault = fault
        if fault is None:
            self._fault_cleared.set()
            self._fault_cleared = trio.Event()

    async def wait_fault_cleared(self) -> None:
        await self._fault_cleared.wait()

    async def _enter(self) -> MemoryBackend:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        while self.fault is not None:
            if self.fault == "error":
                raise StoreUnavailable("memory store: simulated outage")
            await self.wait_fault_cleared()
        self.backend.expire()
        return self.backend

    # --- leases -----------------------------------------------------------------------------
    async def grant_lease(self, ttl: int) -> int:
        if int(ttl) != ttl or ttl < 1:
            raise ValueError(f"lease ttl must be a whole number of seconds >= 1, got {ttl!r}")
        backend = await self._enter()
        return backend.new_lease(int(ttl))

    async def refresh_lease(self, lease: int) -> float:
        backend = await self._enter()
        entry = backend.leases.get(lease)
        if entry is None:
            raise LeaseExpired(f"lease {lease:x} is gone")
        ttl, _ = entry
        backend.leases[lease] = (ttl, trio.current_time() + ttl)
        return float(ttl)

    async def revoke_lease(self, lease: int) -> None:
        backend = await self._enter()
        backend.drop_lease(lease)

    # --- election -----------------------------------------------------------------------------
    async def get_cluster(self) -> ClusterSnapshot:
        backend = await self._enter()
        leader_kv = backend.kvs.get(LEADER_KEY)
        members = {
            m.node: m
            for m in (member_from_kv(kv) for k, kv in sorted(backend.kvs.items())
                      if k.startswith(MEMBERS_PREFIX))
        }
        return ClusterSnapshot(
            leader=leader_from_kv(leader_kv) if leader_kv is not None else None,
            members=members,
            revision=backend.revision,
        )

    async def try_acquire_leader(self, node: str, lease: int, data: Mapping[str, Any]) -> int | None:
        check_node(node)
        backend = await self._enter()
        if LEADER_KEY in backend.kvs:
            return None
        if lease not in backend.leases:
            raise LeaseExpired(f"lease {lease:x} is gone")
        value = encode_json({**data, "node": node, "lease": lease})
        return backend.put(LEADER_KEY, value, lease)

    async def resign(self, node: str, epoch: int) -> bool:
        backend = await self._enter()
        kv = backend.kvs.get(LEADER_KEY)
        if kv is None or kv.create_revision != epoch:
            return False
        backend.delete(LEADER_KEY)
        return True

    async def depose(self, epoch: int) -> bool:
        backend = await self._enter()
        kv = backend.kvs.get(LEADER_KEY)
        if kv is None or kv.create_revision != epoch:
            return False
        backend.delete(LEADER_KEY)
        backend.drop_lease(kv.lease)
        return True

    async def put_member(self, node: str, data: Mapping[str, Any], lease: int) -> int:
        check_node(node)
        backend = await self._enter()
        if lease not in backend.leases:
            raise LeaseExpired(f"lease {lease:x} is gone")
        return backend.put(MEMBERS_PREFIX + node, encode_json(data), lease)

    # --- configuration --------------------------------------------------------------------
    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        backend = await self._enter()
        return backend.kvs.get(key)

    async def get_prefix(self, prefix: str) -> RangeSnapshot:
        backend = await self._enter()
        kvs = {k: kv for k, kv in sorted(backend.kvs.items()) if k.startswith(prefix)}
        return RangeSnapshot(kvs=kvs, revision=backend.revision)

    async def put(self, key: str, value: bytes | str, *, prev_revision: int | None = None,
                  lease: int | None = None) -> int | None:
        check_key(key)
        raw = value.encode() if isinstance(value, str) else bytes(value)
        backend = await self._enter()
        old = backend.kvs.get(key)
        if prev_revision is not None:
            current = old.mod_revision if old is not None else 0
            if current != prev_revision:
                return None
        if lease and lease not in backend.leases:
            raise LeaseExpired(f"lease {lease:x} is gone")
        return backend.put(key, raw, lease or 0)

    async def delete(self, key: str, *, prev_revision: int | None = None) -> bool:
        check_key(key)
        backend = await self._enter()
        old = backend.kvs.get(key)
        if old is None:
            return False
        if prev_revision is not None and old.mod_revision != prev_revision:
            return False
        backend.delete(key)
        return True

    def watch(self, prefix: str, start_revision: int | None = None) -> Watch:
        return _MemoryWatch(self, prefix, start_revision)
