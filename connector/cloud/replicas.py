"""The cloud replicas the nodes hold tunnels to: the seam between shared state and the tunnel.

Theory of operation
-------------------
Several `connector cloud` processes (replicas) serve the same subaccounts behind a load balancer;
every node holds a tunnel to each of them, so whichever replica an application reaches can route
to the location's master. A `ReplicaDirectory` is one replica's view of the set:

* its own entry (`me`) always, so a single replica without shared state announces itself;
* the others as the shared state (the cloud's etcd) reports them, through `update()`.

The tunnel endpoint announces the set to each node right after the HELLO and again whenever it
changes, in a ``replicas`` control operation whose body is `to_body()`; the node reads it with
`from_body()`, dials the replicas it has no tunnel to and drops those no longer announced. The
cloud's HELLO names its replica (`HELLO_REPLICA_KEY`), so a node that reached a replica through a
shared address (a load balancer or a DNS name) knows which one it holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import trio

REPLICAS_OP = "replicas"  # control operation, cloud -> node: the current replica set
HELLO_REPLICA_KEY = "replica"  # in the cloud's HELLO info: the replica's id


@attrs.frozen
class Replica:
    """One cloud replica as nodes and operators see it."""

    id: str
    tunnel_url: str  # where nodes dial this replica's tunnel endpoint (wss://host:port/tunnel)
    admin_url: str = ""  # its admin API (/readyz, /status), for operators and `connector status`

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "tunnel_url": self.tunnel_url, "admin_url": self.admin_url}

    @classmethod
    def from_json(cls, data: Any) -> Replica:
        """Raises ValueError on anything but an object with string `id` and `tunnel_url`."""
        if not isinstance(data, dict):
            raise ValueError(f"a replica must be an object, not {type(data).__name__}")
        rid, url, admin = data.get("id"), data.get("tunnel_url"), data.get("admin_url", "")
        if not isinstance(rid, str) or not rid or not isinstance(url, str) or not url.startswith("wss://"):
            raise ValueError(f"a replica needs a non-empty 'id' and a wss:// 'tunnel_url': {data!r}")
        if not isinstance(admin, str):
            raise ValueError(f"a replica's 'admin_url' must be a string: {data!r}")
        return cls(rid, url, admin)


def to_body(replicas: Iterable[Replica]) -> dict[str, Any]:
    """The ``replicas`` control operation's body."""
    return {"replicas": [r.to_json() for r in sorted(replicas, key=lambda r: r.id)]}


def from_body(body: Any) -> tuple[Replica, ...]:
    """Parse a ``replicas`` body; ValueError names what is wrong (a broken peer, not ours)."""
    if not isinstance(body, dict) or not isinstance(body.get("replicas"), list):
        raise ValueError("a replicas body must be {'replicas': [...]}")
    replicas = tuple(Replica.from_json(item) for item in body["replicas"])
    if len({r.id for r in replicas}) != len(replicas):
        raise ValueError("replica ids must be unique")
    return replicas


class ReplicaDirectory:
    """One replica's view of the replica set; `wait_changed` lets announcers follow it."""

    def __init__(self, me: Replica) -> None:
        self.me = me
        self._others: dict[str, Replica] = {}
        self.version = 0
        self._changed = trio.Event()

    def current(self) -> tuple[Replica, ...]:
        """Every replica, this one included, ordered by id."""
        return tuple(sorted([self.me, *self._others.values()], key=lambda r: r.id))

    def update(self, replicas: Iterable[Replica]) -> bool:
        """Replace the other replicas (entries naming `me` are ignored); True if the set changed."""
        others = {r.id: r for r in replicas if r.id != self.me.id}
        if others == self._others:
            return False
        self._others = others
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()
        return True

    async def wait_changed(self, seen_version: int) -> int:
        """Return the current version once it differs from `seen_version` (at once if it does)."""
        while self.version == seen_version:
            await self._changed.wait()
        return self.version
