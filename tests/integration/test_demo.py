"""`connector demo` as a user runs it: a real process tree, queried, then stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from connector.demo import Demo, DemoSpec
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


class Output:
    """A child's stdout, read as it comes, so a test can wait for a line while the child runs."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.text = ""
        self.changed = trio.Event()
        self.closed = False

    async def pump(self) -> None:
        while chunk := await self.stream.receive_some():
            self.text += chunk.decode(errors="replace")
            self.changed.set()
            self.changed = trio.Event()
        self.closed = True
        self.changed.set()

    async def wait_for(self, needle: str) -> None:
        while needle not in self.text:
            if self.closed:
                raise AssertionError(f"output ended without {needle!r}:\n{self.text}")
            await self.changed.wait()


async def test_demo_runs_serves_reports_status_and_stops_cleanly(tmp_path: Path):
    state_file = tmp_path / "state.json"
    env = {**os.environ, "CONNECTOR_DEMO_POINTER": str(tmp_path / "pointer.json")}
    demo = await trio.lowlevel.open_process(
        [sys.executable, "-m", "connector", "demo", "--dir", str(tmp_path / "demo"), "--state-file", str(state_file),
         "--http-port", "0", "--socks5-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    assert demo.stdout is not None
    output = Output(demo.stdout)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(output.pump)
            with trio.fail_after(START_TIMEOUT):
                await output.wait_for("connector switch")  # the banner's last line: the state file is written
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

            # the banner's SOCKS5 example, pasted as a user would: it prints the echo and exits
            socks_example = next(line for line in output.text.splitlines() if "--socks5-hostname" in line)
            with trio.fail_after(20):
                pasted = await trio.run_process(["bash", "-c", socks_example], capture_stdout=True, check=False)
            assert (pasted.returncode, pasted.stdout) == (0, b"hello")

            # `connector status` with no argument finds the running demo, and says which one
            status = await trio.run_process(
                [sys.executable, "-m", "connector", "status", "--json"], capture_stdout=True, env=env, check=False
            )
            assert status.returncode == 0, status.stdout
            rows = [json.loads(line) for line in status.stdout.decode().splitlines()]
            assert {row["node"] for row in rows} == set(state["nodes"])
            masters = [row for row in rows if row["role"] == "master"]
            assert len(masters) == 1 and masters[0]["epoch"] > 0
            assert {row["pid"] for row in rows} == {info["pid"] for info in state["nodes"].values()}
            assert {(row["cluster"], row["config"]) for row in rows} == {("demo", state["nodes"]["node-a"]["config"])}
            text = await trio.run_process(
                [sys.executable, "-m", "connector", "status"], capture_stdout=True, env=env, check=False
            )
            assert text.stdout.decode().splitlines()[0] == (
                f"cluster demo (config {state['nodes']['node-a']['config']}, the demo of pid {state['pid']} "
                f"in {state['workdir']}; --config picks another)")
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
    assert "curl -x http://127.0.0.1:" in output.text  # the ready-to-paste command was printed
    await _assert_no_strays(state)
    assert not (tmp_path / "pointer.json").exists()


async def _assert_no_strays(state: dict) -> None:
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in _pids(state).values()) and time.monotonic() < deadline:  # noqa: ASYNC110 - other processes: only their pids to poll
        await trio.sleep(0.05)
    assert not [name for name, pid in _pids(state).items() if _alive(pid)], "stray processes after Ctrl-C"


async def test_a_busy_proxy_port_is_named_and_the_log_is_kept(tmp_path: Path):
    """Before: "see /tmp/connector-demo-x/logs/cloud.log" and that directory already deleted;
    the cause only in it, as a bare "Address already in use"."""
    env = {**os.environ, "CONNECTOR_DEMO_POINTER": str(tmp_path / "pointer.json"), "TMPDIR": str(tmp_path)}
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with trio.fail_after(START_TIMEOUT):
            result = await trio.run_process(
                [sys.executable, "-m", "connector", "demo", "--http-port", str(port), "--socks5-port", "0"],
                capture_stdout=True, capture_stderr=True, env=env, check=False)
    errors = result.stderr.decode().splitlines()
    assert result.returncode == 1, errors
    assert len(errors) == 2, errors  # what failed, and where the logs are
    assert f"port {port} is in use by another process: choose another with --http-port N" in errors[0]
    assert f"127.0.0.1:{port} (set by [proxy] http_listen)" in errors[0]
    logs = Path(errors[1].removeprefix("  logs kept in ").strip())
    assert logs.is_relative_to(tmp_path)  # the demo's own temporary directory, kept
    assert f"127.0.0.1:{port}" in (logs / "cloud.log").read_text()


class _PortTakenOnce(Demo):
    """The race as it happens on a shared machine: the first port the demo picks for a child is
    taken by another process (the squatter) before that child binds it."""

    def __init__(self, workdir: Path, squatter: socket.socket) -> None:
        super().__init__(workdir, DemoSpec(http_port=0, socks5_port=0))
        self.squatter = squatter

    def pick_port(self, name: str) -> int:
        if name == "tunnel" and self.port_retries == 0:
            return int(self.squatter.getsockname()[1])
        return super().pick_port(name)


async def test_a_picked_port_taken_by_another_process_costs_one_more_start(tmp_path: Path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        demo = _PortTakenOnce(tmp_path, squatter)
        try:
            with trio.fail_after(START_TIMEOUT):
                state = await demo.start()
            assert demo.port_retries == 1
            assert state["cloud"]["tunnel_port"] != squatter.getsockname()[1]
            assert "Address already in use" in (tmp_path / "logs" / "cloud.log").read_text()  # the real failure
        finally:
            with trio.CancelScope(shield=True):
                await demo.stop()
    await _assert_no_strays(state)


REPO = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


async def test_scripts_dev_demo_on_the_system_python_with_a_system_path(tmp_path: Path):
    """The README's demo command as a newcomer on Debian runs it: `scripts/dev demo` with nothing
    but the system directories on PATH (no pyenv, no activated venv). It installs what is missing
    into the project's .venv (nothing, when CI's `scripts/dev test` ran first), comes up, and
    stops cleanly on Ctrl-C."""
    state_file = tmp_path / "state.json"
    env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", str(tmp_path)),
           "CONNECTOR_DEMO_POINTER": str(tmp_path / "pointer.json")}
    demo = await trio.lowlevel.open_process(
        ["bash", str(REPO / "scripts" / "dev"), "demo", "--dir", str(tmp_path / "demo"),
         "--state-file", str(state_file), "--http-port", "0", "--socks5-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )
    assert demo.stdout is not None
    output = Output(demo.stdout)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(output.pump)
            with trio.fail_after(START_TIMEOUT + 240):  # a first run creates the venv
                await output.wait_for("connector switch")
            state = json.loads(state_file.read_text())
            assert state["pid"] == demo.pid  # scripts/dev exec'd the demo
            interpreter = (await trio.Path(f"/proc/{demo.pid}/cmdline").read_bytes()).split(b"\0")[0].decode()
            assert interpreter == ".venv/bin/python"  # run from the repository, where scripts/dev cd'ed
            assert await trio.Path(f"/proc/{demo.pid}/cwd").resolve() == REPO
            assert str(await trio.Path(f"/proc/{demo.pid}/exe").resolve()).startswith("/usr/bin/python3")  # Debian's
            # another shell has no .venv/bin on PATH: the banner names the script in full
            assert f"  {REPO}/.venv/bin/connector status\n" in output.text
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
    await _assert_no_strays(state)
