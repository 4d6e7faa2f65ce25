"""Readiness of a connector node as a pure function of its state.

Theory of operation: the node snapshots what it knows into a frozen `NodeState` (its role, whether
its tunnel is up and whether the cloud accepted its epoch on it, whether etcd answers, whether
configuration is loaded) and `readiness()` turns that into a `Readiness(ready, reason)`. Nothing
here does I/O or reads a clock, so the whole decision is a table, unit-tested on its own
(cloudflared's idea: ready = master with a live tunnel).

What a caller asks for decides the rule (`want`):

- ``"master"`` (the default, for a load balancer or a Kubernetes readiness probe of the serving
  node): ready when this node is master and at least one cloud replica registered its tunnel (it
  accepted our epoch). One replica is enough: the application's requests reach the replicas through
  a load balancer, and a replica without our tunnel takes itself out of its rotation
  (`cloud_readiness`); the reason counts the replicas registered, so a partial one shows. A master
  that lost etcd stays ready: the cloud fences by epoch, so an etcd outage need not become a
  traffic outage; the reason says that no failover is possible meanwhile.
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
    tunnel_connected: bool = False  # a tunnel to at least one cloud replica is up
    tunnel_registered: bool = False  # at least one replica accepted our epoch
    replicas_connected: int = 0  # cloud replicas we hold a tunnel to
    replicas_registered: int = 0  # of those, the ones that accepted our epoch
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
    tunnels = "a registered tunnel"
    if state.replicas_connected > 1 or state.replicas_registered < state.replicas_connected:
        tunnels = f"tunnels registered on {state.replicas_registered} of {state.replicas_connected} cloud replicas"
    if not state.etcd_reachable:
        return Readiness(True, f"master with {tunnels}; etcd unreachable, no failover possible")
    return Readiness(True, f"master with {tunnels}")


def _as_shadow(state: NodeState) -> Readiness:
    if state.role != "shadow":
        return Readiness(False, f"not shadow (role {state.role})")
    if not state.config_loaded:
        return Readiness(False, "shadow without configuration loaded")
    if state.tunnel_connected:
        return Readiness(True, "shadow with a standby tunnel" if state.replicas_connected <= 1 else
                         f"shadow with standby tunnels to {state.replicas_connected} cloud replicas")
    if state.etcd_reachable:
        return Readiness(True, "shadow reaching etcd, no standby tunnel")
    return Readiness(False, "shadow with neither a standby tunnel nor etcd")


# --- the cloud side: one replica -------------------------------------------------------------

@attrs.frozen(kw_only=True)
class CloudState:
    """What one cloud replica knows at one instant, for its `/readyz` (the load balancer's check).

    Each concern is its own field, so the rules stay one line each and can grow independently.
    Locations are named ``"subaccount/location"``.
    """

    draining: bool = False  # SIGTERM: out of the load balancer's rotation, finishing requests
    shared: bool = False  # [shared] configured: several replicas, state in the cloud's etcd
    fence_loaded: bool = True  # the shared fence was read (always True without [shared])
    shared_reachable: bool = True  # the last operation on the cloud's etcd succeeded
    writes_pending: int = 0  # fence advances accepted here and not yet in the cloud's etcd
    # Where the masters' tunnels are: the locations whose master is registered here, and, for each
    # other serving replica (from the shared state's replica records), the locations whose master
    # is registered there.
    masters_here: frozenset[str] = frozenset()
    masters_elsewhere: dict[str, frozenset[str]] = attrs.field(factory=dict)


def cloud_readiness(state: CloudState) -> Readiness:
    """Whether a cloud replica should be in the load balancer's rotation.

    A replica that has not read the shared fence is never ready: it admits no tunnel and routes
    nothing rather than guess (fail closed). One that has read it stays ready through an outage
    of the cloud's etcd: the cached fence keeps refusing stale masters, and higher epochs, always
    safe, are accepted and written back later.

    A replica without the tunnel of a location's master cannot serve that location's requests (the
    node has not dialled it yet, or only the path between them is cut). It takes itself out of
    rotation while another replica *covers* it: holds the master of every location held here and
    at least one more. So requests go where they can be served, with no data path between replicas;
    and, since covering is strict, no two replicas can take each other out: when the replicas lack
    different locations (two partial partitions at once) each stays in and serves what it has.
    """
    # A draining replica is not ready at once, so the load balancer stops sending before the
    # replica stops accepting (`connector.cloud.drain`); nothing else matters then.
    if state.draining:
        return Readiness(False, "draining: shutting down, finishing the requests under way")
    if state.shared and not state.fence_loaded:
        return Readiness(False, "shared state not loaded (fail closed): the cloud's etcd has not answered since "
                                "this replica started, so it cannot know the fence and serves nothing")
    for replica, theirs in sorted(state.masters_elsewhere.items()):
        missing = theirs - state.masters_here
        if missing and state.masters_here <= theirs:
            return Readiness(False, f"no tunnel from the master of {', '.join(sorted(missing))}, which replica "
                             f"{replica} holds: out of rotation until the node dials this replica")
    if state.shared and not state.shared_reachable:
        return Readiness(True, f"serving from the cached fence; the cloud's etcd is unreachable "
                               f"({state.writes_pending} fence advances to write back)")
    return Readiness(True, "serving")
