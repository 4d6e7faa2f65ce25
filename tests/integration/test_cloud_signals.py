"""`connector cloud` and its signals: SIGTERM drains (not ready at once), a second one stops at once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import trio

from connector.admin import http_request
from connector.cli import init_certs
from connector.cloud.auth import hash_token, new_token
from connector.demo import DemoSpec, cloud_toml, free_port

TEST_TIMEOUT = 30.0
NOTICE = 60.0  # far longer than the test: only the second signal can end the drain in time


async def test_sigterm_turns_not_ready_at_once_and_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    certs = init_certs(tmp_path / "certs", "demo", ["node-a"], ["127.0.0.1"])
    ports = {name: free_port() for name in ("tunnel", "http", "socks5", "admin", "destinations")}
    (tmp_path / "state").mkdir()
    config = tmp_path / "cloud.toml"
    config.write_text(cloud_toml(
        certs, hash_token(new_token()), DemoSpec(), [], tunnel=ports["tunnel"], http=ports["http"],
        socks5=ports["socks5"], admin=ports["admin"], destinations=ports["destinations"],
        replica=f'\n[replica]\nid = "cloud-9"\n\n[drain]\nnotice_seconds = {NOTICE}\n'))
    log = open(tmp_path / "cloud.log", "wb")  # noqa: SIM115, ASYNC230 - owned by the child
    process = await trio.lowlevel.open_process([sys.executable, "-m", "connector", "cloud", "--config", str(config)],
                                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        with trio.fail_after(TEST_TIMEOUT):
            while True:
                try:
                    status, body = await http_request("127.0.0.1", ports["admin"], "/readyz", timeout=1.0)
                    break
                except OSError:
                    await trio.sleep(0.05)  # another process: its port is all there is to poll
            assert (status, json.loads(body)) == (200, {"ready": True, "reason": "serving", "replica": "cloud-9"})

            process.send_signal(signal.SIGTERM)
            while status == 200:
                status, body = await http_request("127.0.0.1", ports["admin"], "/readyz", timeout=1.0)
            assert status == 503 and json.loads(body)["reason"].startswith("draining")
            assert process.poll() is None  # draining: the notice runs for a minute
            stream = await trio.open_tcp_stream("127.0.0.1", ports["http"])  # still accepting meanwhile
            await stream.aclose()

            process.send_signal(signal.SIGTERM)
            with trio.fail_after(5):
                await process.wait()
        assert process.returncode == 0
        assert "again, stopping at once" in (tmp_path / "cloud.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            await process.wait()
