"""Which masters' tunnels each cloud replica holds: the input of a replica's readiness.

Theory of operation: a replica's `/readyz` is `connector.readiness.cloud_readiness`, a pure
function of the locations whose master is registered here (`masters_here`, from the registry)
and of those registered on every other serving replica (a `PeerMasters`, fed by the shared
state's replica records). A replica that lacks a master another replica has takes itself out of
the load balancer's rotation (see `cloud_readiness` for the exact rule and docs/architecture.md
for why that, and not forwarding between replicas).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from connector.readiness import CloudState


def location_name(subaccount: str, location_id: str) -> str:
    """How `CloudState` names a location: ``subaccount/location``."""
    return f"{subaccount}/{location_id}"


def masters_here(snapshot: list[dict[str, Any]]) -> frozenset[str]:
    """The locations with a registered master in a `Registry.snapshot()`."""
    return frozenset(location_name(loc["subaccount"], loc["location_id"]) for loc in snapshot if loc["master"])


class PeerMasters(Protocol):
    """The other replicas' tunnels, as the shared state reports them."""

    def masters_by_replica(self) -> Mapping[str, frozenset[str]]:
        """For each other replica that serves (is not draining, and its record is alive): the
        locations (`location_name`) whose master is registered on it. Never blocks: the last view."""
        ...  # pragma: no cover - protocol


class NoPeers:
    """A single replica, or shared state that reports no replica records: nothing elsewhere."""

    def masters_by_replica(self) -> Mapping[str, frozenset[str]]:
        return {}


def cloud_state(snapshot: list[dict[str, Any]], peers: PeerMasters) -> CloudState:
    return CloudState(masters_here=masters_here(snapshot), masters_elsewhere=dict(peers.masters_by_replica()))
