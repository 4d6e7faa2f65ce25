"""Backup and restore on real processes: the operations guide's steps (docs/operations.md, "Backup
and restore"), in order, against the demo's stack (a real etcd, the cloud, two nodes, the backend).

The cluster first lives long enough for its revisions, hence its epochs and the cloud's fence, to
be far above anything a fresh etcd would issue soon. Then: backup, the master frozen, etcd killed
and its data wiped, a fresh etcd on the same address, restore; a master must serve proxied
requests again within seconds (without the restore's revision bump the nodes would be refused
``stale_epoch`` until their churning elections had climbed thousands of revisions), the restored
mappings and secrets are there, and the master from before the loss, thawed, never serves again:
a registration with its epoch is refused by the cloud.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from connector import pki
from connector.backup import bump_revision
from connector.config import load_node_config
from connector.demo import CLUSTER, LOCATION
from connector.tunnel.session import TunnelSession
from ha.etcd import EtcdSettings, EtcdStore
from tests.failover.harness import Cluster, check_fenced_after, check_routing, fast_spec
from tests.support.etcdserver import EtcdServer

LIVED_REVISION = 3000  # how far the cluster's etcd got before the loss (a young cluster: small)
SERVING_AGAIN = 10.0  # "within seconds": from the restore's end to requests served again
NODES = ("node-a", "node-b")


async def connector(cluster: Cluster, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([sys.executable, "-m", "connector", *args], cwd=cluster.workdir, stdin=stdin,
                                  capture_stdout=True, capture_stderr=True, check=False)


def succeeded(result: subprocess.CompletedProcess[bytes]) -> Any:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout


async def stale_registration(config_path: Path, tunnel_port: int, epoch: int) -> tuple[str, dict[str, Any]]:
    """Dial the cloud as `config_path`'s node with its real certificate, register with `epoch`, and
    return the cloud's answer."""
    config = load_node_config(config_path)
    ctx = pki.client_context(config.tunnel_ca, config.tunnel_cert, config.tunnel_key)
    send, receive = trio.open_memory_channel[tuple[str, dict[str, Any]]](10)

    async def on_control(op: str, body: dict[str, Any]) -> None:
        if op in ("registered", "refused", "fenced"):
            send.send_nowait((op, body))

    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.connect_websocket_url(nursery, f"wss://127.0.0.1:{tunnel_port}/tunnel",
                                                        ssl_context=ctx)
        session = TunnelSession(ws, client=True, hello_info={
            "node": config.node_id, "cluster": CLUSTER, "location_id": LOCATION})
        await session.handshake()
        nursery.start_soon(lambda: session.run(control_handler=on_control))
        await session.send_control("register", {"epoch": epoch})
        with trio.fail_after(5):
            answer = await receive.receive()
        nursery.cancel_scope.cancel()
    return answer


@pytest.mark.slow
async def test_backup_lose_etcd_restore_master_serves_again_and_stale_master_refused(tmp_path: Path) -> None:
    etcd = EtcdServer(tmp_path, "etcd-restore")
    await trio.to_thread.run_sync(etcd.start)
    spec = fast_spec(start_etcd=False, etcd_endpoints={n: [etcd.url] for n in NODES})
    store = EtcdStore(CLUSTER, EtcdSettings(endpoints=(etcd.url,)))
    try:
        async with Cluster(spec) as cluster:
            config = str(cluster.demo.configs["node-a"])
            key, archive = tmp_path / "backup.key", tmp_path / "demo.backup"
            backend = cluster.demo.ports["backend_http"]

            # State that lives only in etcd: a mapping and a secret an operator added.
            succeeded(await connector(cluster, "acl", "add", "--config", config, "--virtual", "restored.virtual:8000",
                                      "--internal", f"127.0.0.1:{backend}", "--path", "/sap/opu/odata"))
            succeeded(await connector(cluster, "secret", "set", "db-password", "--config", config, stdin=b"s3cret"))
            # A cluster that has lived: its etcd's revision, then (after a handover) its epoch, is high.
            await bump_revision(store, LIVED_REVISION, (await store.get_prefix("")).revision)
            _, first_epoch = await cluster.wait_master()
            succeeded(await connector(cluster, "switch", "--config", config))
            old_master, old_epoch = await cluster.wait_master(above_epoch=first_epoch)
            assert old_epoch > LIVED_REVISION

            # 1-2. A key and a backup.
            succeeded(await connector(cluster, "backup-key", str(key)))
            backed_up = json.loads(succeeded(await connector(
                cluster, "backup", "--config", config, "--key-file", str(key), "--out", str(archive))))
            assert backed_up["revision"] >= old_epoch and backed_up["keys"] >= 4, backed_up  # 3 mappings seeded, ...
            assert b"s3cret" not in archive.read_bytes() and b"restored.virtual" not in archive.read_bytes()

            load = cluster.load("restore", max_seconds=120.0, max_requests=100_000, interval=0.05)
            async with trio.open_nursery() as nursery:
                await nursery.start(load.run)
                await load.wait_ok(10)

                # The loss: the master freezes (it will come back believing it is master), etcd
                # is killed, its data gone, a fresh etcd on the same address.
                cluster.signal(old_master, signal.SIGSTOP)
                await trio.to_thread.run_sync(etcd.kill)
                shutil.rmtree(etcd.data_dir)
                await trio.to_thread.run_sync(etcd.start)
                assert (await store.get_prefix("")).revision < old_epoch  # a fresh etcd's epochs: refused

                # A wrong key is one line, and writes nothing.
                wrong = tmp_path / "wrong.key"
                succeeded(await connector(cluster, "backup-key", str(wrong)))
                refused = await connector(cluster, "restore", "--config", config, "--key-file", str(wrong), str(archive))
                assert refused.returncode == 2 and refused.stderr.decode().count("\n") == 1, refused
                assert "cannot decrypt the backup: wrong passphrase or key file" in refused.stderr.decode()
                assert not [k for k, kv in (await store.get_prefix("")).kvs.items() if kv.lease == 0]

                # 3. Restore.
                restored = json.loads(succeeded(await connector(
                    cluster, "restore", "--config", config, "--key-file", str(key), str(archive))))
                done = trio.current_time()
                assert restored["keys"] == backed_up["keys"] and restored["revision"] >= backed_up["revision"]

                # 4. A master the cloud accepts, serving proxied requests, within seconds.
                new_master, new_epoch = await cluster.wait_master(above_epoch=old_epoch, timeout=SERVING_AGAIN)
                await load.wait_ok(10, since=trio.current_time(), timeout=SERVING_AGAIN)
                assert trio.current_time() - done < SERVING_AGAIN
                assert new_master != old_master

                # 5. The frozen master resumes with its epoch from before the loss: it never serves
                # again, and rejoins as a shadow.
                cluster.signal(old_master, signal.SIGCONT)
                await cluster.wait_node(old_master, lambda s: s.get("role") == "shadow", 15.0, "a shadow")
                await load.wait_ok(10, since=trio.current_time())
                load.stop()
            routing = await cluster.routing()
            assert check_fenced_after(routing, old_master, old_epoch, new_epoch) == [], routing

            # The restored state: the operator's mapping (and its history), the secret.
            mappings = json.loads(succeeded(await connector(cluster, "acl", "list", "--json", "--config", config)))
            assert "config/mappings/restored.virtual:8000" in [m["key"] for m in mappings["mappings"]]
            assert succeeded(await connector(cluster, "secret", "get", "db-password", "--config", config)) == b"s3cret"
            history = succeeded(await connector(cluster, "acl", "history", "--json", "--config", config)).decode()
            assert [json.loads(line)["action"] for line in history.splitlines()][-1] == "restore"
            # A second restore finds state there and refuses.
            again = await connector(cluster, "restore", "--config", config, "--key-file", str(key), str(archive))
            assert again.returncode == 2 and "already holds" in again.stderr.decode(), again

            # And a registration with that epoch is refused outright.
            answer = await stale_registration(cluster.demo.configs[old_master], cluster.demo.ports["tunnel"],
                                              old_epoch)
            assert answer[0] == "refused" and answer[1]["reason"] == "stale_epoch", answer
            assert answer[1]["highest_epoch"] == new_epoch
            assert check_routing(await cluster.routing()) == []
            master, epoch = await cluster.master()
            assert (master, epoch) == (new_master, new_epoch)
    finally:
        await store.aclose()
        etcd.kill()
