"""`connector backup --cloud` / `restore --cloud`: the cloud's shared etcd lost under a running
replica and restored from an archive (real etcd, a real CloudServer, the real command).

The replica keeps serving from its cache while etcd is away; its watches resume from the revision
they had seen, so the restore must land above it for the replica to notice the restored keys.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import trio

from connector.backup import bump_revision
from connector.cloud.registry import Fence
from tests.integration.test_cloud_shared import (
    LOCATION,
    dial,
    make_certs,
    open_store,
    register,
    start_replica,
)
from tests.support.stack import SUBACCOUNT

PASSPHRASE = b"the cloud's backup passphrase\n"
LIVED_REVISION = 1000


async def connector(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([sys.executable, "-m", "connector", *args], stdin=stdin, capture_stdout=True,
                                  capture_stderr=True, check=False, env={**os.environ, "PYTHONPATH": os.getcwd()})


async def test_the_clouds_state_is_restored_under_a_running_replica(nursery, tmp_path, etcd):
    certs = make_certs(tmp_path)
    replica = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    with trio.fail_after(10):
        await replica.registry.wait_fence_loaded()
    await register(await dial(nursery, certs, replica, "node-a"), replica, 42)
    with trio.fail_after(5):
        await replica.shared.fence.wait_written()
    store = open_store(etcd)
    try:  # a cloud etcd that has lived: the replica's watches are far above a fresh etcd's revisions
        await bump_revision(store, LIVED_REVISION, (await store.get_prefix("")).revision)
    finally:
        await store.aclose()
    added = await connector("cloud-token", "add", "--config", str(replica.config), "--subaccount", SUBACCOUNT)
    token = json.loads(added.stdout)
    passphrase = tmp_path / "passphrase"
    passphrase.write_bytes(PASSPHRASE)
    archive = tmp_path / "cloud.backup"
    backed_up = await connector("backup", "--cloud", str(replica.config), "--passphrase-file", str(passphrase),
                                "--out", str(archive))
    assert backed_up.returncode == 0, backed_up.stderr
    assert json.loads(backed_up.stdout)["keys"] >= 3  # the fence, the token, the destinations key

    await trio.to_thread.run_sync(etcd.kill)
    shutil.rmtree(etcd.data_dir)
    await trio.to_thread.run_sync(etcd.start)

    wrong = await connector("restore", "--cloud", str(replica.config), "--passphrase-file", "-", str(archive),
                            stdin=b"not the passphrase\n")
    assert wrong.returncode == 2
    assert wrong.stderr.decode() == ("connector: cannot decrypt the backup: wrong passphrase or key file, "
                                     "or the file was altered\n")
    restored = await connector("restore", "--cloud", str(replica.config), "--passphrase-file", "-", str(archive),
                               stdin=PASSPHRASE)
    assert restored.returncode == 0, restored.stderr
    answer = json.loads(restored.stdout)
    assert answer["revision"] >= answer["backup_revision"] > answer["revision_before"]

    store = open_store(etcd)
    try:
        fence = await store.get("fence/acme/%00")
        assert fence is not None and Fence.from_json(json.loads(fence.value)) == Fence(42, "onprem")
    finally:
        await store.aclose()
    # A replica started now reads the restored state.
    fresh = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    with trio.fail_after(10):
        await fresh.registry.wait_fence_loaded()
        await fresh.shared.tokens.wait_revision(answer["revision"])
    assert fresh.registry.fence_of(LOCATION) == Fence(42, "onprem")
    assert fresh.cloud.authenticator.authenticate(token["token"]) == SUBACCOUNT
    # The running replica's watches resumed from the revision they had seen before the loss: the
    # restore landed above it, so a token added now reaches it too.
    added = await connector("cloud-token", "add", "--config", str(replica.config), "--subaccount", SUBACCOUNT)
    later = json.loads(added.stdout)
    with trio.fail_after(10):
        await replica.shared.tokens.wait_revision(later["revision"])
    assert replica.cloud.authenticator.authenticate(later["token"]) == SUBACCOUNT
