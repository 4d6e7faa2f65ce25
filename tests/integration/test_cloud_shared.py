"""Several cloud replicas over one real etcd: the fence, tokens, destinations and the replica set.

Real etcd (tests/support/etcdserver.py, stopped and restarted for the outages), real CloudServers
in this process (two or three at once, each its own ports), real TLS tunnels from bare node
sessions that register with the epochs a test chooses, real HTTP to the proxies, the admin API
and the destination service; the `cloud-token` CLI and the killed replica are real processes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from connector import pki
from connector.admin import http_request
from connector.cli import init_certs
from connector.cloud.auth import hash_token
from connector.cloud.registry import Fence
from connector.cloud.replicas import REPLICAS_OP
from connector.cloud.server import CloudServer
from connector.cloud.shared import fence_key
from connector.config import EtcdConfig, etcd_settings, load_cloud_config
from connector.tunnel.session import TunnelSession
from connector.tunnel.types import ErrorCode
from ha.etcd import EtcdStore
from tests.support.destinations import call
from tests.support.httpclient import HttpClient
from tests.support.stack import SUBACCOUNT, TOKEN, cloud_toml

ADMIN = "shared-destination-admin-token"
LOCATION = (SUBACCOUNT, "")
FIND = "/destination-configuration/v1/destinations"
COLLECTION = "/destination-configuration/v1/subaccountDestinations"


class Replica:
    def __init__(self, cloud: CloudServer, scope: trio.CancelScope, config: Path) -> None:
        self.cloud, self.scope, self.config = cloud, scope, config
        assert cloud.ports is not None
        self.ports = cloud.ports

    @property
    def registry(self) -> Any:
        return self.cloud.registry

    @property
    def shared(self) -> Any:
        assert self.cloud.shared is not None
        return self.cloud.shared

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        status, body = await http_request("127.0.0.1", self.ports.admin, "/readyz")
        return status, json.loads(body)


def replica_toml(tmp_path: Path, certs: dict[str, Path], etcd: Any, rid: str, *, lease_ttl: int = 2) -> Path:
    workdir = tmp_path / rid
    workdir.mkdir(exist_ok=True)
    return cloud_toml(workdir, certs, extra=f"""
destination_admin_sha256 = ["{hash_token(ADMIN)}"]

[destinations]
listen = "127.0.0.1:0"

[replica]
id = "{rid}"
lease_ttl = {lease_ttl}

[shared]
etcd = ["{etcd.url}"]
secrets_key = "{tmp_path / 'shared.key'}"
""")


async def start_replica(nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], etcd: Any, rid: str) -> Replica:
    path = replica_toml(tmp_path, certs, etcd, rid)
    cloud = CloudServer(load_cloud_config(path))
    scope = trio.CancelScope()

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await cloud.run(task_status=task_status)

    await nursery.start(run)
    return Replica(cloud, scope, path)


def make_certs(tmp_path: Path) -> dict[str, Path]:
    return init_certs(tmp_path / "certs", SUBACCOUNT, ["node-a", "node-b"], ["127.0.0.1", "localhost"])


class BareNode:
    """A bare node of cluster "onprem" holding one tunnel; the cloud's control replies queue up."""

    def __init__(self, session: TunnelSession) -> None:
        self.session = session
        self.send, self.replies = trio.open_memory_channel[tuple[str, dict[str, Any]]](100)

    async def on_control(self, op: str, body: dict[str, Any]) -> None:
        if op != REPLICAS_OP:  # the replica set the endpoint announces: not a reply
            self.send.send_nowait((op, body))

    async def wait_closed(self) -> None:
        await self.session.wait_closed()

    @property
    def close_reason(self) -> tuple[ErrorCode, str] | None:
        return self.session.close_reason


async def dial(nursery: trio.Nursery, certs: dict[str, Path], replica: Replica, node: str) -> BareNode:
    ctx = pki.client_context(certs["cloud_ca"], certs[f"node_{node}_cert"], certs[f"node_{node}_key"])
    ws = await trio_websocket.connect_websocket_url(nursery, f"wss://127.0.0.1:{replica.ports.tunnel}/tunnel",
                                                    ssl_context=ctx)
    session = TunnelSession(ws, client=True, hello_info={"location_id": "", "node": node, "cluster": "onprem"})
    await session.handshake()
    bare = BareNode(session)
    await nursery.start(lambda task_status: session.run(control_handler=bare.on_control, task_status=task_status))
    return bare


async def register(bare: BareNode, replica: Replica, epoch: int) -> None:
    """Register with `epoch` and wait until `replica` accepted it."""
    await bare.session.send_control("register", {"epoch": epoch})
    with trio.fail_after(5):
        op, body = await bare.replies.receive()
    assert (op, body["epoch"]) == ("registered", epoch), (op, body)
    master = replica.registry.master_of(*LOCATION)
    assert master is not None and master.epoch == epoch


async def refused_registration(bare: BareNode, epoch: int) -> dict[str, Any]:
    """Register with `epoch` and return the cloud's answer, which must be a refusal."""
    await bare.session.send_control("register", {"epoch": epoch})
    with trio.fail_after(5):
        op, body = await bare.replies.receive()
    assert op == "refused", (op, body)
    return body


def open_store(etcd: Any) -> EtcdStore:
    """The cloud's etcd as the replicas see it (prefix /connector-cloud), for the test's own reads."""
    return EtcdStore("connector-cloud", etcd_settings(EtcdConfig((etcd.url,), None, None, None, None, None)))


async def shared_fence(etcd: Any) -> Fence:
    store = open_store(etcd)
    try:
        kv = await store.get(fence_key(LOCATION))
    finally:
        await store.aclose()
    assert kv is not None
    data = json.loads(kv.value)
    return Fence(data["epoch"], data["cluster"])


# --- the fence across replicas ------------------------------------------------------------------

async def test_a_fence_raised_on_one_replica_fences_the_old_master_on_another(nursery, tmp_path, etcd):
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    b = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    with trio.fail_after(10):
        await a.registry.wait_fence_loaded()
        await b.registry.wait_fence_loaded()
    old_on_a, old_on_b = await dial(nursery, certs, a, "node-a"), await dial(nursery, certs, b, "node-a")
    await register(old_on_a, a, 5)
    await register(old_on_b, b, 5)

    new_on_a = await dial(nursery, certs, a, "node-b")
    await register(new_on_a, a, 9)  # the new master reached replica A only
    with trio.fail_after(5):
        await old_on_b.wait_closed()  # B heard of epoch 9 from etcd and fenced the old master at once
    assert old_on_b.close_reason is not None and old_on_b.close_reason[0] == ErrorCode.STALE_EPOCH
    assert b.registry.master_of(*LOCATION) is None
    assert b.registry.fence_of(LOCATION) == Fence(9, "onprem")
    assert await shared_fence(etcd) == Fence(9, "onprem")

    again = await dial(nursery, certs, b, "node-a")  # the old master comes back to B: refused
    body = await refused_registration(again, 5)
    assert (body["reason"], body["highest_epoch"]) == ("stale_epoch", 9)


async def test_the_stale_master_dialling_a_fresh_replica_is_refused(nursery, tmp_path, etcd):
    """The classic case: an old master frozen past its lease, a new master registered on the
    existing replicas, a fresh replica started, the old master resumed and dialling it."""
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    b = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    with trio.fail_after(10):
        await a.registry.wait_fence_loaded()
        await b.registry.wait_fence_loaded()
    old = [await dial(nursery, certs, r, "node-a") for r in (a, b)]
    for session, replica in zip(old, (a, b), strict=True):
        await register(session, replica, 4)
    # the old master freezes (sends nothing more); the new one registers everywhere
    for replica in (a, b):
        await register(await dial(nursery, certs, replica, "node-b"), replica, 8)
    with trio.fail_after(5):
        await a.shared.fence.wait_written()
        await b.shared.fence.wait_written()

    fresh = await start_replica(nursery, tmp_path, certs, etcd, "cloud-c")
    with trio.fail_after(10):
        await fresh.registry.wait_fence_loaded()
    resumed = await dial(nursery, certs, fresh, "node-a")  # the old master resumes, dials the fresh replica
    body = await refused_registration(resumed, 4)
    assert (body["reason"], body["highest_epoch"]) == ("stale_epoch", 8)
    assert fresh.registry.master_of(*LOCATION) is None
    client = await HttpClient.connect(fresh.ports.http_proxy)
    response = await client.request("GET", "http://erp.virtual:8000/sap/opu/odata/x",
                                    [("Proxy-Authorization", f"Bearer {TOKEN}")])
    assert response.status == 503  # held for the master that never came, never served by the old one
    assert fresh.registry.snapshot()[0]["routing"] == []


async def test_a_replica_started_while_etcd_is_down_serves_nothing_until_it_read_the_fence(nursery, tmp_path, etcd):
    certs = make_certs(tmp_path)
    await trio.to_thread.run_sync(etcd.stop)
    replica = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")

    status, body = await replica.readyz()
    assert status == 503
    assert body["reason"].startswith("shared state not loaded (fail closed)")
    node = await dial(nursery, certs, replica, "node-a")
    with trio.fail_after(5):
        await node.wait_closed()  # no tunnel is admitted
    assert node.close_reason is not None and node.close_reason[0] == ErrorCode.DENIED
    assert node.close_reason[1].startswith("fence_unknown:")
    client = await HttpClient.connect(replica.ports.http_proxy)
    response = await client.request("GET", "http://erp.virtual:8000/sap/opu/odata/x",
                                    [("Proxy-Authorization", f"Bearer {TOKEN}")])
    assert response.status == 503
    assert b"fence_unknown" in response.body
    status, _, _ = await call(replica.ports.destinations, "GET", COLLECTION, token=ADMIN)
    assert status == 503  # no destination answer from a store never read

    await trio.to_thread.run_sync(etcd.start)
    with trio.fail_after(10):
        await replica.registry.wait_fence_loaded()
    status, body = await replica.readyz()
    assert (status, body["ready"]) == (200, True)
    await register(await dial(nursery, certs, replica, "node-a"), replica, 3)


async def test_through_an_outage_higher_epochs_are_accepted_and_written_back(nursery, tmp_path, etcd):
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    with trio.fail_after(10):
        await a.registry.wait_fence_loaded()
    old = await dial(nursery, certs, a, "node-a")
    await register(old, a, 3)
    with trio.fail_after(5):
        await a.shared.fence.wait_written()

    await trio.to_thread.run_sync(etcd.stop)
    new = await dial(nursery, certs, a, "node-b")
    await register(new, a, 7)  # a higher epoch is always safe: accepted from the cached fence
    with trio.fail_after(5):
        await old.wait_closed()
    assert a.shared.fence.pending == 1
    with trio.fail_after(5):
        await a.shared.reach.wait(False)  # the write-back failed
    status, body = await a.readyz()
    assert status == 200 and "unreachable" in body["reason"], body
    stale = await dial(nursery, certs, a, "node-a")
    assert (await refused_registration(stale, 3))["reason"] == "stale_epoch"

    await trio.to_thread.run_sync(etcd.start)
    with trio.fail_after(15):
        await a.shared.fence.wait_written()
    assert await shared_fence(etcd) == Fence(7, "onprem")
    fresh = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    with trio.fail_after(10):
        await fresh.registry.wait_fence_loaded()
    assert fresh.registry.fence_of(LOCATION) == Fence(7, "onprem")

    # A's watch resumed after the restart: an epoch accepted on B now fences A's master at once
    await register(await dial(nursery, certs, fresh, "node-a"), fresh, 12)
    with trio.fail_after(5):
        await new.wait_closed()
    assert new.close_reason is not None and new.close_reason[0] == ErrorCode.STALE_EPOCH
    assert a.registry.fence_of(LOCATION) == Fence(12, "onprem")


# --- tokens and destinations --------------------------------------------------------------------

async def cli(*args: str) -> dict[str, Any]:
    result = await trio.run_process([sys.executable, "-m", "connector", *args], capture_stdout=True,
                                    capture_stderr=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    return json.loads(result.stdout)


async def test_a_token_added_through_the_cli_works_on_every_replica_and_revoked_is_refused(nursery, tmp_path, etcd):
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    b = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    added = await cli("cloud-token", "add", "--config", str(a.config), "--subaccount", SUBACCOUNT, "--label", "app1")
    token = added["token"]
    listed = await cli("cloud-token", "list", "--config", str(b.config))
    assert (listed["sha256"], listed["subaccount"], listed["kind"], listed["label"]) == (
        added["token_sha256"], SUBACCOUNT, "proxy", "app1")
    assert "token" not in listed  # only its digest is kept
    with trio.fail_after(5):
        await b.shared.tokens.wait_revision(added["revision"])
    status, _, _ = await call(b.ports.destinations, "GET", f"{FIND}/nothing", token=token)
    assert status == 404  # authenticated (no such destination), not 401
    assert b.cloud.authenticator.authenticate(TOKEN) == SUBACCOUNT  # cloud.toml's token still works

    revoked = await cli("cloud-token", "revoke", "--config", str(a.config), "--subaccount", SUBACCOUNT,
                        "--sha256", added["token_sha256"][:12])
    assert revoked == {"revoked": [added["token_sha256"]]}
    store = open_store(etcd)
    try:
        now = (await store.get_prefix("tokens/")).revision
    finally:
        await store.aclose()
    with trio.fail_after(5):
        await b.shared.tokens.wait_revision(now)
        await a.shared.tokens.wait_revision(now)
    for replica in (a, b):
        status, _, _ = await call(replica.ports.destinations, "GET", f"{FIND}/nothing", token=token)
        assert status == 401


async def test_a_destination_written_through_one_replica_is_read_through_another(nursery, tmp_path, etcd):
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    b = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    destination = {"Name": "ERP", "Type": "HTTP", "URL": "http://erp.virtual:8000", "Authentication": "BasicAuthentication",
                   "ProxyType": "OnPremise", "User": "u", "Password": "very-secret-password"}
    with trio.fail_after(10):  # loaded: the memory reflects etcd (at revision 1 or later) only from the first read
        await a.cloud.shared_destinations.wait_revision(1)
        await b.cloud.shared_destinations.wait_revision(1)
    assert a.cloud.shared_destinations.loaded and b.cloud.shared_destinations.loaded
    status, _, _ = await call(a.ports.destinations, "POST", COLLECTION, destination, token=ADMIN)
    assert status == 201
    with trio.fail_after(5):
        await b.cloud.shared_destinations.wait_revision(a.cloud.shared_destinations.revision)
    status, found, _ = await call(b.ports.destinations, "GET", f"{FIND}/ERP", token=TOKEN)
    assert status == 200
    assert found["destinationConfiguration"]["Password"] == "very-secret-password"

    store = open_store(etcd)
    try:
        raw = (await store.get_prefix("destinations/")).kvs
    finally:
        await store.aclose()
    assert len(raw) == 1 and b"very-secret-password" not in next(iter(raw.values())).value  # encrypted at rest

    status, _, _ = await call(b.ports.destinations, "DELETE", f"{COLLECTION}/ERP", token=ADMIN)
    assert status == 200
    with trio.fail_after(5):
        while (seen := a.cloud.shared_destinations).get(SUBACCOUNT, "ERP") is not None:
            await seen.wait_revision(seen.revision + 1)  # the next change of the destinations
    status, _, _ = await call(a.ports.destinations, "GET", f"{FIND}/ERP", token=TOKEN)
    assert status == 404


async def test_subaccount_settings_changed_through_the_cli_apply_on_every_replica(nursery, tmp_path, etcd):
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    b = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    with trio.fail_after(10):
        await b.registry.wait_fence_loaded()
    master = await dial(nursery, certs, b, "node-a")
    await register(master, b, 5)

    changed = await cli("cloud-subaccount", "set", "--config", str(a.config), "--subaccount", SUBACCOUNT,
                        "--pin", "=beta", "--location", "plant-2", "--max-streams-per-token", "3")
    assert (changed["clusters"], changed["locations"], changed["max_streams_per_token"]) == ({"": "beta"}, ["plant-2"], 3)
    with trio.fail_after(5):
        await b.shared.settings.wait_revision(changed["revision"])
        await master.wait_closed()  # moved to cluster beta: onprem's master is refused at once
    assert master.close_reason is not None and master.close_reason[1].startswith("wrong_cluster:")
    assert b.registry.admission.limits.for_subaccount(SUBACCOUNT) == 3
    assert [e["location_id"] for e in b.registry.snapshot()] == ["", "plant-2"]  # held for from now on
    shown = await cli("cloud-subaccount", "show", "--config", str(b.config), "--subaccount", SUBACCOUNT)
    assert shown["clusters"] == {"": "beta"}


# --- the replica set ----------------------------------------------------------------------------

async def wait_replicas(replica: Replica, ids: set[str]) -> None:
    directory = replica.cloud.replicas
    version = -1
    while {r.id for r in directory.current()} != ids:
        version = await directory.wait_changed(version)


async def test_the_replica_set_follows_starts_stops_and_kills(nursery, tmp_path, etcd):
    certs = make_certs(tmp_path)
    a = await start_replica(nursery, tmp_path, certs, etcd, "cloud-a")
    b = await start_replica(nursery, tmp_path, certs, etcd, "cloud-b")
    with trio.fail_after(10):
        await wait_replicas(a, {"cloud-a", "cloud-b"})
    me_b = b.cloud.replicas.me
    assert me_b.tunnel_url == f"wss://127.0.0.1:{b.ports.tunnel}/tunnel"
    assert {r.tunnel_url for r in a.cloud.replicas.current()} >= {me_b.tunnel_url}

    b.scope.cancel()  # a graceful stop revokes the lease: gone at once, not after the ttl
    with trio.fail_after(1.5):
        await wait_replicas(a, {"cloud-a"})

    path = replica_toml(tmp_path, certs, etcd, "cloud-k")
    process = await trio.lowlevel.open_process([sys.executable, "-m", "connector", "cloud", "--config", str(path)],
                                               env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        with trio.fail_after(20):
            await wait_replicas(a, {"cloud-a", "cloud-k"})
            version = -1
            while not a.shared.replicas.replicas["cloud-k"]["ready"]:  # published first while reading the fence
                version = await a.shared.replicas.wait_changed(version)
        status, body = await http_request("127.0.0.1", a.ports.admin, "/status")
        entries = {r["id"]: r for r in json.loads(body)["replicas"]}
        assert entries["cloud-k"]["ready"] is True and entries["cloud-a"]["ready"] is True
        process.send_signal(signal.SIGKILL)
        await process.wait()
        with trio.fail_after(2 * 2 + 3):  # lease_ttl 2 s, then etcd expires it
            await wait_replicas(a, {"cloud-a"})
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
