"""A node and several cloud replicas on loopback: one tunnel per replica, found without config edits.

Each replica is a real in-process `CloudServer` (its own registry, tunnel endpoint and proxies) and
the node a real `Node`; TLS, sockets and the TOML loaders are the real ones (`tests/support/stack`).
The replicas are told apart by the id their HELLO names (`cloud-a`, `cloud-b`).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from connector.admin import http_request
from connector.agent.node import MAX_REPLICAS, Node
from connector.cli import init_certs
from connector.cloud.coverage import masters_here
from connector.cloud.replicas import Replica, to_body
from connector.cloud.server import CloudPorts, CloudServer
from connector.config import load_cloud_config, load_node_config
from connector.demo_backend import run_backend
from connector.tunnel.dial import DialTarget, resolve_addresses
from tests.failover.faultproxy import FaultProxy
from tests.support.httpclient import HttpClient
from tests.support.stack import SUBACCOUNT, TOKEN, cloud_toml, node_toml

ERP = "http://erp.virtual:8000/sap/opu/odata/x"
AUTH = ("Proxy-Authorization", f"Bearer {TOKEN}")
WITHIN = 15  # seconds: a redial backs off to at most 5 s; registration is one round trip


@attrs.define
class Cloud:
    name: str
    server: CloudServer
    ports: CloudPorts
    scope: trio.CancelScope

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.ports.tunnel}/tunnel"

    def has_master(self) -> bool:
        return self.server.registry.master_of(SUBACCOUNT, "") is not None


@attrs.define
class Site:
    workdir: Path
    certs: dict[str, Path]
    backend_http: int
    backend_tcp: int


@pytest.fixture
async def site(nursery: trio.Nursery, tmp_path: Path) -> Site:
    certs = init_certs(tmp_path / "certs", SUBACCOUNT, ["node-a"], ["127.0.0.1", "localhost", "cloud.test"])
    backend_http, backend_tcp = await nursery.start(run_backend, "127.0.0.1", 0, 0)
    return Site(tmp_path, certs, backend_http, backend_tcp)


async def start_replica(nursery: trio.Nursery, site: Site, name: str, *, port: int = 0,
                        host: str = "127.0.0.1") -> Cloud:
    workdir = site.workdir / name
    workdir.mkdir(exist_ok=True)
    path = cloud_toml(workdir, site.certs, tunnel_port=port)
    path.write_text(path.read_text().replace(f'listen = "127.0.0.1:{port}"', f'listen = "{host}:{port}"', 1))
    server = CloudServer(load_cloud_config(path))
    scope = trio.CancelScope()

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await server.run(task_status=task_status)

    ports = await nursery.start(run)
    server.replicas.me = attrs.evolve(server.replicas.me, id=name)
    return Cloud(name, server, ports, scope)


async def start_node(nursery: trio.Nursery, site: Site, urls: list[str], **node_kwargs: Any) -> Node:
    path = node_toml(site.workdir, site.certs, 0, site.backend_http, site.backend_tcp)
    path.write_text(path.read_text().replace('url = "wss://127.0.0.1:0/tunnel"', f"url = {json.dumps(urls)}"))
    node = Node(load_node_config(path), **node_kwargs)
    await nursery.start(node.run)
    return node


async def get_through(cloud: Cloud | int) -> int:
    """One request through a replica's HTTP proxy (a `Cloud`, or its port); its status."""
    client = await HttpClient.connect(cloud if isinstance(cloud, int) else cloud.ports.http_proxy)
    try:
        with trio.fail_after(5):
            return (await client.request("GET", ERP, [AUTH])).status
    finally:
        await client.aclose()


async def readyz(cloud: Cloud) -> tuple[int, str]:
    status, body = await http_request("127.0.0.1", cloud.ports.admin, "/readyz")
    return status, json.loads(body)["reason"]


async def test_the_master_registers_on_every_replica_and_is_redialled_after_a_crash(nursery, site):
    a = await start_replica(nursery, site, "cloud-a")
    b = await start_replica(nursery, site, "cloud-b")
    node = await start_node(nursery, site, [a.url, b.url])
    with trio.fail_after(WITHIN):
        await node.wait_tunnels(2, registered=True)
    assert a.has_master() and b.has_master()
    assert [(t["replica"], t["state"]) for t in node.status()["tunnels"]] == [
        ("cloud-a", "registered"), ("cloud-b", "registered")]
    assert node.status()["ready"]
    assert await get_through(a) == 200 and await get_through(b) == 200

    a.scope.cancel()  # replica a is gone (its listener and every tunnel with it)
    with trio.fail_after(WITHIN):
        await node.wait_tunnels(1)
    assert await get_through(b) == 200  # the other replica keeps serving
    assert node.status()["tunnel_failures"] == {} or a.url in node.status()["tunnel_failures"]

    again = await start_replica(nursery, site, "cloud-a", port=a.ports.tunnel)  # back at its address
    with trio.fail_after(WITHIN):
        await node.wait_tunnels(2, registered=True)
    assert again.has_master()
    assert await get_through(again) == 200


async def test_a_replica_the_cloud_announces_is_dialled_and_dropped_when_no_longer_announced(nursery, site):
    a = await start_replica(nursery, site, "cloud-a")
    b = await start_replica(nursery, site, "cloud-b")  # announces itself only: not counted
    node = await start_node(nursery, site, [a.url])  # configured with replica a only
    with trio.fail_after(WITHIN):
        await node.wait_tunnels(1, registered=True)
    assert not b.has_master()

    a.server.replicas.update([Replica("cloud-b", b.url)])
    with trio.fail_after(5):
        await node.wait_tunnels(2, registered=True)
    assert b.has_master() and await get_through(b) == 200
    assert node.targets() == {DialTarget(a.url), DialTarget(b.url)}
    assert [t["replica"] for t in node.status()["tunnels"]] == ["cloud-a", "cloud-b"]

    a.server.replicas.update([])  # removed from the shared state while still running
    with trio.fail_after(5):
        await node.wait_tunnels(1)
        await b.server.endpoint.wait_connections(0)  # closed by the node, not left to time out
    assert node.targets() == {DialTarget(a.url)}
    assert not b.has_master() and a.has_master()


async def test_a_malformed_or_oversized_replica_set_is_ignored(nursery, site):
    a = await start_replica(nursery, site, "cloud-a")
    node = await start_node(nursery, site, [a.url])
    with trio.fail_after(WITHIN):
        await node.wait_tunnels(1, registered=True)
    cloud_side = a.server.registry.master_of(SUBACCOUNT, "").session
    too_many = [Replica(f"r{i}", f"wss://10.9.0.{i}:8443/tunnel") for i in range(MAX_REPLICAS + 1)]
    closed = Replica("cloud-z", "wss://127.0.0.1:1/tunnel")  # nothing listens: fails at once
    failed = node.wait_tunnel_failure
    async with trio.open_nursery() as watch:
        watch.start_soon(failed)
        await trio.testing.wait_all_tasks_blocked()
        await cloud_side.send_control("replicas", {"replicas": [{"id": "x", "tunnel_url": "http://nope"}]})
        await cloud_side.send_control("replicas", to_body(too_many))  # a bound on what a node dials
        await cloud_side.send_control("replicas", to_body([a.server.replicas.me, closed]))  # in order: last
    assert node.targets() == {DialTarget(a.url), DialTarget(closed.tunnel_url)}  # only the good one counted
    assert a.has_master() and node.status()["ready"]
    tunnel = node.tunnels["cloud-a"]  # and each bad one on its own leaves the last good set standing
    for body in ({"replicas": [{"id": "x", "tunnel_url": "http://nope"}]}, to_body(too_many), {"replicas": 3}):
        await node._on_control(tunnel, "replicas", body)
        assert tunnel.announced == (a.server.replicas.me, closed)
    assert node.targets() == {DialTarget(a.url), DialTarget(closed.tunnel_url)}


async def test_a_name_is_dialled_at_each_address_it_resolves_to(nursery, site):
    a = await start_replica(nursery, site, "cloud-a")
    b = await start_replica(nursery, site, "cloud-b", port=a.ports.tunnel, host="127.0.0.2")
    url = f"wss://cloud.test:{a.ports.tunnel}/tunnel"  # as a headless service names every replica
    for cloud in (a, b):  # each announces the name: the server certificate is for it
        cloud.server.replicas.me = attrs.evolve(cloud.server.replicas.me, tunnel_url=url)
    asked: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.1", "127.0.0.2"]

    node = await start_node(nursery, site, [url], resolver=resolver)
    with trio.fail_after(WITHIN):
        await node.wait_tunnels(2, registered=True)
    assert asked[0] == ("cloud.test", a.ports.tunnel)
    assert {t.target for t in node.tunnels.values()} == {DialTarget(url, "127.0.0.1"), DialTarget(url, "127.0.0.2")}
    assert a.has_master() and b.has_master()

    failed = node.wait_tunnel_failure
    async with trio.open_nursery() as watch:
        watch.start_soon(failed)
        await trio.testing.wait_all_tasks_blocked()
        a.server.replicas.update([b.server.replicas.me])  # b announced by the name: dialled by name too
    assert DialTarget(url) in node.targets()  # (only the injected resolver knows cloud.test: it fails)
    assert len(node.tunnels) == 2 and a.has_master() and b.has_master()


async def test_localhost_is_resolved_and_dialled_at_its_address(nursery, site):
    a = await start_replica(nursery, site, "cloud-a")
    assert "127.0.0.1" in await resolve_addresses("localhost", a.ports.tunnel)
    url = f"wss://localhost:{a.ports.tunnel}/tunnel"
    node = await start_node(nursery, site, [url])
    with trio.fail_after(WITHIN):
        await node.wait_tunnels(1, registered=True)
    assert node.tunnels["cloud-a"].target in {DialTarget(url, "127.0.0.1"), DialTarget(a.url)}
    assert DialTarget(url, "127.0.0.1") in node.targets()


class RegistryPeers:
    """The other replicas' tunnels read from their registries (what the shared state publishes)."""

    def __init__(self, *others: Cloud) -> None:
        self.others = others

    def masters_by_replica(self) -> dict[str, frozenset[str]]:
        return {c.name: masters_here(c.server.registry.snapshot()) for c in self.others}


async def test_a_replica_cut_off_from_the_master_leaves_the_rotation_and_the_others_serve(nursery, site):
    a = await start_replica(nursery, site, "cloud-a")
    b = await start_replica(nursery, site, "cloud-b")
    a.server.peer_masters, b.server.peer_masters = RegistryPeers(b), RegistryPeers(a)
    cut = FaultProxy("127.0.0.1", a.ports.tunnel)  # the only path from the node to replica a
    proxy_port = await nursery.start(cut.run)
    proxied = f"wss://127.0.0.1:{proxy_port}/tunnel"
    a.server.replicas.me = attrs.evolve(a.server.replicas.me, tunnel_url=proxied)  # how nodes reach a
    node = await start_node(nursery, site, [proxied, b.url])
    with trio.fail_after(WITHIN):
        await node.wait_tunnels(2, registered=True)
    assert await readyz(a) == (200, "serving") and await readyz(b) == (200, "serving")

    cut.set_mode("blackhole")  # a partition: packets vanish, nothing is closed
    with trio.fail_after(WITHIN):
        await a.server.endpoint.wait_connections(0)  # a dropped the dead tunnel (ping timeout)
    assert await readyz(a) == (503, "no tunnel from the master of acme/, which replica cloud-b holds: out of "
                               "rotation until the node dials this replica")
    assert await readyz(b) == (200, "serving")
    assert await get_through(b) == 200  # the load balancer now sends everything to b, which serves

    cut.set_mode("pass")
    with trio.fail_after(WITHIN):
        await node.wait_tunnels(2, registered=True)
    assert await readyz(a) == (200, "serving")
    assert await get_through(a) == 200


CLUSTER = """
[cluster]
name = "it"
etcd = ["{etcd}"]
ttl = 2
loop_wait = 0.2
retry_timeout = 0.5
"""


async def start_cluster_node(nursery: trio.Nursery, site: Site, name: str, urls: list[str], etcd: str) -> Node:
    from connector.agent.runtime import build_node

    path = node_toml(site.workdir, site.certs, 0, site.backend_http, site.backend_tcp, node=name,
                     cluster=CLUSTER.format(etcd=etcd))
    path.write_text(path.read_text().replace('url = "wss://127.0.0.1:0/tunnel"', f"url = {json.dumps(urls)}"))
    node = build_node(load_node_config(path))
    scope = trio.CancelScope()

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await node.run(task_status=task_status)

    await nursery.start(run)
    node.test_scope = scope  # type: ignore[attr-defined]
    return node


async def test_one_cut_path_deposes_no_master_and_a_crash_fails_over_on_every_replica(nursery, site, etcd):
    site.certs = init_certs(site.workdir / "certs", SUBACCOUNT, ["node-a", "node-b"], ["127.0.0.1"], force=True)
    a = await start_replica(nursery, site, "cloud-a")
    b = await start_replica(nursery, site, "cloud-b")
    a.server.endpoint.replicas = None  # names and announces nothing: each node keys it by the URL it dials
    cut = FaultProxy("127.0.0.1", a.ports.tunnel)
    proxied = f"wss://127.0.0.1:{await nursery.start(cut.run)}/tunnel"
    master = await start_cluster_node(nursery, site, "node-a", [proxied, b.url], etcd.url)  # reaches a via cut
    with trio.fail_after(WITHIN):
        await master.wait_tunnels(2, registered=True)
    shadow = await start_cluster_node(nursery, site, "node-b", [a.url, b.url], etcd.url)
    with trio.fail_after(WITHIN):
        await shadow.wait_tunnels(2)
    epoch = master.registered_epoch
    assert master.role == "master" and shadow.role == "shadow" and epoch is not None
    status = await trio.to_thread.run_sync(functools.partial(
        subprocess.run, [sys.executable, "-m", "connector", "status", "--config", str(master.config.file)],
        capture_output=True, timeout=60))
    lines = status.stdout.decode().splitlines()
    assert status.returncode == 0, status.stderr
    assert f"node-a tunnels: cloud-b registered, {proxied} registered" in lines  # one per replica
    assert f"node-b tunnels: cloud-b standby, {a.url} standby" in lines

    cut.set_mode("blackhole")  # only the path master -> a breaks
    with trio.fail_after(WITHIN):
        # until a lost the master and told the shadow (had the shadow taken it as a hint and
        # taken over, the bug this catches, the checks below fail)
        await a.server.registry.wait_no_master(SUBACCOUNT, "")
        await shadow.wait_master_lost_reports(1)
    assert shadow.role == "shadow" and master.role == "master"
    assert set(shadow._lost_reports.reports[epoch]) == {a.url}  # a said so, b did not: no hint, no failover
    assert shadow.elector._hint is None
    assert b.server.registry.master_of(SUBACCOUNT, "").node == "node-a"
    assert await get_through(b) == 200

    master.test_scope.cancel()  # the master crashes: every replica it still reached loses it
    with trio.fail_after(WITHIN):
        await shadow.wait_tunnels(2, registered=True)
    assert shadow.role == "master" and shadow.registered_epoch > epoch
    assert {a.server.registry.master_of(SUBACCOUNT, "").node, b.server.registry.master_of(SUBACCOUNT, "").node} == {
        "node-b"}
    assert await get_through(a) == 200 and await get_through(b) == 200


@attrs.define
class Load:
    """Requests one after another through each replica's proxy, counting the answers."""

    statuses: dict[str, list[int]] = attrs.field(factory=dict)
    _answered: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)

    async def run(self, cloud: Cloud) -> None:
        answers = self.statuses.setdefault(cloud.name, [])
        while True:
            try:
                answers.append(await get_through(cloud))
            except (OSError, trio.TooSlowError, trio.BrokenResourceError):
                answers.append(0)
            self._answered.unpark_all()

    def failed(self) -> dict[str, int]:
        return {name: sum(s != 200 for s in statuses) for name, statuses in self.statuses.items()}

    async def wait_served(self, name: str, count: int) -> None:
        while sum(s == 200 for s in self.statuses.get(name, [])) < count:
            await self._answered.park()


async def test_a_replica_added_under_load_serves_within_seconds(nursery, site):
    a = await start_replica(nursery, site, "cloud-a")
    node = await start_node(nursery, site, [a.url])
    with trio.fail_after(WITHIN):
        await node.wait_tunnels(1, registered=True)
    b = await start_replica(nursery, site, "cloud-b")
    load = Load()
    async with trio.open_nursery() as traffic:
        traffic.start_soon(load.run, a)
        with trio.fail_after(5):
            await load.wait_served("cloud-a", 20)
        a.server.replicas.update([b.server.replicas.me])  # the shared state learns of replica b
        with trio.fail_after(5):
            await node.wait_tunnels(2, registered=True)
        traffic.start_soon(load.run, b)
        with trio.fail_after(5):
            await load.wait_served("cloud-b", 20)
            await load.wait_served("cloud-a", len(load.statuses["cloud-a"]) + 20)
        traffic.cancel_scope.cancel()
    assert load.failed() == {"cloud-a": 0, "cloud-b": 0}


async def test_a_handover_drains_on_every_replica_without_a_failed_request(nursery, site, etcd):
    site.certs = init_certs(site.workdir / "certs", SUBACCOUNT, ["node-a", "node-b"], ["127.0.0.1"], force=True)
    a = await start_replica(nursery, site, "cloud-a")
    b = await start_replica(nursery, site, "cloud-b")
    master = await start_cluster_node(nursery, site, "node-a", [a.url, b.url], etcd.url)
    with trio.fail_after(WITHIN):
        await master.wait_tunnels(2, registered=True)
    shadow = await start_cluster_node(nursery, site, "node-b", [a.url, b.url], etcd.url)
    with trio.fail_after(WITHIN):
        await shadow.wait_tunnels(2)
    load = Load()
    async with trio.open_nursery() as traffic:
        traffic.start_soon(load.run, a)
        traffic.start_soon(load.run, b)
        with trio.fail_after(5):
            await load.wait_served("cloud-a", 10)
            await load.wait_served("cloud-b", 10)
        with trio.fail_after(WITHIN):
            await master.handover()  # `connector switch`: drain at a and b, resign
            await shadow.wait_tunnels(2, registered=True)
        with trio.fail_after(5):
            await load.wait_served("cloud-a", len(load.statuses["cloud-a"]) + 10)
            await load.wait_served("cloud-b", len(load.statuses["cloud-b"]) + 10)
        traffic.cancel_scope.cancel()
    assert load.failed() == {"cloud-a": 0, "cloud-b": 0}
    for cloud in (a, b):
        assert cloud.server.registry.master_of(SUBACCOUNT, "").node == "node-b"


async def start_cloud_process(site: Site, name: str, ports: dict[str, int]) -> trio.Process:
    """`connector cloud` as its own process (its replica id is the host name), on fixed ports."""
    workdir = site.workdir / name
    workdir.mkdir(exist_ok=True)
    path = cloud_toml(workdir, site.certs, tunnel_port=ports["tunnel"])
    text = path.read_text()
    for key in ("http_listen", "socks5_listen"):
        text = text.replace(f'{key} = "127.0.0.1:0"', f'{key} = "127.0.0.1:{ports[key]}"')
    path.write_text(text.replace('[admin]\nlisten = "127.0.0.1:0"', f'[admin]\nlisten = "127.0.0.1:{ports["admin"]}"'))
    process = await trio.lowlevel.open_process([sys.executable, "-m", "connector", "cloud", "--config", str(path)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with trio.fail_after(WITHIN):
        while True:
            try:
                if (await http_request("127.0.0.1", ports["admin"], "/readyz"))[0] in (200, 503):
                    return process
            except OSError:
                await trio.sleep(0.05)  # the process is starting: nothing to wait on but its port


async def test_a_replica_killed_with_sigkill_is_redialled_when_it_returns(nursery, site):
    from connector.demo import free_port

    ports = {"tunnel": free_port(), "http_listen": free_port(), "socks5_listen": free_port(), "admin": free_port()}
    process = await start_cloud_process(site, "cloud-p", ports)
    try:
        b = await start_replica(nursery, site, "cloud-b")
        node = await start_node(nursery, site, [f"wss://127.0.0.1:{ports['tunnel']}/tunnel", b.url])
        with trio.fail_after(WITHIN):
            await node.wait_tunnels(2, registered=True)
        assert await get_through(ports["http_listen"]) == 200 and await get_through(b) == 200

        process.kill()  # kill -9
        await process.wait()
        with trio.fail_after(WITHIN):
            await node.wait_tunnels(1)
        assert await get_through(b) == 200  # the others serve new requests

        process = await start_cloud_process(site, "cloud-p", ports)
        with trio.fail_after(WITHIN):
            await node.wait_tunnels(2, registered=True)  # the node redials it
        assert await get_through(ports["http_listen"]) == 200
    finally:
        process.kill()
        await process.wait()
