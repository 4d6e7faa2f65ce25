"""The cloud's per-client limits load from [proxy] and [[subaccounts]], validated at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.cloud.admission import StreamLimits
from connector.cloud.clients import AuthThrottleSettings
from connector.config import ConfigError, load_cloud_config

SHA = "a" * 64
CLOUD = f"""
[tunnel]
cert = "server.pem"
key = "server.key"
[proxy]
{{proxy}}
[[subaccounts]]
id = "acme"
ca = "ca.pem"
token_sha256 = ["{SHA}"]
{{subaccount}}
[[subaccounts]]
id = "other"
ca = "ca.pem"
"""


def load(tmp_path: Path, proxy: str = "", subaccount: str = ""):
    for name in ("ca.pem", "server.pem", "server.key"):
        (tmp_path / name).write_text("placeholder")
    path = tmp_path / "cloud.toml"
    path.write_text(CLOUD.format(proxy=proxy, subaccount=subaccount))
    return load_cloud_config(path)


def test_defaults_are_on(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.stream_wait_seconds == 5.0
    assert config.stream_limits == StreamLimits(per_token=256, per_client_address=512)
    assert config.auth_throttle == AuthThrottleSettings()
    assert (config.auth_throttle.failures, config.auth_throttle.delay) == (10, 1.0)


def test_settings_and_a_per_subaccount_token_limit(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "stream_wait_seconds = 2\nmax_streams_per_token = 8\nmax_streams_per_client_address = 0\n"
        "auth_failures_before_delay = 3\nauth_failure_delay = 0.5\nauth_failure_max_delay = 2\n"
        "auth_failure_memory_seconds = 30\nauth_tracked_addresses = 100",
        "max_streams_per_token = 64",
    )
    assert config.stream_wait_seconds == 2.0
    assert config.stream_limits.for_subaccount("acme") == 64
    assert config.stream_limits.for_subaccount("other") == 8
    assert config.stream_limits.per_client_address == 0
    assert config.auth_throttle == AuthThrottleSettings(
        failures=3, delay=0.5, max_delay=2.0, forget_after=30.0, max_addresses=100
    )


@pytest.mark.parametrize(
    ("proxy", "subaccount", "key", "message"),
    [
        ("stream_wait_seconds = 0", "", "proxy.stream_wait_seconds", "must be positive"),
        ("max_streams_per_token = -1", "", "proxy.max_streams_per_token", "at least 0"),
        ("max_streams_per_client_address = 'many'", "", "proxy.max_streams_per_client_address", "an integer"),
        ("", "max_streams_per_token = -5", "subaccounts[0].max_streams_per_token", "at least 0"),
        ("auth_failure_delay = 3\nauth_failure_max_delay = 1", "", "proxy.auth_failure_max_delay",
         "at least auth_failure_delay"),
        ("auth_tracked_addresses = 0", "", "proxy.auth_tracked_addresses", "at least 1"),
        ("auth_failures_before_delay = -1", "", "proxy.auth_failures_before_delay", "at least 0"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, proxy: str, subaccount: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(tmp_path, proxy, subaccount)
    assert error.value.key == key and message in str(error.value)
