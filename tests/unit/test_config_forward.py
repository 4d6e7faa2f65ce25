"""The node's [forward] limits against slow or absent applications: defaults, values, validation,
and that the node hands them to the forwarder."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import GOOD_NODE, node

from connector.agent.node import Node
from connector.cli import init_certs
from connector.config import ConfigError, load_node_config


@pytest.fixture
def files(tmp_path: Path) -> Path:
    certs = init_certs(tmp_path / "certs", "acme", ["node-a"], ["127.0.0.1"])
    (tmp_path / "node.pem").symlink_to(certs["node_node-a_cert"])
    (tmp_path / "node.key").symlink_to(certs["node_node-a_key"])
    return tmp_path


def test_forward_limits_have_safe_defaults(files: Path) -> None:
    config = load_node_config(node(files, GOOD_NODE))
    assert (config.request_head_timeout, config.min_request_body_rate, config.request_body_grace,
            config.response_write_timeout) == (30.0, 240.0, 5.0, 60.0)
    assert (config.pool_max_idle, config.pool_idle_seconds) == (32, 30.0)


def test_forward_limits_reach_the_forwarder_and_the_origin_pool(files: Path) -> None:
    body = GOOD_NODE + ("[forward]\nrequest_head_timeout = 2\nmin_request_body_rate = 1000\n"
                        "request_body_grace = 1.5\nresponse_write_timeout = 7\n"
                        "pool_max_idle = 4\npool_idle_seconds = 2.5\n")
    agent = Node(load_node_config(node(files, body)))
    settings = agent.forward_settings
    assert (settings.request_head_timeout, settings.min_request_body_rate, settings.request_body_grace,
            settings.response_write_timeout) == (2.0, 1000.0, 1.5, 7.0)
    assert (agent.origins.settings.max_idle, agent.origins.settings.idle_seconds) == (4, 2.5)
    assert agent._stream_context.pool is agent.origins  # every stream shares the node's pool


@pytest.mark.parametrize("key", ["request_head_timeout", "min_request_body_rate", "request_body_grace",
                                 "response_write_timeout", "pool_idle_seconds"])
@pytest.mark.parametrize("value", ["0", "-1", '"fast"'])
def test_forward_limits_are_validated_at_load(files: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_node_config(node(files, GOOD_NODE + f"[forward]\n{key} = {value}\n"))
    assert info.value.key == f"forward.{key}"


@pytest.mark.parametrize("value", ["-1", "1.5", '"many"'])
def test_pool_max_idle_is_a_count_of_zero_or_more(files: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_node_config(node(files, GOOD_NODE + f"[forward]\npool_max_idle = {value}\n"))
    assert info.value.key == "forward.pool_max_idle"


def test_pool_max_idle_zero_disables_pooling(files: Path) -> None:
    config = load_node_config(node(files, GOOD_NODE + "[forward]\npool_max_idle = 0\n"))
    assert config.pool_max_idle == 0


def test_retired_keepalive_timeout_is_accepted_with_a_warning(files: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Protocol 1's per-stream keep-alive is gone; an old node.toml still loads, and says why."""
    config = load_node_config(node(files, GOOD_NODE + "[forward]\nkeepalive_timeout = 9\n"))
    assert not hasattr(config, "keepalive_timeout")
    [warning] = [r for r in caplog.records if "keepalive_timeout" in r.getMessage()]
    assert warning.levelname == "WARNING"
    assert "forward.keepalive_timeout is no longer used" in warning.getMessage()
    assert "pool_idle_seconds" in warning.getMessage()


def test_no_warning_without_the_retired_key(files: Path, caplog: pytest.LogCaptureFixture) -> None:
    load_node_config(node(files, GOOD_NODE))
    assert not [r for r in caplog.records if "no longer used" in r.getMessage()]
