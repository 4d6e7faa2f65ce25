"""The in-memory store keeps etcd's revision, lease and compare-and-set semantics."""

from __future__ import annotations

import pytest
import trio

from ha.memory import MemoryStore
from ha.store import LeaseExpired, StoreUnavailable, WatchEvent


async def test_revisions_and_epochs(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    lease = await store.grant_lease(2)
    epoch = await store.try_acquire_leader("a", lease, {"address": "x"})
    assert epoch is not None
    assert await store.try_acquire_leader("b", lease, {}) is None
    snapshot = await store.get_cluster()
    assert snapshot.leader is not None
    assert (snapshot.leader.node, snapshot.leader.epoch, snapshot.leader.lease) == ("a", epoch, lease)
    assert snapshot.leader.data["address"] == "x"
    assert await store.resign("a", epoch + 1) is False
    assert await store.resign("a", epoch) is True
    second = await store.try_acquire_leader("b", lease, {})
    assert second is not None and second > epoch


async def test_lease_expiry_follows_trio_clock(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    lease = await store.grant_lease(2)
    await store.put_member("a", {"priority": 1}, lease)
    await trio.sleep(1.5)
    assert await store.refresh_lease(lease) == 2.0
    await trio.sleep(1.999)
    assert "a" in (await store.get_cluster()).members
    await trio.sleep(0.001)
    assert (await store.get_cluster()).members == {}
    with pytest.raises(LeaseExpired):
        await store.refresh_lease(lease)
    with pytest.raises(LeaseExpired):
        await store.put_member("a", {}, lease)


async def test_depose_compares_epoch_and_revokes_lease(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    lease = await store.grant_lease(3)
    epoch = await store.try_acquire_leader("a", lease, {})
    assert epoch is not None
    await store.put_member("a", {}, lease)
    assert await store.depose(epoch - 1) is False
    assert (await store.get_cluster()).leader is not None
    assert await store.depose(epoch) is True
    snapshot = await store.get_cluster()
    assert snapshot.leader is None and snapshot.members == {}
    with pytest.raises(LeaseExpired):
        await store.refresh_lease(lease)


async def test_compare_and_set(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    first = await store.put("config/mapping/a", b"1", prev_revision=0)
    assert first is not None
    assert await store.put("config/mapping/a", b"2", prev_revision=0) is None
    second = await store.put("config/mapping/a", "2", prev_revision=first)
    assert second is not None and second > first
    assert await store.put("config/mapping/a", b"3", prev_revision=first) is None
    kv = await store.get("config/mapping/a")
    assert kv is not None and kv.value == b"2" and kv.create_revision == first
    assert await store.delete("config/mapping/a", prev_revision=first) is False
    assert await store.delete("config/mapping/a", prev_revision=second) is True
    assert await store.get("config/mapping/a") is None
    with pytest.raises(ValueError, match="invalid store key"):
        await store.put("/absolute", b"x")


async def test_watch_replays_and_sees_expiry_at_once(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    start = (await store.get_prefix("config/")).revision + 1
    await store.put("config/a", b"1")
    lease = await store.grant_lease(2)
    await store.put("config/b", b"2", lease=lease)
    seen: list[tuple[float, WatchEvent]] = []
    async with store.watch("config/", start) as events:
        async for event in events:
            seen.append((trio.current_time(), event))
            if len(seen) == 3:
                break
    assert [(t, e.kind, e.key) for t, e in seen] == [
        (0, "put", "config/a"), (0, "put", "config/b"), (2.0, "delete", "config/b")
    ]


async def test_faults(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    view = store.view()
    view.set_fault("error")
    with pytest.raises(StoreUnavailable):
        await view.get_cluster()
    await store.get_cluster()  # other clients unaffected
    view.set_fault("hang")
    with trio.move_on_after(1) as scope:
        await view.get_cluster()
    assert scope.cancelled_caught
    with pytest.raises(ValueError, match="unknown fault"):
        view.set_fault("slow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="whole number"):
        await store.grant_lease(1.5)  # type: ignore[arg-type]
