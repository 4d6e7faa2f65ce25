"""`connector demo`: a whole local cluster on 127.0.0.1, for trying the connector and for tests.

It starts, as child processes, a single-member etcd, the cloud side, two connector nodes (master
and shadow) and a small internal host (`connector.demo_backend`). With ``--cloud-replicas N``
(N >= 2) the cloud side is N replicas (`cloud-1` ...) sharing a cloud etcd of their own (never the
nodes' etcd), behind HAProxy (`connector.haproxy`), whose ports are the HTTP proxy, SOCKS5 and
destination ports the demo prints: the front door. It waits until a master is
registered, prints every endpoint and a ready-to-paste curl, and writes a state file (ports,
pids, URLs; keys ending in ``metrics_url`` for Prometheus). Ctrl-C or SIGTERM stops everything it
started; connector children also stop by themselves if the demo dies (they watch their parent
pid, see `connector.cli`), so nothing strays.

Ports are picked free, released, and bound by the children a moment later; another process may
take one in between. A child that then fails with "address already in use" on a port the demo
picked makes the demo start again on new ports (at most `START_ATTEMPTS` times); a port the user
chose (`--http-port`, `--socks5-port`) is reported instead, naming the option. A demo that failed
to start keeps its working directory, so the log it points to is there to read.

The pointer file (`pointer_file()`) names the state of the running demo, for `connector status`
and `connector switch` with no `--config`. The first demo to run owns it: a second demo started
meanwhile leaves it alone (and says so), so a pointer never silently moves to another cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from connector import haproxy
from connector.admin import http_request

log = logging.getLogger(__name__)

SUBACCOUNT = "demo"
LOCATION = ""
NODES = ("node-a", "node-b")
CLUSTER = "demo"
# `connector demo`'s SAP surfaces (DemoSpec.sap_examples): a second location served by a node of a
# cluster of its own, a user of the token service, and one destination per kind an application uses
LOCATION_2 = "plant-2"
NODE_2 = "node-plant-2"
CLUSTER_2 = "demo-plant-2"
USER = "alice"
DESTINATIONS = {  # kind -> Name; the properties are `demo_destinations`'
    "BasicAuthentication": "erp-basic",
    "OAuth2ClientCredentials": "erp-oauth",
    "PrincipalPropagation": "erp-principal",
    "CloudConnectorLocationId": "mes-plant-2",
}
PRINCIPAL_HOST = "erp.virtual:8443"  # the virtual host:port of the principal-propagation mapping
STARTUP_TIMEOUT = 30.0
START_ATTEMPTS = 3  # starts on new ports after a picked port was taken by another process
ETCD_ENV = "ETCD_BINARY"
# docs/operations.md: "avoid 3.5.0 to 3.5.2" (etcd's own advice: data inconsistency after a crash)
ETCD_AVOID = {(3, 5, 0), (3, 5, 1), (3, 5, 2)}
ETCD_INSTALL_HINT = "sudo apt-get install etcd-server (or run scripts/dev demo, which installs it)"


class DemoError(Exception):
    """The demo cannot start; the message is one line that says what to do."""


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


def find_etcd(explicit: str | None = None) -> str:
    """The etcd binary to run: `--etcd PATH`, else $ETCD_BINARY, else `etcd` on PATH.

    Checked by running `etcd --version`: a path that is not an etcd fails here, in one line,
    not as a child that dies later."""
    source = "--etcd" if explicit else ETCD_ENV if os.environ.get(ETCD_ENV) else None
    candidate = explicit or os.environ.get(ETCD_ENV) or shutil.which("etcd")
    if not candidate:
        raise DemoError(f"no etcd on PATH: {ETCD_INSTALL_HINT}; or point to a binary with --etcd PATH "
                        f"or {ETCD_ENV}=PATH")
    where = f"{source} {candidate}" if source else candidate
    found = shutil.which(candidate) if os.sep not in candidate else candidate
    if found is None or not os.path.isfile(found):
        raise DemoError(f"{where}: no such file")
    if not os.access(found, os.X_OK):
        raise DemoError(f"{where}: not executable (chmod +x it)")
    try:
        output = subprocess.run([found, "--version"], capture_output=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise DemoError(f"{where}: `{found} --version` failed ({exc}); is it etcd?") from None
    match = re.search(rb"etcd Version: (\d+)\.(\d+)\.(\d+)", output)
    if match is None:
        raise DemoError(f"{where}: `{found} --version` does not name an etcd version; is it etcd?")
    version = tuple(int(part) for part in match.groups())
    if version < (3, 4, 0) or version in ETCD_AVOID:
        raise DemoError(f"{where} is etcd {'.'.join(map(str, version))}, which the connector does not "
                        f"support (see docs/operations.md): {ETCD_INSTALL_HINT}")
    return os.path.abspath(found)


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
    etcd: str | None = None  # the etcd binary (`--etcd`); None: see find_etcd
    cloud_replicas: int = 1  # N >= 2: N replicas and a cloud etcd behind HAProxy (the front door)
    drain: str = "notice_seconds = 1.0\ndrain_seconds = 10.0"  # each replica's [drain] table (N >= 2)
    proxy_extra: str = ""  # extra TOML lines for the cloud's [proxy] table (the benchmark's stream limits)
    # `connector demo`'s: the token service ([oauth]) with a user, a second location (LOCATION_2,
    # one node) and the destinations of DESTINATIONS; one cloud process only (no shared key ring yet)
    sap_examples: bool = False


def demo_destinations(token_url: str, client_id: str, client_secret: str, password: str) -> list[dict[str, str]]:
    """One destination of each kind in DESTINATIONS, as `connector demo` creates them: what an
    application written for SAP BTP finds by name (`executeHttpRequest({destinationName})`)."""
    erp = {"Type": "HTTP", "URL": "http://erp.virtual:8000", "ProxyType": "OnPremise"}
    names = DESTINATIONS
    return [
        {**erp, "Name": names["BasicAuthentication"], "Authentication": "BasicAuthentication",
         "User": "erp-user", "Password": password},
        {**erp, "Name": names["OAuth2ClientCredentials"], "Authentication": "OAuth2ClientCredentials",
         "tokenServiceURL": token_url, "clientId": client_id, "clientSecret": client_secret},
        # the ERP's HTTPS port, where the node logs the user on with a short-lived certificate
        {**erp, "URL": f"http://{PRINCIPAL_HOST}", "Name": names["PrincipalPropagation"],
         "Authentication": "PrincipalPropagation"},
        {"Type": "HTTP", "URL": "http://mes.virtual:8000", "ProxyType": "OnPremise",
         "Name": names["CloudConnectorLocationId"], "Authentication": "NoAuthentication",
         "CloudConnectorLocationId": LOCATION_2},
    ]


def principal_certs(directory: Path) -> dict[str, Path]:
    """The HTTPS internal host's CA and server certificate, and the principal-propagation CA whose
    short-lived user certificates that host requires (the erp-principal destination's mapping)."""
    from connector import pki

    backend_ca = pki.create_ca(directory, "backend-ca", "demo internal host CA", force=True)
    server = pki.issue(backend_ca, directory, "backend", common_name="127.0.0.1", server_names=["127.0.0.1"],
                       force=True)
    pp_ca = pki.create_ca(directory, "principal-ca", "demo principal propagation CA", force=True)
    return {"backend_ca": backend_ca.cert_path, "backend_cert": server.cert_path, "backend_key": server.key_path,
            "principal_ca": pp_ca.cert_path, "principal_ca_key": pp_ca.key_path}


def cloud_toml(certs: dict[str, Path], token_sha256: str, spec: DemoSpec, admin_digests: list[str], *,
               tunnel: int, http: int, socks5: int, admin: int, destinations: int, state: str = "state",
               replica: str = "", oauth: int | None = None, user_hash: str = "") -> str:
    """One cloud configuration; `replica` holds the [replica], [shared] and [drain] tables of a
    replica of a cluster (empty: the single cloud process of today). `oauth`, a port, adds the
    token service (its certificate is the tunnel's) and `user_hash` its user USER."""
    # with [shared] the fence lives in the cloud's etcd: no state_file
    state_file = "" if "[shared]" in replica else f'state_file = "{state}/cloud-epochs.json"\n'
    locations = [LOCATION, LOCATION_2] if spec.sap_examples else [LOCATION]
    token_service = users = token_ca = ""
    if oauth is not None:
        token_ca = f'token_service_ca = "{certs["cloud_ca"]}"\n'  # the OAuth2 destination's token service: ours
        token_service = f"""
[oauth]
listen = "127.0.0.1:{oauth}"
bindings = "{state}/bindings.json"
signing_keys = "{state}/signing-keys.json"
"""
    if user_hash:
        users = f"""
[[subaccounts.users]]
user_name = "{USER}"
password_scrypt = "{user_hash}"
email = "{USER}@example.com"
"""
    return f"""\
{state_file}
[tunnel]
listen = "127.0.0.1:{tunnel}"
cert = "{certs['server_cert']}"
key = "{certs['server_key']}"

[proxy]
http_listen = "127.0.0.1:{http}"
socks5_listen = "127.0.0.1:{socks5}"
hold_seconds = {spec.hold_seconds}
{spec.proxy_extra}
[admin]
listen = "127.0.0.1:{admin}"

[destinations]
listen = "127.0.0.1:{destinations}"
store = "{state}/destinations.json"
{token_ca}{replica}{token_service}
[[subaccounts]]
id = "{SUBACCOUNT}"
ca = "{certs['subaccount_ca']}"
token_sha256 = {json.dumps([token_sha256, *spec.extra_token_sha256])}
destination_admin_sha256 = {json.dumps(admin_digests)}
locations = {json.dumps(locations)}
{users}"""


def replica_ids(spec: DemoSpec) -> list[str]:
    """The replicas' ids (also their process and log names): cloud-1 ... cloud-N."""
    return [f"cloud-{i}" for i in range(1, spec.cloud_replicas + 1)] if spec.cloud_replicas >= 2 else []


def nodes_dial_every_replica() -> bool:
    """Whether a node's [tunnel] url takes a list (issue 10's node side, which dials each replica).

    Until then a node dials one URL, and the demo's nodes dial the first replica only."""
    from connector.config import NodeConfig

    return "tunnel_urls" in attrs.fields_dict(NodeConfig)


def write_configs(
    workdir: Path, certs: dict[str, Path], ports: dict[str, int], token_sha256: str, spec: DemoSpec = DemoSpec(),
    *, destination_admin_sha256: str | None = None, user_hash: str = "",
) -> dict[str, Path]:
    """cloud.toml (or cloud-1.toml ... with `spec.cloud_replicas` >= 2) and one toml per node
    (NODE_2's too with `spec.sap_examples`, whose token service needs `ports["oauth"]`)."""
    admin_digests = [destination_admin_sha256] if destination_admin_sha256 else []
    result: dict[str, Path] = {}
    replicas = replica_ids(spec)
    tunnel_urls = [f"wss://127.0.0.1:{ports['tunnel']}/tunnel"]
    if not replicas:
        cloud = workdir / "cloud.toml"
        cloud.write_text(cloud_toml(certs, token_sha256, spec, admin_digests, tunnel=ports["tunnel"],
                                    http=ports["http_proxy"], socks5=ports["socks5_proxy"], admin=ports["cloud_admin"],
                                    destinations=ports["destinations"],
                                    oauth=ports["oauth"] if spec.sap_examples else None, user_hash=user_hash))
        result["cloud"] = cloud
    else:
        tunnel_urls = [f"wss://127.0.0.1:{ports[f'{r}_tunnel']}/tunnel" for r in replicas]
        secrets_key = workdir / "state" / "cloud-secrets.key"  # one key for every replica
        if not secrets_key.exists():
            from cryptography.fernet import Fernet

            from connector import pki

            pki.write_private(secrets_key, Fernet.generate_key(), overwrite=False)
        for replica, url in zip(replicas, tunnel_urls, strict=True):
            (workdir / "state" / replica).mkdir(parents=True, exist_ok=True)
            tables = f"""
[replica]
id = "{replica}"
tunnel_url = "{url}"

[shared]
etcd = ["http://127.0.0.1:{ports['cloud_etcd_client']}"]
prefix = "/connector-cloud"
secrets_key = "state/cloud-secrets.key"

[drain]
{spec.drain}
"""
            path = workdir / f"{replica}.toml"
            path.write_text(cloud_toml(
                certs, token_sha256, spec, admin_digests, tunnel=ports[f"{replica}_tunnel"],
                http=ports[f"{replica}_http_proxy"], socks5=ports[f"{replica}_socks5"], admin=ports[f"{replica}_admin"],
                destinations=ports[f"{replica}_destinations"], state=f"state/{replica}", replica=tables))
            result[replica] = path
    dial = json.dumps(tunnel_urls if len(tunnel_urls) > 1 and nodes_dial_every_replica() else tunnel_urls[0])
    for index, node in enumerate(spec.nodes):
        endpoints = (spec.etcd_endpoints or {}).get(node) or [f"http://127.0.0.1:{ports['etcd_client']}"]
        result[node] = workdir / f"{node}.toml"
        result[node].write_text(node_toml(node, certs, ports, spec, dial=dial, endpoints=endpoints,
                                          priority=100 - index * 10))
    if spec.sap_examples:
        result[NODE_2] = workdir / f"{NODE_2}.toml"
        result[NODE_2].write_text(node_toml(
            NODE_2, certs, ports, spec, dial=dial, endpoints=[f"http://127.0.0.1:{ports['etcd_client']}"],
            priority=100, location=LOCATION_2, cluster=CLUSTER_2, mappings=MAPPINGS_2.format(**ports)))
    return result


# the second location's internal host: the demo's HTTP service under a name only that location has
MAPPINGS_2 = """
[[mappings]]
virtual_host = "mes.virtual"
virtual_port = 8000
internal_host = "127.0.0.1"
internal_port = {backend_http}
protocol = "HTTP"
host_in_header = "virtual"
resources = [{{ path = "/sap/opu/odata", prefix = true }}]
"""


def node_toml(node: str, certs: dict[str, Path], ports: dict[str, int], spec: DemoSpec, *, dial: str,
              endpoints: list[str], priority: int, location: str = LOCATION, cluster: str = CLUSTER,
              mappings: str | None = None) -> str:
    """One node's configuration; `mappings` (TOML) replaces the first location's three mappings."""
    if mappings is None:
        mappings = f"""
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

# raw TCP onto the HTTP service: the SOCKS5 example of the banner (an HTTP exchange ends by itself)
[[mappings]]
virtual_host = "raw.virtual"
virtual_port = 8000
internal_host = "127.0.0.1"
internal_port = {ports['backend_http']}
protocol = "TCP"

# the ERP's HTTPS port, which requires a user's client certificate (the erp-principal destination)
[[mappings]]
virtual_host = "{PRINCIPAL_HOST.partition(':')[0]}"
virtual_port = {PRINCIPAL_HOST.partition(':')[2]}
internal_host = "127.0.0.1"
internal_port = {ports['backend_https']}
protocol = "HTTPS"
trust_store = "{certs['backend_ca']}"
principal_propagation = "certificate"
resources = [{{ path = "/sap/opu/odata", prefix = true }}]

[principal_propagation]
ca_cert = "{certs['principal_ca']}"
ca_key = "{certs['principal_ca_key']}"
subject = "CN=${{user_name}}"
validity_minutes = 10
"""
    return f"""\
[node]
id = "{node}"
subaccount = "{SUBACCOUNT}"
location_id = "{location}"
priority = {priority}
audit_log = "logs/{node}-audit.jsonl"

[tunnel]
url = {dial}
ca = "{certs['cloud_ca']}"
cert = "{certs[f'node_{node}_cert']}"
key = "{certs[f'node_{node}_key']}"
{spec.tunnel_extra}

[admin]
listen = "127.0.0.1:{ports[f'{node}_admin']}"
token_file = "{certs['admin_token']}"

[cluster]
name = "{cluster}"
etcd = {json.dumps(endpoints)}
secrets_key = "state/cluster.key"
{spec.cluster_extra}

{mappings}"""


class Demo:
    """Starts and stops the demo's processes; the failover tests drive one directly."""

    def __init__(self, workdir: Path, spec: DemoSpec = DemoSpec()) -> None:
        self.workdir = workdir
        self.spec = spec
        self.processes: dict[str, trio.Process] = {}
        self.state: dict[str, Any] = {}
        self.configs: dict[str, Path] = {}
        self.ports: dict[str, int] = {}
        self.log_offsets: dict[str, int] = {}  # where this start's output begins in each log
        self.port_retries = 0

    def pick_port(self, name: str) -> int:
        """A free port for `name`, released at once: its child binds it a moment later."""
        return free_port()

    def log_path(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    async def start_process(self, name: str, argv: list[str]) -> trio.Process:
        logfile = open(self.log_path(name), "ab")  # noqa: SIM115, ASYNC230 - local, owned by the child
        self.log_offsets[name] = logfile.tell()
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
                    last = self.last_words(name)
                    raise RuntimeError(f"{name} exited with {process.returncode}" + (f" ({last})" if last else "")
                                       + f"; see {self.log_path(name)}")
                try:
                    status, body = await http_request("127.0.0.1", port, path, timeout=1.0)
                    if status == 200:
                        value = json.loads(body) if body else None
                        if predicate is None or predicate(value):
                            return value
                except (OSError, trio.TooSlowError, ValueError):
                    pass
                await trio.sleep(0.05)

    def this_start_output(self, name: str) -> str:
        path = self.log_path(name)
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(self.log_offsets.get(name, 0))
            return f.read().decode(errors="replace")

    def last_words(self, name: str) -> str:
        """The last line a child wrote in this start: a connector's one-line error, or etcd's."""
        lines = [line.strip() for line in self.this_start_output(name).splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def taken_ports(self) -> set[int]:
        """The ports that children of this start could not bind ("address already in use")."""
        taken: set[int] = set()
        for name in self.processes:
            for line in self.this_start_output(name).splitlines():
                if "address already in use" in line.lower():
                    taken.update(int(port) for port in re.findall(r"127\.0\.0\.1:(\d+)", line))
        return taken

    async def start(self) -> dict[str, Any]:
        """Start everything; on new ports again when another process took a picked one."""
        fixed = {self.spec.http_port: "--http-port", self.spec.socks5_port: "--socks5-port"}
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return await self._start_once()
            except (RuntimeError, trio.TooSlowError) as exc:
                taken = self.taken_ports()
                with trio.CancelScope(shield=True):
                    await self.stop()
                for port in sorted(taken):
                    if port in fixed:
                        raise DemoError(f"port {port} is in use by another process: choose another with "
                                        f"{fixed[port]} N (0 = any free port); {self.last_failure(port)}") from exc
                if not taken or attempt == START_ATTEMPTS:
                    raise
                log.info("port(s) %s taken by another process while starting; starting again on new ports",
                         sorted(taken))
                self.port_retries += 1
                shutil.rmtree(self.workdir / "state", ignore_errors=True)  # etcd's data names the old ports
                self.processes.clear()
        raise AssertionError("unreachable")  # pragma: no cover

    def last_failure(self, port: int) -> str:
        for name in self.processes:
            for line in reversed(self.this_start_output(name).splitlines()):
                if f":{port}" in line and "in use" in line.lower():
                    return f"{name}: {line.strip()}"
        return ""

    async def _start_once(self) -> dict[str, Any]:
        from connector.cli import init_certs
        from connector.cloud.auth import hash_token, new_token

        for sub in ("logs", "state", "certs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        spec = self.spec
        certs = init_certs(self.workdir / "certs", SUBACCOUNT, list(spec.nodes), ["127.0.0.1", "localhost"],
                           force=True, cluster=CLUSTER)
        certs.update(principal_certs(self.workdir / "certs"))
        token = new_token()
        destination_admin_token = new_token()  # manages destinations; the proxy token only finds them
        replicas = replica_ids(spec)
        ports = self.ports = {name: self.pick_port(name) for name in (
            "destinations", "etcd_client", "etcd_peer", "backend_http", "backend_tcp", "backend_https",
            *(f"{n}_admin" for n in spec.nodes))}
        user_password, user_hash = "", ""
        if spec.sap_examples:
            certs.update(self._second_location_certs(certs))
            ports.update({name: self.pick_port(name) for name in ("oauth", f"{NODE_2}_admin")})
            from connector.cloud.bindings import hash_secret

            user_password = secrets.token_urlsafe(16)
            user_hash = hash_secret(user_password)
        ports["http_proxy"] = spec.http_port or self.pick_port("http_proxy")
        ports["socks5_proxy"] = spec.socks5_port or self.pick_port("socks5_proxy")
        if replicas:
            for name in ("cloud_etcd_client", "cloud_etcd_peer"):
                ports[name] = self.pick_port(name)
            for replica in replicas:
                for service in ("tunnel", "admin", "http_proxy", "socks5", "destinations"):
                    ports[f"{replica}_{service}"] = self.pick_port(f"{replica}_{service}")
            ports["tunnel"], ports["cloud_admin"] = ports["cloud-1_tunnel"], ports["cloud-1_admin"]
        else:
            ports["tunnel"], ports["cloud_admin"] = self.pick_port("tunnel"), self.pick_port("cloud_admin")
        configs = self.configs = write_configs(
            self.workdir, certs, ports, hash_token(token), spec,
            destination_admin_sha256=hash_token(destination_admin_token), user_hash=user_hash,
        )
        python = sys.executable

        etcd_info: dict[str, Any] = {}
        if spec.start_etcd:
            etcd = await self.start_process("etcd", etcd_command(
                find_etcd(spec.etcd), self.workdir / "state" / "etcd", ports["etcd_client"], ports["etcd_peer"]))
            await self.wait_http("etcd", ports["etcd_client"], "/health")
            etcd_info = {
                "pid": etcd.pid,
                "client_url": f"http://127.0.0.1:{ports['etcd_client']}",
                "metrics_url": f"http://127.0.0.1:{ports['etcd_client']}/metrics",
            }
        backend = await self.start_process("backend", [
            python, "-m", "connector.demo_backend", "--http-port", str(ports["backend_http"]),
            "--tcp-port", str(ports["backend_tcp"]), "--https-port", str(ports["backend_https"]),
            "--cert", str(certs["backend_cert"]), "--key", str(certs["backend_key"]),
            "--client-ca", str(certs["principal_ca"])])
        cluster: dict[str, Any] = {}
        if replicas:
            cluster = await self._start_cloud_cluster(replicas)
            cloud = self.processes["cloud-1"]
        else:
            cloud = await self.start_process("cloud", [python, "-m", "connector", "cloud", "--config",
                                                       str(configs["cloud"])])
            await self.wait_http("cloud", ports["cloud_admin"], "/healthz")
        for node in self.node_names():
            await self.start_node(node)
        # the replicas the nodes dial: every one, or (a node that takes one URL) the first
        dialled = (replicas if nodes_dial_every_replica() else replicas[:1]) if replicas else ["cloud"]
        tunnels = {LOCATION: len(spec.nodes), **({LOCATION_2: 1} if spec.sap_examples else {})}
        for name in dialled:
            admin = ports["cloud_admin"] if name == "cloud" else ports[f"{name}_admin"]
            await self.wait_http(
                name, admin, "/status",
                lambda v: all(any(loc["location_id"] == location and loc["master"] and len(loc["tunnels"]) == count
                                  for loc in v["locations"]) for location, count in tunnels.items()),
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
            "backend": {"pid": backend.pid, "http_port": ports["backend_http"], "tcp_port": ports["backend_tcp"],
                        "https_port": ports["backend_https"]},
            "cloud": {
                "pid": cloud.pid,
                "config": str(configs["cloud" if not replicas else "cloud-1"]),
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
            **cluster,
        }
        if spec.sap_examples:
            self.state.update(await self._sap_examples(certs, destination_admin_token, user_password))
        return self.state

    def node_names(self) -> list[str]:
        """Every node process: the first location's, then NODE_2 (`sap_examples`)."""
        return [*self.spec.nodes, *([NODE_2] if self.spec.sap_examples else [])]

    def _second_location_certs(self, certs: dict[str, Path]) -> dict[str, Path]:
        """NODE_2's client certificate: the subaccount's CA, bound to its own cluster CLUSTER_2."""
        from connector import pki

        ca = pki.Issued(certs["subaccount_ca"], certs["subaccount_ca"].with_suffix(".key"))
        issued = pki.issue(ca, self.workdir / "certs", f"node-{NODE_2}", common_name=NODE_2,
                           organization=SUBACCOUNT, cluster=CLUSTER_2, client=True, force=True)
        return {f"node_{NODE_2}_cert": issued.cert_path, f"node_{NODE_2}_key": issued.key_path}

    async def _sap_examples(self, certs: dict[str, Path], admin_token: str, user_password: str) -> dict[str, Any]:
        """The OAuth2 client of the OAuth2ClientCredentials destination (a binding of the token
        service), the destinations of DESTINATIONS, and their part of the state."""
        from connector.cloud.bindings import FileBindingStore, new_binding
        from connector.cloud.destinations import COLLECTION

        ports = self.ports
        token_url = f"https://127.0.0.1:{ports['oauth']}"
        client, secret = new_binding(SUBACCOUNT, time.time())
        FileBindingStore(self.workdir / "state" / "bindings.json").add(client)
        body = json.dumps(demo_destinations(f"{token_url}/oauth/token", client.client_id, secret,
                                            secrets.token_urlsafe(16))).encode()
        status, answer = await http_request("127.0.0.1", ports["destinations"], COLLECTION, method="POST",
                                            body=body, token=admin_token, timeout=STARTUP_TIMEOUT,
                                            headers=[("content-type", "application/json")])
        if status != 201:
            raise RuntimeError(f"the demo's destinations were refused: {status} {answer[:300]!r}")
        node = self.processes[NODE_2]
        return {
            "token_service": {"url": token_url, "ca": str(certs["cloud_ca"])},
            "user": {"name": USER, "password": user_password},
            "destinations": dict(DESTINATIONS),
            "locations": {LOCATION_2: {
                "node": NODE_2, "cluster": CLUSTER_2, "pid": node.pid, "config": str(self.configs[NODE_2]),
                "admin_port": ports[f"{NODE_2}_admin"],
                "metrics_url": f"http://127.0.0.1:{ports[f'{NODE_2}_admin']}/metrics",
            }},
        }

    async def _start_cloud_cluster(self, replicas: list[str]) -> dict[str, Any]:
        """The cloud etcd, the replicas and HAProxy in front of them; their part of the state.

        `cloud` keeps its keys: the first replica's pid, admin and tunnel ports, the front door's
        application ports (so what used `cloud` for requests now goes through the front door)."""
        ports, python = self.ports, sys.executable
        cloud_etcd = await self.start_process("cloud-etcd", etcd_command(
            find_etcd(self.spec.etcd), self.workdir / "state" / "cloud-etcd", ports["cloud_etcd_client"],
            ports["cloud_etcd_peer"], name="cloud-etcd"))
        await self.wait_http("cloud-etcd", ports["cloud_etcd_client"], "/health")
        for replica in replicas:
            await self.start_process(replica, [python, "-m", "connector", "cloud", "--config",
                                               str(self.configs[replica])])
        for replica in replicas:
            await self.wait_http(replica, ports[f"{replica}_admin"], "/healthz")
        front = haproxy.Front("127.0.0.1", ports["http_proxy"], ports["socks5_proxy"], ports["destinations"])
        backends = [haproxy.Backend(r, "127.0.0.1", ports[f"{r}_http_proxy"], ports[f"{r}_socks5"],
                                    ports[f"{r}_destinations"], ports[f"{r}_admin"]) for r in replicas]
        try:
            binary = haproxy.find_haproxy()
            config = haproxy.write_config(self.workdir / "haproxy.cfg", front, backends)
            haproxy.check_config(binary, config)
        except haproxy.HAProxyError as exc:
            raise DemoError(str(exc)) from None
        balancer = await self.start_process("haproxy", haproxy.haproxy_command(binary, config))
        await self.wait_tcp("haproxy", [ports["http_proxy"], ports["socks5_proxy"], ports["destinations"]])
        return {
            "front": {"pid": balancer.pid, "config": str(config), "http_proxy_port": ports["http_proxy"],
                      "socks5_port": ports["socks5_proxy"], "destinations_port": ports["destinations"]},
            "cloud_replicas": [
                {
                    "id": r,
                    "pid": self.processes[r].pid,
                    "config": str(self.configs[r]),
                    "admin_port": ports[f"{r}_admin"],
                    "metrics_url": f"http://127.0.0.1:{ports[f'{r}_admin']}/metrics",
                    "tunnel_port": ports[f"{r}_tunnel"],
                    "http_proxy_port": ports[f"{r}_http_proxy"],
                    "socks5_port": ports[f"{r}_socks5"],
                    "destinations_port": ports[f"{r}_destinations"],
                }
                for r in replicas
            ],
            "cloud_etcd": {"pid": cloud_etcd.pid, "client_url": f"http://127.0.0.1:{ports['cloud_etcd_client']}"},
        }

    async def wait_tcp(self, name: str, ports: list[int]) -> None:
        """Until `name` (a child that is no connector: HAProxy) accepts on each of `ports`."""
        with trio.fail_after(STARTUP_TIMEOUT):
            for port in ports:
                while True:
                    process = self.processes[name]
                    if process.poll() is not None:
                        last = self.last_words(name)
                        raise RuntimeError(f"{name} exited with {process.returncode}" + (f" ({last})" if last else "")
                                           + f"; see {self.log_path(name)}")
                    try:
                        stream = await trio.open_tcp_stream("127.0.0.1", port)
                    except OSError:
                        await trio.sleep(0.05)
                        continue
                    await stream.aclose()
                    break

    async def start_node(self, node: str) -> trio.Process:
        """Start (or restart, after a drill killed it) one node process."""
        return await self.start_process(
            node, [sys.executable, "-m", "connector", "node", "--config", str(self.configs[node])]
        )

    async def stop(self) -> None:
        """SIGTERM nodes first (graceful handover), then the rest; SIGKILL whatever lingers.

        Cloud replicas drain (`[drain]`), so they get SIGTERM before the load balancer in front
        of them; the etcd processes are killed last (their data is the demo's, thrown away)."""
        order = [*self.node_names(), "cloud", *replica_ids(self.spec), "haproxy", "backend", "etcd", "cloud-etcd"]
        for name in order:
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            if name in ("etcd", "cloud-etcd"):
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


def connector_command() -> str:
    """How to call `connector` from another shell: in a virtual environment (scripts/dev's .venv)
    the script is not on that shell's PATH, so the banner names it in full."""
    script = Path(sys.executable).parent / "connector"
    return str(script) if sys.prefix != sys.base_prefix and script.exists() else "connector"


def print_banner(state: dict[str, Any], other: dict[str, Any] | None = None) -> None:
    cloud = state["cloud"]
    connector = connector_command()
    first_config = next(iter(state["nodes"].values()))["config"]
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
    if "front" in state:
        lines[2:8] = [
            f"  etcd              {state['etcd'].get('client_url')} (the nodes')",
            f"  cloud etcd        {state['cloud_etcd']['client_url']} (the replicas' shared state)",
            f"  front door        HAProxy, pid {state['front']['pid']} ({state['front']['config']})",
            f"  HTTP proxy        http://127.0.0.1:{cloud['http_proxy_port']}",
            f"  SOCKS5 proxy      127.0.0.1:{cloud['socks5_port']}",
            f"  destinations      http://127.0.0.1:{cloud['destinations_port']}/destination-configuration/v1/",
        ]
        for replica in state["cloud_replicas"]:
            lines.append(f"  {replica['id']:<17} tunnel wss://127.0.0.1:{replica['tunnel_port']}/tunnel  "
                         f"ready http://127.0.0.1:{replica['admin_port']}/readyz  metrics {replica['metrics_url']}")
    for node, info in state["nodes"].items():
        lines.append(f"  {node:<17} admin http://127.0.0.1:{info['admin_port']}/status  metrics {info['metrics_url']}")
    for location, info in state.get("locations", {}).items():
        lines.append(f"  {info['node']:<17} admin http://127.0.0.1:{info['admin_port']}/status  metrics "
                     f"{info['metrics_url']} (location {location!r}, cluster {info['cluster']})")
    if "token_service" in state:
        kinds = ", ".join(f"{name} ({kind})" for kind, name in state["destinations"].items())
        lines += [
            f"  token service     {state['token_service']['url']}/oauth/token (CA {state['token_service']['ca']}); "
            f"user {state['user']['name']}, password {state['user']['password']}",
            f"  destinations      {kinds}",
            f"  an application's VCAP_SERVICES: {connector} binding create --config {cloud['config']} "
            f"--subaccount {state['subaccount']}",
        ]
    socks = f"{state['subaccount']}:{state['token']}@127.0.0.1:{cloud['socks5_port']}"
    lines += [
        "",
        "Try it:",
        f"  curl -x http://127.0.0.1:{cloud['http_proxy_port']} --proxy-header 'Proxy-Authorization: Bearer "
        f"{state['token']}' http://erp.virtual:8000/sap/opu/odata/x",
        f"  curl -s --socks5-hostname {socks} --data hello http://raw.virtual:8000/echo",
        f"  curl -H 'Authorization: Bearer {state['destination_admin_token']}' "
        f"http://127.0.0.1:{cloud['destinations_port']}/destination-configuration/v1/subaccountDestinations",
        f"  curl -H \"Authorization: Bearer $(cat {state['admin_token_file']})\" "
        f"http://127.0.0.1:{next(iter(state['nodes'].values()))['admin_port']}/audit",
    ]
    if other is None:
        lines += [f"  {connector} status", f"  {connector} switch"]
    else:  # the pointer names the other demo: commands without --config act on that one
        lines += [
            f"  {connector} status --config {first_config}",
            f"  {connector} switch --config {first_config}",
            "",
            f"Another demo (pid {other.get('pid')}, {other.get('workdir')}) was running first: `connector status`",
            "and `connector switch` without --config act on that one; use --config for this one.",
        ]
    print("\n".join(lines), flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def read_pointer(pointer: Path | None = None) -> dict[str, Any] | None:
    """The state the pointer names, or None when there is none or its demo is gone."""
    pointer = pointer or pointer_file()
    try:
        state = json.loads(pointer.read_text())
    except (FileNotFoundError, ValueError):
        return None
    pid = state.get("pid")
    return state if isinstance(pid, int) and _alive(pid) else None


def claim_pointer(state: dict[str, Any], pointer: Path | None = None) -> dict[str, Any] | None:
    """Make the pointer name `state`, unless it names another running demo: then leave it and
    return that demo's state. Atomic: two demos starting at once cannot both claim it."""
    pointer = pointer or pointer_file()
    pointer.parent.mkdir(parents=True, exist_ok=True)
    staged = pointer.with_name(f".{pointer.name}.{os.getpid()}")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the demo token
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state, indent=2))
    try:
        for _ in range(2):
            try:
                os.link(staged, pointer)  # fails if the pointer exists
                return None
            except FileExistsError:
                other = read_pointer(pointer)
                if other is not None and other.get("pid") != state.get("pid"):
                    return other
                with contextlib.suppress(FileNotFoundError):
                    pointer.unlink()  # a demo that died without cleaning up
        return read_pointer(pointer)
    finally:
        staged.unlink()


def release_pointer(pointer: Path | None = None) -> None:
    pointer = pointer or pointer_file()
    try:
        if json.loads(pointer.read_text() or "{}").get("pid") == os.getpid():
            pointer.unlink()
    except (FileNotFoundError, ValueError):
        pass


def run_demo(*, state_file: Path | None, workdir: Path | None, http_port: int = 20003, socks5_port: int = 20004,
             etcd: str | None = None, cloud_replicas: int = 1) -> int:
    try:
        etcd_binary = find_etcd(etcd)
        if cloud_replicas < 1:
            raise DemoError(f"--cloud-replicas {cloud_replicas}: give 1 (one cloud process) or more")
        if cloud_replicas >= 2:
            haproxy.find_haproxy()
    except (DemoError, haproxy.HAProxyError) as exc:
        print(f"connector demo: {exc}", file=sys.stderr)
        return 2
    owned = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="connector-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    failed: list[BaseException] = []

    async def main() -> int:
        demo = Demo(workdir.resolve(), DemoSpec(http_port=http_port, socks5_port=socks5_port, etcd=etcd_binary,
                                                cloud_replicas=cloud_replicas, sap_examples=cloud_replicas == 1))
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    async def _start() -> None:
                        try:
                            state = await demo.start()
                        except (DemoError, RuntimeError, trio.TooSlowError) as exc:
                            print(f"connector demo failed to start: {exc or 'timed out'}", file=sys.stderr)
                            print(f"  logs kept in {workdir}/logs", file=sys.stderr, flush=True)
                            failed.append(exc)
                            nursery.cancel_scope.cancel()
                            return
                        if state_file is not None:
                            state_file.write_text(json.dumps(state, indent=2))  # noqa: ASYNC240 - a few hundred bytes, once
                            os.chmod(state_file, 0o600)  # it holds the demo token
                        print_banner(state, claim_pointer(state))

                    nursery.start_soon(_start)
                    async for signum in signals:
                        print(f"\nreceived {signal.Signals(signum).name}, stopping the demo", flush=True)
                        nursery.cancel_scope.cancel()
                        break
        finally:
            with trio.CancelScope(shield=True):
                await demo.stop()
            release_pointer()
            if owned and not failed:  # a failed start keeps its logs for reading
                shutil.rmtree(workdir, ignore_errors=True)
        return 1 if failed else 0

    return trio.run(main)
