"""The fence of a location, as values and pure decisions (no trio, no I/O).

A location belongs to one cluster and is served by the master with the highest epoch of that
cluster (epochs are revisions of the cluster's etcd). `Fence` is that pair, plus how often an
operator reset it; `decide_registration` is the verdict on one registration; `merge_fence` meets
the fence another replica wrote in the cloud's etcd with this replica's. `connector.cloud.registry`
applies them; `connector.cloud.shared` replicates fences.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["LocationKey", "Fence", "merge_fence", "RegistrationResult", "decide_registration"]

LocationKey = tuple[str, str]  # (subaccount, location_id)


@attrs.frozen
class Fence:
    """What fences a location: the highest epoch accepted, of the cluster the location is bound to,
    and how many times an operator reset it (`connector cloud-fence reset`)."""

    epoch: int = -1
    cluster: str | None = None
    resets: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cluster": self.cluster, "resets": self.resets}

    @classmethod
    def from_json(cls, data: Any) -> Fence:
        """ValueError unless `data` is {"epoch": int >= -1, "cluster": str or null, "resets": int >= 0
        (absent: 0)}."""
        if not isinstance(data, dict):
            raise ValueError(f"a fence must be an object, not {type(data).__name__}")
        epoch, cluster, resets = data.get("epoch"), data.get("cluster"), data.get("resets", 0)
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < -1:
            raise ValueError(f"a fence's epoch must be an integer >= -1: {data!r}")
        if cluster is not None and not isinstance(cluster, str):
            raise ValueError(f"a fence's cluster must be a string or null: {data!r}")
        if not isinstance(resets, int) or isinstance(resets, bool) or resets < 0:
            raise ValueError(f"a fence's resets must be an integer >= 0: {data!r}")
        return cls(epoch, cluster, resets)


def merge_fence(shared: Fence, local: Fence, *, pinned: str | None) -> Fence:
    """The fence of a location once the `shared` one (in etcd, written by any replica) meets this
    replica's `local` one.

    The owner is the pin, else the cluster bound in the shared fence (the first replica to bind
    the location won the compare-and-set), else the local binding. Epochs only ever rise: the
    result is the highest epoch of the two that belongs to the owner (an unbound epoch, from a
    state file of before bindings, counts for any owner, as in `decide_registration`).
    The one exception is an operator's reset: the fence with more `resets` replaces the other's
    epoch instead of meeting it (a reset is how a fence is lowered, on every replica).
    """
    owner = pinned if pinned is not None else shared.cluster if shared.cluster is not None else local.cluster
    newest = [f for f in (shared, local) if f.resets == max(shared.resets, local.resets)]
    epochs = [f.epoch for f in newest if f.cluster in (None, owner)]
    return Fence(max(epochs, default=-1), owner, newest[0].resets)


@attrs.frozen
class RegistrationResult:
    accepted: bool
    reason: str  # accepted, stale_epoch, wrong_cluster, fence_unknown
    highest_epoch: int
    cluster: str | None = None  # the cluster that owns the location (after an acceptance: the caller's)

    @property
    def message(self) -> str:
        if self.reason == "wrong_cluster":
            return f"this location is served by cluster {self.cluster!r}"
        if self.reason == "stale_epoch":
            return f"a master with epoch {self.highest_epoch} registered since"
        if self.reason == "fence_unknown":
            return ("this cloud replica has not read the shared fence yet (its etcd is unreachable): "
                    "it accepts no tunnel until it has")
        return "accepted"

    def control_body(self) -> dict[str, Any]:
        """The body of the ``refused`` control message telling a node about this verdict."""
        return {"reason": self.reason, "cluster": self.cluster, "highest_epoch": self.highest_epoch,
                "message": self.message}


def decide_registration(
    *, pinned: str | None, bound: str | None, highest_epoch: int, cluster: str, epoch: int | None
) -> RegistrationResult:
    """The cloud's verdict on `cluster` registering (or, with `epoch` None, connecting) for a location
    that is `pinned` in the configuration and `bound` by an earlier registration, whose bound
    cluster's highest epoch is `highest_epoch`.

    The owner is the pinned cluster, else the bound one, else (nobody yet) the caller. Another
    cluster is refused with ``wrong_cluster``. A pin naming a cluster other than the bound one moves
    the location: the old cluster's epochs say nothing about the new cluster's, so they start afresh.
    Epochs of a location never bound to a cluster (a state file from before bindings) still fence.
    """
    owner = pinned if pinned is not None else bound if bound is not None else cluster
    highest = highest_epoch if bound in (None, owner) else -1
    if cluster != owner:
        return RegistrationResult(False, "wrong_cluster", highest, owner)
    if epoch is None or epoch >= highest:
        return RegistrationResult(True, "accepted", highest if epoch is None else epoch, owner)
    return RegistrationResult(False, "stale_epoch", highest, owner)
