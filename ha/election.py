"""The HA decision loop: who is master, with which fencing epoch.

Theory of operation
-------------------
Every node runs an ``Elector``. Each node holds one lease of ``timing.ttl`` seconds; its member
key (``members/<node>``) and, while master, the leader key are bound to it. The loop runs one
*cycle* every ``loop_wait`` seconds, or at once when woken (the leader key changed, a hint
arrived, a wait is due). Each cycle returns a sentence saying what it decided; the loop logs it
and keeps the last ones in ``decisions`` (tests assert them).

Master cycle: renew the lease (retrying for at most ``retry_timeout``), read the cluster, check
the leader key is still ours (same epoch), refresh the member key.
  * lease gone (LeaseExpired) or leader key gone / someone else's -> demote at once.
  * store unreachable for ``retry_timeout``: with ``timing.keep_serving_without_store`` (the
    default) the node STAYS master with ``etcd_reachable = False``. This is safe because the
    cloud is the fence: if another node can reach etcd it waits for our lease to expire, gets a
    higher epoch, registers it with the cloud, and the cloud closes our tunnel (the agent then
    calls ``force_shadow``). If nobody can reach etcd nobody else can be elected, so an etcd
    outage does not become a traffic outage (Patroni needs ``failsafe_mode`` for this). When the
    store answers again, a lease that survived (etcd restarted) keeps us master with the same
    epoch; a lease that expired demotes us. With ``keep_serving_without_store=False`` the master
    demotes itself after ``retry_timeout`` (Patroni's behaviour), which
    ``loop_wait + 2*retry_timeout <= ttl`` guarantees happens before the lease can expire.

Shadow cycle: keep the lease, read the cluster and
  * leader present -> follow it; if a hint says that leader's epoch is lost
    (``hint_master_lost``), the best-ranked shadow deposes that epoch (compare-and-delete the
    key, revoke its lease) and acquires at once; lower-ranked ones wait ``rank *
    priority_step`` first and re-check (they only act if the lost master is still there).
  * leader vacant -> rank 0 tries at once; rank r waits ``r * priority_step`` from the moment the
    vacancy was seen, re-reading the leader in between. Rank = number of healthy, eligible
    members with higher priority (ties broken by node id), the former master excluded.
  * our own node's key with another lease -> a stale key from our previous process: depose it.
Shadows WATCH the leader key, so a deletion (resign, depose, lease expiry) triggers a cycle
immediately: no polling delay.

``resign(hold_off)`` deletes our leader key at once (graceful handover) and keeps us from trying
again for ``hold_off`` seconds. ``force_shadow(reason)`` is for a master the cloud has fenced.
Role changes are published as ``RoleChange`` records: ``await wait_role_change(since_version)``.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, TypeVar

import attrs
import trio

from connector import metrics
from ha.store import (
    LEADER_KEY,
    ClusterSnapshot,
    LeaseExpired,
    RevisionCompacted,
    Store,
    StoreUnavailable,
    check_node,
)
from ha.timing import HATiming

log = logging.getLogger(__name__)

Role = Literal["starting", "shadow", "master"]
ROLES: tuple[Role, ...] = ("starting", "shadow", "master")
T = TypeVar("T")


@attrs.frozen
class RoleChange:
    """One role transition; ``version`` increases by one per change."""

    role: Role
    epoch: int | None
    reason: str
    version: int
    at: float


@attrs.frozen
class _Hint:
    epoch: int
    source: str
    at: float


class Elector:
    """Leader election and membership for one node (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        node_id: str,
        *,
        timing: HATiming | None = None,
        priority: int = 100,
        member_data: Mapping[str, Any] | None = None,
        location: str = "",
    ) -> None:
        self.store = store
        self.node_id = check_node(node_id)
        self.timing = timing if timing is not None else HATiming()
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        self.priority = priority
        self.location = location
        self.member_data: dict[str, Any] = dict(member_data or {})
        self.member_data.setdefault("pid", os.getpid())

        self.role: Role = "starting"
        self.epoch: int | None = None
        self.etcd_reachable = False
        self.leader_node: str | None = None  # last leader seen (None: vacant or unknown)
        self.last_decision = ""
        self.decisions: deque[tuple[float, str]] = deque(maxlen=256)
        self._decided = trio.lowlevel.ParkingLot()  # unparked by every recorded decision
        self._change = RoleChange("starting", None, "not started", 0, 0.0)
        self._changed = trio.Event()
        self._role_dirty = False

        self._lease: int | None = None
        self._wake = trio.Event()
        self._next_due = math.inf
        self._lock = trio.Lock()
        self._hold_off_until = -math.inf
        self._vacant_since: float | None = None
        self._hint: _Hint | None = None
        self._fenced_epoch: int | None = None
        self._labels = {"cluster": store.cluster, "location": location, "node": node_id}
        self._publish_metrics()

    # --- public API ------------------------------------------------------------------------
    @property
    def state(self) -> RoleChange:
        """The latest role change (role, epoch, reason, version)."""
        return self._change

    @property
    def version(self) -> int:
        return self._change.version

    @property
    def lease(self) -> int | None:
        return self._lease

    async def wait_role_change(self, since_version: int) -> RoleChange:
        """Wait until the role changes after ``since_version``; return the latest change."""
        while self._change.version <= since_version:
            await self._changed.wait()
        return self._change

    async def wait_etcd_reachable(self, reachable: bool = True) -> None:
        """Return once a cycle found the store reachable (or, with False, unreachable); at once
        if the last one did. For tests and tools: the caller bounds the wait."""
        await trio.lowlevel.checkpoint()
        while self.etcd_reachable != reachable:
            await self._decided.park()

    async def wait_decision(self, decision: str) -> None:
        """Return once `decision` is the last decision recorded (at once if it is)."""
        await trio.lowlevel.checkpoint()
        while self.last_decision != decision:
            await self._decided.park()

    def hint_master_lost(self, epoch: int, source: str) -> None:
        """The cloud or a probe says the master of ``epoch`` is gone: try to take over now."""
        if self.role == "master":
            log.info("%s: ignoring hint from %s that epoch %s is lost: we are master (epoch %s)",
                     self.node_id, source, epoch, self.epoch)
            return
        self._hint = _Hint(int(epoch), source, trio.current_time())
        self._wake.set()

    def update_member_data(self, **fields: Any) -> None:
        """Merge fields (e.g. ``health="degraded"``) into the member key; sent next cycle."""
        self.member_data.update(fields)
        self._wake.set()

    async def resign(self, hold_off: float) -> bool:
        """Graceful handover: delete our leader key now, become shadow, and do not try to
        acquire again for ``hold_off`` seconds. Returns True if our key was deleted."""
        if hold_off < 0 or not math.isfinite(hold_off):
            raise ValueError(f"hold_off must be a finite number >= 0, got {hold_off!r}")
        async with self._lock:
            now = trio.current_time()
            self._hold_off_until = now + hold_off
            if self.role != "master" or self.epoch is None:
                self._record(f"resign requested while {self.role}: holding off {hold_off:g} s")
                return False
            epoch = self.epoch
            self._set_role("shadow", None, f"resigned epoch {epoch}: graceful handover")
            try:
                deleted = await self._op(self.store.resign, self.node_id, epoch)
                await self._put_member()
            except (StoreUnavailable, LeaseExpired) as exc:
                self._record(f"resigned epoch {epoch} locally; store did not answer ({exc}): the "
                             "key will go when our lease expires")
                return False
            self._record(f"resigned: deleted leader key (epoch {epoch}), holding off {hold_off:g} s")
            return deleted

    def force_shadow(self, reason: str, hold_off: float = 0.0) -> None:
        """Demote now, without the store: the cloud says a newer epoch registered (we were
        fenced). If our leader key is still in the store the next cycle deletes it."""
        if self.role != "master":
            return
        now = trio.current_time()
        self._fenced_epoch = self.epoch
        self._hold_off_until = max(self._hold_off_until, now + hold_off)
        self._set_role("shadow", None, f"fenced: {reason}")
        self._record(f"demoted: fenced by the cloud ({reason})")
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run cycles forever; ``started()`` after the first cycle has decided something.
        Cancelling this is a crash as far as the cluster is concerned (the lease just expires);
        call ``resign`` first for a graceful stop."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_leader)
            started = False
            while True:
                self._wake = trio.Event()
                self._next_due = math.inf
                async with self._lock:
                    decision = await self._cycle()
                self._record(decision)
                if not started:
                    started = True
                    task_status.started()
                deadline = min(trio.current_time() + self.timing.loop_wait, self._next_due)
                with trio.move_on_at(deadline):
                    await self._wake.wait()

    # --- the cycle -------------------------------------------------------------------------
    async def _cycle(self) -> str:
        if self.role == "master":
            return await self._master_cycle()
        return await self._shadow_cycle()

    async def _master_cycle(self) -> str:
        epoch = self.epoch
        try:
            await self._renew_within_retry_timeout()
            snapshot = await self._op(self.store.get_cluster)
        except LeaseExpired:
            self._lease = None
            self.etcd_reachable = True
            self._set_role("shadow", None, "lease expired")
            return f"demoted: lease expired, epoch {epoch} is gone"
        except StoreUnavailable as exc:
            self.etcd_reachable = False
            if self.timing.keep_serving_without_store:
                return (f"store unreachable ({exc}); keeping master role (epoch {epoch}): "
                        "the cloud fences any newer master")
            self._set_role("shadow", None, "could not renew lease within retry_timeout")
            return (f"demoted: could not renew lease within retry_timeout "
                    f"({self.timing.retry_timeout:g} s)")
        self.etcd_reachable = True
        leader = snapshot.leader
        self._see_leader(snapshot)
        if leader is None or leader.epoch != epoch:
            why = ("leader key is gone" if leader is None
                   else f"leader key now held by {leader.node} (epoch {leader.epoch})")
            self._set_role("shadow", None, why)
            await self._put_member_quietly()
            return f"demoted: {why}"
        await self._put_member_quietly()
        return f"renewed lease, still master (epoch {epoch})"

    async def _shadow_cycle(self) -> str:
        try:
            await self._ensure_lease()
            snapshot = await self._op(self.store.get_cluster)
        except StoreUnavailable as exc:
            self.etcd_reachable = False
            return f"store unreachable ({exc}); staying {self.role}"
        self.etcd_reachable = True
        try:
            decision = await self._decide_as_shadow(snapshot)
        except StoreUnavailable as exc:
            return f"store unreachable while deciding ({exc}); staying {self.role}"
        except LeaseExpired:
            self._lease = None
            self._wake.set()
            return "our lease expired while deciding; granting a new one"
        if self.role == "starting":
            self._set_role("shadow", None, decision)
        await self._put_member_quietly()
        return decision

    async def _decide_as_shadow(self, snapshot: ClusterSnapshot) -> str:
        now = trio.current_time()
        leader = snapshot.leader
        previous_leader = self.leader_node
        self._see_leader(snapshot)
        prefix = ""
        if leader is not None and leader.node == self.node_id:
            if (leader.lease == self._lease and leader.epoch != self._fenced_epoch
                    and now >= self._hold_off_until):
                self._promote(leader.epoch, "found our own leader key")
                return f"found our own leader key (epoch {leader.epoch}), promoting"
            if leader.lease == self._lease:
                await self._op(self.store.resign, self.node_id, leader.epoch)
                prefix = f"gave up our own leader key (epoch {leader.epoch}); "
            else:
                await self._op(self.store.depose, leader.epoch)
                prefix = f"deposed our previous process's stale leader key (epoch {leader.epoch}); "
            leader = None
            previous_leader = None

        if leader is not None:
            self._vacant_since = None
            hint = self._hint
            if hint is not None and (hint.epoch != leader.epoch
                                     or now >= hint.at + self.timing.ttl):
                self._hint = hint = None  # about another epoch, or too old to matter
            if hint is None:
                return f"following master {leader.node} (epoch {leader.epoch})"
            rank = self._rank(snapshot, exclude=leader.node)
            due = hint.at + rank * self.timing.priority_step
            lost = f"master {leader.node} (epoch {leader.epoch}) reported lost by {hint.source}"
            if now < due:
                self._due(due)
                return f"{lost}; waiting {due - now:.2f} s for {rank} higher-priority node(s)"
            self._hint = None
            deposed = await self._op(self.store.depose, leader.epoch)
            prefix += f"{lost}: {'deposed it' if deposed else 'it was already gone'}; "
            return prefix + await self._try_acquire()

        if now < self._hold_off_until:
            self._due(self._hold_off_until)
            return (prefix + f"leader key vacant; holding off for "
                    f"{self._hold_off_until - now:.2f} s after resigning")
        if self._vacant_since is None:
            self._vacant_since = now
        rank = self._rank(snapshot, exclude=previous_leader)
        due = self._vacant_since + rank * self.timing.priority_step
        if now < due:
            self._due(due)
            return (prefix + f"leader key vacant; waiting {due - now:.2f} s for {rank} "
                    "higher-priority node(s)")
        return prefix + await self._try_acquire()

    async def _try_acquire(self) -> str:
        await self._ensure_lease()
        assert self._lease is not None
        data = {k: v for k, v in self.member_data.items() if k in ("address", "admin_url")}
        epoch = await self._op(self.store.try_acquire_leader, self.node_id, self._lease, data)
        if epoch is None:
            self._wake.set()  # look at the winner right away
            return "lost the race for the leader key"
        self._vacant_since = None
        self._promote(epoch, "acquired leader key")
        return f"acquired leader key with epoch {epoch}, promoting"

    # --- helpers ---------------------------------------------------------------------------
    async def _op(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """One store call, bounded by retry_timeout (a hung store is StoreUnavailable)."""
        with trio.move_on_after(self.timing.retry_timeout):
            return await fn(*args)
        raise StoreUnavailable(f"no answer within retry_timeout ({self.timing.retry_timeout:g} s)")

    async def _ensure_lease(self) -> None:
        if self._lease is not None:
            try:
                await self._op(self.store.refresh_lease, self._lease)
                return
            except LeaseExpired:
                metrics.LEASE_RENEWAL_FAILURES.inc()
                self._lease = None
        self._lease = await self._op(self.store.grant_lease, self.timing.ttl)

    async def _renew_within_retry_timeout(self) -> None:
        """Refresh the master's lease, retrying until retry_timeout (LeaseExpired at once)."""
        if self._lease is None:
            raise LeaseExpired("our lease was found gone earlier")
        pause = min(0.25, self.timing.retry_timeout / 4)
        last: Exception | None = None
        with trio.move_on_after(self.timing.retry_timeout):
            while True:
                try:
                    await self.store.refresh_lease(self._lease)
                    return
                except LeaseExpired:
                    metrics.LEASE_RENEWAL_FAILURES.inc()
                    raise
                except StoreUnavailable as exc:
                    metrics.LEASE_RENEWAL_FAILURES.inc()
                    last = exc
                await trio.sleep(pause)
        raise StoreUnavailable(f"could not renew lease within retry_timeout: {last or 'no answer'}")

    def _member_payload(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            **self.member_data,
            "node": self.node_id,
            "priority": self.priority,
            "role": self.role,
            "epoch": self.epoch,
            "health": self.member_data.get("health", "ok"),
            "eligible": now >= self._hold_off_until,
        }

    async def _put_member(self) -> None:
        if self._lease is not None:
            await self._op(self.store.put_member, self.node_id, self._member_payload(), self._lease)

    async def _put_member_quietly(self) -> None:
        try:
            await self._put_member()
        except StoreUnavailable:
            pass
        except LeaseExpired:
            self._lease = None

    def _rank(self, snapshot: ClusterSnapshot, exclude: str | None) -> int:
        mine = (-self.priority, self.node_id)
        return sum(
            1
            for member in snapshot.members.values()
            if member.node not in (self.node_id, exclude)
            and member.healthy
            and member.data.get("eligible", True) is not False
            and (-member.priority, member.node) < mine
        )

    def _due(self, when: float) -> None:
        self._next_due = min(self._next_due, when)

    def _see_leader(self, snapshot: ClusterSnapshot) -> None:
        node = snapshot.leader.node if snapshot.leader is not None else None
        if node is not None and node != self.leader_node:
            metrics.LEADER_CHANGES.labels(self.store.cluster, self.location).inc()
        self.leader_node = node

    def _promote(self, epoch: int, reason: str) -> None:
        self._fenced_epoch = None
        self._set_role("master", epoch, reason)

    def _set_role(self, role: Role, epoch: int | None, reason: str) -> None:
        """Change role now; the RoleChange is published by the next ``_record`` so that its
        reason is the cycle's full decision (and ``last_decision`` is set before waiters wake)."""
        if role == self.role and epoch == self.epoch:
            return
        self.role = role
        self.epoch = epoch
        self._role_dirty = True
        self._publish_metrics()
        log.warning("%s: role %s (epoch %s): %s", self.node_id, role, epoch, reason)

    def _publish_metrics(self) -> None:
        for role in ROLES:
            metrics.NODE_ROLE.labels(role=role, **self._labels).set(1 if role == self.role else 0)
        metrics.NODE_EPOCH.labels(**self._labels).set(self.epoch or 0)

    def _record(self, decision: str) -> None:
        if decision != self.last_decision:
            log.info("%s: %s", self.node_id, decision)
        else:
            log.debug("%s: %s", self.node_id, decision)
        self.last_decision = decision
        self.decisions.append((trio.current_time(), decision))
        self._decided.unpark_all()
        if self._role_dirty:
            self._role_dirty = False
            self._change = RoleChange(self.role, self.epoch, decision, self._change.version + 1,
                                      trio.current_time())
            self._changed.set()
            self._changed = trio.Event()

    async def _watch_leader(self) -> None:
        """Wake the loop when the leader key changes (shadows act on a deletion at once)."""
        while True:
            try:
                async with self.store.watch(LEADER_KEY) as events:
                    async for event in events:
                        if event.key != LEADER_KEY:
                            continue
                        if self.role != "master" or event.kind == "delete":
                            self._wake.set()
            except (StoreUnavailable, RevisionCompacted) as exc:
                log.debug("%s: leader watch interrupted (%s); re-creating", self.node_id, exc)
            await trio.sleep(self.timing.loop_wait)
