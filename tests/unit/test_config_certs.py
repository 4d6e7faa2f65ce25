"""The settings of certificate renewal: `[tunnel] renew_at` (node) and `[[subaccounts]] ca_key`
(cloud), validated at load and by the start-up file checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.cli import init_certs
from connector.config import ConfigError, check_cloud_files, load_cloud_config, load_node_config

SHA = "0" * 64


def node_toml(tmp_path: Path, extra: str) -> Path:
    for name in ("node.pem", "node.key"):
        (tmp_path / name).write_text("placeholder")
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
id = "node-a"
subaccount = "acme"
[tunnel]
url = "wss://127.0.0.1:8443/tunnel"
cert = "node.pem"
key = "node.key"
{extra}
""")
    return path


def test_renew_at_defaults_to_two_thirds_and_zero_turns_renewal_off(tmp_path: Path) -> None:
    assert load_node_config(node_toml(tmp_path, "")).tunnel_renew_at == 0.67
    assert load_node_config(node_toml(tmp_path, "renew_at = 0")).tunnel_renew_at == 0.0


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", '"soon"'])
def test_renew_at_outside_0_to_1_is_refused_naming_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_node_config(node_toml(tmp_path, f"renew_at = {value}"))
    assert info.value.key == "tunnel.renew_at"


def cloud_toml(tmp_path: Path, ca_key: str) -> Path:
    certs = init_certs(tmp_path / "certs", "acme", ["node-a"], ["127.0.0.1"])
    path = tmp_path / "cloud.toml"
    path.write_text(f"""
[tunnel]
cert = "{certs['server_cert']}"
key = "{certs['server_key']}"
[[subaccounts]]
id = "acme"
ca = "{certs['subaccount_ca']}"
ca_key = "{ca_key}"
token_sha256 = ["{SHA}"]
""")
    return path


def test_ca_key_must_be_the_key_of_the_subaccounts_ca(tmp_path: Path) -> None:
    good = load_cloud_config(cloud_toml(tmp_path, str(tmp_path / "certs" / "acme-ca.key")))
    check_cloud_files(good)
    assert good.subaccounts[0].ca_key == tmp_path / "certs" / "acme-ca.key"

    wrong = load_cloud_config(cloud_toml(tmp_path / "w", str(tmp_path / "certs" / "cloud-ca.key")))
    with pytest.raises(ConfigError) as info:
        check_cloud_files(wrong)
    assert info.value.key == "subaccounts[0].ca_key"
    assert "is not the private key of" in str(info.value)
