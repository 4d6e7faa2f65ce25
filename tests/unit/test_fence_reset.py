"""An operator's fence reset: the merge rule that lets it lower a fence on every replica, the
registry applying it, and `fenceadmin.reset_fence`'s refusals and audit record over an in-memory
store. The real etcd under real replicas and the CLI: tests/integration/test_fence_reset.py."""

import json

import pytest

from connector.cloud import fenceadmin
from connector.cloud.registry import Fence, Registry, merge_fence
from connector.cloud.shared import REPLICAS_PREFIX, encode, fence_key
from ha.memory import MemoryStore
from tests.unit.test_registry import handle

KEY = ("acme", "")


@pytest.mark.parametrize(("shared", "local", "expected"), [
    (Fence(2, "c1", 1), Fence(9, "c1", 0), Fence(2, "c1", 1)),  # a reset in etcd lowers the cached fence
    (Fence(9, "c1", 0), Fence(2, "c1", 1), Fence(2, "c1", 1)),  # a late write of the old fence does not undo it
    (Fence(2, "c1", 1), Fence(5, "c1", 1), Fence(5, "c1", 1)),  # after the reset: epochs rise as ever
    (Fence(-1, None, 1), Fence(9, "c1", 0), Fence(-1, "c1", 1)),  # reset to "any": the binding stays
])
def test_the_fence_with_more_resets_replaces_the_epoch(shared, local, expected):
    assert merge_fence(shared, local, pinned=None) == expected


def test_resets_in_json_default_to_none_and_are_validated():
    assert Fence.from_json({"epoch": 4, "cluster": "c"}) == Fence(4, "c", 0)
    assert Fence.from_json(Fence(4, "c", 2).to_json()) == Fence(4, "c", 2)
    for bad in ({"epoch": 1, "resets": -1}, {"epoch": 1, "resets": "1"}, {"epoch": 1, "resets": True}):
        with pytest.raises(ValueError):
            Fence.from_json(bad)


async def test_a_registry_applies_a_reset_and_accepts_the_restored_clusters_epochs(nursery):
    registry = Registry(hold_seconds=5.0, hold_max=3, known_locations=[KEY], shared_fence=True)
    await nursery.start(registry.run)
    registry.load_shared_fences({KEY: Fence(9, "")})
    restored = handle("b")
    registry.add(restored)
    assert registry.register(restored, 3).reason == "stale_epoch"

    assert registry.apply_shared_fence(KEY, Fence(2, "", 1)) == Fence(2, "", 1)
    assert registry.register(restored, 3).accepted
    assert registry.fence_of(KEY) == Fence(3, "", 1)
    assert registry.register(handle("stale"), 2).reason == "stale_epoch"  # below the reset fence: refused


async def put_fence(store: MemoryStore, fence: Fence) -> None:
    await store.put(fence_key(KEY), encode({**fence.to_json(), "subaccount": KEY[0], "location_id": KEY[1]}))


async def test_a_reset_is_recorded_with_who_when_and_both_epochs():
    store = MemoryStore("connector-cloud")
    await put_fence(store, Fence(3022, "demo"))
    result = await fenceadmin.reset_fence(store, KEY, 150, reason="etcd restored from backup")
    assert result.applied and (result.old, result.new) == (Fence(3022, "demo"), Fence(150, "demo", 1))
    kv = await store.get(fence_key(KEY))
    assert kv is not None and Fence.from_json(json.loads(kv.value)) == Fence(150, "demo", 1)
    (record,) = [json.loads(kv.value) for kv in (await store.get_prefix(fenceadmin.RESETS_PREFIX)).kvs.values()]
    assert record["user"] and record["host"] and record["time"] > 0
    assert (record["old"]["epoch"], record["new"]["epoch"], record["applied"]) == (3022, 150, True)
    assert record["reason"] == "etcd restored from backup"
    (shown,) = await fenceadmin.fence_report(store)
    assert shown["epoch"] == 150 and shown["reset_records"] == [record]


@pytest.mark.parametrize(("epoch", "reason", "message"), [
    (3022, "x", "only lowers"),
    (5000, "x", "only lowers"),
    (-2, "x", "-1"),
    (10, " ", "--reason"),
])
async def test_a_reset_that_would_not_lower_or_says_no_reason_is_refused(epoch, reason, message):
    store = MemoryStore("connector-cloud")
    await put_fence(store, Fence(3022, "demo"))
    with pytest.raises(ValueError, match=message):
        await fenceadmin.reset_fence(store, KEY, epoch, reason=reason)
    assert not (await store.get_prefix(fenceadmin.RESETS_PREFIX)).kvs  # refused: nothing recorded


async def test_a_reset_is_refused_while_a_replica_has_a_master_there():
    store = MemoryStore("connector-cloud")
    await put_fence(store, Fence(3022, "demo"))
    lease = await store.grant_lease(10)
    entry = {"id": "cloud-1", "tunnel_url": "wss://127.0.0.1:1/tunnel", "admin_url": "http://127.0.0.1:2",
             "ready": True, "reason": "", "locations": {"acme/": {"tunnels": 2, "master": "node-a", "epoch": 3022}}}
    await store.put(f"{REPLICAS_PREFIX}cloud-1", json.dumps(entry), lease=lease)
    with pytest.raises(ValueError, match="has master node-a"):
        await fenceadmin.reset_fence(store, KEY, 10, reason="x")
    kv = await store.get(fence_key(KEY))
    assert kv is not None and json.loads(kv.value)["epoch"] == 3022


async def test_there_is_nothing_to_reset_without_a_fence():
    with pytest.raises(ValueError, match="no fence"):
        await fenceadmin.reset_fence(MemoryStore("connector-cloud"), KEY, 10, reason="x")
