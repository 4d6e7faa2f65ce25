"""Operating a cluster on real etcd: status, readiness, shared allow-list edits applied live by
every node, configuration history, and secrets encrypted with the cluster key."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import trio

from connector.admin import http_request
from connector.agent.runtime import build_node, open_store
from connector.clusterctl import collect_status
from connector.config import load_node_config
from connector.tunnel.types import StreamProtocol, Target
from tests.support.httpclient import HttpClient
from tests.support.stack import SUBACCOUNT, node_toml, start_stack

NEW = Target("new.virtual", 9000, StreamProtocol.HTTP)


def cluster_section(etcd, tmp_path) -> str:
    return f"""
[cluster]
name = "it"
etcd = ["{etcd.url}"]
ttl = 2
loop_wait = 0.2
retry_timeout = 0.5
secrets_key = "{tmp_path / 'cluster.key'}"
"""


async def start_cluster(nursery, tmp_path, etcd):
    stack = await start_stack(nursery, tmp_path, with_node=False)
    nodes, paths = [], []
    for name in ("node-a", "node-b"):
        path = node_toml(tmp_path, stack.certs, stack.ports.tunnel, stack.backend_http, stack.backend_tcp,
                         node=name, cluster=cluster_section(etcd, tmp_path))
        node = build_node(load_node_config(path))
        await nursery.start(node.run)
        nodes.append(node)
        paths.append(path)
    with trio.fail_after(10):
        await stack.cloud.registry.wait_master(SUBACCOUNT, "")
        for node in nodes:
            await node.wait_tunnels(1)
    return stack, nodes, paths


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "connector", *args], capture_output=True, input=stdin, timeout=60)


async def test_status_readiness_and_live_shared_configuration(nursery, tmp_path, etcd):
    stack, nodes, paths = await start_cluster(nursery, tmp_path, etcd)
    config = load_node_config(paths[0])

    rows, leader = await collect_status(config)
    master = stack.cloud.registry.master_of(SUBACCOUNT, "")
    assert leader is not None and leader["node"] == master.node and leader["epoch"] == master.epoch > 0
    assert sorted(r["role"] for r in rows) == ["master", "shadow"]
    assert {r["pid"] for r in rows} == {os.getpid()}

    status = await trio.to_thread.run_sync(cli, "status", "--json", "--config", str(paths[0]))
    assert status.returncode == 0, status.stderr
    assert len(status.stdout.decode().splitlines()) == 2

    by_role = {n.role: n for n in nodes}
    for role, want, expected in (("master", "master", 200), ("shadow", "master", 503), ("shadow", "shadow", 200)):
        code, body = await http_request("127.0.0.1", by_role[role].admin_port, f"/readyz?want={want}")
        assert code == expected, (role, want, body)
    code, _ = await http_request("127.0.0.1", by_role["master"].admin_port, "/readyz?want=nonsense")
    assert code == 400

    # an edit through `connector acl` reaches both nodes without a restart
    assert all(n.acl.find_mapping(NEW) is None for n in nodes)
    added = await trio.to_thread.run_sync(
        cli, "acl", "--config", str(paths[0]), "add", "--virtual", "new.virtual:9000",
        "--internal", f"127.0.0.1:{stack.backend_http}", "--path", "/sap",
    )
    assert added.returncode == 0, added.stderr
    with trio.fail_after(5):
        for node in nodes:
            await node.wait_mapping(NEW)
    client = await HttpClient.connect(stack.ports.http_proxy)
    response = await client.request("GET", "http://new.virtual:9000/sap/x", [stack.proxy_auth])
    assert response.status == 200
    audit = [json.loads(line) for line in (tmp_path / "node-b-audit.jsonl").read_text().splitlines()]
    assert any(line.get("kind") == "config" and "new.virtual:9000" in line.get("mappings", []) for line in audit)

    listed = json.loads((await trio.to_thread.run_sync(cli, "acl", "--config", str(paths[0]), "list", "--json")).stdout)
    entry = next(e for e in listed["mappings"] if e["key"].endswith("new.virtual:9000"))
    # compare-and-set on the version: a stale revision writes nothing
    stale = await trio.to_thread.run_sync(
        cli, "acl", "--config", str(paths[0]), "add", "--virtual", "new.virtual:9000",
        "--internal", "127.0.0.1:1", "--expect-revision", str(entry["revision"] - 1),
    )
    assert stale.returncode == 1 and b"nothing written" in stale.stderr
    invalid = await trio.to_thread.run_sync(
        cli, "acl", "--config", str(paths[0]), "add", "--virtual", "bad.virtual:99999", "--internal", "x:1",
    )
    assert invalid.returncode == 2 and b"invalid mapping" in invalid.stderr

    removed = await trio.to_thread.run_sync(cli, "acl", "--config", str(paths[0]), "remove", "--virtual", "new.virtual:9000")
    assert removed.returncode == 0, removed.stderr
    with trio.fail_after(5):
        for node in nodes:
            await node.wait_mapping(NEW, present=False)
    history = (await trio.to_thread.run_sync(cli, "acl", "--config", str(paths[0]), "history", "--json")).stdout.decode()
    actions = [json.loads(line)["action"] for line in history.splitlines()]
    assert actions[-2:] == ["add", "remove"] and "seed" in actions


async def test_secrets_are_encrypted_at_rest(nursery, tmp_path, etcd):
    path = node_toml(tmp_path, {"cloud_ca": tmp_path / "x", "node_node-a_cert": tmp_path / "x",
                                "node_node-a_key": tmp_path / "x"}, 1, 1, 1,
                     cluster=cluster_section(etcd, tmp_path))
    (tmp_path / "x").write_text("unused")
    stored = await trio.to_thread.run_sync(
        lambda: cli("secret", "--config", str(path), "set", "erp-password", stdin=b"s3cret-value"))
    assert stored.returncode == 0, stored.stderr
    key = tmp_path / "cluster.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    store = open_store(load_node_config(path))
    raw = await store.get("secrets/erp-password")
    await store.aclose()
    assert raw is not None and b"s3cret-value" not in raw.value
    got = await trio.to_thread.run_sync(cli, "secret", "--config", str(path), "get", "erp-password")
    assert got.stdout == b"s3cret-value"
    key.write_bytes(b"A" * 43 + b"=")  # another cluster's key: a clear refusal, no garbage
    os.chmod(key, 0o600)
    wrong = await trio.to_thread.run_sync(cli, "secret", "--config", str(path), "get", "erp-password")
    assert wrong.returncode == 1 and b"does not decrypt" in wrong.stderr


async def test_status_exits_non_zero_without_a_master(tmp_path, etcd):
    path = node_toml(tmp_path, {"cloud_ca": tmp_path / "x", "node_node-a_cert": tmp_path / "x",
                                "node_node-a_key": tmp_path / "x"}, 1, 1, 1,
                     cluster=cluster_section(etcd, tmp_path))
    (tmp_path / "x").write_text("unused")
    result = await trio.to_thread.run_sync(cli, "status", "--config", str(path))
    assert result.returncode == 1
    assert b"NO MASTER" in result.stdout
