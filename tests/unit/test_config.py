"""Configuration is validated at load: every error names the file, the key and what is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from connector.config import (
    ConfigError,
    check_cloud_files,
    check_node_files,
    load_cloud_config,
    load_node_config,
)

SHA = "a" * 64


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("ca.pem", "server.pem", "server.key", "node.pem", "node.key"):
        (tmp_path / name).write_text("placeholder")
    return tmp_path


def cloud(files: Path, body: str) -> Path:
    path = files / "cloud.toml"
    path.write_text(body)
    return path


GOOD_CLOUD = f"""
[tunnel]
cert = "server.pem"
key = "server.key"
[[subaccounts]]
id = "acme"
ca = "ca.pem"
token_sha256 = ["{SHA}"]
"""

GOOD_NODE = """
[node]
id = "node-a"
subaccount = "acme"
[tunnel]
url = "wss://127.0.0.1:8443/tunnel"
cert = "node.pem"
key = "node.key"
[[mappings]]
virtual_host = "erp.virtual"
virtual_port = 8000
internal_host = "10.0.0.1"
internal_port = 80
resources = [{ path = "/sap" }]
"""


RANGE_MAPPING = """
[[mappings]]
virtual_host = "mq.virtual"
virtual_port = "7000-7009"
internal_host = "10.0.0.2"
internal_port = 9000
protocol = "TCP"
"""


def test_a_tcp_mapping_may_name_a_port_range(files):
    mapping = load_node_config(node(files, GOOD_NODE + RANGE_MAPPING)).mappings[1]
    assert (mapping.name, mapping.virtual_port, mapping.internal_port, mapping.port_count) == (
        "mq.virtual:7000-7009", 7000, 9000, 10)


def node(files: Path, body: str) -> Path:
    path = files / "node.toml"
    path.write_text(body)
    return path


def test_good_files_load_with_defaults_and_relative_paths(files):
    config = load_cloud_config(cloud(files, GOOD_CLOUD))
    assert config.http_listen.port == 20003 and config.socks5_listen.port == 20004
    assert config.tunnel_cert == files / "server.pem"
    assert config.subaccounts[0].locations == ("",)
    node_config = load_node_config(node(files, GOOD_NODE))
    assert node_config.cluster is None
    assert node_config.mappings[0].name == "erp.virtual:8000"


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        (GOOD_CLOUD.replace('cert = "server.pem"\n', ""), "tunnel.cert", "is required"),
        (GOOD_CLOUD.replace('"server.pem"', '"missing.pem"'), "tunnel.cert", "does not exist"),
        (GOOD_CLOUD + "\n[proxy]\nhold_seconds = -1\n", "proxy.hold_seconds", "must be positive"),
        (GOOD_CLOUD + "\n[proxy]\nhttp_listen = 'nowhere'\n", "proxy.http_listen", "HOST:PORT"),
        (GOOD_CLOUD + "\n[proxy]\nhold_max = '10'\n", "proxy.hold_max", "must be an integer"),
        (GOOD_CLOUD + "\n[proxy]\nhold_secnds = 3\n", "proxy.hold_secnds", "unknown key"),
        (GOOD_CLOUD.replace(SHA, "plaintext-token"), "subaccounts[0].token_sha256[0]", "SHA-256"),
        (GOOD_CLOUD.split("[[subaccounts]]")[0], "subaccounts", "at least one"),
        (GOOD_CLOUD + "\nping = [\n", "", "not valid TOML"),
    ],
)
def test_bad_cloud_config_names_file_and_key(files, body, key, message):
    path = cloud(files, body)
    with pytest.raises(ConfigError) as info:
        load_cloud_config(path)
    assert info.value.key == key
    assert message in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        (GOOD_NODE.replace("wss://", "ws://"), "tunnel.url", "wss://"),
        (GOOD_NODE.replace('id = "node-a"\n', ""), "node.id", "is required"),
        (GOOD_NODE.replace("internal_port = 80", "internal_port = 70000"), "mappings[0]", "internal_port"),
        (GOOD_NODE.replace('resources = [{ path = "/sap" }]', 'resources = [{ path = "sap" }]'), "mappings[0]", "path"),
        (GOOD_NODE + "\n[cluster]\nname = 'c'\nttl = 1\n", "cluster", "ttl"),
        (GOOD_NODE + "\n[cluster]\nname = 'c'\nttl = 2\nloop_wait = 1\nretry_timeout = 1\n", "cluster", "loop_wait + 2*retry_timeout"),
        (GOOD_NODE + "\n[cluster]\nname = 'c'\nkeep_serving_without_store = 'no'\n", "cluster", "true or false"),
        (GOOD_NODE + "\n[admin]\nlisten = '0.0.0.0:9000'\n[cluster]\nname = 'c'\n", "admin.advertise_url", "wildcard"),
        (GOOD_NODE + "\n[tunnel2]\n", "tunnel2", "unknown key"),
        (GOOD_NODE + GOOD_NODE.split("[tunnel]")[1].split("key = \"node.key\"")[1], "mappings", "share a virtual host"),
        (GOOD_NODE + RANGE_MAPPING.replace("7000-7009", "7009-7010") + RANGE_MAPPING, "mappings",
         "share a virtual host:port: overlapping mappings 'mq.virtual:7009-7010' and 'mq.virtual:7000-7009'"),
        (GOOD_NODE + RANGE_MAPPING.replace('"TCP"', '"HTTP"'), "mappings[1]", "only TCP and TCP-TLS"),
    ],
)
def test_bad_node_config_names_file_and_key(files, body, key, message):
    path = node(files, body)
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    assert info.value.key == key, str(info.value)
    assert message in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_node_config(tmp_path / "absent.toml")


def test_process_refuses_to_start_on_a_bad_config(files):
    path = node(files, GOOD_NODE.replace("wss://", "ws://"))
    result = subprocess.run([sys.executable, "-m", "connector", "node", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "tunnel.url" in result.stderr and str(path) in result.stderr


# --- etcd credentials ------------------------------------------------------------------------------

TLS_CLUSTER = "\n[cluster]\nname = 'c'\netcd = ['https://127.0.0.1:2379']\netcd_ca = 'ca.pem'\netcd_user = 'node'\n"


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_etcd_password_file_is_read_when_private(files):
    _private(files / "etcd.pw", "s3cret\n")
    config = load_node_config(node(files, GOOD_NODE + TLS_CLUSTER + "etcd_password_file = 'etcd.pw'\n"))
    assert config.cluster is not None
    assert (config.cluster.etcd.user, config.cluster.etcd.password) == ("node", "s3cret")
    assert "s3cret" not in repr(config)  # never in a log line or a traceback


def test_inline_etcd_password_needs_a_private_config_file(files):
    path = node(files, GOOD_NODE + TLS_CLUSTER + "etcd_password = 'inline'\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        load_node_config(path)
    assert info.value.key == "cluster.etcd_password"
    path.chmod(0o600)
    config = load_node_config(path)
    assert config.cluster is not None and config.cluster.etcd.password == "inline"


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        ("etcd_password_file = 'open.pw'\n", "cluster.etcd_password_file", "readable by others"),
        ("etcd_password_file = 'empty.pw'\n", "cluster.etcd_password_file", "is empty"),
        ("etcd_password_file = 'absent.pw'\n", "cluster.etcd_password_file", "does not exist"),
        ("etcd_password_file = 'binary.pw'\n", "cluster.etcd_password_file", "not UTF-8"),
        ("etcd_password_file = 'pwdir'\n", "cluster.etcd_password_file", "cannot read"),
        ("etcd_password_file = 'etcd.pw'\netcd_password = 'x'\n", "cluster.etcd_password", "not both"),
        ("", "cluster.etcd_user", "go together"),
    ],
)
def test_bad_etcd_credentials_name_the_key(files, extra, key, message):
    _private(files / "etcd.pw", "s3cret")
    _private(files / "empty.pw", "\n")
    _private(files / "binary.pw", "").write_bytes(b"\xff\xfe")
    (files / "pwdir").mkdir(mode=0o700)
    (files / "open.pw").write_text("s3cret")
    (files / "open.pw").chmod(0o644)
    path = _private(files / "node.toml", GOOD_NODE + TLS_CLUSTER + extra)
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    assert info.value.key == key, str(info.value)
    assert message in str(info.value)


def test_etcd_password_over_plain_http_is_refused(files):
    _private(files / "etcd.pw", "s3cret")
    body = TLS_CLUSTER.replace("https://", "http://").replace("etcd_ca = 'ca.pem'\n", "")
    path = _private(files / "node.toml", GOOD_NODE + body + "etcd_password_file = 'etcd.pw'\n")
    with pytest.raises(ConfigError, match="clear text") as info:
        load_node_config(path)
    assert info.value.key == "cluster.etcd_user"


# --- what start-up opens, checked by --check (certificates, keys, trust stores, directories) ------

@pytest.fixture
def real(tmp_path: Path) -> Path:
    """A directory with the files the GOOD_* configurations name, as real certificates and keys."""
    from connector.cli import init_certs

    certs = init_certs(tmp_path / "certs", "acme", ["node-a"], ["127.0.0.1"])
    for name, source in (("ca.pem", "subaccount_ca"), ("server.pem", "server_cert"), ("server.key", "server_key"),
                         ("node.pem", "node_node-a_cert"), ("node.key", "node_node-a_key")):
        (tmp_path / name).write_bytes(certs[source].read_bytes())
    (tmp_path / "cloud-ca.pem").write_bytes(certs["cloud_ca"].read_bytes())
    return tmp_path


def test_real_files_pass_the_start_up_checks(real):
    (real / "state").mkdir()
    check_cloud_files(load_cloud_config(cloud(real, 'state_file = "state/epochs.json"\n' + GOOD_CLOUD)))
    check_node_files(load_node_config(node(real, GOOD_NODE.replace('cert = "node.pem"',
                                                                   'ca = "cloud-ca.pem"\ncert = "node.pem"'))))


def _swap(config_text: str) -> str:
    return config_text.replace('cert = "server.pem"\nkey = "server.key"', 'cert = "server.key"\nkey = "server.pem"')


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        (_swap(GOOD_CLOUD), "tunnel.cert", "server.key holds a private key, not a certificate (certificate and key swapped?)"),
        (GOOD_CLOUD.replace('key = "server.key"', 'key = "node.key"'), "tunnel.key",
         "node.key is not the private key of"),
        (GOOD_CLOUD.replace('ca = "ca.pem"', 'ca = "node.key"'), "subaccounts[0].ca", "holds a private key"),
        ('state_file = "absent/epochs.json"\n' + GOOD_CLOUD, "state_file", "directory"),
        (GOOD_CLOUD.replace("[[subaccounts]]", '[destinations]\nstore = "absent/d.json"\n[[subaccounts]]'),
         "destinations.store", "does not exist"),
    ],
)
def test_cloud_start_up_files_are_checked_and_named(real, body, key, message):
    config = load_cloud_config(cloud(real, body))  # loads: the TOML itself is fine
    with pytest.raises(ConfigError) as info:
        check_cloud_files(config)
    assert info.value.key == key, str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        (GOOD_NODE.replace('cert = "node.pem"\nkey = "node.key"', 'cert = "node.key"\nkey = "node.pem"'),
         "tunnel.cert", "swapped"),
        (GOOD_NODE.replace('cert = "node.pem"', 'ca = "node.pem"\ncert = "node.pem"').replace(
            'key = "node.key"', 'key = "server.key"'), "tunnel.key", "is not the private key"),
        (GOOD_NODE.replace('cert = "node.pem"', 'ca = "node.key"\ncert = "node.pem"'), "tunnel.ca", "private key"),
        (GOOD_NODE + 'trust_store = "/nonexistent/internal-ca.pem"\n', "mappings[0].trust_store", "no such"),
        ('[tunel]\nurl = "wss://x"\n' + GOOD_NODE.replace("[tunnel]\n", "[admin]\n").replace(
            'url = "wss://127.0.0.1:8443/tunnel"\ncert = "node.pem"\nkey = "node.key"\n', ""), "tunel",
         "did you mean [tunnel]"),
    ],
)
def test_node_start_up_files_are_checked_and_named(real, body, key, message):
    with pytest.raises(ConfigError) as info:
        check_node_files(load_node_config(node(real, body)))
    assert info.value.key == key, str(info.value)
    assert message in str(info.value)


def test_check_exits_2_naming_the_file_for_swapped_certificate_and_key(real, capsys):
    from connector.cli import main

    path = cloud(real, _swap(GOOD_CLOUD))
    assert main(["cloud", "--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "tunnel.cert" in err and str(real / "server.key") in err and "swapped" in err


def test_cloud_with_swapped_files_exits_2_with_the_file_not_pem_lib(real):
    """Not only --check: the process itself (what systemd restarts) exits 2 naming the file."""
    path = cloud(real, _swap(GOOD_CLOUD))
    result = subprocess.run([sys.executable, "-m", "connector", "cloud", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "PEM lib" not in result.stderr and "Traceback" not in result.stderr
    assert str(real / "server.key") in result.stderr


def test_unknown_key_suggests_the_known_one(files):
    with pytest.raises(ConfigError, match="did you mean 'hold_seconds'"):
        load_cloud_config(cloud(files, GOOD_CLOUD + "\n[proxy]\nhold_secnds = 3\n"))
