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
            config.response_write_timeout, config.keepalive_timeout) == (30.0, 240.0, 5.0, 60.0, 120.0)


def test_forward_limits_reach_the_forwarder(files: Path) -> None:
    body = GOOD_NODE + ("[forward]\nrequest_head_timeout = 2\nmin_request_body_rate = 1000\n"
                        "request_body_grace = 1.5\nresponse_write_timeout = 7\nkeepalive_timeout = 9\n")
    settings = Node(load_node_config(node(files, body))).forward_settings
    assert (settings.request_head_timeout, settings.min_request_body_rate, settings.request_body_grace,
            settings.response_write_timeout, settings.keepalive_timeout) == (2.0, 1000.0, 1.5, 7.0, 9.0)


@pytest.mark.parametrize("key", ["request_head_timeout", "min_request_body_rate", "request_body_grace",
                                 "response_write_timeout", "keepalive_timeout"])
@pytest.mark.parametrize("value", ["0", "-1", '"fast"'])
def test_forward_limits_are_validated_at_load(files: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_node_config(node(files, GOOD_NODE + f"[forward]\n{key} = {value}\n"))
    assert info.value.key == f"forward.{key}"
