"""An operator's reset of one location's fence in the cloud's etcd (`connector cloud-fence`).

Theory of operation
-------------------
By itself a fence only rises (`registry.merge_fence`). When an on-premise cluster's etcd is lost
and the restored one cannot be moved past the fence (`connector restore` moves its revision past
the backup's with one write per revision: minutes for a young cluster, days for one whose member
keys have been rewritten every `loop_wait` for a year; or elections happened after the backup),
the cluster's new masters are refused ``stale_epoch``. The reset is the way out: it writes the
location's fence with a lower epoch and one more ``resets``, by compare-and-set on the key's mod
revision. Every replica's watch applies it (the fence with more resets replaces the epoch instead
of meeting it), and a replica writing an advance of its own back re-reads and merges over it,
so no replica can raise it again from its cache.

A reset is refused while any replica reports a master for the location (a master is proof the
fence is not in the way, and lowering it then would let an older master of the cluster displace
it) and when it would raise the fence. Each reset is recorded create-only under
``fence-resets/<subaccount>/<location>/<time_ns>``: who, from which host, when, the old and new
epoch and fence, and the reason the operator gave. The record is written before the fence
(``"applied": null``), so no reset happens unrecorded, and completed after it: ``true``, or
``false`` when another replica changed the fence in between (nothing changed: run it again).

Authentication is that of the cloud's etcd (cloud.toml's ``[shared]`` TLS client certificate or
user and password), as for ``connector cloud-token``: whoever may write the cloud's etcd can write
any fence already; the command adds no new way in (no HTTP endpoint with credentials of its own).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import attrs

from connector.agent.sharedconfig import operator_name
from connector.cloud.registry import Fence, LocationKey
from connector.cloud.shared import (
    FENCE_PREFIX,
    REPLICAS_PREFIX,
    _quote,
    encode,
    fence_key,
    parse_fence,
    replicas_from,
)
from ha.store import Store

RESETS_PREFIX = "fence-resets/"


@attrs.frozen
class ResetResult:
    old: Fence
    new: Fence
    record_key: str
    applied: bool  # False: the fence changed between our read and write (nothing changed; run it again)


def record_prefix(key: LocationKey) -> str:
    return f"{RESETS_PREFIX}{_quote(key[0])}/{_quote(key[1])}/"


def masters_of(replicas: dict[str, dict[str, Any]], key: LocationKey) -> dict[str, str]:
    """replica id -> the master it reports for `key` (the replica set's `Registry.summary`)."""
    name = f"{key[0]}/{key[1]}"
    return {rid: str(entry["locations"][name]["master"]) for rid, entry in sorted(replicas.items())
            if (entry.get("locations") or {}).get(name, {}).get("master")}


async def reset_fence(store: Store, key: LocationKey, epoch: int, *, reason: str) -> ResetResult:
    """Lower `key`'s fence to `epoch` (see the module docstring); ValueError when refused."""
    if epoch < -1:
        raise ValueError("--epoch must be -1 (accept any epoch) or more")
    if not reason.strip():
        raise ValueError("give a --reason: it is kept with the reset")
    masters = masters_of(replicas_from((await store.get_prefix(REPLICAS_PREFIX)).kvs), key)
    if masters:
        raise ValueError(f"replica {next(iter(masters))} has master {next(iter(masters.values()))} for "
                         f"{key[0]}/{key[1]}: its fence is not in the way, and a reset now would let an older "
                         "master displace it")
    kv = await store.get(fence_key(key))
    parsed = parse_fence(kv.key, kv.value) if kv is not None else None
    if parsed is None:
        raise ValueError(f"no fence for {key[0]}/{key[1]} in the cloud's etcd (nothing to reset)")
    assert kv is not None
    old = parsed[1]
    if epoch >= old.epoch:
        raise ValueError(f"the fence of {key[0]}/{key[1]} is at epoch {old.epoch}: a reset only lowers it")
    new = Fence(epoch, old.cluster, old.resets + 1)
    now = time.time_ns()
    record = {"subaccount": key[0], "location_id": key[1], "user": operator_name(), "host": socket.gethostname(),
              "pid": os.getpid(), "time": now / 1e9, "old": old.to_json(), "new": new.to_json(), "reason": reason, "applied": None}
    record_key = f"{record_prefix(key)}{now:020d}"
    if await store.put(record_key, encode(record), prev_revision=0) is None:
        raise ValueError(f"{record_key} exists (two resets in one nanosecond?): run it again")
    value = {**new.to_json(), "subaccount": key[0], "location_id": key[1], "reset_record": record_key}
    applied = await store.put(fence_key(key), encode(value), prev_revision=kv.mod_revision) is not None
    await store.put(record_key, encode({**record, "applied": applied}))
    return ResetResult(old, new, record_key, applied)


async def fence_report(store: Store) -> list[dict[str, Any]]:
    """Every location's fence with its resets' records, for `connector cloud-fence show`."""
    fences = dict(filter(None, (parse_fence(kv.key, kv.value)
                                for kv in (await store.get_prefix(FENCE_PREFIX)).kvs.values())))
    records = (await store.get_prefix(RESETS_PREFIX)).kvs
    report = []
    for key, fence in sorted(fences.items()):
        prefix = record_prefix(key)
        resets = [json.loads(kv.value) for name, kv in sorted(records.items()) if name.startswith(prefix)]
        report.append({"subaccount": key[0], "location_id": key[1], **fence.to_json(), "reset_records": resets})
    return report
