"""Electors on a REAL etcd: failover when the master process dies, is reported lost, or resigns."""

from __future__ import annotations

import trio

from ha.election import Elector
from ha.etcd import EtcdSettings, EtcdStore
from ha.timing import HATiming
from tests.support.etcdserver import EtcdServer

TIMING = HATiming(ttl=2, loop_wait=0.25, retry_timeout=0.75)
TAKEOVER_BY_LEASE = TIMING.ttl + 1.0  # lease expiry + a loop and etcd's lease checker


class Node:
    def __init__(self, etcd: EtcdServer, name: str, priority: int = 100) -> None:
        self.store = EtcdStore("ha", EtcdSettings(endpoints=(etcd.url,), timeout=0.5, time_retry=0.2))
        self.elector = Elector(self.store, name, timing=TIMING, priority=priority,
                               member_data={"address": f"{name}.example:443"})
        self.scope = trio.CancelScope()

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            await self.elector.run(task_status=task_status)

    async def start(self, nursery: trio.Nursery) -> Node:
        await nursery.start(self._run)
        return self


async def wait_master(elector: Elector) -> float:
    while elector.role != "master":
        await elector.wait_role_change(elector.version)
    return trio.current_time()


async def start_pair(etcd: EtcdServer, nursery: trio.Nursery) -> tuple[Node, Node]:
    a = await Node(etcd, "a").start(nursery)
    b = await Node(etcd, "b").start(nursery)
    assert a.elector.role == "master" and b.elector.role == "shadow"
    assert b.elector.last_decision == f"following master a (epoch {a.elector.epoch})"
    return a, b


async def test_failover_when_master_is_cancelled(etcd: EtcdServer) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(etcd, nursery)
        old_epoch = a.elector.epoch
        assert old_epoch is not None
        await trio.sleep(0.5)  # the scenario: a master that has served (and renewed) a while crashes
        a.scope.cancel()  # a crash: the lease is left to expire
        crashed = trio.current_time()
        with trio.fail_after(TAKEOVER_BY_LEASE + 1):
            took_over = await wait_master(b.elector)
        assert took_over - crashed <= TAKEOVER_BY_LEASE
        assert took_over - crashed >= TIMING.ttl - TIMING.loop_wait - 0.1  # it did wait for the lease
        assert b.elector.epoch is not None and b.elector.epoch > old_epoch
        snapshot = await b.store.get_cluster()
        assert snapshot.leader is not None and snapshot.leader.node == "b"
        assert snapshot.members["b"].data["address"] == "b.example:443"
        nursery.cancel_scope.cancel()


async def test_failover_on_hint_is_fast(etcd: EtcdServer) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(etcd, nursery)
        epoch = a.elector.epoch
        assert epoch is not None
        a.scope.cancel()
        hinted = trio.current_time()
        b.elector.hint_master_lost(epoch, "cloud")
        with trio.fail_after(TIMING.ttl):
            took_over = await wait_master(b.elector)
        assert took_over - hinted < 0.5
        assert b.elector.epoch is not None and b.elector.epoch > epoch
        nursery.cancel_scope.cancel()


async def test_graceful_resign_hands_over_at_once(etcd: EtcdServer) -> None:
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(etcd, nursery)
        resigned = trio.current_time()
        assert await a.elector.resign(hold_off=5.0) is True
        with trio.fail_after(TIMING.ttl):
            took_over = await wait_master(b.elector)
        assert took_over - resigned < 0.5  # the watch saw the deletion: no polling, no lease wait
        with trio.fail_after(TIMING.ttl):
            await a.elector.wait_decision(f"following master b (epoch {b.elector.epoch})")
        assert a.elector.role == "shadow"
        nursery.cancel_scope.cancel()


async def test_master_keeps_serving_through_etcd_restart(etcd: EtcdServer) -> None:
    """etcd down for everyone: nobody else can be elected, so the master keeps its role and
    epoch (the cloud fence makes this safe); after the restart its lease is still there."""
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(etcd, nursery)
        epoch = a.elector.epoch
        await trio.to_thread.run_sync(etcd.kill)
        with trio.fail_after(5):
            await a.elector.wait_etcd_reachable(False)
        assert a.elector.role == "master"
        assert a.elector.last_decision.startswith("store unreachable")
        await trio.sleep(0.5)  # the scenario: etcd stays down a while, and nobody is elected meanwhile
        await trio.to_thread.run_sync(etcd.start)
        with trio.fail_after(5):
            await a.elector.wait_etcd_reachable()
        await trio.sleep(1.0)  # the scenario: several cycles with etcd back, and still no change of role
        assert (a.elector.role, a.elector.epoch, a.elector.version) == ("master", epoch, 1)
        assert b.elector.role == "shadow"
        assert a.elector.last_decision == f"renewed lease, still master (epoch {epoch})"
        nursery.cancel_scope.cancel()
