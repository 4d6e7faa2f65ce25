"""Backend identity without sockets: mapping keys, start-up checks, and the cached client contexts
(files rotated by mtime, keys refused unless private, secrets followed by revision)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from cryptography.fernet import Fernet

from connector.agent.acl import BackendProtocol, Mapping
from connector.agent.identity import ClusterSecrets, IdentityError, backend_context
from connector.cli import init_certs
from connector.config import ConfigError, check_node_files, load_node_config
from ha.memory import MemoryStore

BASE = {"virtual_host": "erp.virtual", "virtual_port": 8000, "internal_host": "10.0.0.1", "internal_port": 443,
        "protocol": "HTTPS"}


@pytest.mark.parametrize(("extra", "message"), [
    ({"client_cert": "/c.pem"}, "client_key: client_cert and client_key go together"),
    ({"client_key": "/c.key"}, "client_key: client_cert and client_key go together"),
    ({"client_cert": "/c.pem", "client_key": "/c.key", "client_identity": "secret:x"},
     "client_identity: give client_cert/client_key or client_identity, not both"),
    ({"client_identity": "file:/c.pem"}, "client_identity: 'file:/c.pem' is not \"secret:<name>\""),
    ({"client_identity": "secret:"}, "client_identity: 'secret:' is not"),
    ({"client_identity": "secret:a/b"}, "client_identity: 'secret:a/b' is not"),
    ({"client_cert": 7, "client_key": "/c.key"}, "client_cert: must be a non-empty string"),
    ({"protocol": "HTTP", "client_identity": "secret:x"},
     "client_identity: only HTTPS and TCP-TLS mappings present a client certificate"),
    ({"protocol": "TCP", "client_cert": "/c.pem", "client_key": "/c.key"},
     "client_cert: only HTTPS and TCP-TLS mappings present a client certificate"),
])
def test_bad_client_identity_names_the_key(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        Mapping.from_dict(BASE | extra)


@pytest.mark.parametrize("extra", [
    {"client_cert": "/etc/sys.pem", "client_key": "/etc/sys.key"},
    {"client_identity": "secret:erp-system.v2"},
    {"protocol": "TCP-TLS", "client_identity": "secret:mq"},
])
def test_client_identity_round_trips_through_the_shared_form(extra: dict[str, object]) -> None:
    mapping = Mapping.from_dict(BASE | extra)
    assert Mapping.from_dict(mapping.to_dict()) == mapping
    assert {k: mapping.to_dict()[k] for k in extra} == extra


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(certificate, key 0600, another certificate's key 0600) made by connector.pki."""
    certs = init_certs(tmp_path / "certs", "acme", ["node-a", "node-b"], ["127.0.0.1"])
    return certs["node_node-a_cert"], certs["node_node-a_key"], certs["node_node-b_key"]


def node_file(tmp_path: Path, mapping: str, cluster: str = "") -> Path:
    """A node configuration with one HTTPS mapping; its tunnel files are made by `pair`."""
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
id = "node-a"
subaccount = "acme"
[tunnel]
url = "wss://127.0.0.1:8443/tunnel"
cert = "{tmp_path / 'certs/node-node-a.pem'}"
key = "{tmp_path / 'certs/node-node-a.key'}"
{cluster}
[[mappings]]
virtual_host = "erp.virtual"
virtual_port = 8000
internal_host = "10.0.0.1"
internal_port = 443
protocol = "HTTPS"
resources = [{{ path = "/" }}]
{mapping}
""")
    return path


def test_start_up_checks_the_client_key_is_private_and_matches(tmp_path: Path, pair: tuple[Path, Path, Path]) -> None:
    cert, key, other_key = pair
    config = load_node_config(node_file(tmp_path, f'client_cert = "{cert}"\nclient_key = "{key}"'))
    check_node_files(config)
    os.chmod(key, 0o640)
    with pytest.raises(ConfigError) as info:
        check_node_files(config)
    assert info.value.key == "mappings[0].client_key" and "readable by others (mode 640): chmod 600" in str(info.value)
    config = load_node_config(node_file(tmp_path, f'client_cert = "{cert}"\nclient_key = "{other_key}"'))
    with pytest.raises(ConfigError) as info:
        check_node_files(config)
    assert info.value.key == "mappings[0].client_key" and "is not the private key of" in str(info.value)


@pytest.mark.usefixtures("pair")
def test_a_secret_identity_needs_the_cluster_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_node_config(node_file(tmp_path, 'client_identity = "secret:erp"'))
    assert info.value.key == "mappings[0].client_identity" and "[cluster] secrets_key" in str(info.value)
    cluster = f'[cluster]\nname = "c"\netcd = ["http://127.0.0.1:2379"]\nsecrets_key = "{tmp_path / "k"}"\n'
    assert load_node_config(node_file(tmp_path, 'client_identity = "secret:erp"', cluster)).mappings[0].client_identity


def test_file_identity_context_is_cached_until_a_file_changes(pair: tuple[Path, Path, Path]) -> None:
    cert, key, _ = pair
    mapping = Mapping("erp.virtual", 8000, "10.0.0.1", 443, protocol=BackendProtocol.HTTPS,
                      client_cert=str(cert), client_key=str(key))
    first = backend_context(mapping)
    assert backend_context(mapping) is first
    os.utime(key, ns=(0, os.stat(key).st_mtime_ns + 1_000_000_000))  # a rotated key: a new context
    second = backend_context(mapping)
    assert second is not first and backend_context(mapping) is second
    os.chmod(key, 0o644)  # read again each time it changes: refused, not used
    os.utime(key, ns=(0, os.stat(key).st_mtime_ns + 1_000_000_000))
    with pytest.raises(IdentityError, match="readable by others"):
        backend_context(mapping)


async def test_secret_identity_follows_the_secret(pair: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    cert, key, other_key = pair
    fernet = Fernet(Fernet.generate_key())
    store = MemoryStore()
    mapping = Mapping("erp.virtual", 8000, "10.0.0.1", 443, protocol=BackendProtocol.HTTPS,
                      client_identity="secret:erp")
    with pytest.raises(IdentityError, match="no cluster secrets on this node"):
        backend_context(mapping, None)
    secrets = ClusterSecrets(store, fernet)
    async with trio.open_nursery() as nursery:
        await nursery.start(secrets.run)
        with pytest.raises(IdentityError, match="secret:erp: no such secret"):
            backend_context(mapping, secrets)
        await store.put("secrets/unrelated", b"not a fernet token")  # no mapping names it: never decrypted
        revision = await store.put("secrets/erp", fernet.encrypt(cert.read_bytes() + key.read_bytes()))
        await secrets.wait_revision(revision)
        first = backend_context(mapping, secrets)
        assert "unrelated" not in caplog.text
        assert backend_context(mapping, secrets) is first
        # a bundle whose key is not the certificate's: refused with the secret's name, not used
        revision = await store.put("secrets/erp", fernet.encrypt(cert.read_bytes() + other_key.read_bytes()))
        await secrets.wait_revision(revision)
        with pytest.raises(IdentityError, match="client identity secret:erp unusable"):
            backend_context(mapping, secrets)
        # one encrypted with another key is not used (and said so in the node's log)
        revision = await store.put("secrets/erp", Fernet(Fernet.generate_key()).encrypt(b"x"))
        await secrets.wait_revision(revision)
        assert secrets.get("erp") is None and "secret erp" in caplog.text and "does not decrypt" in caplog.text
        revision = await store.put("secrets/erp", fernet.encrypt(cert.read_bytes() + key.read_bytes()))
        await secrets.wait_revision(revision)
        assert backend_context(mapping, secrets) is not first  # a new revision: a new context
        nursery.cancel_scope.cancel()
