"""`connector demo` as a user runs it: a real process tree, queried, then stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from tests.support.httpclient import HttpClient

pytestmark = pytest.mark.slow

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while chunk := await stream.receive_some():
        chunks.append(chunk)
    return b"".join(chunks)


def _pids(state: dict) -> dict[str, int]:
    pids = {"etcd": state["etcd"]["pid"], "backend": state["backend"]["pid"], "cloud": state["cloud"]["pid"]}
    pids.update({name: info["pid"] for name, info in state["nodes"].items()})
    return pids


async def test_demo_runs_serves_reports_status_and_stops_cleanly(tmp_path: Path):
    state_file = tmp_path / "state.json"
    env = {**os.environ, "CONNECTOR_DEMO_POINTER": str(tmp_path / "pointer.json")}
    demo = await trio.lowlevel.open_process(
        [sys.executable, "-m", "connector", "demo", "--dir", str(tmp_path / "demo"), "--state-file", str(state_file),
         "--http-port", "0", "--socks5-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    assert demo.stdout is not None
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not state_file.exists():
            if demo.poll() is not None:
                raise AssertionError((await _read_all(demo.stdout)).decode())
            assert time.monotonic() < deadline, "demo did not write its state file in time"
            await trio.sleep(0.1)
        await trio.sleep(0.1)
        state = json.loads(state_file.read_text())
        assert oct(state_file.stat().st_mode & 0o777) == "0o600"  # it holds the token
        assert state["cloud"]["metrics_url"].endswith("/metrics")
        assert all(info["metrics_url"] for info in state["nodes"].values())
        assert len(state["nodes"]) == 2

        client = await HttpClient.connect(state["cloud"]["http_proxy_port"])
        response = await client.request(
            "GET", "http://erp.virtual:8000/sap/opu/odata/x", [("Proxy-Authorization", f"Bearer {state['token']}")]
        )
        assert response.status == 200, response.body
        assert response.json()["path"] == "/sap/opu/odata/x"

        # `connector status` with no argument finds the running demo
        status = await trio.run_process(
            [sys.executable, "-m", "connector", "status", "--json"], capture_stdout=True, env=env, check=False
        )
        assert status.returncode == 0, status.stdout
        rows = [json.loads(line) for line in status.stdout.decode().splitlines()]
        assert {row["node"] for row in rows} == set(state["nodes"])
        masters = [row for row in rows if row["role"] == "master"]
        assert len(masters) == 1 and masters[0]["epoch"] > 0
        assert {row["pid"] for row in rows} == {info["pid"] for info in state["nodes"].values()}
    finally:
        demo.send_signal(signal.SIGINT)
        with trio.move_on_after(STOP_TIMEOUT) as stopping:
            output = (await _read_all(demo.stdout)).decode()
            await demo.wait()
        if stopping.cancelled_caught:
            demo.kill()
            raise subprocess.TimeoutExpired(demo.args, STOP_TIMEOUT)
    assert demo.returncode == 0, output
    assert "curl -x http://127.0.0.1:" in output  # the ready-to-paste command was printed
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in _pids(state).values()) and time.monotonic() < deadline:  # noqa: ASYNC110 - other processes: only their pids to poll
        await trio.sleep(0.05)
    assert not [name for name, pid in _pids(state).items() if _alive(pid)], "stray processes after Ctrl-C"
    assert not (tmp_path / "pointer.json").exists()
