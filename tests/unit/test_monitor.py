"""The shadow's probe of the master, on the in-memory store under autojump_clock.

Defaults: probe_interval 0.5, probe_failures 3. Probes run start to start every 0.5 s, so a
master that stops answering at t is declared lost after three misses, ~1.5 s later, whatever
each probe's timeout consumed.
"""

from __future__ import annotations

import pytest
import trio

from ha.election import Elector
from ha.memory import MemoryStore
from ha.monitor import MasterProbe
from tests.unit.test_election import Node, wait_master  # noqa: F401 - shared election fixtures


class FakeMaster:
    """Answers probes until `freeze()`; a frozen master makes each probe wait out its timeout."""

    def __init__(self) -> None:
        self.alive = True
        self.probes: list[tuple[float, str]] = []

    def freeze(self) -> None:
        self.alive = False

    async def check(self, url: str, budget: float) -> bool:
        self.probes.append((trio.current_time(), url))
        if self.alive:
            return True
        await trio.sleep(budget)
        return False


async def start(nursery, store, name, member_url=None) -> Elector:
    node = await Node(store, name).start(nursery)
    if member_url:
        node.elector.update_member_data(admin_url=member_url)
    return node.elector


async def test_frozen_master_is_declared_lost_after_three_periods(autojump_clock):
    store = MemoryStore()
    master = FakeMaster()
    async with trio.open_nursery() as nursery:
        a = await start(nursery, store, "a", "http://127.0.0.1:1111")
        await trio.sleep(0.6)  # the member key carries the admin URL
        b = await start(nursery, store, "b")
        probe = MasterProbe(b, master.check)
        nursery.start_soon(probe.run)
        await trio.sleep(2.0)
        assert probe.hints == 0 and b.role == "shadow"
        assert {url for _, url in master.probes} == {"http://127.0.0.1:1111"}
        frozen_at = trio.current_time()
        old_epoch = a.epoch
        master.freeze()
        took_over = await wait_master(b)
        # three consecutive misses at most one period after the freeze, then an immediate depose
        assert frozen_at + 1.0 <= took_over <= frozen_at + 2.0
        assert probe.hints == 1
        assert b.epoch > old_epoch
        await trio.sleep(1.0)
        assert a.role == "shadow"  # the deposed (in truth, frozen) master finds its lease gone
        nursery.cancel_scope.cancel()


async def test_healthy_master_is_never_hinted_and_master_does_not_probe(autojump_clock):
    store = MemoryStore()
    master = FakeMaster()
    async with trio.open_nursery() as nursery:
        a = await start(nursery, store, "a", "http://127.0.0.1:1111")
        b = await start(nursery, store, "b")
        probe_b = MasterProbe(b, master.check)
        probe_a = MasterProbe(a, master.check)
        nursery.start_soon(probe_b.run)
        nursery.start_soon(probe_a.run)
        await trio.sleep(10.0)
        assert probe_b.hints == probe_a.hints == 0
        times = [t for t, _ in master.probes]
        assert len(times) == pytest.approx(10.0 / 0.5, abs=2)  # only b probes, every 0.5 s
        assert (a.role, b.role) == ("master", "shadow")
        nursery.cancel_scope.cancel()


async def test_store_outage_pauses_probing(autojump_clock):
    store = MemoryStore()
    master = FakeMaster()
    async with trio.open_nursery() as nursery:
        await start(nursery, store, "a", "http://127.0.0.1:1111")
        b = await start(nursery, store, "b")
        probe = MasterProbe(b, master.check)
        nursery.start_soon(probe.run)
        await trio.sleep(1.0)
        seen = len(master.probes)
        b.store.set_fault("error")
        await trio.sleep(2.0)
        assert len(master.probes) == seen
        nursery.cancel_scope.cancel()
