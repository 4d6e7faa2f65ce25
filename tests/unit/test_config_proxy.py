"""[proxy] deadlines, minimum body rates and the cloud audit log: loaded, defaulted, validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.cloud.proxy import ProxySettings
from connector.config import ConfigError, load_cloud_config
from connector.datarate import MinDataRate
from tests.unit.test_config import GOOD_CLOUD, cloud, files  # noqa: F401  # files: fixture


def test_defaults_are_the_proxys_own(files: Path) -> None:  # noqa: F811
    config = load_cloud_config(cloud(files, GOOD_CLOUD))
    assert config.http_proxy == ProxySettings()
    assert config.audit_log is None


def test_settings_are_read(files: Path) -> None:  # noqa: F811
    body = GOOD_CLOUD + """
[proxy]
audit_log = "logs/cloud-audit.jsonl"
header_timeout = 5
idle_timeout = 60.0
stream_idle_timeout = 1.5
min_request_body_rate = 1000
min_response_body_rate = 0
min_rate_grace_period = 2.5
"""
    config = load_cloud_config(cloud(files, body))
    assert config.audit_log == files / "logs" / "cloud-audit.jsonl"
    settings = config.http_proxy
    assert (settings.header_timeout, settings.idle_timeout, settings.stream_idle_timeout) == (5.0, 60.0, 1.5)
    assert settings.min_request_body_rate == MinDataRate(1000.0, 2.5)
    assert settings.min_response_body_rate == MinDataRate(0.0, 2.5)  # 0: no minimum
    assert not settings.min_response_body_rate.enabled


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ("header_timeout = 0", "proxy.header_timeout", "must be positive"),
        ("stream_idle_timeout = -1", "proxy.stream_idle_timeout", "must be positive"),
        ("min_request_body_rate = -5", "proxy.min_request_body_rate", r"0 \(no minimum\) or more"),
        ("min_rate_grace_period = 0", "proxy.min_rate_grace_period", "must be positive"),
        ('idle_timeout = "long"', "proxy.idle_timeout", "must be an integer or a number"),
    ],
)
def test_bad_values_name_the_key(files: Path, line: str, key: str, message: str) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match=message) as info:
        load_cloud_config(cloud(files, GOOD_CLOUD + f"\n[proxy]\n{line}\n"))
    assert info.value.key == key
