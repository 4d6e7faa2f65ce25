"""Which proxy a node's tunnel goes through: [tunnel] proxy, https_proxy, no_proxy (connector.tunnel.egress)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from connector.cli import init_certs
from connector.config import ConfigError, load_node_config
from connector.tunnel.egress import (
    EgressPolicy,
    EgressProxy,
    bypasses,
    egress_policy,
    parse_proxy_url,
)

CLOUD = "cloud.example"
ENV_PROXY = {"https_proxy": "http://proxy.corp:3128"}


# --- the key against the environment ------------------------------------------------------------


def test_no_key_and_no_environment_is_direct() -> None:
    assert egress_policy(None, {}) == EgressPolicy()
    assert egress_policy(None, {}).proxy_for(CLOUD, 443) is None


def test_environment_https_proxy_is_used_without_the_key() -> None:
    proxy = egress_policy(None, ENV_PROXY).proxy_for(CLOUD, 443)
    assert proxy == EgressProxy("proxy.corp", 3128, source="https_proxy")


def test_lowercase_variable_wins_over_uppercase_and_empty_counts_as_unset() -> None:
    both = {"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2"}
    assert egress_policy(None, both).proxy == EgressProxy("low", 1, source="https_proxy")
    only_upper = {"https_proxy": "", "HTTPS_PROXY": "http://up:2"}
    assert egress_policy(None, only_upper).proxy == EgressProxy("up", 2, source="HTTPS_PROXY")


def test_http_proxy_alone_is_not_used_for_the_wss_tunnel() -> None:
    assert egress_policy(None, {"http_proxy": "http://proxy.corp:3128"}).proxy is None


def test_the_key_overrides_the_environment_and_its_no_proxy() -> None:
    policy = egress_policy("http://mine:8080", {**ENV_PROXY, "no_proxy": CLOUD})
    assert policy.proxy_for(CLOUD, 443) == EgressProxy("mine", 8080, source="[tunnel] proxy")


@pytest.mark.parametrize("value", ["none", "NONE", "", "  "])
def test_key_none_or_empty_disables_the_environment_proxy(value: str) -> None:
    assert egress_policy(value, ENV_PROXY).proxy_for(CLOUD, 443) is None


def test_environment_proxy_skips_loopback_but_the_key_does_not() -> None:
    env = egress_policy(None, ENV_PROXY)
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost", "LOCALHOST.", "node.localhost"):
        assert env.proxy_for(host, 443) is None, host
    assert env.proxy_for("10.0.0.1", 443) is not None
    assert egress_policy("http://mine:8080", {}).proxy_for("127.0.0.1", 443) is not None


def test_environment_no_proxy_exempts_hosts() -> None:
    policy = egress_policy(None, {**ENV_PROXY, "NO_PROXY": "internal.example, .corp"})
    assert policy.proxy_for("internal.example", 443) is None
    assert policy.proxy_for("a.corp", 443) is None
    assert policy.proxy_for(CLOUD, 443) is not None


# --- no_proxy as curl and requests read it ------------------------------------------------------


@pytest.mark.parametrize(("entries", "host", "port", "exempt"), [
    (["*"], CLOUD, 443, True),
    ([CLOUD], CLOUD, 443, True),
    ([CLOUD], "eu." + CLOUD, 443, True),  # a name covers its subdomains
    (["." + CLOUD], "eu." + CLOUD, 443, True),
    (["*." + CLOUD], "eu." + CLOUD, 443, True),
    (["." + CLOUD], CLOUD, 443, True),
    ([CLOUD], "notcloud.example", 443, False),  # a suffix, but not a subdomain
    ([CLOUD], "cloud.example.org", 443, False),
    (["Cloud.Example"], CLOUD + ".", 443, True),  # case and the trailing dot do not matter
    ([f"{CLOUD}:8443"], CLOUD, 8443, True),  # a port limits the entry to that port
    ([f"{CLOUD}:8443"], CLOUD, 443, False),
    (["10.1.2.3"], "10.1.2.3", 443, True),
    (["10.1.2.3"], "10.1.2.4", 443, False),
    (["10.0.0.0/8"], "10.200.0.1", 443, True),  # CIDR, as requests and curl >= 7.86
    (["10.0.0.0/8"], "11.0.0.1", 443, False),
    (["10.0.0.0/8"], CLOUD, 443, False),  # names are not resolved to match an address entry
    (["10.1.2.3:443"], "10.1.2.3", 443, True),
    (["10.1.2.3:443"], "10.1.2.3", 8443, False),
    (["fd00::/8"], "fd00::5", 443, True),
    (["[fd00::5]:443"], "fd00::5", 443, True),
    (["[fd00::5]:443"], "fd00::5", 80, False),
    (["", "  "], CLOUD, 443, False),
    ([], CLOUD, 443, False),
])
def test_no_proxy_matching(entries: list[str], host: str, port: int, exempt: bool) -> None:
    assert bypasses(entries, host, port) is exempt


# --- the proxy URL ------------------------------------------------------------------------------


def test_credentials_come_from_the_userinfo_and_are_masked_everywhere() -> None:
    proxy = parse_proxy_url("http://svc%40corp:p%3Ass@proxy.corp:3128", "[tunnel] proxy")
    assert (proxy.user, proxy.password) == ("svc@corp", "p:ss")
    assert proxy.authorization() == "Basic c3ZjQGNvcnA6cDpzcw=="  # base64("svc@corp:p:ss")
    for shown in (str(proxy), proxy.url, repr(proxy), EgressPolicy(proxy).describe()):
        assert "p:ss" not in shown and "p%3Ass" not in shown, shown
    assert str(proxy) == "http://svc%40corp:***@proxy.corp:3128"


def test_a_proxy_without_credentials_sends_no_authorization() -> None:
    proxy = parse_proxy_url("proxy.corp:3128", "https_proxy")  # no scheme: http://, as curl reads it
    assert proxy == EgressProxy("proxy.corp", 3128, source="https_proxy")
    assert proxy.authorization() is None
    assert str(proxy) == "http://proxy.corp:3128"


@pytest.mark.parametrize(("url", "message"), [
    ("https://proxy.corp:3128", "must be an http:// proxy URL"),
    ("socks5://proxy.corp:1080", "must be an http:// proxy URL"),
    ("http://proxy.corp", "needs the proxy's port"),
    ("http://proxy.corp:99999", "invalid port"),
    ("http://:3128", "names no proxy host"),
    ("http://proxy.corp:3128/path", "with no path"),
])
def test_bad_proxy_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_proxy_url(url, "[tunnel] proxy")


def test_a_bad_url_message_never_shows_the_password() -> None:
    with pytest.raises(ValueError) as caught:
        parse_proxy_url("http://user:hunter2@proxy.corp", "[tunnel] proxy")
    assert "hunter2" not in str(caught.value) and "user:***@proxy.corp" in str(caught.value)


# --- at config load -----------------------------------------------------------------------------


def node_toml(tmp_path: Path, tunnel_extra: str = "") -> Path:
    for name in ("node.pem", "node.key"):
        (tmp_path / name).write_text("placeholder")
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
id = "node-a"
subaccount = "acme"
[tunnel]
url = "wss://{CLOUD}:8443/tunnel"
cert = "node.pem"
key = "node.key"
{tunnel_extra}
""")
    return path


def test_config_reads_the_key(tmp_path: Path) -> None:
    config = load_node_config(node_toml(tmp_path, 'proxy = "http://u:pw@proxy.corp:3128"'), environ=ENV_PROXY)
    assert config.egress.proxy == EgressProxy("proxy.corp", 3128, "u", "pw")
    assert "pw" not in repr(config)


def test_config_falls_back_to_the_environment(tmp_path: Path) -> None:
    config = load_node_config(node_toml(tmp_path), environ={**ENV_PROXY, "no_proxy": "internal"})
    assert config.egress == EgressPolicy(EgressProxy("proxy.corp", 3128, source="https_proxy"), ("internal",),
                                         loopback_direct=True)


def test_config_refuses_a_bad_key_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tunnel\.proxy.*must be an http:// proxy URL"):
        load_node_config(node_toml(tmp_path, 'proxy = "https://proxy.corp:3128"'), environ={})


def test_config_refuses_a_bad_environment_proxy_naming_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"HTTPS_PROXY \(environment\) needs the proxy's port"):
        load_node_config(node_toml(tmp_path), environ={"HTTPS_PROXY": "http://proxy.corp"})


def test_check_reports_the_proxy_in_use_masked(tmp_path: Path) -> None:
    """`connector node --check` (a real process) says which proxy the tunnels will use."""
    certs = init_certs(tmp_path / "certs", "acme", ["node-a"], ["127.0.0.1"])
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
id = "node-a"
subaccount = "acme"
[tunnel]
url = "wss://{CLOUD}:8443/tunnel"
ca = "{certs['cloud_ca']}"
cert = "{certs['node_node-a_cert']}"
key = "{certs['node_node-a_key']}"
proxy = "http://svc:hunter2@proxy.corp:3128"
""")
    result = subprocess.run([sys.executable, "-m", "connector", "node", "--config", str(path), "--check"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "https_proxy": ""})
    assert result.returncode == 0, result.stderr
    assert "tunnels connect through proxy http://svc:***@proxy.corp:3128 ([tunnel] proxy)" in result.stdout
    assert "hunter2" not in result.stdout + result.stderr
