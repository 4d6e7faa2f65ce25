"""The cloud's tunnel endpoint deadlines ([tunnel] tls_handshake_timeout, upgrade_timeout,
hello_timeout): defaults, values and validation at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.config import ConfigError, load_cloud_config
from tests.unit.test_config import GOOD_CLOUD, cloud

KEYS = ("tls_handshake_timeout", "upgrade_timeout", "hello_timeout")


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("ca.pem", "server.pem", "server.key"):
        (tmp_path / name).write_text("placeholder")
    return tmp_path


def with_tunnel_keys(lines: str) -> str:
    return GOOD_CLOUD.replace("[tunnel]\n", f"[tunnel]\n{lines}\n")


def test_defaults_are_a_few_seconds(files: Path) -> None:
    config = load_cloud_config(cloud(files, GOOD_CLOUD))
    assert (config.tls_handshake_timeout, config.upgrade_timeout, config.hello_timeout) == (5.0, 5.0, 5.0)


def test_values_are_read(files: Path) -> None:
    config = load_cloud_config(cloud(files, with_tunnel_keys(
        "tls_handshake_timeout = 1.5\nupgrade_timeout = 2\nhello_timeout = 0.5")))
    assert (config.tls_handshake_timeout, config.upgrade_timeout, config.hello_timeout) == (1.5, 2.0, 0.5)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(("value", "message"), [("0", "must be positive"), ("'5'", "got str")])
def test_bad_values_name_the_key(files: Path, key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_cloud_config(cloud(files, with_tunnel_keys(f"{key} = {value}")))
    assert info.value.key == f"tunnel.{key}"
    assert message in str(info.value)
