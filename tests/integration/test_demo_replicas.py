"""`connector demo --cloud-replicas 2`: the replicas, a cloud etcd and HAProxy come up and go away.

A real process tree started as a user does, its state file read, requests sent through the front
door, then Ctrl-C: nothing may be left running, HAProxy and the cloud etcd included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from connector.demo import nodes_dial_every_replica
from tests.integration.test_demo import Output, _alive, _read_all
from tests.support.httpclient import HttpClient

pytestmark = pytest.mark.slow

START_TIMEOUT = 90.0
STOP_TIMEOUT = 40.0
URL = "http://erp.virtual:8000/sap/opu/odata/x"
NEEDS_NODES_ON_EVERY_REPLICA = pytest.mark.xfail(
    not nodes_dial_every_replica(), strict=True,
    reason="a node dials one [tunnel] url on this branch (list-valued urls come with issue 10's node side): "
           "the demo's nodes hold tunnels to cloud-1 only, so requests HAProxy sends to cloud-2 find no master")


def all_pids(state: dict) -> dict[str, int]:
    pids = {"etcd": state["etcd"]["pid"], "backend": state["backend"]["pid"], "front": state["front"]["pid"],
            "cloud_etcd": state["cloud_etcd"]["pid"]}
    pids.update({replica["id"]: replica["pid"] for replica in state["cloud_replicas"]})
    pids.update({name: info["pid"] for name, info in state["nodes"].items()})
    return pids


async def get(port: int, token: str) -> int:
    client = await HttpClient.connect(port)
    try:
        response = await client.request("GET", URL, [("Proxy-Authorization", f"Bearer {token}")])
        return response.status
    finally:
        await client.aclose()


async def run_demo(tmp_path: Path, check: object) -> dict:
    """Start the demo with two replicas, await `check(state)`, Ctrl-C it; assert nothing strays."""
    state_file = tmp_path / "state.json"
    env = {**os.environ, "CONNECTOR_DEMO_POINTER": str(tmp_path / "pointer.json")}
    demo = await trio.lowlevel.open_process(
        [sys.executable, "-m", "connector", "demo", "--cloud-replicas", "2", "--dir", str(tmp_path / "demo"),
         "--state-file", str(state_file), "--http-port", "0", "--socks5-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    assert demo.stdout is not None
    output = Output(demo.stdout)
    state: dict = {}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(output.pump)
            with trio.fail_after(START_TIMEOUT):
                await output.wait_for("connector switch")
            state = json.loads(state_file.read_text())
            await check(state)  # type: ignore[operator]
            nursery.cancel_scope.cancel()
    finally:
        demo.send_signal(signal.SIGINT)
        with trio.move_on_after(STOP_TIMEOUT) as stopping:
            output.text += (await _read_all(demo.stdout)).decode(errors="replace")
            await demo.wait()
        if stopping.cancelled_caught:
            demo.kill()
            raise subprocess.TimeoutExpired(demo.args, STOP_TIMEOUT)
    assert demo.returncode == 0, output.text
    assert "front door" in output.text and "cloud-2" in output.text, output.text
    with trio.fail_after(10):
        while [name for name, pid in all_pids(state).items() if _alive(pid)]:  # noqa: ASYNC110 - other processes
            await trio.sleep(0.05)
    return state


async def test_two_replicas_come_up_behind_haproxy_and_leave_no_stray(tmp_path: Path) -> None:
    async def check(state: dict) -> None:
        front, replicas = state["front"], state["cloud_replicas"]
        assert set(front) >= {"pid", "http_proxy_port", "socks5_port", "destinations_port"}
        assert [r["id"] for r in replicas] == ["cloud-1", "cloud-2"]
        for replica in replicas:
            assert set(replica) >= {"pid", "admin_port", "metrics_url", "tunnel_port", "http_proxy_port", "socks5_port"}
            assert replica["metrics_url"] == f"http://127.0.0.1:{replica['admin_port']}/metrics"
        assert state["cloud_etcd"]["client_url"].startswith("http://127.0.0.1:")
        assert state["cloud_etcd"]["client_url"] != state["etcd"]["client_url"]  # two etcd clusters
        # today's keys are kept: `cloud` is the first replica, its request ports the front door's
        assert state["cloud"]["pid"] == replicas[0]["pid"]
        assert state["cloud"]["http_proxy_port"] == front["http_proxy_port"]
        assert len(set(all_pids(state).values())) == len(all_pids(state))
        # HAProxy alternates: one of two requests reaches cloud-1, which holds the master's tunnel
        statuses = [await get(front["http_proxy_port"], state["token"]) for _ in range(2)]
        assert 200 in statuses, statuses

    with trio.fail_after(START_TIMEOUT + STOP_TIMEOUT + 60):
        await run_demo(tmp_path, check)


@NEEDS_NODES_ON_EVERY_REPLICA
async def test_every_request_through_the_front_door_is_served(tmp_path: Path) -> None:
    async def check(state: dict) -> None:
        statuses = [await get(state["front"]["http_proxy_port"], state["token"]) for _ in range(6)]
        assert statuses == [200] * 6

    with trio.fail_after(START_TIMEOUT + STOP_TIMEOUT + 60):
        await run_demo(tmp_path, check)


async def test_a_busy_front_door_port_is_named(tmp_path: Path) -> None:
    """HAProxy cannot bind port 0: a taken --http-port is reported naming the option, nothing strays."""
    import socket

    env = {**os.environ, "CONNECTOR_DEMO_POINTER": str(tmp_path / "pointer.json")}
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with trio.fail_after(START_TIMEOUT):
            result = await trio.run_process(
                [sys.executable, "-m", "connector", "demo", "--cloud-replicas", "2", "--http-port", str(port),
                 "--socks5-port", "0", "--dir", str(tmp_path / "demo")],
                capture_stdout=True, capture_stderr=True, env=env, check=False)
    assert result.returncode == 1
    first = result.stderr.decode().splitlines()[0]
    assert f"port {port} is in use by another process: choose another with --http-port N" in first
    assert "haproxy" in first
    assert (tmp_path / "demo" / "logs" / "haproxy.log").exists()  # the log it points to is kept
    assert processes_naming(str(tmp_path / "demo")) == []


def processes_naming(text: str) -> list[str]:
    """Pids of the processes whose command line contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(proc.name)
        except OSError:
            continue  # gone meanwhile
    return found
