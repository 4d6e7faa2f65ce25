"""Shadows probe the master directly, so a frozen or hung master is noticed before its lease ends.

Theory of operation: every ``probe_interval`` (start to start, so a probe that times out does not
stretch the period) a shadow reads the cluster, finds the leader's admin URL (in the leader key,
else in its member key) and calls ``check(url, timeout)``. ``probe_failures`` misses in a row for
the *same* leader and epoch tell the elector that epoch is lost (``hint_master_lost``); the elector
then deposes it and takes over (or, if lower in priority, waits its turn). A wrong verdict is
safe: the new master's higher epoch fences the old one at the cloud. Store errors pause probing
(the election loop deals with etcd); probing restarts from zero whenever the leader changes or
this node is not a shadow. With the defaults (0.5 s x 3) a frozen master is declared lost after
about 1.5 s, well inside the 3 s lease.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ha.store import StoreError

log = logging.getLogger(__name__)

Check = Callable[[str, float], Awaitable[bool]]


class MasterProbe:
    def __init__(self, elector: Any, check: Check) -> None:
        self.elector = elector
        self.check = check
        self.timing = elector.timing
        self.misses = 0
        self.hints = 0

    async def run(self) -> None:
        interval = self.timing.probe_interval
        probed: tuple[str, int] | None = None
        next_probe = trio.current_time()
        while True:
            next_probe = max(next_probe + interval, trio.current_time())
            await trio.sleep_until(next_probe)
            if self.elector.role != "shadow":
                self.misses, probed = 0, None
                continue
            try:
                snapshot = await self.elector.store.get_cluster()
            except StoreError:
                continue
            leader = snapshot.leader
            if leader is None or leader.node == self.elector.node_id:
                self.misses, probed = 0, None
                continue
            member = snapshot.members.get(leader.node)
            url = leader.data.get("admin_url") or (member.data.get("admin_url") if member else None)
            if not url:
                continue
            if probed != (leader.node, leader.epoch):
                probed, self.misses = (leader.node, leader.epoch), 0
            healthy = await self.check(str(url), interval * 0.8)
            self.misses = 0 if healthy else self.misses + 1
            if self.misses >= self.timing.probe_failures:
                log.warning("master %s (epoch %d) missed %d probes in a row", leader.node, leader.epoch, self.misses)
                self.elector.hint_master_lost(leader.epoch, "probe")
                self.hints += 1
                self.misses = 0
