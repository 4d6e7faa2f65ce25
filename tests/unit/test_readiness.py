"""readiness() as a table: each row is a node state, what is asked for, and the exact answer."""

from __future__ import annotations

import attrs
import pytest

from connector.readiness import NodeState, Readiness, readiness

MASTER_OK = NodeState(role="master", tunnel_connected=True, tunnel_registered=True, etcd_reachable=True, config_loaded=True)
SHADOW_OK = NodeState(role="shadow", tunnel_connected=True, etcd_reachable=True, config_loaded=True)
STARTING = NodeState(role="starting", etcd_reachable=True, config_loaded=True)


def changed(state: NodeState, **fields: object) -> NodeState:
    return attrs.evolve(state, **fields)


TABLE = [
    # (state, want, ready, reason)
    (MASTER_OK, "master", True, "master with a registered tunnel"),
    (changed(MASTER_OK, etcd_reachable=False), "master", True,
     "master with a registered tunnel; etcd unreachable, no failover possible"),
    (changed(MASTER_OK, tunnel_registered=False), "master", False,
     "master with a tunnel the cloud has not registered (epoch not accepted yet)"),
    (changed(MASTER_OK, tunnel_connected=False, tunnel_registered=False), "master", False,
     "master without a tunnel to the cloud"),
    (changed(MASTER_OK, draining=True), "master", False, "draining (master): handing over or shutting down"),
    (SHADOW_OK, "master", False, "not master (role shadow)"),
    (STARTING, "master", False, "starting: role not decided yet"),
    (SHADOW_OK, "shadow", True, "shadow with a standby tunnel"),
    (changed(SHADOW_OK, etcd_reachable=False), "shadow", True, "shadow with a standby tunnel"),
    (changed(SHADOW_OK, tunnel_connected=False), "shadow", True, "shadow reaching etcd, no standby tunnel"),
    (changed(SHADOW_OK, tunnel_connected=False, etcd_reachable=False), "shadow", False,
     "shadow with neither a standby tunnel nor etcd"),
    (changed(SHADOW_OK, config_loaded=False), "shadow", False, "shadow without configuration loaded"),
    (changed(SHADOW_OK, draining=True), "shadow", False, "draining (shadow): handing over or shutting down"),
    (MASTER_OK, "shadow", False, "not shadow (role master)"),
    (STARTING, "shadow", False, "starting: role not decided yet"),
    (MASTER_OK, "any", True, "master with a registered tunnel"),
    (changed(MASTER_OK, tunnel_connected=False, tunnel_registered=False), "any", False,
     "master without a tunnel to the cloud"),
    (SHADOW_OK, "any", True, "shadow with a standby tunnel"),
    (changed(SHADOW_OK, tunnel_connected=False, etcd_reachable=False), "any", False,
     "shadow with neither a standby tunnel nor etcd"),
    (STARTING, "any", False, "starting: role not decided yet"),
]


@pytest.mark.parametrize(("state", "want", "ready", "reason"), TABLE)
def test_readiness_table(state: NodeState, want: str, ready: bool, reason: str) -> None:
    assert readiness(state, want=want) == Readiness(ready, reason)


def test_default_asks_for_master() -> None:
    assert readiness(SHADOW_OK) == readiness(SHADOW_OK, want="master")
    assert readiness(MASTER_OK).ready is True


def test_unknown_want_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown readiness target 'leader'; expected one of master, shadow, any"):
        readiness(MASTER_OK, want="leader")


def test_unknown_role_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="role"):
        NodeState(role="candidate")


def test_state_is_frozen_and_keyword_only() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        MASTER_OK.role = "shadow"  # type: ignore[misc]
    with pytest.raises(TypeError):
        NodeState("master")  # type: ignore[misc]


def test_defaults_are_not_ready() -> None:
    for role in ("master", "shadow"):
        state = NodeState(role=role)
        assert readiness(state, want="any").ready is False
