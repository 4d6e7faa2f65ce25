"""A newcomer who follows README's "Using it" top to bottom gets a proxied 200.

The README's shell block is run as written by bash in an empty directory, with `connector` and the
venv's python first on the PATH; only the fixed ports are moved to free ones (so parallel test runs
do not collide) and etcd is the test's own (the block's `etcd ... &` line is the one not run).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.etcdserver import free_port

README = Path(__file__).resolve().parents[2] / "README.md"
RUN_DEADLINE = 120.0


def using_it_block() -> str:
    section = README.read_text().split("## Using it", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "README's Using it has no sh block"
    return match.group(1)


def with_free_ports(script: str, etcd_url: str) -> str:
    tunnel, proxy, socks, admin, node_admin, backend = (free_port() for _ in range(6))
    replacements = [
        ("etcd --data-dir etcd-data >etcd.log 2>&1 &", "true  # etcd runs already: the fixture"),
        ("http://127.0.0.1:2379", etcd_url),
        ('[tunnel]\ncert = "certs/tunnel-server.pem"',
         f'[proxy]\nhttp_listen = "127.0.0.1:{proxy}"\nsocks5_listen = "127.0.0.1:{socks}"\n'
         f'[admin]\nlisten = "127.0.0.1:{admin}"\n'
         f'[tunnel]\nlisten = "127.0.0.1:{tunnel}"\ncert = "certs/tunnel-server.pem"'),
        ("localhost:8443", f"localhost:{tunnel}"),
        ("127.0.0.1:8081", f"127.0.0.1:{node_admin}"),
        ("--http-port 8000", f"--http-port {backend}"),
        ("internal_port = 8000", f"internal_port = {backend}"),
        ("127.0.0.1:20003", f"127.0.0.1:{proxy}"),
    ]
    for old, new in replacements:
        assert old in script, f"README no longer contains {old!r}: update this test with it"
        script = script.replace(old, new)
    return script


def test_readme_using_it_reaches_a_proxied_200(tmp_path, etcd):
    script = with_free_ports(using_it_block(), etcd.url)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=RUN_DEADLINE)
    finally:
        try:  # the block's background processes (cloud, node, backend) are in its process group
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    logs = {name: (tmp_path / name).read_text() for name in ("cloud.log", "node.log") if (tmp_path / name).exists()}
    assert process.returncode == 0, (err, logs)
    answer = json.loads(out.strip().splitlines()[-1])  # the internal host's answer, proxied
    assert answer["path"] == "/sap/opu/odata/x" and answer["host"] == "erp.virtual:8000"
