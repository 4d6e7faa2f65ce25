"""A minimal node.toml for tests that exercise the CLI or the store, not the tunnel."""

from __future__ import annotations

from pathlib import Path


def cluster_node_toml(tmp_path: Path, cluster: str, etcd: list[str], cluster_extra: str = "") -> Path:
    """Write `tmp_path/node.toml` for node-a of subaccount acme in `cluster` on `etcd` (extra TOML
    lines go into [cluster]); its certificate and key are placeholders: the tunnel is not used."""
    for name in ("node.pem", "node.key"):
        (tmp_path / name).write_text("placeholder")
    endpoints = ", ".join(f'"{url}"' for url in etcd)
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
id = "node-a"
subaccount = "acme"
[tunnel]
url = "wss://127.0.0.1:8443/tunnel"
cert = "node.pem"
key = "node.key"
[cluster]
name = "{cluster}"
etcd = [{endpoints}]
{cluster_extra}
""")
    return path
