"""`connector acl` tells the operator what happened: who changed what when, in words; a trust
store that does not exist is refused before etcd is touched; an unreachable etcd is named."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
from pathlib import Path

from tests.support.etcdserver import free_port
from tests.support.nodeconfig import cluster_node_toml


def node_toml(tmp_path: Path, etcd_url: str) -> Path:
    return cluster_node_toml(tmp_path, "msg", [etcd_url])  # acl commands talk to etcd only


def cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "connector", "acl", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_history_names_the_account_without_user_variable_and_prints_utc_times(tmp_path, etcd):
    config = node_toml(tmp_path, etcd.url)
    systemd_like = {k: v for k, v in os.environ.items() if k not in ("USER", "LOGNAME", "SUDO_USER")}
    added = cli(config, "add", "--virtual", "erp.virtual:8000", "--internal", "10.0.0.1:80", "--path", "/sap",
                env=systemd_like)
    assert added.returncode == 0, added.stderr
    history = cli(config, "history")
    assert history.returncode == 0, history.stderr
    me = pwd.getpwuid(os.getuid()).pw_name
    line = history.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC  {re.escape(me)} +add +erp\.virtual:8000  rev \d+",
                        line), line
    raw = cli(config, "history", "--json")
    assert f'"user": "{me}"' in raw.stdout


def test_missing_trust_store_is_refused_before_etcd_is_touched(tmp_path, etcd):
    config = node_toml(tmp_path, etcd.url)
    for store, message in (("/nonexistent/ca.pem", "no such certificate file"), ("ca.pem", "absolute path")):
        refused = cli(config, "add", "--virtual", "hr.virtual:443", "--internal", "10.0.0.2:8443",
                      "--protocol", "HTTPS", "--path", "/api", "--trust-store", store)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    listed = cli(config, "list")
    assert listed.returncode == 0 and "hr.virtual" not in listed.stdout


def test_unreachable_etcd_is_named(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = cli(node_toml(tmp_path, url), "list")
    assert result.returncode == 3
    assert f"etcd unreachable at {url}" in result.stderr and "node.toml" in result.stderr
