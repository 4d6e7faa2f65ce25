"""Readiness of a connector node as a pure function of its state.

Theory of operation: the node snapshots what it knows into a frozen `NodeState` (its role, whether
its tunnel is up and whether the cloud accepted its epoch on it, whether etcd answers, whether
configuration is loaded) and `readiness()` turns that into a `Readiness(ready, reason)`. Nothing
here does I/O or reads a clock, so the whole decision is a table, unit-tested on its own
(cloudflared's idea: ready = master with a live tunnel).

What a caller asks for decides the rule (`want`):

- ``"master"`` (the default, for a load balancer or a Kubernetes readiness probe of the serving
  node): ready when this node is master and holds a tunnel the cloud registered (it accepted our
  epoch). A master that lost etcd stays ready: the cloud fences by epoch, so an etcd outage need
  not become a traffic outage; the reason says that no failover is possible meanwhile.
- ``"shadow"`` (is this standby fit to take over?): ready when this node is shadow, has its
  configuration loaded, and either holds a standby tunnel or reaches etcd (so it can be elected).
- ``"any"``: either of the above.

A node that is starting or draining (handing over, shutting down), or that the cloud refuses (its
cluster does not own the location), is never ready. The reason is
always one sentence an operator can act on; `/readyz` returns it as is.
"""

from __future__ import annotations

from typing import Final

import attrs

ROLES: Final = ("starting", "shadow", "master")
WANTS: Final = ("master", "shadow", "any")


@attrs.frozen(kw_only=True)
class NodeState:
    """What a node knows about itself at one instant; build a fresh one for each question."""

    role: str = attrs.field(validator=attrs.validators.in_(ROLES))
    tunnel_connected: bool = False
    tunnel_registered: bool = False  # the cloud accepted our epoch on this tunnel
    etcd_reachable: bool = False
    config_loaded: bool = False
    last_config_revision: int | None = None  # etcd revision of the configuration applied, if any
    draining: bool = False  # handing over or shutting down: finish streams, take no new work
    cloud_refusal: str | None = None  # the cloud refuses this node's cluster for its location (why)


@attrs.frozen
class Readiness:
    ready: bool
    reason: str


def readiness(state: NodeState, *, want: str = "master") -> Readiness:
    """Whether `state` is ready for what the caller wants (`master`, `shadow` or `any`).

    Raises ValueError for any other `want` (it comes from a query string: say what is accepted).
    """
    if want not in WANTS:
        raise ValueError(f"unknown readiness target {want!r}; expected one of {', '.join(WANTS)}")
    if state.draining:
        return Readiness(False, f"draining ({state.role}): handing over or shutting down")
    if state.role == "starting":
        return Readiness(False, "starting: role not decided yet")
    if state.cloud_refusal is not None:
        return Readiness(False, f"the cloud refuses this node: {state.cloud_refusal}")
    if want == "master" or (want == "any" and state.role == "master"):
        return _as_master(state)
    if want == "shadow" or state.role == "shadow":
        return _as_shadow(state)
    raise AssertionError(f"unreachable: role {state.role!r}, want {want!r}")  # pragma: no cover


def _as_master(state: NodeState) -> Readiness:
    if state.role != "master":
        return Readiness(False, f"not master (role {state.role})")
    if not state.tunnel_connected:
        return Readiness(False, "master without a tunnel to the cloud")
    if not state.tunnel_registered:
        return Readiness(False, "master with a tunnel the cloud has not registered (epoch not accepted yet)")
    if not state.etcd_reachable:
        return Readiness(True, "master with a registered tunnel; etcd unreachable, no failover possible")
    return Readiness(True, "master with a registered tunnel")


def _as_shadow(state: NodeState) -> Readiness:
    if state.role != "shadow":
        return Readiness(False, f"not shadow (role {state.role})")
    if not state.config_loaded:
        return Readiness(False, "shadow without configuration loaded")
    if state.tunnel_connected:
        return Readiness(True, "shadow with a standby tunnel")
    if state.etcd_reachable:
        return Readiness(True, "shadow reaching etcd, no standby tunnel")
    return Readiness(False, "shadow with neither a standby tunnel nor etcd")


# --- the cloud side ----------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class CloudState:
    """What a cloud replica knows about itself at one instant (see `cloud_readiness`)."""

    draining: bool = False  # SIGTERM: out of the load balancer's rotation, finishing requests


def cloud_readiness(state: CloudState) -> Readiness:
    """Whether a cloud replica should receive applications' connections (its `/readyz`)."""
    # A draining replica is not ready at once, so the load balancer stops sending before the
    # replica stops accepting (`connector.cloud.drain`); nothing else matters then.
    if state.draining:
        return Readiness(False, "draining: shutting down, finishing the requests under way")
    return Readiness(True, "serving")
