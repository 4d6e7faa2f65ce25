"""[replica] and [shared] of cloud.toml: defaults, validation, and the settings that need etcd."""

from __future__ import annotations

import socket

import pytest

from connector.config import ConfigError, check_cloud_files, load_cloud_config
from tests.unit.test_config import GOOD_CLOUD, cloud, files, real  # noqa: F401 - the fixtures

SHARED = """
[shared]
etcd = ["http://127.0.0.1:2379"]
"""


def test_one_replica_without_shared_state_by_default(files):  # noqa: F811
    config = load_cloud_config(cloud(files, GOOD_CLOUD))
    assert config.shared is None
    assert config.replica is not None
    assert (config.replica.id, config.replica.tunnel_url, config.replica.lease_ttl) == (socket.gethostname(), None, 10)


def test_shared_state_and_replica_keys_load(files):  # noqa: F811
    (files / "cloud.key").write_text("x")
    config = load_cloud_config(cloud(files, GOOD_CLOUD + """
[replica]
id = "cloud-1"
tunnel_url = "wss://cloud-1.example:8443/tunnel"
admin_url = "http://cloud-1.example:20006"
lease_ttl = 3

[shared]
etcd = ["https://etcd-1:2379", "https://etcd-2:2379"]
prefix = "/my-cloud"
etcd_ca = "ca.pem"
etcd_timeout = 2.5
secrets_key = "cloud.key"
"""))
    assert config.replica is not None and config.shared is not None
    assert (config.replica.id, config.replica.tunnel_url, config.replica.lease_ttl) == (
        "cloud-1", "wss://cloud-1.example:8443/tunnel", 3)
    assert config.shared.etcd.endpoints == ("https://etcd-1:2379", "https://etcd-2:2379")
    assert (config.shared.prefix, config.shared.etcd.timeout) == ("/my-cloud", 2.5)
    assert config.shared.etcd.ca == files / "ca.pem"
    assert config.shared.secrets_key == files / "cloud.key"


@pytest.mark.parametrize(("extra", "key", "message"), [
    ('[replica]\nid = "a/b"\n', "replica.id", "without '/'"),
    ('[replica]\ntunnel_url = "ws://x:1/tunnel"\n', "replica.tunnel_url", "wss://"),
    ('[replica]\nlease_ttl = 0\n', "replica.lease_ttl", "at least 1"),
    ('[replica]\nid = "a"\ncolour = 1\n', "replica.colour", "unknown key"),
    (SHARED + 'prefix = "/a/b"\n', "shared.prefix", "one path segment"),
    (SHARED + 'prefix = "connector"\n', "shared.prefix", "one path segment"),
    (SHARED + 'etcd_user = "u"\netcd_password_file = "ca.pem"\n', "shared.etcd_password_file", "readable by others"),
    ('[destinations]\n' + SHARED, "shared.secrets_key", "is required"),
    ('[oauth]\n' + SHARED, "shared.secrets_key", "signing keys"),
])
def test_bad_shared_settings_name_the_key(files, extra, key, message):  # noqa: F811
    with pytest.raises(ConfigError) as raised:
        load_cloud_config(cloud(files, GOOD_CLOUD + extra))
    assert f": {key}: " in str(raised.value)
    assert message in str(raised.value)


def test_a_local_state_file_is_refused_with_shared_state(files):  # noqa: F811
    with pytest.raises(ConfigError, match="state_file: with \\[shared\\] the fence lives in the cloud's etcd"):
        load_cloud_config(cloud(files, 'state_file = "state.json"\n' + GOOD_CLOUD + SHARED))


def test_a_wildcard_listen_needs_the_replica_urls_only_with_shared_state(files):  # noqa: F811
    wildcard = GOOD_CLOUD.replace('[tunnel]\n', '[tunnel]\nlisten = "0.0.0.0:8443"\n')
    assert load_cloud_config(cloud(files, wildcard)).shared is None  # one replica: as before
    with pytest.raises(ConfigError, match="replica.tunnel_url: is required when tunnel.listen is a wildcard"):
        load_cloud_config(cloud(files, wildcard + SHARED))
    config = load_cloud_config(cloud(files, wildcard + '[replica]\ntunnel_url = "wss://c1:8443/tunnel"\n' + SHARED))
    assert config.replica is not None and config.replica.tunnel_url == "wss://c1:8443/tunnel"


@pytest.mark.parametrize(("shared", "key", "message"), [
    ('etcd_ca = "server.key"\n', "shared.etcd_ca", "private key"),
    ('etcd_cert = "node.pem"\netcd_key = "server.key"\n', "shared.etcd_key", "is not the private key"),
    ('secrets_key = "absent/cloud.key"\n', "shared.secrets_key", "does not exist"),
])
def test_shared_start_up_files_are_checked_and_named(real, shared, key, message):  # noqa: F811
    config = load_cloud_config(cloud(real, GOOD_CLOUD + SHARED + shared))
    with pytest.raises(ConfigError) as info:
        check_cloud_files(config)
    assert info.value.key == key, str(info.value)
    assert message in str(info.value)


def test_shared_destinations_need_no_store_directory(real):  # noqa: F811
    (real / "cloud.key").write_text("")
    body = GOOD_CLOUD.replace("[[subaccounts]]", '[destinations]\nstore = "absent/d.json"\n[[subaccounts]]')
    check_cloud_files(load_cloud_config(cloud(real, body + SHARED + 'secrets_key = "cloud.key"\n')))
