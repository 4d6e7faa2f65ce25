"""An in-process stack on loopback: the cloud side, one standalone node and the demo backend.

Real TLS with certificates made by `connector.pki`, real sockets, configuration through the real
TOML loaders. Used by the end-to-end tests of the tunnel, proxy and access control.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import trio

from connector.agent.node import Node
from connector.agent.runtime import build_node
from connector.cli import init_certs
from connector.cloud.auth import hash_token
from connector.cloud.server import CloudPorts, CloudServer
from connector.config import load_cloud_config, load_node_config
from connector.demo_backend import run_backend

TOKEN = "test-token-0123456789"
SUBACCOUNT = "acme"


@attrs.define
class Stack:
    workdir: Path
    certs: dict[str, Path]
    backend_http: int
    backend_tcp: int
    cloud: CloudServer
    ports: CloudPorts
    node: Node | None = None
    node_scope: trio.CancelScope | None = None
    cloud_scope: trio.CancelScope | None = None

    @property
    def proxy_auth(self) -> tuple[str, str]:
        return ("Proxy-Authorization", f"Bearer {TOKEN}")

    async def wait_registered(self) -> None:
        """Until the node has registered with the cloud; the caller bounds the wait."""
        assert self.node is not None, "start_node first"
        await self.node.wait_registered()


def cloud_toml(workdir: Path, certs: dict[str, Path], *, tunnel_port: int = 0, hold_seconds: float = 1.0,
               extra: str = "", audit_log: Path | None = None) -> Path:
    path = workdir / "cloud.toml"
    audit = f'audit_log = "{audit_log}"' if audit_log is not None else ""
    path.write_text(f"""
[tunnel]
listen = "127.0.0.1:{tunnel_port}"
cert = "{certs['server_cert']}"
key = "{certs['server_key']}"
ping_interval = 0.5
ping_timeout = 2.0

[proxy]
http_listen = "127.0.0.1:0"
socks5_listen = "127.0.0.1:0"
hold_seconds = {hold_seconds}
{audit}

[admin]
listen = "127.0.0.1:0"

[[subaccounts]]
id = "{SUBACCOUNT}"
ca = "{certs['subaccount_ca']}"
token_sha256 = ["{hash_token(TOKEN)}"]
{extra}
""")
    return path


def node_toml(workdir: Path, certs: dict[str, Path], tunnel_port: int, backend_http: int, backend_tcp: int,
              *, node: str = "node-a", cert_name: str | None = None, extra_mappings: str = "",
              cluster: str = "", tunnel_extra: str = "") -> Path:
    cert_name = cert_name or node
    path = workdir / f"{node}.toml"
    token_file = f'token_file = "{certs["admin_token"]}"' if "admin_token" in certs else ""
    path.write_text(f"""
[node]
id = "{node}"
subaccount = "{SUBACCOUNT}"
audit_log = "{workdir / (node + '-audit.jsonl')}"

[tunnel]
url = "wss://127.0.0.1:{tunnel_port}/tunnel"
ca = "{certs['cloud_ca']}"
cert = "{certs[f'node_{cert_name}_cert']}"
key = "{certs[f'node_{cert_name}_key']}"
ping_interval = 0.5
ping_timeout = 2.0
connect_timeout = 1.0
{tunnel_extra}

[forward]
connect_timeout = 2.0
response_timeout = 2.0

[admin]
listen = "127.0.0.1:0"
{token_file}
{cluster}

[[mappings]]
virtual_host = "erp.virtual"
virtual_port = 8000
internal_host = "127.0.0.1"
internal_port = {backend_http}
protocol = "HTTP"
resources = [
  {{ path = "/sap/opu/odata", prefix = true }},
  {{ path = "/ws", prefix = false, websocket_upgrade = true }},
  {{ path = "/nows", prefix = false, websocket_upgrade = false }},
]

[[mappings]]
virtual_host = "echo.virtual"
virtual_port = 7000
internal_host = "127.0.0.1"
internal_port = {backend_tcp}
protocol = "TCP"

[[mappings]]
virtual_host = "dead.virtual"
virtual_port = 8000
internal_host = "127.0.0.1"
internal_port = 1
protocol = "HTTP"
resources = [{{ path = "/", prefix = true }}]
{extra_mappings}
""")
    return path


async def start_node(nursery: trio.Nursery, stack: Stack, config_path: Path) -> Node:
    node = build_node(load_node_config(config_path))
    scope = trio.CancelScope()

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await node.run(task_status=task_status)

    await nursery.start(run)
    stack.node, stack.node_scope = node, scope
    return node


async def start_cloud(
    nursery: trio.Nursery, workdir: Path, certs: dict[str, Path], **cloud_kwargs: Any
) -> tuple[CloudServer, CloudPorts, trio.CancelScope]:
    cloud = CloudServer(load_cloud_config(cloud_toml(workdir, certs, **cloud_kwargs)))
    scope = trio.CancelScope()

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await cloud.run(task_status=task_status)

    ports = await nursery.start(run)
    return cloud, ports, scope


async def start_stack(nursery: trio.Nursery, workdir: Path, *, with_node: bool = True, **cloud_kwargs: Any) -> Stack:
    certs = init_certs(workdir / "certs", SUBACCOUNT, ["node-a", "node-b"], ["127.0.0.1", "localhost"])
    backend_http, backend_tcp = await nursery.start(run_backend, "127.0.0.1", 0, 0)
    cloud, ports, scope = await start_cloud(nursery, workdir, certs, **cloud_kwargs)
    stack = Stack(workdir, certs, backend_http, backend_tcp, cloud, ports, cloud_scope=scope)
    if with_node:
        await start_node(nursery, stack, node_toml(workdir, certs, ports.tunnel, backend_http, backend_tcp))
        with trio.fail_after(10):
            await stack.wait_registered()
    return stack
