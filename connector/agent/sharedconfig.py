"""Shared configuration in etcd: every node applies the same mappings, live.

Theory of operation
-------------------
Mappings live under ``config/mappings/<virtual_host:port>`` as JSON (`Mapping.to_dict`). On start
a node reads the prefix; if it is empty, the node *seeds* it from its TOML file (create-only writes,
so two nodes starting together cannot clobber each other). It then applies the snapshot and watches
the prefix from the snapshot's revision + 1: any change re-reads the whole prefix and applies it as
one new `AccessControl`, so a shadow always holds the master's exact configuration when it takes
over. A value that fails validation, or shares a virtual port with a value of a lower key, is
skipped with an error in the log and the audit log (the rest still applies); an etcd outage keeps the last applied configuration and retries with backoff.

Every accepted edit made with `connector acl` is also recorded under ``history/<revision>`` (who,
what, when): that is the versioned, audited trail; etcd's revisions are the versions.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

from connector.agent.acl import Mapping, PortTable, claim_ports
from connector.backoff import Backoff
from ha.store import RevisionCompacted, Store, StoreUnavailable

log = logging.getLogger(__name__)

MAPPINGS_PREFIX = "config/mappings/"
HISTORY_PREFIX = "history/"

Apply = Callable[[list[Mapping], int], None]


def mapping_key(mapping: Mapping) -> str:
    return MAPPINGS_PREFIX + mapping.name.lower()


def decode_mappings(kvs: Iterable[Any]) -> tuple[list[Mapping], list[str]]:
    """Valid mappings and one error string per invalid value (never raises). Of two values that
    share a virtual port (a range written over another mapping's port), the one with the lower
    key wins and the other is an error, so every node keeps the same one."""
    mappings: list[Mapping] = []
    errors = []
    taken: PortTable = {}
    for kv in sorted(kvs, key=lambda kv: kv.key):
        try:
            mapping = Mapping.from_dict(json.loads(kv.value))
        except (ValueError, TypeError) as exc:
            errors.append(f"{kv.key}: {exc}")
            continue
        holder = claim_ports(taken, mapping)
        if holder is not None:
            errors.append(f"{kv.key}: virtual_port: overlaps the mapping {holder.name!r}")
            continue
        mappings.append(mapping)
    return sorted(mappings, key=lambda m: m.name), errors


def operator_name() -> str:
    """Who made a change: the sudo caller, else the account of this process (systemd sets no $USER)."""
    if os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"]
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        return f"uid {os.getuid()}"


async def record_history(store: Store, action: str, key: str, revision: int | None, detail: Any) -> None:
    entry = {
        "action": action,
        "key": key,
        "revision": revision,
        "detail": detail,
        "user": operator_name(),
        "time": time.time(),  # wall-clock time of an operator action, for people to read
    }
    # keyed by time (not by the change's revision: a remove carries the revision of the add it
    # undoes); create-only, so a clash can never overwrite an earlier entry
    while await store.put(f"{HISTORY_PREFIX}{time.time_ns():020d}", json.dumps(entry, sort_keys=True),
                          prev_revision=0) is None:
        pass


class SharedConfig:
    def __init__(self, store: Store, seed: Iterable[Mapping], on_error: Callable[[str], object] | None = None) -> None:
        self.store = store
        self.seed = list(seed)
        self.revision = 0
        self.on_error = on_error or (lambda message: None)

    async def _seed_if_empty(self) -> None:
        snapshot = await self.store.get_prefix(MAPPINGS_PREFIX)
        if snapshot.kvs or not self.seed:
            return
        for mapping in self.seed:
            revision = await self.store.put(mapping_key(mapping), json.dumps(mapping.to_dict()), prev_revision=0)
            if revision is not None:
                await record_history(self.store, "seed", mapping_key(mapping), revision, mapping.to_dict())
        log.info("seeded shared configuration with %d mappings from the node's file", len(self.seed))

    async def _load(self, apply: Apply) -> int:
        snapshot = await self.store.get_prefix(MAPPINGS_PREFIX)
        mappings, errors = decode_mappings(snapshot.kvs.values())
        for error in errors:
            log.error("invalid shared mapping skipped: %s", error)
            self.on_error(error)
        self.revision = snapshot.revision
        apply(mappings, snapshot.revision)
        return snapshot.revision

    async def run(self, apply: Apply, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        started = False
        while True:
            try:
                if not started:
                    await self._seed_if_empty()
                revision = await self._load(apply)
                if not started:
                    started = True
                    task_status.started()
                backoff.reset()
                async with self.store.watch(MAPPINGS_PREFIX, revision + 1) as events:
                    async for _event in events:
                        await self._load(apply)
            except (StoreUnavailable, RevisionCompacted) as exc:
                delay = backoff.next_delay()
                log.warning("shared configuration: %s; keeping revision %d, retrying in %.1f s", exc, self.revision, delay)
                if not started:
                    # Start with the file's configuration rather than not at all; etcd may be down.
                    started = True
                    apply(self.seed, 0)
                    task_status.started()
                await trio.sleep(delay)
