"""The etcd store with user/password authentication, as configured from a node's [cluster]
etcd_user and etcd_password(_file), against a real etcd with auth enabled (over TLS: gRPC will not
send credentials on a plain channel, and neither should we).

etcd holds a role with read-write permission on the cluster's prefix only; the right user works
(keys, leases, the leader transaction, watches), a wrong password, no user, or a user without
permission on the prefix get a clear StoreUnavailable, and an etcd restart (which forgets every
issued token) costs the store one re-authentication, not a restart of the node.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from etcd3 import etcdrpc

from connector import pki
from ha.etcd import EtcdSettings, EtcdStore
from ha.store import StoreUnavailable
from tests.support.etcdserver import EtcdServer
from tests.support.nodeconfig import cluster_node_toml

USER, PASSWORD = "node", "s3cret-for-tests"
CLUSTER = "demo"


def _enable_auth(server: EtcdServer, ca: Path) -> None:
    """root (required before enabling auth), a role with read-write on /demo/, user `node` in it."""
    channel = grpc.secure_channel(server.endpoint, grpc.ssl_channel_credentials(ca.read_bytes()))
    auth = etcdrpc.AuthStub(channel)
    try:
        auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password="root-pw"), timeout=5)
        auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
        auth.RoleAdd(etcdrpc.AuthRoleAddRequest(name="connector-demo"), timeout=5)
        permission = etcdrpc.auth_pb2.Permission(
            permType=etcdrpc.auth_pb2.Permission.READWRITE, key=f"/{CLUSTER}/".encode(),
            range_end=f"/{CLUSTER}0".encode())  # "/" + 1: the whole prefix
        auth.RoleGrantPermission(
            etcdrpc.AuthRoleGrantPermissionRequest(name="connector-demo", perm=permission), timeout=5)
        auth.UserAdd(etcdrpc.AuthUserAddRequest(name=USER, password=PASSWORD), timeout=5)
        auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user=USER, role="connector-demo"), timeout=5)
        auth.AuthEnable(etcdrpc.AuthEnableRequest(), timeout=5)
    finally:
        channel.close()


@pytest.fixture
def auth_etcd(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ca = pki.create_ca(tmp_path, "etcd-ca", "etcd test CA")
    cert = pki.issue(ca, tmp_path, "etcd-server", common_name="127.0.0.1", server_names=["127.0.0.1"])
    server = EtcdServer(tmp_path, tls=(cert.cert_path, cert.key_path, ca.cert_path))
    server.start()
    try:
        _enable_auth(server, ca.cert_path)
        yield {"server": server, "ca": str(ca.cert_path)}
    finally:
        server.kill()


def store(etcd: dict[str, Any], cluster: str = CLUSTER, user: str | None = USER,
          password: str | None = PASSWORD) -> EtcdStore:
    return EtcdStore(cluster, EtcdSettings(endpoints=(etcd["server"].url,), ca_file=etcd["ca"],
                                           user=user, password=password, timeout=1.0))


async def test_the_right_user_works_for_everything_a_node_does(auth_etcd: dict[str, Any]) -> None:
    good, writer = store(auth_etcd), store(auth_etcd)
    with trio.fail_after(20):
        revision = await good.put("config/probe", b"ok")
        assert (await good.get("config/probe")).value == b"ok"  # type: ignore[union-attr]
        lease = await good.grant_lease(5)
        assert await good.refresh_lease(lease) > 0
        epoch = await good.try_acquire_leader("node-a", lease, {"address": "127.0.0.1:1"})
        assert epoch is not None and epoch > revision
        snapshot = await good.get_cluster()
        assert snapshot.leader is not None and snapshot.leader.node == "node-a"
        async with good.watch("config/", revision + 1) as events:
            await writer.put("config/mapping", b"m")
            event = await events.__anext__()
        assert (event.kind, event.key, event.value) == ("put", "config/mapping", b"m")
        await good.revoke_lease(lease)
    await good.aclose()
    await writer.aclose()


@pytest.mark.parametrize(
    ("cluster", "user", "password", "reason"),
    [
        (CLUSTER, USER, "wrong", "authentication failed"),
        (CLUSTER, None, None, "user name is empty"),
        ("other", USER, PASSWORD, "permission denied"),  # the role covers /demo/ only
    ],
    ids=["wrong password", "no user", "prefix not granted"],
)
async def test_wrong_credentials_get_a_clear_error(
    auth_etcd: dict[str, Any], cluster: str, user: str | None, password: str | None, reason: str
) -> None:
    candidate = store(auth_etcd, cluster, user, password)
    with trio.fail_after(10), pytest.raises(StoreUnavailable, match=reason):
        await candidate.put("config/probe", b"must not land")
    await candidate.aclose()
    # nothing landed: the right user sees no such key under its own prefix either
    good = store(auth_etcd)
    with trio.fail_after(10):
        assert await good.get("config/probe") is None
    await good.aclose()


@pytest.mark.parametrize("graceful", [False, True], ids=["SIGKILL", "SIGTERM"])
async def test_an_etcd_restart_costs_one_re_authentication(auth_etcd: dict[str, Any], graceful: bool) -> None:
    """etcd's tokens live in its memory: after a restart every issued token is invalid, unless
    etcd happens to replay the authentication from its WAL (a SIGKILL within ~100 ms of it,
    before the backend committed: that made this test pass by luck most of the time). A
    graceful stop commits the backend first, so the tokens are gone for certain. The store
    authenticates again by itself (the watch resumes too), so the node needs no restart."""
    server: EtcdServer = auth_etcd["server"]
    good, writer = store(auth_etcd), store(auth_etcd)
    with trio.fail_after(30):
        start = await good.put("config/a", b"1") + 1
        async with good.watch("config/", start) as events:
            await trio.to_thread.run_sync(functools.partial(server.restart, graceful=graceful))
            while True:  # bounded by fail_after: the first calls may meet etcd still electing itself
                try:
                    await writer.put("config/b", b"2")
                    break
                except StoreUnavailable:
                    await trio.sleep(0.1)
            event = await events.__anext__()
        assert (event.kind, event.key, event.value) == ("put", "config/b", b"2")
        assert (await good.get("config/a")).value == b"1"  # type: ignore[union-attr]
    await good.aclose()
    await writer.aclose()


def test_password_authentication_needs_tls() -> None:
    with pytest.raises(ValueError, match="https"):
        EtcdSettings(endpoints=("http://127.0.0.1:2379",), user=USER, password=PASSWORD)


async def test_a_node_config_with_a_password_file_reaches_the_store(auth_etcd: dict[str, Any], tmp_path: Path) -> None:
    """From [cluster] etcd_user + etcd_password_file to a working store, as `connector node` does."""
    from connector.agent.runtime import open_store
    from connector.config import load_node_config

    password_file = tmp_path / "etcd.pw"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    config_file = cluster_node_toml(tmp_path, CLUSTER, [auth_etcd["server"].url], f"""\
etcd_ca = "{auth_etcd['ca']}"
etcd_user = "{USER}"
etcd_password_file = "etcd.pw"
""")
    store_ = open_store(load_node_config(config_file))
    assert store_ is not None
    with trio.fail_after(10):
        await store_.put("config/from-node-config", b"ok")
        assert (await store_.get("config/from-node-config")).value == b"ok"  # type: ignore[union-attr]
    await store_.aclose()
