"""The token service on two cloud replicas over one real etcd: one key ring, one set of bindings.

Real etcd (tests/support/etcdserver.py), two real `CloudServer`s in this process with [oauth] and
[shared], a real node with a tunnel to each and the demo backend behind it; tokens fetched over
TLS from one replica's token service are presented at the other's HTTP proxy
(``Proxy-Authorization: Bearer <JWT>``). Bindings are made and revoked with the real `connector
binding` command in a subprocess (it runs trio itself).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
import trio

from connector import pki
from connector.agent.node import Node
from connector.cli import init_certs, main
from connector.cloud.oauth_shared import BINDINGS_PREFIX, SharedBindings, SharedKeyRing
from connector.cloud.server import CloudServer
from connector.config import EtcdConfig, etcd_settings, load_cloud_config, load_node_config
from connector.demo_backend import run_backend
from ha.etcd import EtcdStore
from tests.support.httpclient import HttpClient, Response
from tests.support.stack import SUBACCOUNT, cloud_toml, node_toml

ERP = "http://erp.virtual:8000/sap/opu/odata/x"
LIFETIME = 600  # token_lifetime and key_overlap
WITHIN = 15  # seconds for the node's tunnels to register; etcd watches deliver within moments
OAUTH = f"""
[oauth]
listen = "127.0.0.1:0"
token_lifetime = {LIFETIME}
key_overlap = {LIFETIME}
"""


@attrs.define
class Replica:
    cloud: CloudServer
    config: Path
    scope: trio.CancelScope
    ca: Path

    @property
    def keyring(self) -> SharedKeyRing:
        assert self.cloud.oauth is not None and isinstance(self.cloud.oauth.keyring, SharedKeyRing)
        return self.cloud.oauth.keyring

    @property
    def bindings(self) -> SharedBindings:
        assert self.cloud.oauth is not None and isinstance(self.cloud.oauth.bindings, SharedBindings)
        return self.cloud.oauth.bindings

    async def oauth_request(self, method: str, path: str, headers: list[tuple[str, str]] | None = None,
                            body: bytes = b"") -> Response:
        assert self.cloud.ports is not None and self.cloud.ports.oauth is not None
        sock = await trio.open_tcp_stream("127.0.0.1", self.cloud.ports.oauth)
        stream = trio.SSLStream(sock, pki.client_context(self.ca), server_hostname="127.0.0.1", https_compatible=True)
        client = HttpClient(stream)
        try:
            with trio.fail_after(10):
                return await client.request(method, path, headers or [], body)
        finally:
            await client.aclose()

    async def token_response(self, credentials: dict[str, Any]) -> Response:
        basic = base64.b64encode(f"{credentials['clientid']}:{credentials['clientsecret']}".encode()).decode()
        return await self.oauth_request("POST", "/oauth/token", [
            ("content-type", "application/x-www-form-urlencoded"), ("authorization", f"Basic {basic}")],
            b"grant_type=client_credentials")

    async def token(self, credentials: dict[str, Any]) -> str:
        response = await self.token_response(credentials)
        assert response.status == 200, response.body
        return str(response.json()["access_token"])

    async def kids(self) -> list[str]:
        response = await self.oauth_request("GET", "/token_keys")
        assert response.status == 200
        return [key["kid"] for key in response.json()["keys"]]

    async def through_proxy(self, token: str) -> int:
        assert self.cloud.ports is not None
        client = await HttpClient.connect(self.cloud.ports.http_proxy)
        try:
            with trio.fail_after(10):
                return (await client.request("GET", ERP, [("Proxy-Authorization", f"Bearer {token}")])).status
        finally:
            await client.aclose()


def shared_section(tmp_path: Path, etcd: Any, rid: str) -> str:
    return f"""
[replica]
id = "{rid}"
lease_ttl = 2

[shared]
etcd = ["{etcd.url}"]
secrets_key = "{tmp_path / 'shared.key'}"
"""


async def start_replica(nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], etcd: Any, rid: str,
                        *, config: Path | None = None) -> Replica:
    if config is None:
        workdir = tmp_path / rid
        workdir.mkdir(exist_ok=True)
        config = cloud_toml(workdir, certs, extra=OAUTH + shared_section(tmp_path, etcd, rid))
    cloud = CloudServer(load_cloud_config(config))
    scope = trio.CancelScope()

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await cloud.run(task_status=task_status)

    await nursery.start(run)
    return Replica(cloud, config, scope, certs["cloud_ca"])


async def start_node(nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], replicas: list[Replica]) -> Node:
    backend_http, backend_tcp = await nursery.start(run_backend, "127.0.0.1", 0, 0)
    path = node_toml(tmp_path, certs, 0, backend_http, backend_tcp)
    urls = [f"wss://127.0.0.1:{r.cloud.ports.tunnel}/tunnel" for r in replicas]  # type: ignore[union-attr]
    path.write_text(path.read_text().replace('url = "wss://127.0.0.1:0/tunnel"', f"url = {json.dumps(urls)}"))
    node = Node(load_node_config(path))
    await nursery.start(node.run)
    with trio.fail_after(WITHIN):
        await node.wait_tunnels(len(replicas), registered=True)
    return node


async def binding_cli(*args: str) -> str:
    """`connector binding ...` in a subprocess (it runs trio itself); its standard output."""
    result = await trio.run_process([sys.executable, "-m", "connector", "binding", *args], capture_stdout=True,
                                    capture_stderr=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    return result.stdout.decode()


async def bindings_revision(etcd: Any) -> int:
    """The revision of the latest change of a binding (what a replica that saw it has applied)."""
    store = EtcdStore("connector-cloud", etcd_settings(EtcdConfig((etcd.url,), None, None, None, None, None)))
    try:
        return max(kv.mod_revision for kv in (await store.get_prefix(BINDINGS_PREFIX)).kvs.values())
    finally:
        await store.aclose()


async def seen_by_both(etcd: Any, *replicas: Replica) -> None:
    revision = await bindings_revision(etcd)
    with trio.fail_after(5):
        for replica in replicas:
            await replica.bindings.wait_revision(revision)


def make_certs(tmp_path: Path) -> dict[str, Path]:
    return init_certs(tmp_path / "certs", SUBACCOUNT, ["node-a"], ["127.0.0.1", "localhost"])


async def test_a_binding_and_its_tokens_work_on_both_replicas_until_it_is_revoked(nursery, tmp_path, etcd):
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    b = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    await start_node(nursery, tmp_path, certs, [a, b])
    vcap = json.loads(await binding_cli("create", "--config", str(a.config), "--subaccount", SUBACCOUNT, "--compact"))
    credentials = vcap["connectivity"][0]["credentials"]
    await seen_by_both(etcd, a, b)

    from_a, from_b = await a.token(credentials), await b.token(credentials)  # the binding works on both
    assert jwt.get_unverified_header(from_a)["kid"] == jwt.get_unverified_header(from_b)["kid"]  # one ring
    assert await b.through_proxy(from_a) == 200  # issued by replica a, accepted by replica b
    assert await a.through_proxy(from_b) == 200
    listed = [json.loads(line) for line in (await binding_cli("list", "--config", str(b.config))).splitlines()]
    assert [(r["client_id"], r["revoked"]) for r in listed] == [(credentials["clientid"], None)]

    await binding_cli("revoke", "--config", str(b.config), credentials["clientid"])
    await seen_by_both(etcd, a, b)
    for replica in (a, b):  # refused everywhere: no new tokens, the issued ones refused
        refused = await replica.token_response(credentials)
        assert (refused.status, refused.json()["error_description"]) == (401, "this binding is revoked")
        assert await replica.through_proxy(from_a) == 407
        assert await replica.through_proxy(from_b) == 407


async def test_a_rotation_on_one_replica_publishes_both_keys_on_both(nursery, tmp_path, etcd):
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    b = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    await start_node(nursery, tmp_path, certs, [a, b])
    vcap = json.loads(await binding_cli("create", "--config", str(a.config), "--subaccount", SUBACCOUNT, "--compact"))
    credentials = vcap["connectivity"][0]["credentials"]
    await seen_by_both(etcd, a, b)
    old = await b.token(credentials)
    (old_kid,) = await a.kids()

    assert a.cloud.oauth is not None
    await a.cloud.oauth.rotate_keys()
    with trio.fail_after(5):
        await b.keyring.wait_revision(a.keyring.ring_revision)
    assert b.keyring.ring_revision == a.keyring.ring_revision  # b rotated nothing itself
    new_kid = a.keyring.ring.current.kid  # type: ignore[union-attr]
    assert await a.kids() == await b.kids() == [new_kid, old_kid]  # both keys, on both replicas
    new = await b.token(credentials)  # b signs with the new key too
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    for replica in (a, b):  # the old key's token is still good during the overlap
        assert await replica.through_proxy(old) == 200
        assert await replica.through_proxy(new) == 200


async def test_a_single_replicas_files_are_imported_when_it_gets_shared(nursery, tmp_path, etcd,
                                                                         capsys: pytest.CaptureFixture[str]):
    certs = make_certs(tmp_path)
    workdir = tmp_path / "cloud-a"
    workdir.mkdir()
    alone = cloud_toml(workdir, certs, extra=OAUTH)
    assert main(["binding", "create", "--config", str(alone), "--subaccount", SUBACCOUNT, "--compact"]) == 0
    credentials = json.loads(capsys.readouterr().out)["connectivity"][0]["credentials"]
    single = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a", config=alone)
    assert single.cloud.shared is None
    token = await single.token(credentials)  # signed by the key in signing-keys.json
    single.scope.cancel()

    alone.write_text(alone.read_text() + shared_section(tmp_path, etcd, "cloud-a"))  # now one replica of two
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a", config=alone)
    with trio.fail_after(5):
        await a.keyring.ready.wait()  # imported
    assert not (workdir / "signing-keys.json").exists() and (workdir / "signing-keys.json.imported").exists()
    assert a.keyring.ring is not None and a.keyring.ring.current.kid == jwt.get_unverified_header(token)["kid"]
    b = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    await start_node(nursery, tmp_path, certs, [a, b])
    await seen_by_both(etcd, a, b)
    assert not (workdir / "bindings.json").exists() and (workdir / "bindings.json.imported").exists()
    for replica in (a, b):  # the binding and the file key's token work on both
        assert await replica.through_proxy(token) == 200
        assert await replica.through_proxy(await replica.token(credentials)) == 200


async def test_an_emergency_rotation_through_the_cli_refuses_the_old_keys_tokens_on_both(nursery, tmp_path, etcd):
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    b = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    await start_node(nursery, tmp_path, certs, [a, b])
    vcap = json.loads(await binding_cli("create", "--config", str(a.config), "--subaccount", SUBACCOUNT, "--compact"))
    credentials = vcap["connectivity"][0]["credentials"]
    await seen_by_both(etcd, a, b)
    leaked = await a.token(credentials)
    assert await b.through_proxy(leaked) == 200

    result = await trio.run_process([sys.executable, "-m", "connector", "cloud-keys", "rotate", "--overlap", "0",
                                     "--config", str(b.config)], capture_stdout=True, capture_stderr=True,
                                    env={**os.environ, "PYTHONPATH": os.getcwd()})
    rotated, *keys = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [k["signs"] for k in keys] == [True, False] and "private_pem" not in keys[0]
    with trio.fail_after(5):
        for replica in (a, b):
            await replica.keyring.wait_revision(rotated["revision"])
    for replica in (a, b):
        assert await replica.kids() == [keys[0]["kid"]]  # the leaked key is gone from /token_keys at once
        assert await replica.through_proxy(leaked) == 407
        assert await replica.through_proxy(await replica.token(credentials)) == 200
