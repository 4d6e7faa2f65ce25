"""The pure decisions of the cloud replicas' shared state: merging fences, fail-closed start,
fencing a master another replica outdated, tokens united with cloud.toml, a replica's readiness.

Recording fake sessions (from test_registry): these are the registry's decisions; the real etcd
under real replicas is in tests/integration/test_cloud_shared.py.
"""

import pytest
import trio
import trio.testing

from connector.cloud.auth import hash_token
from connector.cloud.registry import Fence, Registry, merge_fence
from connector.cloud.router import NoConnectorError
from connector.cloud.shared import (
    SubaccountSettings,
    effective_settings,
    fence_key,
    merge_tokens,
    parse_fence_key,
)
from connector.readiness import CloudState, cloud_readiness
from connector.tunnel.types import ErrorCode
from tests.unit.test_registry import TARGET, handle

# --- merge_fence --------------------------------------------------------------------------------


@pytest.mark.parametrize(("shared", "local", "pinned", "expected"), [
    (Fence(), Fence(), None, Fence()),
    (Fence(5, "c1"), Fence(), None, Fence(5, "c1")),  # read at start
    (Fence(), Fence(5, "c1"), None, Fence(5, "c1")),  # accepted here, not in etcd yet
    (Fence(9, "c1"), Fence(5, "c1"), None, Fence(9, "c1")),  # another replica accepted a newer one
    (Fence(5, "c1"), Fence(9, "c1"), None, Fence(9, "c1")),  # never lowered by an older shared value
    (Fence(5, "c1"), Fence(9, "c2"), None, Fence(5, "c1")),  # the first binding in etcd wins
    (Fence(9, "c1"), Fence(2, "c2"), "c2", Fence(2, "c2")),  # a pin moves the location: epochs afresh
    (Fence(2, "c2"), Fence(9, "c1"), "c2", Fence(2, "c2")),  # ... on every replica
    (Fence(7, None), Fence(3, "c1"), None, Fence(7, "c1")),  # an unbound epoch still fences
])
def test_merge_fence(shared, local, pinned, expected):
    assert merge_fence(shared, local, pinned=pinned) == expected


def test_fence_json_is_validated():
    assert Fence.from_json({"epoch": 4, "cluster": "c"}) == Fence(4, "c")
    for bad in ([], {"epoch": "4"}, {"epoch": True}, {"epoch": -2}, {"epoch": 1, "cluster": 3}):
        with pytest.raises(ValueError):
            Fence.from_json(bad)


@pytest.mark.parametrize("key", [("acme", ""), ("a/b", "loc.1"), ("..", "%00"), ("x", "y/z")])
def test_fence_keys_round_trip(key):
    encoded = fence_key(key)
    assert encoded.count("/") == 2
    assert parse_fence_key(encoded) == key


# --- the registry with a shared fence -----------------------------------------------------------

@pytest.fixture
async def shared_registry(nursery):
    reg = Registry(hold_seconds=5.0, hold_max=3, known_locations=[("acme", "")], shared_fence=True)
    await nursery.start(reg.run)
    return reg


async def test_nothing_is_admitted_or_routed_before_the_shared_fence_is_read(shared_registry):
    a = handle("a")
    verdict = shared_registry.admit(a)
    assert (verdict.accepted, verdict.reason) == (False, "fence_unknown")
    assert "not read the shared fence" in verdict.message
    assert not shared_registry.register(a, 1).accepted
    with pytest.raises(NoConnectorError) as raised:
        await shared_registry.open_stream("acme", "", TARGET)
    assert raised.value.code == "fence_unknown"

    shared_registry.load_shared_fences({("acme", ""): Fence(4, "")})
    assert shared_registry.admit(a).accepted
    shared_registry.add(a)
    assert shared_registry.register(a, 3).reason == "stale_epoch"  # below what another replica accepted
    assert shared_registry.register(a, 4).accepted
    assert await shared_registry.open_stream("acme", "", TARGET) == ("a", TARGET)


async def test_a_master_outdated_by_another_replica_is_fenced_at_once(shared_registry):
    told: list = []
    shared_registry.load_shared_fences({})
    shared_registry.fence_listener = lambda key, fence: told.append((key, fence))
    a = handle("a")
    shared_registry.add(a)
    assert shared_registry.register(a, 5).accepted
    assert told == [(("acme", ""), Fence(5, ""))]  # written back by the shared state

    merged = shared_registry.apply_shared_fence(("acme", ""), Fence(8, ""))
    assert merged == Fence(8, "")
    assert shared_registry.master_of("acme", "") is None
    await trio.testing.wait_all_tasks_blocked()
    assert a.session.controls == [("fenced", {"epoch": 8})]
    assert a.session.closed[0] == ErrorCode.STALE_EPOCH
    # an older shared value changes nothing and says etcd is behind
    assert shared_registry.apply_shared_fence(("acme", ""), Fence(6, "")) == Fence(8, "")


async def test_a_binding_won_by_another_cluster_elsewhere_refuses_ours(shared_registry):
    shared_registry.load_shared_fences({})
    ours = handle("a")
    shared_registry.add(ours)
    shared_registry.register(ours, 5)  # bound to node:a here, not yet written
    assert shared_registry.apply_shared_fence(("acme", ""), Fence(2, "beta")) == Fence(2, "beta")
    await trio.testing.wait_all_tasks_blocked()
    assert shared_registry.master_of("acme", "") is None
    assert ours.session.closed[0] == ErrorCode.DENIED
    assert ours.session.controls[0][1]["reason"] == "wrong_cluster"


async def test_without_a_shared_fence_nothing_changes(nursery):
    reg = Registry(known_locations=[("acme", "")])
    await nursery.start(reg.run)
    assert reg.fence_loaded
    assert reg.admit(handle("a")).accepted


# --- tokens -------------------------------------------------------------------------------------

def test_shared_tokens_join_the_configured_ones_without_taking_them_over():
    conf_proxy, conf_admin, new, stolen = (hash_token(t) for t in ("p", "adm", "new", "x"))
    configured = {"proxy": {"acme": (conf_proxy,)}, "destination_admin": {"acme": (conf_admin,)}}
    shared = {
        new: {"subaccount": "acme", "kind": "proxy"},
        conf_proxy: {"subaccount": "other", "kind": "proxy"},  # cloud.toml's token for another subaccount
        conf_admin: {"subaccount": "acme", "kind": "proxy"},  # an admin token as a proxy token
        stolen: {"subaccount": "acme", "kind": "destination_admin"},
    }
    merged = merge_tokens(configured, shared)
    assert merged["proxy"] == {"acme": [conf_proxy, new]}
    assert merged["destination_admin"] == {"acme": [conf_admin, stolen]}


# --- readiness ----------------------------------------------------------------------------------

def test_a_replica_without_the_shared_fence_is_not_ready():
    result = cloud_readiness(CloudState(shared=True, fence_loaded=False, shared_reachable=False))
    assert not result.ready
    assert result.reason.startswith("shared state not loaded (fail closed)")


def test_a_replica_that_knows_the_fence_stays_ready_through_an_outage():
    result = cloud_readiness(CloudState(shared=True, fence_loaded=True, shared_reachable=False, writes_pending=2))
    assert result.ready
    assert "2 fence advances to write back" in result.reason
    assert cloud_readiness(CloudState()).ready


# --- subaccount settings ------------------------------------------------------------------------

def test_shared_subaccount_settings_override_cloud_toml_and_add_locations():
    configured = {"acme": SubaccountSettings(("",), {"": "alpha", "p2": "beta"}, 10), "other": SubaccountSettings()}
    shared = {"acme": SubaccountSettings(("p3",), {"p2": "gamma"}, None), "stranger": SubaccountSettings(("x",))}
    assert effective_settings(configured, shared) == {
        "acme": SubaccountSettings(("", "p3"), {"": "alpha", "p2": "gamma"}, 10),
        "other": SubaccountSettings(),  # and no subaccount without a CA in cloud.toml
    }


def test_subaccount_settings_json_is_validated():
    assert SubaccountSettings.from_json({"max_streams_per_token": 0}) == SubaccountSettings(max_streams_per_token=0)
    for bad in ([], {"colour": 1}, {"locations": "x"}, {"clusters": {"": ""}}, {"max_streams_per_token": -1},
                {"max_streams_per_token": True}):
        with pytest.raises(ValueError):
            SubaccountSettings.from_json(bad)


async def test_a_live_pin_refuses_the_other_clusters_master_at_once(shared_registry):
    shared_registry.load_shared_fences({})
    master = handle("a")
    shared_registry.add(master)
    assert shared_registry.register(master, 5).accepted
    shared_registry.pin(("acme", ""), "beta")
    await trio.testing.wait_all_tasks_blocked()
    assert shared_registry.master_of("acme", "") is None
    assert master.session.closed[0] == ErrorCode.DENIED
    assert not shared_registry.admit(handle("a2")).accepted  # cluster "" no longer owns it
