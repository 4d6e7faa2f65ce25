"""Election decisions on the in-memory store under autojump_clock, at exact virtual times.

Timings (HATiming defaults): ttl 3, loop_wait 0.5, retry_timeout 1.0, priority_step 0.25.
A master that started at 0 renews at 0, 0.5, 1.0, ...; cancelled at 1.2 its lease runs out
at 1.0 + 3 = 4.0, which is when a watching shadow must take over.
"""

from __future__ import annotations

import trio
import trio.testing

from ha.election import Elector
from ha.memory import MemoryStore
from ha.timing import HATiming

TIMING = HATiming()
DEMOTING = HATiming(keep_serving_without_store=False)


class Node:
    """One elector with its own store view and cancel scope (cancelling = a crash)."""

    def __init__(self, store: MemoryStore, name: str, priority: int = 100,
                 timing: HATiming = TIMING) -> None:
        self.store = store.view()
        self.elector = Elector(self.store, name, timing=timing, priority=priority)
        self.scope = trio.CancelScope()

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            await self.elector.run(task_status=task_status)

    async def start(self, nursery: trio.Nursery) -> Node:
        await nursery.start(self._run)
        return self

    def crash(self) -> None:
        self.scope.cancel()


async def wait_master(elector: Elector) -> float:
    while elector.role != "master":
        await elector.wait_role_change(elector.version)
    return trio.current_time()


def decided(elector: Elector, text: str) -> list[float]:
    return [t for t, d in elector.decisions if text in d]


async def test_single_node_acquires_at_once(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a").start(nursery)
        assert trio.current_time() == 0
        assert a.elector.role == "master"
        assert a.elector.epoch is not None and a.elector.epoch > 0
        assert a.elector.last_decision == f"acquired leader key with epoch {a.elector.epoch}, promoting"
        await trio.sleep(1.0)
        assert a.elector.last_decision == f"renewed lease, still master (epoch {a.elector.epoch})"
        snapshot = await store.get_cluster()
        assert snapshot.leader is not None and snapshot.leader.node == "a"
        assert snapshot.leader.epoch == a.elector.epoch
        assert snapshot.members["a"].data["role"] == "master"
        nursery.cancel_scope.cancel()


async def test_second_node_follows(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a").start(nursery)
        b = await Node(store, "b").start(nursery)
        assert b.elector.role == "shadow"
        assert b.elector.last_decision == f"following master a (epoch {a.elector.epoch})"
        await trio.sleep(5)
        assert (a.elector.role, b.elector.role) == ("master", "shadow")
        nursery.cancel_scope.cancel()


async def test_master_crash_takeover_after_ttl(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a").start(nursery)
        b = await Node(store, "b").start(nursery)
        old_epoch = a.elector.epoch
        assert old_epoch is not None
        await trio.sleep(1.2)
        a.crash()
        assert await wait_master(b.elector) == 4.0  # last renewal 1.0 + ttl 3
        assert b.elector.epoch is not None and b.elector.epoch > old_epoch
        assert b.elector.last_decision == f"acquired leader key with epoch {b.elector.epoch}, promoting"
        nursery.cancel_scope.cancel()


async def test_hint_master_lost_takes_over_at_once(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a").start(nursery)
        b = await Node(store, "b").start(nursery)
        old_epoch = a.elector.epoch
        assert old_epoch is not None
        await trio.sleep(1.2)
        a.crash()
        await trio.sleep(0.1)
        b.elector.hint_master_lost(old_epoch, "cloud")
        assert await wait_master(b.elector) == 1.3
        assert b.elector.last_decision.startswith(
            f"master a (epoch {old_epoch}) reported lost by cloud: deposed it; acquired leader key"
        )
        nursery.cancel_scope.cancel()


async def test_stale_hint_is_ignored(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a").start(nursery)
        b = await Node(store, "b").start(nursery)
        assert a.elector.epoch is not None
        b.elector.hint_master_lost(a.elector.epoch - 1, "probe")  # an older epoch
        await trio.sleep(1)
        assert (a.elector.role, b.elector.role) == ("master", "shadow")
        assert b.elector.last_decision == f"following master a (epoch {a.elector.epoch})"
        a.elector.hint_master_lost(a.elector.epoch, "probe")  # a master ignores hints
        await trio.sleep(1)
        assert a.elector.role == "master"
        nursery.cancel_scope.cancel()


async def test_resign_hands_over_at_once_and_holds_off(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a").start(nursery)
        b = await Node(store, "b").start(nursery)
        old_epoch = a.elector.epoch
        await trio.sleep(1.25)
        assert await a.elector.resign(hold_off=5.0) is True
        assert a.elector.role == "shadow" and a.elector.epoch is None
        assert await wait_master(b.elector) == 1.25
        assert b.elector.epoch is not None and old_epoch is not None and b.elector.epoch > old_epoch
        await trio.sleep(0.5)
        b.crash()  # b's last renewal was at 1.75: its lease runs out at 4.75
        await trio.sleep(2.75)
        assert trio.current_time() == 4.5
        t_acquired = await wait_master(a.elector)
        assert t_acquired == 1.25 + 5.0  # not at 4.75: a holds off until 6.25
        assert decided(a.elector, "leader key vacant; holding off")
        nursery.cancel_scope.cancel()


async def test_priority_highest_shadow_takes_over(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a", priority=100).start(nursery)
        low = await Node(store, "low", priority=50).start(nursery)
        high = await Node(store, "high", priority=200).start(nursery)
        await trio.sleep(1.2)
        a.crash()
        assert await wait_master(high.elector) == 4.0
        await trio.sleep(1)
        assert low.elector.role == "shadow"
        assert low.elector.last_decision == f"following master high (epoch {high.elector.epoch})"
        # low either saw the vacancy first (and waited its step) or saw high's key at once
        assert not decided(low.elector, "acquired")
        assert set(decided(low.elector, "leader key vacant")) <= {4.0}
        nursery.cancel_scope.cancel()


async def test_priority_lower_shadow_waits_one_step(autojump_clock: trio.abc.Clock) -> None:
    """The best shadow is alive in the member list but stalled: the next one waits one step."""
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a", priority=100).start(nursery)
        mid = await Node(store, "mid", priority=100).start(nursery)
        high = await Node(store, "high", priority=200).start(nursery)
        low = await Node(store, "low", priority=50).start(nursery)
        await trio.sleep(1.2)
        a.crash()
        await trio.sleep(2.6)
        high.crash()  # last renewal at 3.5: its member key lives until 6.5
        assert await wait_master(mid.elector) == 4.25  # rank 1: 4.0 + 0.25
        waits = decided(mid.elector, "leader key vacant; waiting 0.25 s for 1 higher-priority node(s)")
        assert set(waits) == {4.0}  # woken by the watch and the poll: maybe twice at 4.0
        await trio.sleep(1)
        assert low.elector.role == "shadow"
        nursery.cancel_scope.cancel()


async def test_priority_hint_best_shadow_deposes(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a").start(nursery)
        low = await Node(store, "low", priority=50).start(nursery)
        high = await Node(store, "high", priority=200).start(nursery)
        epoch = a.elector.epoch
        assert epoch is not None
        await trio.sleep(1.25)
        a.crash()
        low.elector.hint_master_lost(epoch, "cloud")
        high.elector.hint_master_lost(epoch, "cloud")
        assert await wait_master(high.elector) == 1.25
        await trio.sleep(1)
        assert low.elector.role == "shadow"
        assert decided(low.elector, "reported lost by cloud; waiting 0.25 s for 1 higher-priority")
        nursery.cancel_scope.cancel()


async def test_demotes_when_renewal_fails_beyond_retry_timeout(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a", timing=DEMOTING).start(nursery)
        await trio.sleep(1.2)
        a.store.set_fault("error")
        change = await a.elector.wait_role_change(a.elector.version)
        assert change.role == "shadow"
        assert trio.current_time() == 2.5  # cycle at 1.5 + retry_timeout 1.0
        assert a.elector.last_decision == "demoted: could not renew lease within retry_timeout (1 s)"
        nursery.cancel_scope.cancel()


async def test_demotes_when_store_hangs(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a", timing=DEMOTING).start(nursery)
        await trio.sleep(1.2)
        a.store.set_fault("hang")
        await a.elector.wait_role_change(a.elector.version)
        assert trio.current_time() == 2.5
        nursery.cancel_scope.cancel()


async def test_keeps_serving_without_store_until_fenced_by_lease(autojump_clock: trio.abc.Clock) -> None:
    """Master cut off from the store keeps its role; another node takes over once the lease
    expires; when the store answers again, the old master learns its lease is gone."""
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a").start(nursery)
        b = await Node(store, "b").start(nursery)
        await trio.sleep(1.2)
        a.store.set_fault("error")
        await trio.sleep(1.5)
        assert a.elector.role == "master" and a.elector.etcd_reachable is False
        assert a.elector.last_decision.startswith("store unreachable")
        assert await wait_master(b.elector) == 4.0
        assert a.elector.role == "master"  # still: the cloud fence protects traffic
        await trio.sleep(1.0)
        a.store.set_fault(None)
        change = await a.elector.wait_role_change(a.elector.version)
        assert change.role == "shadow"
        assert a.elector.last_decision.startswith("demoted: lease expired")
        await trio.sleep(1)
        assert a.elector.last_decision == f"following master b (epoch {b.elector.epoch})"
        nursery.cancel_scope.cancel()


async def test_keeps_master_through_short_outage(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a").start(nursery)
        epoch = a.elector.epoch
        await trio.sleep(1.2)
        a.store.set_fault("hang")
        await trio.sleep(1.5)
        assert a.elector.etcd_reachable is False
        a.store.set_fault(None)
        await trio.sleep(1.0)
        assert (a.elector.role, a.elector.epoch, a.elector.etcd_reachable) == ("master", epoch, True)
        assert a.elector.version == 1
        nursery.cancel_scope.cancel()


async def test_force_shadow_gives_up_key(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a").start(nursery)
        b = await Node(store, "b").start(nursery)
        await trio.sleep(1.25)
        a.elector.force_shadow("newer epoch registered", hold_off=2.0)
        assert a.elector.role == "shadow"
        assert await wait_master(b.elector) == 1.25
        assert decided(a.elector, "gave up our own leader key")
        nursery.cancel_scope.cancel()


async def test_restarted_node_deposes_its_stale_key(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a").start(nursery)
        old_epoch = a.elector.epoch
        assert old_epoch is not None
        await trio.sleep(1.2)
        a.crash()
        again = await Node(store, "a").start(nursery)  # same node id, new process
        assert trio.current_time() == 1.2
        assert again.elector.role == "master"
        assert again.elector.epoch is not None and again.elector.epoch > old_epoch
        assert again.elector.last_decision.startswith(
            f"deposed our previous process's stale leader key (epoch {old_epoch}); acquired"
        )
        nursery.cancel_scope.cancel()


async def test_starting_while_store_down(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    node = Node(store, "a")
    node.store.set_fault("error")
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        assert node.elector.role == "starting"
        assert node.elector.last_decision.startswith("store unreachable")
        await trio.sleep(0.75)
        node.store.set_fault(None)
        await wait_master(node.elector)
        assert trio.current_time() == 1.0
        nursery.cancel_scope.cancel()


async def test_bad_arguments_are_refused() -> None:
    store = MemoryStore()
    for bad in ("", "a/b"):
        try:
            Elector(store, bad)
        except ValueError as exc:
            assert "node id" in str(exc)
        else:
            raise AssertionError(f"node id {bad!r} accepted")
    elector = Elector(store, "a")
    try:
        await elector.resign(hold_off=-1)
    except ValueError as exc:
        assert "hold_off" in str(exc)
    else:
        raise AssertionError("negative hold_off accepted")


async def test_wait_etcd_reachable_and_wait_decision(autojump_clock: trio.abc.Clock) -> None:
    """Both return at the cycle that records the state (at once if the last one did), not before;
    each wait is bounded, so one that is never woken fails instead of hanging."""
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        a = await Node(store, "a").start(nursery)
        renewed = f"renewed lease, still master (epoch {a.elector.epoch})"
        with trio.fail_after(TIMING.loop_wait / 2):  # at once: the first cycle reached the store
            await a.elector.wait_etcd_reachable()
        assert trio.current_time() == 0
        with trio.fail_after(TIMING.ttl):
            await a.elector.wait_decision(renewed)
        assert trio.current_time() == 0.5  # the first renewal, not the acquisition before it
        a.store.set_fault("error")
        with trio.fail_after(TIMING.ttl):
            await a.elector.wait_etcd_reachable(False)
        unreachable_at = trio.current_time()
        assert unreachable_at == decided(a.elector, "store unreachable")[0]
        assert a.elector.last_decision.startswith("store unreachable")
        a.store.set_fault(None)
        with trio.fail_after(TIMING.ttl):
            await a.elector.wait_etcd_reachable()
        assert trio.current_time() == decided(a.elector, "renewed lease")[-1] > unreachable_at
        assert a.elector.last_decision == renewed
        with trio.fail_after(TIMING.loop_wait / 2):
            await a.elector.wait_decision(renewed)  # the last decision: at once
        nursery.cancel_scope.cancel()
