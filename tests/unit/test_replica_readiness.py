"""Readiness with several cloud replicas, as tables: the node's (registered on how many replicas)
and a replica's own (out of rotation while another replica covers the masters it lacks)."""

from __future__ import annotations

import pytest

from connector.cloud.coverage import NoPeers, cloud_state, masters_here
from connector.readiness import CloudState, NodeState, Readiness, cloud_readiness, readiness

MASTER = dict(role="master", etcd_reachable=True, config_loaded=True)

NODE_TABLE = [
    # (tunnels connected, registered, ready, reason)
    (1, 1, True, "master with a registered tunnel"),
    (2, 2, True, "master with tunnels registered on 2 of 2 cloud replicas"),
    (3, 1, True, "master with tunnels registered on 1 of 3 cloud replicas"),
    (2, 0, False, "master with a tunnel the cloud has not registered (epoch not accepted yet)"),
    (0, 0, False, "master without a tunnel to the cloud"),
]


@pytest.mark.parametrize(("connected", "registered", "ready", "reason"), NODE_TABLE)
def test_a_master_is_ready_once_one_replica_registered_it(connected: int, registered: int, ready: bool,
                                                          reason: str) -> None:
    state = NodeState(**MASTER, tunnel_connected=connected > 0, tunnel_registered=registered > 0,  # type: ignore[arg-type]
                      replicas_connected=connected, replicas_registered=registered)
    assert readiness(state) == Readiness(ready, reason)


def test_a_shadow_counts_its_standby_tunnels() -> None:
    state = NodeState(role="shadow", config_loaded=True, tunnel_connected=True, replicas_connected=3)
    assert readiness(state, want="shadow") == Readiness(True, "shadow with standby tunnels to 3 cloud replicas")


L1, L2, L3 = "acme/", "acme/plant", "beta/"

CLOUD_TABLE = [
    # (masters here, masters on the other replicas, ready, reason)
    (set(), {}, True, "serving"),
    ({L1}, {}, True, "serving"),
    ({L1, L2}, {"cloud-2": {L1, L2}}, True, "serving"),  # the same tunnels everywhere
    ({L1, L2}, {"cloud-2": {L1}}, True, "serving"),  # the other one lacks a master: it steps out, not us
    ({L1}, {"cloud-2": {L1, L2}}, False,
     "no tunnel from the master of acme/plant, which replica cloud-2 holds: out of rotation until the node "
     "dials this replica"),
    (set(), {"cloud-2": {L1}}, False,
     "no tunnel from the master of acme/, which replica cloud-2 holds: out of rotation until the node dials "
     "this replica"),
    # two partial partitions: neither covers the other, both stay in and serve what they have
    ({L1}, {"cloud-2": {L2}}, True, "serving"),
    ({L1, L3}, {"cloud-2": {L1, L2}}, True, "serving"),
    # one of several covers us
    ({L1}, {"cloud-2": {L2}, "cloud-3": {L1, L2, L3}}, False,
     "no tunnel from the master of acme/plant, beta/, which replica cloud-3 holds: out of rotation until the "
     "node dials this replica"),
]


@pytest.mark.parametrize(("here", "elsewhere", "ready", "reason"), CLOUD_TABLE)
def test_a_replica_covered_by_another_steps_out_of_rotation(here: set[str], elsewhere: dict[str, set[str]],
                                                            ready: bool, reason: str) -> None:
    state = CloudState(masters_here=frozenset(here),
                       masters_elsewhere={replica: frozenset(m) for replica, m in elsewhere.items()})
    assert cloud_readiness(state) == Readiness(ready, reason)


def test_masters_here_reads_the_registry_snapshot() -> None:
    snapshot = [
        {"subaccount": "acme", "location_id": "", "master": "node-a"},
        {"subaccount": "acme", "location_id": "plant", "master": None},  # a standby only: no master
    ]
    assert masters_here(snapshot) == {L1}
    assert cloud_state(snapshot, NoPeers()) == CloudState(masters_here=frozenset({L1}))


def test_shared_peers_reads_the_masters_of_the_other_ready_replicas() -> None:
    """The replica records in the cloud's etcd feed readiness: this replica and the replicas that
    are not ready (draining, fence not loaded, out of rotation) do not count."""
    from types import SimpleNamespace

    from connector.cloud.coverage import SharedPeers
    from connector.cloud.replicas import Replica, ReplicaDirectory

    def entry(ready: bool, **masters: str | None) -> dict[str, object]:
        return {"ready": ready, "locations": {loc: {"tunnels": 1, "master": m, "epoch": 7} for loc, m in masters.items()}}

    records = SimpleNamespace(replicas={
        "me": entry(True, **{"acme/": "node-a"}),
        "b": entry(True, **{"acme/": "node-a", "acme/plant2": "node-c", "acme/empty": None}),
        "c": entry(False, **{"acme/plant3": "node-d"}),
    })
    peers = SharedPeers(records, ReplicaDirectory(Replica("me", "wss://me:1/tunnel")))
    assert peers.masters_by_replica() == {"b": frozenset({"acme/", "acme/plant2"})}
