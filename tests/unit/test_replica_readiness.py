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
