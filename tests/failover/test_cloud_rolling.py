"""A rolling restart of the cloud replicas under steady load, behind a real HAProxy: zero failures.

Real processes: two `connector cloud` replicas, the demo backend, HAProxy from `connector.haproxy`
(health-checking each replica's /readyz) and, for each replica, a standalone node holding its
master tunnel. Each replica has its own registry and its own node here, so the test holds whether
or not the replicas share state and whether or not a node dials every replica (issue 10's other
parts): what is tested is the drain (`connector.cloud.drain`) and the load balancer working
together. Keep-alive clients send requests back to back through the front door while each replica
in turn gets SIGTERM, exits, is started again and takes traffic again. Every request must succeed,
the clients on a draining replica must have been told `Connection: close`, and each replica must
exit 0 long before its drain deadline.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import trio

from connector import haproxy
from connector.admin import http_request
from connector.cli import init_certs
from connector.cloud.auth import hash_token, new_token
from connector.demo import DemoSpec, cloud_toml, free_port
from tests.support.httpclient import HttpClient

pytestmark = pytest.mark.slow

REPLICAS = ("cloud-1", "cloud-2")
CLIENTS = 6
RECYCLE_AFTER = 40  # requests per connection, as a connection pool recycles: new ones reach new replicas
REQUEST_TIMEOUT = 10.0  # a request held while a node redials still answers well within this
NOTICE_SECONDS = 1.0  # HAProxy marks a draining replica down within 2 * 200 ms
DRAIN_SECONDS = 10.0
EXIT_WITHIN = NOTICE_SECONDS + 5.0  # requests are short: the drain ends long before DRAIN_SECONDS
STEADY_REQUESTS = 200  # served between two steps, so each step happens under load
URL = "http://erp.virtual:8000/sap/opu/odata/rolling"
TEST_TIMEOUT = 150.0


@attrs.define
class SteadyLoad:
    """`CLIENTS` keep-alive clients sending requests back to back; a `Connection: close` answer
    makes the client open a new connection (through HAProxy, to a replica still in rotation), and
    so does every `RECYCLE_AFTER`-th request (or a restarted replica would never see a client)."""

    port: int
    token: str
    ok: int = 0
    closes: int = 0
    failures: list[str] = attrs.Factory(list)
    stopping: bool = False
    _progress: trio.Event = attrs.Factory(trio.Event)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(CLIENTS):
                nursery.start_soon(self._client)

    async def _client(self) -> None:
        client: HttpClient | None = None
        used = 0
        while not self.stopping:
            try:
                if client is not None and used >= RECYCLE_AFTER:
                    await client.aclose()
                    client = None
                if client is None:
                    client, used = await HttpClient.connect(self.port), 0
                used += 1
                with trio.fail_after(REQUEST_TIMEOUT):
                    response = await client.request("GET", URL, [("Proxy-Authorization", f"Bearer {self.token}")])
            except Exception as exc:  # every way a request can fail counts, and is named
                self.failures.append(f"{type(exc).__name__}: {exc}")
                client = None
                continue
            if response.status != 200:
                self.failures.append(f"{response.status} {response.body[:200]!r}")
            else:
                self.ok += 1
                self._progress.set()
                self._progress = trio.Event()
            if response.headers.get("connection") == "close":
                self.closes += 1
                await client.aclose()
                client = None
        if client is not None:
            await client.aclose()

    async def wait_ok(self, count: int) -> None:
        target = self.ok + count
        while self.ok < target:
            await self._progress.wait()


class Replicas:
    """The processes of the test; `path` is its working directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.processes: dict[str, trio.Process] = {}
        self.argv: dict[str, list[str]] = {}
        self.ports = {f"{r}_{s}": free_port() for r in REPLICAS
                      for s in ("tunnel", "admin", "http_proxy", "socks5", "destinations")}
        self.ports.update({name: free_port() for name in ("backend_http", "backend_tcp", "front_http",
                                                          "front_socks5", "front_destinations")})
        self.token = new_token()

    async def start(self, name: str, argv: list[str] | None = None) -> None:
        self.argv[name] = argv or self.argv[name]
        log = open(self.path / f"{name}.log", "ab")  # noqa: SIM115, ASYNC230 - owned by the child
        self.processes[name] = await trio.lowlevel.open_process(
            self.argv[name], stdout=log, stderr=subprocess.STDOUT, cwd=self.path)
        log.close()

    def write_configs(self) -> None:
        certs = init_certs(self.path / "certs", "demo", ["solo"], ["127.0.0.1", "localhost"])
        spec = DemoSpec(hold_seconds=REQUEST_TIMEOUT / 2)
        for replica in REPLICAS:
            (self.path / "state" / replica).mkdir(parents=True, exist_ok=True)
            tables = (f'\n[replica]\nid = "{replica}"\n\n[drain]\nnotice_seconds = {NOTICE_SECONDS}\n'
                      f"drain_seconds = {DRAIN_SECONDS}\n")
            p = self.ports
            (self.path / f"{replica}.toml").write_text(cloud_toml(
                certs, hash_token(self.token), spec, [], tunnel=p[f"{replica}_tunnel"], http=p[f"{replica}_http_proxy"],
                socks5=p[f"{replica}_socks5"], admin=p[f"{replica}_admin"], destinations=p[f"{replica}_destinations"],
                state=f"state/{replica}", replica=tables))
            # a standalone node per replica (one certificate): each replica has its own master
            (self.path / f"node-{replica}.toml").write_text(f"""
[node]
id = "solo"
subaccount = "demo"
audit_log = "node-{replica}-audit.jsonl"

[tunnel]
url = "wss://127.0.0.1:{p[f'{replica}_tunnel']}/tunnel"
ca = "{certs['cloud_ca']}"
cert = "{certs['node_solo_cert']}"
key = "{certs['node_solo_key']}"
ping_interval = 0.5
ping_timeout = 2.0

[admin]
listen = "127.0.0.1:0"

[[mappings]]
virtual_host = "erp.virtual"
virtual_port = 8000
internal_host = "127.0.0.1"
internal_port = {p['backend_http']}
protocol = "HTTP"
resources = [{{ path = "/sap/opu/odata", prefix = true }}]
""")

    def haproxy_argv(self) -> list[str]:
        p = self.ports
        binary = haproxy.find_haproxy()
        config = haproxy.write_config(
            self.path / "haproxy.cfg", haproxy.Front("127.0.0.1", p["front_http"], p["front_socks5"],
                                                     p["front_destinations"]),
            [haproxy.Backend(r, "127.0.0.1", p[f"{r}_http_proxy"], p[f"{r}_socks5"], p[f"{r}_destinations"],
                             p[f"{r}_admin"]) for r in REPLICAS])
        haproxy.check_config(binary, config)
        return haproxy.haproxy_command(binary, config)

    async def admin_json(self, replica: str, path: str) -> tuple[int, bytes]:
        return await http_request("127.0.0.1", self.ports[f"{replica}_admin"], path, timeout=1.0)

    async def wait_serving(self, replica: str) -> None:
        """Until `replica` is ready and holds a master tunnel."""
        while True:
            try:
                status, _ = await self.admin_json(replica, "/readyz")
                if status == 200:
                    _, body = await self.admin_json(replica, "/status")
                    if any(loc["master"] == "solo" for loc in json.loads(body)["locations"]):
                        return
            except (OSError, trio.TooSlowError):
                pass
            await trio.sleep(0.05)  # other processes: their admin API is all there is to poll

    async def wait_front(self) -> None:
        """Until HAProxy accepts on the front door's HTTP port."""
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", self.ports["front_http"])
            except OSError:
                await trio.sleep(0.05)  # another process: its port is all there is to poll
                continue
            await stream.aclose()
            return

    async def served(self, replica: str) -> float:
        """Requests `replica` answered 200 since it started (its own counter)."""
        _, body = await self.admin_json(replica, "/metrics")
        match = re.search(rb'connector_proxy_requests_total\{proxy="http",status="200"\} (\S+)', body)
        return float(match.group(1)) if match else 0.0

    async def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            await process.wait()


async def test_rolling_restart_of_every_replica_under_load_fails_no_request(tmp_path: Path) -> None:
    replicas = Replicas(tmp_path)
    replicas.write_configs()
    python = sys.executable
    try:
        with trio.fail_after(TEST_TIMEOUT):
            await replicas.start("backend", [python, "-m", "connector.demo_backend", "--http-port",
                                             str(replicas.ports["backend_http"]), "--tcp-port",
                                             str(replicas.ports["backend_tcp"])])
            for replica in REPLICAS:
                await replicas.start(replica, [python, "-m", "connector", "cloud", "--config",
                                               str(tmp_path / f"{replica}.toml")])
                await replicas.start(f"node-{replica}", [python, "-m", "connector", "node", "--config",
                                                         str(tmp_path / f"node-{replica}.toml")])
            for replica in REPLICAS:
                await replicas.wait_serving(replica)
            await replicas.start("haproxy", replicas.haproxy_argv())
            await replicas.wait_front()
            load = SteadyLoad(replicas.ports["front_http"], replicas.token)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load.run)
                await load.wait_ok(STEADY_REQUESTS)
                for replica in REPLICAS:
                    assert await replicas.served(replica) > 0, f"{replica} took no traffic before the restart"
                for replica in REPLICAS:
                    closes_before = load.closes
                    process = replicas.processes[replica]
                    process.send_signal(signal.SIGTERM)
                    with trio.fail_after(EXIT_WITHIN):
                        await process.wait()
                    assert process.returncode == 0, f"{replica} exited with {process.returncode}"
                    assert load.closes > closes_before, "no client was told Connection: close"
                    await load.wait_ok(STEADY_REQUESTS)  # the other replica serves alone meanwhile
                    await replicas.start(replica)
                    await replicas.wait_serving(replica)
                    await load.wait_ok(STEADY_REQUESTS)
                    while await replicas.served(replica) == 0:  # back in HAProxy's rotation
                        await load.wait_ok(10)
                load.stopping = True
            assert load.failures == [], f"{len(load.failures)} of {load.ok + len(load.failures)} failed: " \
                                        f"{load.failures[:5]}"
            assert load.ok >= 5 * STEADY_REQUESTS
    finally:
        with trio.CancelScope(shield=True):
            await replicas.stop_all()
