"""`connector cloud-fence reset` against real replicas over a real etcd.

Two CloudServers share the fence through a real etcd; bare node sessions register with the epochs
the test chooses (tests/integration/test_cloud_shared.py); the command is a real process. The
story is the one of a restored on-premise etcd whose revisions stay far below the fence.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import trio

from connector.cloud import fenceadmin
from connector.cloud.registry import Fence
from connector.cloud.shared import REPLICAS_PREFIX, replicas_from
from tests.integration.test_cloud_shared import (
    LOCATION,
    Replica,
    dial,
    make_certs,
    open_store,
    refused_registration,
    register,
    shared_fence,
    start_replica,
)
from tests.support.stack import SUBACCOUNT


async def cloud_fence(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    result = await trio.run_process([sys.executable, "-m", "connector", "cloud-fence", *args], capture_stdout=True,
                                    capture_stderr=True, check=False, env={**os.environ, "PYTHONPATH": os.getcwd()})
    out = result.stdout.decode().strip()
    return result.returncode, json.loads(out.splitlines()[-1]) if out else None, result.stderr.decode()


async def wait_fence(replica: Replica, expected: Fence) -> None:
    """Until the replica's registry holds `expected` (its watch applied the write)."""
    with trio.fail_after(5):
        await replica.registry.wait_fence(LOCATION, expected)


async def wait_master_published(etcd: Any, published: bool) -> None:
    """Until some replica's entry in etcd names a master for the location, or (False) none does:
    replicas rewrite their entries when their tunnels change (within `REPLICA_PUBLISH_INTERVAL`)."""
    store = open_store(etcd)

    def seen(kvs: Any) -> bool:
        return bool(fenceadmin.masters_of(replicas_from(kvs), LOCATION)) == published

    try:
        with trio.fail_after(10):
            snapshot = await store.get_prefix(REPLICAS_PREFIX)
            if seen(snapshot.kvs):
                return
            async with store.watch(REPLICAS_PREFIX, snapshot.revision + 1) as events:
                async for _ in events:
                    if seen((await store.get_prefix(REPLICAS_PREFIX)).kvs):
                        return
    finally:
        await store.aclose()


async def test_a_reset_lowers_the_fence_on_every_replica_and_is_recorded(nursery, tmp_path, etcd):
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    b = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    with trio.fail_after(10):
        await a.registry.wait_fence_loaded()
        await b.registry.wait_fence_loaded()
    old_master = await dial(nursery, certs, a, "node-a")
    await register(old_master, a, 3022)  # a cluster that lived long
    with trio.fail_after(5):
        await a.shared.fence.wait_written()
    await wait_fence(b, Fence(3022, "onprem"))
    base = ("--config", str(a.config), "--subaccount", SUBACCOUNT, "--location", "")

    # While a master is registered the fence is in nobody's way: refused.
    await wait_master_published(etcd, True)
    status, _, error = await cloud_fence("reset", *base, "--epoch", "150", "--reason", "restored")
    assert status == 2 and "has master node-a" in error, error

    # etcd lost and restored: the master is gone and its successors' epochs start low.
    await old_master.session.aclose()
    await wait_master_published(etcd, False)
    restored_on_b = await dial(nursery, certs, b, "node-b")
    assert (await refused_registration(restored_on_b, 151))["reason"] == "stale_epoch"

    status, answer, error = await cloud_fence("reset", *base, "--epoch", "150", "--reason", "etcd restored")
    assert status == 0, error
    assert answer is not None and answer["applied"] and answer["old"]["epoch"] == 3022
    assert answer["new"] == {"epoch": 150, "cluster": "onprem", "resets": 1}
    await wait_fence(a, Fence(150, "onprem", 1))
    await wait_fence(b, Fence(150, "onprem", 1))

    await register(restored_on_b, b, 151)  # the restored cluster's master is accepted
    restored_on_a = await dial(nursery, certs, a, "node-b")
    await register(restored_on_a, a, 151)
    with trio.fail_after(5):
        await b.shared.fence.wait_written()
    assert await shared_fence(etcd) == Fence(151, "onprem")  # (the helper reads epoch and cluster)
    stale = await dial(nursery, certs, a, "node-a")  # a master with an epoch at or below the reset: refused
    assert (await refused_registration(stale, 149))["reason"] == "stale_epoch"

    # The record: who, when, the old and the new fence, the reason.
    status, shown, _ = await cloud_fence("show", "--config", str(b.config))
    assert status == 0 and shown is not None
    (record,) = shown["reset_records"]
    assert (record["old"]["epoch"], record["new"]["epoch"], record["reason"], record["applied"]) == (
        3022, 150, "etcd restored", True)
    assert record["user"] and record["host"] and record["time"] > 0
