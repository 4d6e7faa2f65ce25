"""A node's identity is its certificate's; the admin token file; the cloud's cluster pins.

Configuration is checked at load (token file) and at start / `--check` (certificate): every
error names the file, the key and both values.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from connector import pki
from connector.cli import init_certs
from connector.config import (
    ConfigError,
    check_node_certificate,
    load_cloud_config,
    load_node_config,
)
from connector.readiness import NodeState, readiness

TOKEN = "a-private-admin-token-0123456789"


def write_node(tmp_path: Path, certs: dict[str, Path], *, subaccount: str = "acme", node: str = "node-a",
               cluster: str | None = None, admin: str = "") -> Path:
    path = tmp_path / "node.toml"
    cluster_section = f'[cluster]\nname = "{cluster}"\n' if cluster else ""
    path.write_text(f"""
[node]
id = "{node}"
subaccount = "{subaccount}"
[tunnel]
url = "wss://127.0.0.1:8443/tunnel"
cert = "{certs['node_node-a_cert']}"
key = "{certs['node_node-a_key']}"
[admin]
{admin}
{cluster_section}
""")
    return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return init_certs(tmp_path_factory.mktemp("certs"), "acme", ["node-a"], ["127.0.0.1"], cluster="alpha")


def test_certs_init_binds_the_cluster_and_writes_a_private_admin_token(certs):
    cert = pki.load_certificate(certs["node_node-a_cert"])
    assert (pki.subaccount_of(cert), pki.common_name_of(cert), pki.cluster_of(cert)) == ("acme", "node-a", "alpha")
    token = certs["admin_token"]
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text().strip()) >= 43


def test_matching_certificate_passes(tmp_path, certs):
    assert check_node_certificate(load_node_config(write_node(tmp_path, certs, cluster="alpha"))) == []


def test_other_subaccount_than_the_certificate_is_a_config_error(tmp_path, certs):
    path = write_node(tmp_path, certs, subaccount="acme-typo", cluster="alpha")
    with pytest.raises(ConfigError) as info:
        check_node_certificate(load_node_config(path))
    assert info.value.key == "node.subaccount"
    message = str(info.value)
    assert str(path) in message and "'acme-typo'" in message and "'acme'" in message


def test_other_cluster_than_the_certificate_is_a_config_error(tmp_path, certs):
    for cluster in ("beta", None):  # another cluster, or standalone with a cluster-bound certificate
        with pytest.raises(ConfigError) as info:
            check_node_certificate(load_node_config(write_node(tmp_path, certs, cluster=cluster)))
        assert info.value.key == "cluster.name" and "'alpha'" in str(info.value) and repr(cluster) in str(info.value)


def test_other_node_id_than_the_certificate_is_a_warning(tmp_path, certs):
    warnings = check_node_certificate(load_node_config(write_node(tmp_path, certs, node="node-z", cluster="alpha")))
    assert len(warnings) == 1 and "'node-z'" in warnings[0] and "'node-a'" in warnings[0]


@pytest.mark.parametrize("check", [["--check"], []])  # `--check`, and a real start
def test_node_exits_2_naming_file_key_and_both_values(tmp_path, certs, check):
    path = write_node(tmp_path, certs, subaccount="globex", cluster="alpha")
    result = subprocess.run([sys.executable, "-m", "connector", "node", "--config", str(path), *check],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{path}: node.subaccount: is 'globex'" in result.stderr and "'acme'" in result.stderr


def test_admin_token_file_is_read_when_private(tmp_path, certs):
    token = tmp_path / "admin.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    config = load_node_config(write_node(tmp_path, certs, admin=f'token_file = "{token}"'))
    assert config.admin_token == TOKEN and config.admin_token_file == token
    assert TOKEN not in repr(config)


@pytest.mark.parametrize(("mode", "text", "message"), [
    (0o644, TOKEN, "readable by others (mode 644): chmod 600 it"),
    (0o640, TOKEN, "readable by others (mode 640): chmod 600 it"),
    (0o600, "", "is empty"),
    (0o600, "short", "holds a token of 5 characters; use at least 16"),
])
def test_bad_admin_token_file_names_the_key(tmp_path, certs, mode, text, message):
    token = tmp_path / "admin.token"
    token.write_text(text)
    os.chmod(token, mode)
    with pytest.raises(ConfigError, match="admin.token_file") as info:
        load_node_config(write_node(tmp_path, certs, admin=f'token_file = "{token}"'))
    assert message in str(info.value)


def test_cloud_pins_clusters_per_location(tmp_path, certs):
    path = tmp_path / "cloud.toml"
    body = f"""
[tunnel]
cert = "{certs['server_cert']}"
key = "{certs['server_key']}"
[[subaccounts]]
id = "acme"
ca = "{certs['subaccount_ca']}"
clusters = {{ "" = "alpha", "plant-2" = "beta" }}
"""
    path.write_text(body)
    assert load_cloud_config(path).subaccounts[0].clusters == {"": "alpha", "plant-2": "beta"}
    path.write_text(body.replace('"beta"', '""'))
    with pytest.raises(ConfigError, match=r"subaccounts\[0\]\.clusters\.plant-2: must name a cluster"):
        load_cloud_config(path)
    path.write_text(body.replace('"beta"', "3"))
    with pytest.raises(ConfigError, match=r"subaccounts\[0\]\.clusters\.plant-2: must be a string"):
        load_cloud_config(path)


@pytest.mark.parametrize("want", ["master", "shadow", "any"])
@pytest.mark.parametrize("role", ["master", "shadow"])
def test_a_node_the_cloud_refuses_is_never_ready_and_says_why(role, want):
    refused = NodeState(role=role, tunnel_connected=True, etcd_reachable=True, config_loaded=True,
                        cloud_refusal="wrong_cluster: this location is served by cluster 'alpha'")
    result = readiness(refused, want=want)
    assert not result.ready
    assert result.reason == "the cloud refuses this node: wrong_cluster: this location is served by cluster 'alpha'"
