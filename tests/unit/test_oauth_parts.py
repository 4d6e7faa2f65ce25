"""The token service's pure parts: bindings and their store, VCAP_SERVICES, client authentication,
the token cache on trio's clock, key files, and the [oauth] configuration."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import trio

from connector.cloud.bindings import (
    BindingError,
    Endpoints,
    FileBindingStore,
    check_secret,
    hash_secret,
    new_binding,
    vcap_services,
)
from connector.cloud.jwks import FileKeyStore, KeyRing, SigningKey, load_or_create
from connector.cloud.oauth import OAuthError, _form, client_credentials_of
from connector.config import ConfigError, load_cloud_config

T0 = 1_800_000_000.0
ENDPOINTS = Endpoints("https://cloud.example:20007", "cloud.example", 20003, 20004, "http://cloud.example:20005")


def test_secrets_are_stored_as_salted_scrypt_hashes() -> None:
    binding, secret = new_binding("acme", T0, location="loc-1")
    assert binding.secret_hash.startswith("scrypt$16384$8$1$") and secret not in binding.secret_hash
    assert binding.check_secret(secret) and not binding.check_secret(secret + "x")
    assert hash_secret(secret) != hash_secret(secret)  # salted
    assert not check_secret(secret, "sha256$abc") and not check_secret(secret, "garbage")
    assert ":" not in binding.client_id and secret not in repr(binding)
    with pytest.raises(ValueError, match="location"):
        new_binding("acme", T0, location="bad location")


def test_file_store_is_private_and_a_revocation_is_seen_by_a_running_reader(tmp_path: Path) -> None:
    path = tmp_path / "bindings.json"
    writer, reader = FileBindingStore(path), FileBindingStore(path)
    binding, _ = new_binding("acme", T0)
    writer.add(binding)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert reader.is_active(binding.client_id)
    with pytest.raises(BindingError, match="exists"):
        writer.add(binding)
    revoked = FileBindingStore(path).revoke(binding.client_id, T0 + 5)  # another process: the CLI
    assert revoked.revoked == T0 + 5
    assert not reader.is_active(binding.client_id) and reader.get(binding.client_id) == revoked
    assert not reader.is_active("sb-unknown")
    with pytest.raises(BindingError, match="no binding"):
        writer.revoke("sb-unknown", T0)
    os.chmod(path, 0o644)
    with pytest.raises(OSError, match="chmod 600"):
        FileBindingStore(path).all()


def test_vcap_services_has_the_three_bindings_with_sap_field_names() -> None:
    binding, secret = new_binding("acme", T0, location="loc-1")
    vcap = vcap_services(binding, secret, ENDPOINTS)
    assert sorted(vcap) == ["connectivity", "destination", "xsuaa"]
    connectivity = vcap["connectivity"][0]["credentials"]
    assert connectivity["clientid"] == binding.client_id and connectivity["clientsecret"] == secret
    # with its port: xssec fetches a tenant's tokens and keys from https://{uaadomain} (the SAP Cloud SDK test)
    assert connectivity["url"] == "https://cloud.example:20007" and connectivity["uaadomain"] == "cloud.example:20007"
    assert (connectivity["onpremise_proxy_host"], connectivity["onpremise_proxy_http_port"],
            connectivity["onpremise_socks5_proxy_port"]) == ("cloud.example", "20003", "20004")
    assert connectivity["zoneid"] == connectivity["tenantid"] == connectivity["identityzone"] == "acme"
    assert connectivity["cloud_connector_location_id"] == "loc-1"
    assert vcap["destination"][0]["credentials"]["uri"] == "http://cloud.example:20005"
    assert vcap["xsuaa"][0]["credentials"]["xsappname"] == "app!acme"
    assert vcap["connectivity"][0]["label"] == "connectivity"
    no_destinations = vcap_services(binding, secret, Endpoints("https://c", "c", 1, 2, None))
    assert "destination" not in no_destinations
    assert no_destinations["xsuaa"][0]["credentials"]["uaadomain"] == "c"  # port 443: the host alone, as SAP's


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_client_authentication_basic_or_form_never_both() -> None:
    assert client_credentials_of(basic("sb-a%21b", "s+c"), {}) == ("sb-a!b", "s c")  # RFC 6749 2.3.1 encoding
    assert client_credentials_of(None, {"client_id": "a", "client_secret": "s"}) == ("a", "s")
    with pytest.raises(OAuthError) as both:
        client_credentials_of(basic("a", "s"), {"client_id": "a", "client_secret": "s"})
    assert both.value.status == 400
    for authorization, form in ((None, {}), (b"Bearer x", {}), (b"Basic !!!", {}), (None, {"client_id": "a"})):
        with pytest.raises(OAuthError) as refused:
            client_credentials_of(authorization, form)
        assert (refused.value.status, refused.value.error) == (401, "invalid_client")


def test_form_bodies() -> None:
    assert _form(b"grant_type=client_credentials&scope=") == {"grant_type": "client_credentials", "scope": ""}
    assert _form(b"") == {}
    for body in (b"a=1&a=2", b"\xff=1", b"novalue"):
        with pytest.raises(OAuthError) as refused:
            _form(body)
        assert refused.value.error == "invalid_request"


def test_key_file_is_private_and_survives_a_restart(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    ring = load_or_create(store, T0)
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    rotated = ring.rotate(T0 + 10, overlap=100)
    store.save(rotated)
    loaded = FileKeyStore(store.path).load()
    assert loaded is not None and [k.kid for k in loaded.keys] == [k.kid for k in rotated.keys]
    assert loaded.keys[1].retires == T0 + 110
    os.chmod(store.path, 0o640)
    with pytest.raises(OSError, match="chmod 600"):
        store.load()
    with pytest.raises(ValueError, match="current key"):
        KeyRing((SigningKey.generate(T0).__class__("k", b"", T0, retires=T0),))


# --- [oauth] in cloud.toml -----------------------------------------------------------------------

def write_cloud(tmp_path: Path, oauth: str) -> Path:
    for name in ("ca.pem", "server.pem", "server.key", "oauth.pem", "oauth.key"):
        (tmp_path / name).write_text("placeholder")
    path = tmp_path / "cloud.toml"
    path.write_text(f"""
[tunnel]
cert = "server.pem"
key = "server.key"
[[subaccounts]]
id = "acme"
ca = "ca.pem"
{oauth}
""")
    return path


def test_oauth_section_defaults(tmp_path: Path) -> None:
    assert load_cloud_config(write_cloud(tmp_path, "")).oauth is None
    config = load_cloud_config(write_cloud(tmp_path, "[oauth]\n"))
    oauth = config.oauth
    assert oauth is not None
    assert (str(oauth.listen), oauth.settings.url, oauth.proxy_host) == (
        "127.0.0.1:20007", "https://127.0.0.1:20007", "127.0.0.1")
    assert oauth.cert == tmp_path / "server.pem" and oauth.bindings == tmp_path / "bindings.json"
    assert oauth.signing_keys == tmp_path / "signing-keys.json"
    assert (oauth.settings.token_lifetime, oauth.settings.key_overlap, oauth.settings.max_body_bytes) == (
        3600.0, 7200.0, 8192)
    custom = load_cloud_config(write_cloud(tmp_path, '[oauth]\nurl = "https://auth.example"\ncert = "oauth.pem"\n'
                                                      'key = "oauth.key"\nproxy_host = "proxy.example"\n'))
    assert custom.oauth is not None and custom.oauth.settings.issuer == "https://auth.example/oauth/token"


@pytest.mark.parametrize(("body", "key", "message"), [
    ('token_lifetime = 7200\nkey_overlap = 3600', "oauth", "key_overlap must be at least token_lifetime"),
    ('url = "http://plain.example"', "oauth", "https://"),
    ('cert = "oauth.pem"', "oauth.cert", "go together"),
    ('max_body_bytes = 0', "oauth.max_body_bytes", "at least 1"),
    ('lifetime = 1', "oauth.lifetime", "unknown key"),
])
def test_oauth_section_errors_name_the_key(tmp_path: Path, body: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_cloud_config(write_cloud(tmp_path, f"[oauth]\n{body}\n"))
    assert caught.value.key == key and message in str(caught.value)


def test_json_roundtrip_of_a_binding(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    binding, _ = new_binding("acme", T0)
    FileBindingStore(path).add(binding)
    assert json.loads(path.read_text())["bindings"][0]["client_id"] == binding.client_id
    assert FileBindingStore(path).all() == [binding]


# --- the service's key maintenance, on trio's clock ---------------------------------------------

class MemoryKeys:
    def __init__(self) -> None:
        self.saved: list[KeyRing] = []
        self.fail = False

    def load(self) -> KeyRing | None:
        return self.saved[-1] if self.saved else None

    def save(self, ring: KeyRing) -> None:
        if self.fail:
            raise OSError("disk full")
        self.saved.append(ring)


async def test_the_service_rotates_and_prunes_on_schedule(autojump_clock: trio.testing.MockClock,
                                                          tmp_path: Path) -> None:
    import ssl

    from connector.cloud.oauth import OAuthSettings, TokenService

    settings = OAuthSettings(url="https://t.example", token_lifetime=100, key_overlap=200, rotate_after=1000)
    keys = MemoryKeys()
    service = TokenService(settings, bindings=FileBindingStore(tmp_path / "b.json"), keys=keys,
                           ssl_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
                           clock=lambda: T0 + trio.current_time())
    first = service.ring.current
    assert len(keys.saved) == 1  # created and saved before first use
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service._maintain_keys_forever)  # checks every min(60, overlap / 10) = 20 s
        await trio.sleep(999)
        assert service.ring.current is first
        await trio.sleep(21)  # the check at 1000 s rotated
        assert service.ring.current is not first and [k.kid for k in service.ring.keys][1] == first.kid
        assert keys.saved[-1] is service.ring
        keys.fail = True  # a failed save keeps the ring in use (and is retried)
        await trio.sleep(200)
        assert len(service.ring.keys) == 2
        keys.fail = False
        # 21, not 20: a check falls due every 20 s, and two tasks due at one virtual instant run
        # in either order (trio randomises it), so the assertion must come strictly after one
        await trio.sleep(21)
        assert [k.kid for k in service.ring.keys] == [service.ring.current.kid]
        nursery.cancel_scope.cancel()


def test_binding_cli_refuses_what_it_cannot_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from connector.cli import main

    without = write_cloud(tmp_path, "")
    assert main(["binding", "create", "--config", str(without), "--subaccount", "acme"]) == 2
    assert "no [oauth] section" in capsys.readouterr().err
    config = str(write_cloud(tmp_path, "[oauth]\n"))
    assert main(["binding", "create", "--config", config, "--subaccount", "nobody"]) == 2
    assert "no subaccount 'nobody'" in capsys.readouterr().err
    assert main(["binding", "revoke", "sb-unknown", "--config", config]) == 2
    assert "no binding 'sb-unknown'" in capsys.readouterr().err
    assert main(["binding", "create", "--config", config, "--subaccount", "acme", "--location", "a b"]) == 2
    assert "location id" in capsys.readouterr().err
    assert main(["binding", "list", "--config", config]) == 0 and capsys.readouterr().out == ""
