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

from connector.cloud.replicas import ReplicaDirectory
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


class SharedPeers:
    """The other replicas' masters from the replica records in the cloud's etcd (`ReplicaSync`):
    each record's ``locations`` names the master registered there. Replicas that are not ready
    (draining, fence not loaded, themselves out of rotation) do not count."""

    def __init__(self, records: Any, directory: ReplicaDirectory) -> None:
        self.records = records  # has `.replicas`: id -> the published entry
        self.directory = directory

    def masters_by_replica(self) -> Mapping[str, frozenset[str]]:
        me = self.directory.me.id
        return {
            rid: frozenset(name for name, info in entry.get("locations", {}).items() if info.get("master"))
            for rid, entry in self.records.replicas.items()
            if rid != me and entry.get("ready")
        }


def cloud_state(snapshot: list[dict[str, Any]], peers: PeerMasters) -> CloudState:
    return CloudState(masters_here=masters_here(snapshot), masters_elsewhere=dict(peers.masters_by_replica()))
