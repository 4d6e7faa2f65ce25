"""A location belongs to one cluster: the registry's decision table and what the registry does with it.

The sessions are the recording fakes of test_registry (pure logic); the real endpoint and nodes
are in tests/integration/test_two_clusters.py.
"""

import json

import pytest
import trio
from prometheus_client import REGISTRY

from connector.cloud.registry import RegistrationResult, Registry, TunnelHandle, decide_registration
from connector.tunnel.types import ErrorCode, Target
from tests.unit.test_registry import FakeSession

TARGET = Target("erp.virtual", 8000)


def handle(name: str, cluster: str, location: str = "") -> TunnelHandle:
    return TunnelHandle(FakeSession(name), "acme", location, name, cluster=cluster)  # type: ignore[arg-type]


def refused_total(reason: str, location: str = "") -> float:
    value = REGISTRY.get_sample_value(
        "connector_cloud_registrations_total", {"subaccount": "acme", "location": location, "result": reason})
    return value or 0.0


@pytest.mark.parametrize(
    ("pinned", "bound", "highest", "cluster", "epoch", "expected"),
    [
        # nobody owns the location yet: the first cluster gets it
        (None, None, -1, "alpha", 5, RegistrationResult(True, "accepted", 5, "alpha")),
        # the owner: the fencing rule as before
        (None, "alpha", 7, "alpha", 8, RegistrationResult(True, "accepted", 8, "alpha")),
        (None, "alpha", 7, "alpha", 7, RegistrationResult(True, "accepted", 7, "alpha")),
        (None, "alpha", 7, "alpha", 6, RegistrationResult(False, "stale_epoch", 7, "alpha")),
        # another cluster, whatever its epoch: refused, naming the owner
        (None, "alpha", 7, "beta", 1000, RegistrationResult(False, "wrong_cluster", 7, "alpha")),
        (None, "alpha", 7, "beta", 0, RegistrationResult(False, "wrong_cluster", 7, "alpha")),
        # a pin decides even before anyone registered
        ("alpha", None, -1, "beta", 3, RegistrationResult(False, "wrong_cluster", -1, "alpha")),
        ("alpha", None, -1, "alpha", 3, RegistrationResult(True, "accepted", 3, "alpha")),
        # a pin moves a bound location: the old owner is refused, the new one starts with fresh epochs
        ("beta", "alpha", 900, "alpha", 901, RegistrationResult(False, "wrong_cluster", -1, "beta")),
        ("beta", "alpha", 900, "beta", 2, RegistrationResult(True, "accepted", 2, "beta")),
        # epochs kept before bindings existed (an older state file) still fence the first cluster
        (None, None, 5, "alpha", 3, RegistrationResult(False, "stale_epoch", 5, "alpha")),
        (None, None, 5, "alpha", 6, RegistrationResult(True, "accepted", 6, "alpha")),
        ("beta", None, 5, "beta", 3, RegistrationResult(False, "stale_epoch", 5, "beta")),
        # a pin equal to the binding changes nothing
        ("alpha", "alpha", 7, "alpha", 6, RegistrationResult(False, "stale_epoch", 7, "alpha")),
        # connecting (no epoch yet): only the owner's tunnels are admitted
        (None, None, -1, "beta", None, RegistrationResult(True, "accepted", -1, "beta")),
        (None, "alpha", 7, "alpha", None, RegistrationResult(True, "accepted", 7, "alpha")),
        (None, "alpha", 7, "beta", None, RegistrationResult(False, "wrong_cluster", 7, "alpha")),
    ],
)
def test_decide_registration(pinned, bound, highest, cluster, epoch, expected):
    assert decide_registration(pinned=pinned, bound=bound, highest_epoch=highest, cluster=cluster,
                               epoch=epoch) == expected


def test_refusal_message_names_the_owner():
    verdict = decide_registration(pinned=None, bound="alpha", highest_epoch=7, cluster="beta", epoch=9)
    assert verdict.control_body() == {
        "reason": "wrong_cluster", "cluster": "alpha", "highest_epoch": 7,
        "message": "this location is served by cluster 'alpha'",
    }


@pytest.fixture
async def registry(nursery, tmp_path):
    reg = Registry(known_locations=[("acme", "")], state_file=tmp_path / "epochs.json")
    await nursery.start(reg.run)
    return reg


async def test_second_cluster_is_refused_without_fencing_the_first(registry):
    a, b = handle("a", "alpha"), handle("b", "beta")
    registry.add(a)
    assert registry.register(a, 10).accepted
    before = refused_total("wrong_cluster")
    assert registry.admit(b).reason == "wrong_cluster"
    result = registry.register(b, 11)  # a higher epoch of another cluster's etcd means nothing here
    await trio.testing.wait_all_tasks_blocked()
    assert (result.accepted, result.reason, result.cluster) == (False, "wrong_cluster", "alpha")
    assert refused_total("wrong_cluster") == before + 2
    assert registry.master_of("acme", "") is a and a.epoch == 10
    assert a.session.controls == [] and a.session.closed is None  # not fenced, not told anything
    assert await registry.open_stream("acme", "", TARGET) == ("a", TARGET)


async def test_binding_closes_standbys_of_other_clusters(registry):
    a, b = handle("a", "alpha"), handle("b", "beta")
    registry.add(a)
    registry.add(b)  # both connected before anyone registered: both were admissible
    assert registry.register(a, 4).accepted
    await trio.testing.wait_all_tasks_blocked()
    assert b.session.controls == [("refused", {"reason": "wrong_cluster", "cluster": "alpha", "highest_epoch": 4,
                                               "message": "this location is served by cluster 'alpha'"})]
    assert b.session.closed[0] == ErrorCode.DENIED
    # and it hears nothing more of this location, e.g. not that alpha's master is lost
    registry.remove(a)
    await trio.testing.wait_all_tasks_blocked()
    assert len(b.session.controls) == 1


async def test_binding_survives_a_cloud_restart(tmp_path, nursery):
    state = tmp_path / "epochs.json"
    first = Registry(state_file=state)
    await nursery.start(first.run)
    a = handle("a", "alpha")
    first.add(a)
    first.register(a, 3)
    assert json.loads(state.read_text())["epochs"] == [
        {"subaccount": "acme", "location_id": "", "epoch": 3, "cluster": "alpha"}]

    second = Registry(state_file=state)
    await nursery.start(second.run)
    b = handle("b", "beta")
    assert second.admit(b).reason == "wrong_cluster"
    assert second.snapshot()[0]["cluster"] == "alpha"


async def test_a_pin_moves_the_location_and_its_epochs_start_afresh(tmp_path, nursery):
    state = tmp_path / "epochs.json"
    first = Registry(state_file=state)
    await nursery.start(first.run)
    first.add(old := handle("a", "alpha"))
    first.register(old, 900)

    moved = Registry(state_file=state, pinned_clusters={("acme", ""): "beta"})
    await nursery.start(moved.run)
    assert moved.admit(handle("a2", "alpha")).reason == "wrong_cluster"
    new = handle("b", "beta")
    assert moved.admit(new).accepted
    moved.add(new)
    assert moved.register(new, 2).accepted  # beta's etcd revisions are not compared with alpha's
    assert json.loads(state.read_text())["epochs"][0] == {
        "subaccount": "acme", "location_id": "", "epoch": 2, "cluster": "beta"}
