"""[proxy] deadlines, the minimum request body rate and the cloud audit log: loaded, defaulted,
validated, and turned into the HTTP proxy's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.cloud.proxy import ProxySettings
from connector.cloud.server import proxy_settings
from connector.config import ConfigError, load_cloud_config
from connector.datarate import MinDataRate
from tests.unit.test_config import GOOD_CLOUD, cloud, files  # noqa: F401  # files: fixture


def test_defaults_are_the_proxys_own(files: Path) -> None:  # noqa: F811
    config = load_cloud_config(cloud(files, GOOD_CLOUD))
    assert proxy_settings(config) == ProxySettings()
    assert config.audit_log is None


def test_settings_are_read(files: Path) -> None:  # noqa: F811
    body = GOOD_CLOUD + """
[proxy]
audit_log = "logs/cloud-audit.jsonl"
request_head_timeout = 5
idle_timeout = 60.0
min_request_body_rate = 1000
request_body_grace = 2.5
response_write_timeout = 20
"""
    config = load_cloud_config(cloud(files, body))
    assert config.audit_log == files / "logs" / "cloud-audit.jsonl"
    assert proxy_settings(config) == ProxySettings(
        request_head_timeout=5.0, idle_timeout=60.0,
        request_body_rate=MinDataRate(1000.0, 2.5), response_write_timeout=20.0,
    )


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ("request_head_timeout = 0", "proxy.request_head_timeout", "must be positive"),
        ("min_request_body_rate = 0", "proxy.min_request_body_rate", "must be positive"),
        ("request_body_grace = -5", "proxy.request_body_grace", "must be positive"),
        ('response_write_timeout = "long"', "proxy.response_write_timeout", "must be an integer or a number"),
        ("header_timeout = 5", "proxy.header_timeout", "unknown key"),
    ],
)
def test_bad_values_name_the_key(files: Path, line: str, key: str, message: str) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match=message) as info:
        load_cloud_config(cloud(files, GOOD_CLOUD + f"\n[proxy]\n{line}\n"))
    assert info.value.key == key


def test_a_retired_key_is_accepted_with_a_warning_that_says_why(
        files: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    # stream_idle_timeout released idle streams of version 1; every request has its own stream now
    config = load_cloud_config(cloud(files, GOOD_CLOUD + "\n[proxy]\nstream_idle_timeout = 1.5\n"))
    assert proxy_settings(config) == ProxySettings()
    assert any("proxy.stream_idle_timeout is no longer used" in r.getMessage()
               and "its own tunnel stream" in r.getMessage() for r in caplog.records)
