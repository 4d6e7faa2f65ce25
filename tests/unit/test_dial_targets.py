"""Where a node dials: configured URLs (one or a list), their names' addresses, announced replicas."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.config import ConfigError, load_node_config
from connector.tunnel.dial import DialTarget, dial_targets, is_address

A = "wss://10.0.0.1:8443/tunnel"
NAME = "wss://cloud.example:8443/tunnel"


def test_an_address_url_is_dialled_as_is() -> None:
    assert dial_targets([A], {}, []) == {DialTarget(A)}


def test_a_name_is_dialled_at_each_of_its_addresses() -> None:
    targets = dial_targets([NAME], {NAME: ["10.0.0.2", "10.0.0.3"]}, [])
    assert targets == {DialTarget(NAME, "10.0.0.2"), DialTarget(NAME, "10.0.0.3")}
    assert {t.host for t in targets} == {"cloud.example"}  # the TLS server name stays the name
    assert DialTarget(NAME, "10.0.0.2").key == f"{NAME}@10.0.0.2"


def test_a_name_not_resolved_yet_is_dialled_by_name() -> None:
    assert dial_targets([NAME], {NAME: []}, []) == {DialTarget(NAME)}


def test_announced_replicas_join_the_configured_ones_once() -> None:
    announced = ["wss://10.0.0.9:8443/tunnel", A]
    assert dial_targets([A], {}, announced) == {DialTarget(A), DialTarget("wss://10.0.0.9:8443/tunnel")}


@pytest.mark.parametrize(("host", "address"), [("127.0.0.1", True), ("::1", True), ("localhost", False),
                                               ("cloud-0.cloud.svc", False)])
def test_is_address(host: str, address: bool) -> None:
    assert is_address(host) is address


NODE = """
[node]
id = "node-a"
subaccount = "acme"
[tunnel]
url = {url}
cert = "{cert}"
key = "{cert}"
"""


def _load(tmp_path: Path, url: str):  # type: ignore[no-untyped-def]
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    path = tmp_path / "node.toml"
    path.write_text(NODE.format(url=url, cert=cert))
    return load_node_config(path)


def test_tunnel_url_may_be_a_list(tmp_path: Path) -> None:
    config = _load(tmp_path, f'["{A}", "{NAME}"]')
    assert config.tunnel_urls == (A, NAME)
    assert config.tunnel_url == A
    assert _load(tmp_path, f'"{A}"').tunnel_urls == (A,)


@pytest.mark.parametrize(("url", "key", "message"), [
    ("[]", "tunnel.url", "needs at least one URL"),
    ('"https://x/tunnel"', "tunnel.url", "must be wss://"),
    (f'["{A}", "ws://x/tunnel"]', "tunnel.url[1]", "must be wss://"),
    (f'["{A}", 3]', "tunnel.url[1]", "must be a string"),
    (f'["{A}", "{A}"]', "tunnel.url", "lists a URL twice"),
    ('"wss://x:99999/tunnel"', "tunnel.url", "invalid port"),
    ("3", "tunnel.url", "must be a string or a list"),
])
def test_bad_tunnel_urls_are_refused_naming_the_key(tmp_path: Path, url: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, url)
    assert error.value.key == key
    assert message in str(error.value)
