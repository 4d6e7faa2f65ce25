"""Which node serves which (subaccount, location): the cloud side's fence and failover hold.

Theory of operation
-------------------
Every node of a location keeps one tunnel to the cloud. A tunnel starts as a *standby*; it becomes
the location's *master* by registering with a fencing epoch (the create_revision of its etcd leader
key). The registry keeps, per (subaccount, location), the highest epoch it ever accepted:

* a registration with a lower epoch is refused (``stale_epoch``): a master that was frozen or cut
  off from etcd cannot come back and serve once a newer one registered;
* a higher epoch replaces the current master, whose tunnel is closed at once (unless it announced a
  graceful drain: then its in-flight streams finish, but it gets no new ones);
* the same epoch from a new tunnel is the same master reconnecting after a blip.

Epochs only order the masters of *one* cluster (they are revisions of that cluster's etcd), so a
location also belongs to one cluster: the one pinned for it in the cloud's configuration, or else
the first cluster that registers it (the binding is kept with the epochs). Any other cluster is
refused (``wrong_cluster``, naming the owner) without disturbing the owner's master: two clusters
claiming one location would otherwise fence each other many times a second. The decision is the
pure function `decide_registration`; moving a location to another cluster is a pin in the cloud's
configuration (its epochs start afresh, the old cluster is then refused).

Waiting for a stream. While a known location has no master (failover, handover), `open_stream`
*holds* the request: it waits for a registration for at most ``hold_seconds``, with at most
``hold_max`` requests waiting, then fails with `NoConnectorError` (503). A failover therefore
costs latency, not errors. While every stream of the master's tunnel is in use (the node's
``max_streams``), a request waits for a free one for at most ``stream_wait_seconds`` (both
measured from the call), at most ``hold_max`` of them, then fails with code ``tunnel_busy``; if
the master changes meanwhile, the decision is made again. Before any wait the request is admitted
per token and per client address (`connector.cloud.admission`), so one application cannot hold
or queue for a whole tunnel. A request whose application closes its connection while it waits
ends at once (``client_gone``): no waiter, count or stream is left behind for it.
When a master's tunnel drops, the standbys of its location are told at once (``master_lost``), which
is the fastest signal a shadow node can get that the master process died.

Highest epochs are persisted to ``state_file`` (when configured) so a restarted cloud keeps fencing.

Several replicas (``[shared]``): the fence and the binding of every location are shared through the
cloud's etcd (`connector.cloud.shared`), as a `Fence` per location. The registry stays the one
place that decides; the shared state feeds it what other replicas accepted (`apply_shared_fence`,
merged by the pure `merge_fence`: epochs only rise, the first binding in etcd wins unless a pin
says otherwise; only an operator's reset, `connector cloud-fence reset`, lowers one), and hears of what this replica accepted through `fence_listener`, to write it
back. A master whose epoch falls below the merged fence (another replica accepted a newer one) is
fenced at once, exactly as on a higher registration here. Such a registry starts *fail closed*
(``shared_fence=True``): until `load_shared_fences` ran, it admits no tunnel (``fence_unknown``)
and routes nothing, because a fence it has not read cannot refuse a stale master.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import trio

from connector import metrics
from connector.cloud.admission import StreamAdmission
from connector.cloud.audit import CloudAudit
from connector.cloud.clients import ClientConnection, current_client
from connector.cloud.fence import (
    Fence,
    LocationKey,
    RegistrationResult,
    decide_registration,
    merge_fence,
)
from connector.cloud.fencefile import FenceFile
from connector.cloud.router import NoConnectorError
from connector.tunnel.session import TunnelError, TunnelSession
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, Target

log = logging.getLogger(__name__)

__all__ = ["Registry", "TunnelHandle", "RegistryStatistics", "refuse_tunnel",
           # the fence vocabulary lives in connector.cloud.fence; re-exported for existing imports
           "Fence", "LocationKey", "RegistrationResult", "decide_registration", "merge_fence"]



@attrs.define(eq=False)
class TunnelHandle:
    """One connected node tunnel as the registry sees it."""

    session: TunnelSession
    subaccount: str
    location_id: str
    node: str  # the certificate's CN
    cluster: str = ""  # the cluster the node belongs to (see `decide_registration`)
    epoch: int | None = None  # set once registered as master
    draining: bool = False

    @property
    def key(self) -> LocationKey:
        return (self.subaccount, self.location_id)


@attrs.define(eq=False)
class _Location:
    key: LocationKey
    known: bool = False
    master: TunnelHandle | None = None
    highest_epoch: int = -1  # of the bound cluster
    cluster: str | None = None  # the cluster this location is bound to (None: not yet)
    resets: int = 0  # operator resets of the shared fence seen (`Fence.resets`)
    pinned: str | None = None  # the cluster the cloud's configuration assigns (overrides `cluster`)
    tunnels: set[TunnelHandle] = attrs.Factory(set)
    master_changed: trio.Event = attrs.Factory(trio.Event)
    no_master_since: float | None = None
    last_master: tuple[str, int] | None = None  # (node, epoch) of the last accepted registration, for the audit
    # Who carried this location's streams, run-length encoded: the drills check from this that
    # epochs never go backwards, i.e. that no two masters ever served at once.
    routing: deque[dict[str, Any]] = attrs.Factory(lambda: deque(maxlen=1000))

    def record_stream(self, node: str, epoch: int | None) -> None:
        last = self.routing[-1] if self.routing else None
        if last is not None and last["node"] == node and last["epoch"] == epoch:
            last["streams"] += 1
            last["last"] = trio.current_time()
        else:
            now = trio.current_time()
            self.routing.append({"node": node, "epoch": epoch, "first": now, "last": now, "streams": 1})

    def fence(self) -> Fence:
        return Fence(self.highest_epoch, self.cluster, self.resets)

    def signal(self) -> None:
        self.master_changed.set()
        self.master_changed = trio.Event()


@attrs.frozen
class RegistryStatistics:
    held: int  # requests waiting for a master
    waiting_for_streams: int  # requests waiting for a free stream on their master's tunnel


class Registry:
    """Implements `connector.cloud.router.Router` over the registered tunnels."""

    def __init__(
        self,
        *,
        hold_seconds: float = 5.0,
        hold_max: int = 1000,
        known_locations: Iterable[LocationKey] = (),
        pinned_clusters: dict[LocationKey, str] | None = None,
        state_file: Path | None = None,
        stream_wait_seconds: float = 5.0,
        admission: StreamAdmission | None = None,
        shared_fence: bool = False,
        audit: CloudAudit | None = None,
    ) -> None:
        self.hold_seconds = hold_seconds
        self.audit = audit if audit is not None else CloudAudit()  # registrations, refusals, fence, switches
        self.hold_max = hold_max
        self.stream_wait_seconds = stream_wait_seconds
        self.admission = admission if admission is not None else StreamAdmission()
        self._waiting_for_streams = 0
        self._waiting_changed = trio.lowlevel.ParkingLot()
        self.state_file = state_file
        self._fence_file = FenceFile(state_file)
        self._locations: dict[LocationKey, _Location] = {}
        self._locations_changed = trio.lowlevel.ParkingLot()  # unparked whenever a location is exported
        self._masters_changed = trio.lowlevel.ParkingLot()  # unparked whenever a location's master changes
        self._held = 0
        self._nursery: trio.Nursery | None = None
        # with a shared fence: nothing is admitted or routed until it was read (fail closed)
        self.fence_loaded = not shared_fence
        self._fence_gauge = metrics.CLOUD_SHARED_LOADED.labels("shared" if shared_fence else "local")
        self._fence_gauge.set(1 if self.fence_loaded else 0)
        if not shared_fence:  # nothing to write to a cloud etcd: the series exists, and says so
            metrics.CLOUD_SHARED_WRITES_PENDING.labels("local").set(0)
        for outcome in ("released", "timeout", "overflow"):  # at 0 from the start: increase() sees the first
            metrics.HELD_TOTAL.labels(outcome)
        self._fence_loaded_event = trio.Event()
        if self.fence_loaded:
            self._fence_loaded_event.set()
        self.fence_listener: Callable[[LocationKey, Fence], None] | None = None  # told of local advances
        for key in known_locations:
            self._location(key).known = True
        for key, fence in self._fence_file.load().items():
            location = self._location(key)
            location.highest_epoch = fence.epoch
            location.cluster = fence.cluster
            location.known = True
        for key, cluster in (pinned_clusters or {}).items():
            location = self._location(key)
            location.pinned = cluster
            location.known = True
            if location.cluster not in (None, cluster):
                log.warning("location %s moves from cluster %r to cluster %r (pinned in the configuration)",
                            key, location.cluster, cluster)

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the tasks that notify standbys and close replaced tunnels; account no-master time."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            now = trio.current_time()
            for location in self._locations.values():
                if location.known and location.master is None:
                    location.no_master_since = now
                    self._export(location)
            task_status.started()
            while True:
                await trio.sleep(1.0)
                self._account_no_master()
                if self._fence_file.failing:
                    self._save_epochs()  # retried until the disk takes it again

    def _spawn(self, fn: Any, *args: Any) -> None:
        if self._nursery is None:
            raise RuntimeError("Registry.run() is not running")
        self._nursery.start_soon(fn, *args)

    # --- tunnels -------------------------------------------------------------------------

    def admit(self, handle: TunnelHandle) -> RegistrationResult:
        """Whether a new tunnel may join its location at all: only its owning cluster's may.
        The caller refuses the tunnel (and does not `add` it) when this is not accepted."""
        location = self._location(handle.key)
        verdict = self._decide(location, handle, None)
        if not verdict.accepted:
            self._refused(handle, verdict)
        return verdict

    def _fence_unknown(self, location: _Location) -> RegistrationResult:
        return RegistrationResult(False, "fence_unknown", location.highest_epoch, None)

    def add(self, handle: TunnelHandle) -> None:
        location = self._location(handle.key)
        location.known = True
        location.tunnels.add(handle)
        if location.master is None and location.no_master_since is None:
            location.no_master_since = trio.current_time()
        self._export(location)

    def remove(self, handle: TunnelHandle) -> None:
        """The tunnel closed. If it was the master, tell the standbys at once."""
        location = self._location(handle.key)
        location.tunnels.discard(handle)
        if location.master is handle:
            self._set_master(location, None)
            if not handle.draining:
                log.warning("master %s of %s lost its tunnel (epoch %s)", handle.node, handle.key, handle.epoch)
                self._broadcast(location, "master_lost", {"epoch": handle.epoch, "node": handle.node})
        self._export(location)

    def register(self, handle: TunnelHandle, epoch: int) -> RegistrationResult:
        """Apply the fencing rule to a master registration (see module docstring)."""
        location = self._location(handle.key)
        sub, loc = handle.key
        verdict = self._decide(location, handle, epoch)
        if not verdict.accepted:
            self._refused(handle, verdict, epoch)
            return verdict
        fence_changed = False
        if location.cluster != verdict.cluster:
            if location.cluster is not None:  # moved by a pin: the old cluster's epochs do not apply
                log.warning("location %s now belongs to cluster %r (was %r)", handle.key, verdict.cluster, location.cluster)
                location.highest_epoch = -1
            location.cluster = verdict.cluster
            fence_changed = True
        previous = location.master
        repeated = previous is handle and handle.epoch == epoch  # registering again: nothing to audit
        if previous is not None and previous is not handle:
            # A newer (or the same, reconnected) master: the old tunnel must never carry traffic again.
            previous.epoch = None
            if not previous.draining:
                self._spawn(self._fence, previous, epoch)
        handle.epoch = epoch
        handle.draining = False
        if epoch > location.highest_epoch:
            self.audit.fence_advanced(subaccount=sub, location=loc, cluster=handle.cluster, node=handle.node,
                                      old_epoch=location.highest_epoch, new_epoch=epoch, source="registration")
            location.highest_epoch = epoch
            fence_changed = True
        if fence_changed:
            self._save_epochs()
            if self.fence_listener is not None:
                self.fence_listener(location.key, location.fence())
        self._set_master(location, handle)
        if not repeated:
            self._audit_registration(location, handle, epoch)
        self._refuse_other_clusters(location)
        metrics.CLOUD_REGISTRATIONS.labels(sub, loc, "accepted").inc()
        metrics.CLOUD_MASTER_EPOCH.labels(sub, loc).set(epoch)
        log.info("%s of cluster %r is master of %s with epoch %d", handle.node, handle.cluster, handle.key, epoch)
        self._export(location)
        return verdict

    def _decide(self, location: _Location, handle: TunnelHandle, epoch: int | None) -> RegistrationResult:
        if not self.fence_loaded:
            return self._fence_unknown(location)
        return decide_registration(
            pinned=location.pinned, bound=location.cluster, highest_epoch=location.highest_epoch,
            cluster=handle.cluster, epoch=epoch,
        )

    def _audit_registration(self, location: _Location, handle: TunnelHandle, epoch: int) -> None:
        sub, loc = handle.key
        self.audit.tunnel_registered(subaccount=sub, location=loc, node=handle.node, cluster=handle.cluster, epoch=epoch)
        if location.last_master != (handle.node, epoch):  # else the same master reconnecting
            last_node, last_epoch = location.last_master or (None, None)
            self.audit.master_switched(subaccount=sub, location=loc, node=handle.node, cluster=handle.cluster,
                                       epoch=epoch, from_node=last_node, from_epoch=last_epoch)
            location.last_master = (handle.node, epoch)

    def _refused(self, handle: TunnelHandle, verdict: RegistrationResult, epoch: int | None = None) -> None:
        metrics.CLOUD_REGISTRATIONS.labels(*handle.key, verdict.reason).inc()
        self.audit.tunnel_refused(subaccount=handle.subaccount, location=handle.location_id, node=handle.node,
                                  cluster=handle.cluster, reason=verdict.reason, epoch=epoch,
                                  highest_epoch=verdict.highest_epoch, owner=verdict.cluster)
        if verdict.reason == "wrong_cluster":
            log.error(
                "refused node %s of cluster %r for location %s: the location belongs to cluster %r "
                "(a second cluster claims it: check [cluster] name, etcd and subaccount of that node; "
                "to move the location, pin it in the cloud configuration)",
                handle.node, handle.cluster, handle.key, verdict.cluster,
            )
        elif verdict.reason == "fence_unknown":
            log.warning("refused %s for %s: the shared fence is not read yet (cloud etcd unreachable)",
                        handle.node, handle.key)
        else:
            log.warning("refused %s for %s: epoch %s is lower than %d", handle.node, handle.key, epoch,
                        verdict.highest_epoch)

    def _refuse_other_clusters(self, location: _Location) -> None:
        """A location was just bound: standby tunnels of other clusters have no business here."""
        for tunnel in list(location.tunnels):
            verdict = self._decide(location, tunnel, None)
            if not verdict.accepted:
                self._refused(tunnel, verdict)
                location.tunnels.discard(tunnel)
                self._spawn(refuse_tunnel, tunnel.session, verdict.control_body())

    # --- the shared fence (several replicas) -------------------------------------------------

    def load_shared_fences(self, fences: dict[LocationKey, Fence]) -> None:
        """The shared fence was read: apply it, then admit and route (see the module docstring)."""
        for key, fence in fences.items():
            self.apply_shared_fence(key, fence)
        if not self.fence_loaded:
            log.info("shared fence read (%d locations): admitting tunnels", len(fences))
        self.fence_loaded = True
        self._fence_gauge.set(1)
        self._fence_loaded_event.set()

    def apply_shared_fence(self, key: LocationKey, fence: Fence) -> Fence:
        """Merge a fence another replica wrote (or read at start) into ours; fence a master it
        outdates. Returns the merged fence: when it differs from `fence`, etcd is behind us."""
        location = self._location(key)
        location.known = True
        local = location.fence()
        merged = merge_fence(fence, local, pinned=location.pinned)
        if merged != local:
            if merged.cluster != location.cluster and location.cluster is not None:
                log.warning("location %s is bound to cluster %r by another replica (was %r here)",
                            key, merged.cluster, location.cluster)
            if merged.epoch > location.highest_epoch:
                self.audit.fence_advanced(subaccount=key[0], location=key[1], cluster=merged.cluster,
                                          old_epoch=location.highest_epoch, new_epoch=merged.epoch, source="shared")
            if merged.resets > local.resets:
                log.warning("the fence of %s was reset by an operator: epoch %d -> %d (reset %d)",
                            key, local.epoch, merged.epoch, merged.resets)
            location.highest_epoch, location.cluster, location.resets = merged.epoch, merged.cluster, merged.resets
            self._enforce(location)
            self._export(location)
        return merged

    def _enforce(self, location: _Location) -> None:
        """The fence rose or the binding moved: a master it outdates never serves again here."""
        master = location.master
        if master is not None:
            verdict = self._decide(location, master, master.epoch)
            if not verdict.accepted:
                self._refused(master, verdict, master.epoch)
                master.epoch = None
                self._set_master(location, None)
                if verdict.reason == "wrong_cluster":
                    location.tunnels.discard(master)
                    self._spawn(refuse_tunnel, master.session, verdict.control_body())
                else:
                    log.warning("master %s of %s fenced: another replica accepted epoch %d",
                                master.node, location.key, location.highest_epoch)
                    self._spawn(self._fence, master, location.highest_epoch)
        self._refuse_other_clusters(location)

    def pin(self, key: LocationKey, cluster: str | None) -> None:
        """Assign (or, with None, un-assign) the cluster that alone may serve a location, live
        (a subaccount setting from the cloud's etcd): its master and standbys of any other
        cluster are refused at once, its epochs start afresh when its new cluster registers."""
        location = self._location(key)
        location.known = True
        if location.pinned == cluster:
            return
        log.warning("location %s is now pinned to cluster %r (was %r)", key, cluster, location.pinned)
        location.pinned = cluster
        self._enforce(location)
        self._export(location)

    def know(self, key: LocationKey) -> None:
        """Hold requests for this location during a failover even before its first master."""
        location = self._location(key)
        if not location.known:
            location.known = True
            if location.master is None and location.no_master_since is None:
                location.no_master_since = trio.current_time()
            self._export(location)

    def fences(self) -> list[LocationKey]:
        """The locations with a fence (an accepted epoch or a binding)."""
        return [key for key, loc in sorted(self._locations.items()) if loc.highest_epoch >= 0 or loc.cluster is not None]

    def fence_of(self, key: LocationKey) -> Fence:
        location = self._locations.get(key)
        return location.fence() if location is not None else Fence()

    async def wait_fence(self, key: LocationKey, expected: Fence) -> None:
        """Return once the location's fence is `expected` (e.g. a shared write applied here)."""
        await trio.lowlevel.checkpoint()
        while self.fence_of(key) != expected:
            await self._locations_changed.park()

    async def wait_fence_loaded(self) -> None:
        await self._fence_loaded_event.wait()

    def unregister(self, handle: TunnelHandle, *, draining: bool) -> None:
        """The master stops taking new streams (graceful drain, or it lost leadership)."""
        location = self._location(handle.key)
        handle.draining = draining
        if location.master is handle:
            self._set_master(location, None)
            handle.epoch = None
            log.info("%s of %s unregistered (draining=%s)", handle.node, handle.key, draining)
        self._export(location)

    async def _fence(self, handle: TunnelHandle, new_epoch: int) -> None:
        with trio.move_on_after(1.0):
            try:
                await handle.session.send_control("fenced", {"epoch": new_epoch})
            except TunnelError:
                pass
        await handle.session.aclose(ErrorCode.STALE_EPOCH, f"replaced by a master with epoch {new_epoch}")

    def _broadcast(self, location: _Location, op: str, body: dict[str, Any]) -> None:
        for tunnel in list(location.tunnels):
            self._spawn(self._send_quietly, tunnel, op, body)

    @staticmethod
    async def _send_quietly(tunnel: TunnelHandle, op: str, body: dict[str, Any]) -> None:
        with trio.move_on_after(1.0):
            try:
                await tunnel.session.send_control(op, body)
            except TunnelError:
                pass

    # --- routing (Router protocol) ----------------------------------------------------------

    async def open_stream(self, subaccount: str, location_id: str, target: Target, *,
                          avoid: TunnelStream | None = None) -> TunnelStream:
        """A stream to `target` on the location's master; see "Waiting for a stream" above.

        `avoid`: a stream whose tunnel refused this request (REFUSED: not the master, handing
        over); while that tunnel is still the location's master, the request waits in the hold
        for the next one, as if none were registered."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self.fence_loaded:
            raise NoConnectorError("this cloud replica has not read the shared fence yet (its etcd is unreachable): "
                                   "it routes nothing until it has", code="fence_unknown")
        location = self._locations.get((subaccount, location_id))
        if location is None or not location.known:
            raise NoConnectorError(f"no connector is connected for location {location_id!r} of subaccount {subaccount!r}")
        client = current_client.get()
        ticket = self.admission.admit(subaccount, client)  # NoConnectorError at once past a limit
        try:
            stream = await self._open(location, target, client, getattr(avoid, "session", None))
        except BaseException:
            ticket.release()
            raise
        return ticket.attach(stream)

    async def _open(self, location: _Location, target: Target, client: ClientConnection | None,
                    refused_by: object = None) -> TunnelStream:
        started = trio.current_time()
        hold_deadline = started + self.hold_seconds
        busy_deadline = started + self.stream_wait_seconds
        held_since: float | None = None
        try:
            while True:
                master = location.master
                if master is not None and refused_by is not None and master.session is refused_by:
                    master = None  # it refused this very request: wait for the next master
                if master is not None:
                    # The routing decision is made now, with this epoch: a stream opened at once
                    # is this master's even if it drains or is fenced right after; one waited for
                    # is taken only while this master stays (else the decision is made again).
                    epoch = master.epoch
                    stream: TunnelStream | None
                    try:
                        try:
                            stream = master.session.open_stream_nowait(target)
                        except trio.WouldBlock:
                            stream = await self._wait_for_free_stream(location, master, target, client, busy_deadline)
                    except TunnelError:
                        # The tunnel died before this request was sent: safe to wait for the next master.
                        if location.master is master:
                            self.remove(master)
                        continue
                    if stream is None:  # the master changed while we waited: decide again
                        continue
                    location.record_stream(master.node, epoch)
                    if held_since is not None:
                        metrics.HELD_TOTAL.labels("released").inc()
                        metrics.HELD_SECONDS.observe(trio.current_time() - held_since)
                    return stream
                if held_since is None:
                    if self._held >= self.hold_max:
                        metrics.HELD_TOTAL.labels("overflow").inc()
                        raise NoConnectorError("no master connected and the failover hold is full")
                    held_since = trio.current_time()
                    self._held += 1
                    metrics.HELD_REQUESTS.set(self._held)
                if await self._wait(client, hold_deadline, location.master_changed.wait, subaccount=location.key[0]):
                    continue
                metrics.HELD_TOTAL.labels("timeout").inc()
                metrics.HELD_SECONDS.observe(trio.current_time() - held_since)
                raise NoConnectorError(
                    f"no master registered for location {location.key[1]!r} within {self.hold_seconds:g} s"
                )
        finally:
            if held_since is not None:
                self._held -= 1
                metrics.HELD_REQUESTS.set(self._held)

    async def _wait_for_free_stream(
        self, location: _Location, master: TunnelHandle, target: Target, client: ClientConnection | None,
        deadline: float,
    ) -> TunnelStream | None:
        """Every stream of the master's tunnel is in use: wait for one until `deadline`.

        None if the location's master changed meanwhile (the caller decides again); TunnelError
        if the tunnel died; NoConnectorError (``tunnel_busy``) when the deadline passed or the
        wait is full, (``client_gone``) when the application left.
        """
        sub = location.key[0]
        if self._waiting_for_streams >= self.hold_max:
            metrics.PROXY_STREAM_REFUSALS.labels(sub, "tunnel_busy").inc()
            raise NoConnectorError("every stream of the connector's tunnel is in use and too many requests wait",
                                   code="tunnel_busy")
        opened: list[TunnelStream] = []
        failed: list[TunnelError] = []

        async def take_a_free_stream() -> None:
            try:
                opened.append(await master.session.open_stream(target))
            except TunnelError as exc:
                failed.append(exc)

        changed = location.master_changed
        self._count_waiting(+1)
        try:
            await self._wait(client, deadline, take_a_free_stream, changed.wait, subaccount=sub)
        finally:
            self._count_waiting(-1)
        if opened:
            return opened[0]
        if failed:
            raise failed[0]
        if changed.is_set():
            return None
        metrics.PROXY_STREAM_REFUSALS.labels(sub, "tunnel_busy").inc()
        raise NoConnectorError(
            f"every stream of the connector's tunnel stayed in use for {self.stream_wait_seconds:g} s",
            code="tunnel_busy",
        )

    @staticmethod
    async def _wait(
        client: ClientConnection | None, deadline: float, *waits: Callable[[], Awaitable[object]], subaccount: str
    ) -> bool:
        """Run `waits` until the first returns (True) or `deadline` passes (False). Raise
        NoConnectorError (``client_gone``) as soon as the application closes its connection: a
        client that gave up leaves no waiter behind, and no stream is opened for it."""
        done = gone = False
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:

                async def first(wait: Callable[[], Awaitable[object]]) -> None:
                    nonlocal done
                    await wait()
                    done = True
                    nursery.cancel_scope.cancel()

                async def watch_client(client: ClientConnection) -> None:
                    nonlocal gone
                    await client.wait_gone()
                    gone = True
                    nursery.cancel_scope.cancel()

                for wait in waits:
                    nursery.start_soon(first, wait)
                if client is not None:
                    nursery.start_soon(watch_client, client)
        if gone and not done:
            metrics.PROXY_STREAM_REFUSALS.labels(subaccount, "client_gone").inc()
            raise NoConnectorError("the application closed its connection while waiting for a stream",
                                   code="client_gone")
        return done

    def _count_waiting(self, delta: int) -> None:
        self._waiting_for_streams += delta
        metrics.PROXY_STREAM_WAITING.set(self._waiting_for_streams)
        self._waiting_changed.unpark_all()

    async def wait_waiting(self, count: int) -> None:
        """Return once exactly `count` requests wait for a free stream (for tests: no polling)."""
        while self._waiting_for_streams != count:
            await self._waiting_changed.park()

    # --- introspection ---------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """JSON-able view for the admin API: per location, master, epoch and tunnels."""
        result = []
        for (sub, loc), location in sorted(self._locations.items()):
            result.append(
                {
                    "subaccount": sub,
                    "location_id": loc,
                    "master": location.master.node if location.master else None,
                    "epoch": location.master.epoch if location.master else None,
                    "highest_epoch": location.highest_epoch,
                    "cluster": location.pinned or location.cluster,
                    "tunnels": [
                        {"node": t.node, "cluster": t.cluster, "role": "master" if t is location.master else "standby", "draining": t.draining}
                        for t in sorted(location.tunnels, key=lambda t: t.node)
                    ],
                    "routing": list(location.routing),
                }
            )
        return result

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per location ("subaccount/location"): tunnels, master and its epoch (the replica set's view)."""
        return {
            f"{sub}/{loc}": {"tunnels": len(location.tunnels), "master": location.master.node if location.master else None,
                             "epoch": location.master.epoch if location.master else None}
            for (sub, loc), location in sorted(self._locations.items())
        }

    def statistics(self) -> RegistryStatistics:
        return RegistryStatistics(self._held, self._waiting_for_streams)

    def master_of(self, subaccount: str, location_id: str) -> TunnelHandle | None:
        location = self._locations.get((subaccount, location_id))
        return location.master if location else None

    async def wait_master(self, subaccount: str, location_id: str, *, node: str | None = None) -> TunnelHandle:
        """Return the location's master once it has one (node `node`, if given); at once if it
        has. Woken by every change of master, never polling; the caller bounds the wait."""
        await trio.lowlevel.checkpoint()
        while True:
            master = self.master_of(subaccount, location_id)
            if master is not None and node in (None, master.node):
                return master
            await self._masters_changed.park()

    async def wait_no_master(self, subaccount: str, location_id: str) -> None:
        """Return once the location has no master (at once if it has none); the caller bounds it."""
        await trio.lowlevel.checkpoint()
        while self.master_of(subaccount, location_id) is not None:
            await self._masters_changed.park()

    # --- internals -------------------------------------------------------------------------

    def _location(self, key: LocationKey) -> _Location:
        location = self._locations.get(key)
        if location is None:
            location = self._locations[key] = _Location(key)
        return location

    def _set_master(self, location: _Location, handle: TunnelHandle | None) -> None:
        now = trio.current_time()
        if handle is None and location.master is not None:
            location.no_master_since = now
        elif handle is not None and location.no_master_since is not None:
            metrics.CLOUD_NO_MASTER_SECONDS.labels(*location.key).inc(now - location.no_master_since)
            location.no_master_since = None
        location.master = handle
        location.signal()
        self._masters_changed.unpark_all()

    def _account_no_master(self) -> None:
        now = trio.current_time()
        for location in self._locations.values():
            if location.known and location.master is None and location.no_master_since is not None:
                metrics.CLOUD_NO_MASTER_SECONDS.labels(*location.key).inc(now - location.no_master_since)
                location.no_master_since = now
            self._export(location)

    def _export(self, location: _Location) -> None:
        self._locations_changed.unpark_all()  # every change of a location is exported: wake wait_fence
        sub, loc = location.key
        metrics.CLOUD_HAS_MASTER.labels(sub, loc).set(1 if location.master else 0)
        masters = 1 if location.master else 0
        metrics.CLOUD_TUNNELS.labels(sub, loc, "master").set(masters)
        metrics.CLOUD_TUNNELS.labels(sub, loc, "standby").set(len(location.tunnels) - masters)
        if location.highest_epoch >= 0:
            metrics.CLOUD_MASTER_EPOCH.labels(sub, loc).set(location.highest_epoch)

    def _save_epochs(self) -> None:
        self._fence_file.save((key, Fence(location.highest_epoch, location.cluster))
                              for key, location in self._locations.items())

    @property
    def persisted(self) -> bool:
        """Whether `state_file` holds the current epochs (False while writes fail)."""
        return not self._fence_file.failing

    async def wait_persisted(self) -> None:
        """Wait until `state_file` holds the current epochs again (at once if it does)."""
        await self._fence_file.wait_written()


async def refuse_tunnel(session: TunnelSession, body: dict[str, Any]) -> None:
    """Tell a node why the cloud will not use its tunnel (``refused`` with a reason and a message),
    then close the tunnel: used when it connects and when its registration is refused.

    A replica that has not read the shared fence (``fence_unknown``) only closes the tunnel (the
    reason in the GOAWAY): a node takes a ``refused`` control as a verdict on its registration and
    steps down, which one replica that cannot reach its etcd must never cause; closed, it redials."""
    if body["reason"] != "fence_unknown":
        with trio.move_on_after(1.0):
            try:
                await session.send_control("refused", body)
            except TunnelError:
                pass
    await session.aclose(ErrorCode.DENIED, f"{body['reason']}: {body['message']}")
