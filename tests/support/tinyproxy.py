"""Run a real tinyproxy (Debian's) on loopback for tests: the HTTP proxy a node's egress goes through.

Theory of operation
-------------------
``TinyProxy(tmp_dir, ...)`` writes a tinyproxy.conf (listen on 127.0.0.1, allow 127.0.0.1 only,
optional Basic credentials, optional list of the ports CONNECT may reach: none means any) and
``start()`` runs ``tinyproxy -d`` (foreground) with it, then waits until it logs that it accepts
connections. tinyproxy cannot be told to listen on port 0 and report the port, so a free port is
picked, released and bound by tinyproxy a moment later, as `tests.support.etcdserver` does for
etcd; when another process took it in between (tinyproxy exits with "Could not create listening
sockets" in this start's output) the start is tried again on a new port, at most
``BIND_ATTEMPTS`` times. ``kill()`` is SIGKILL and reaps. Every wait is bounded.

`tinyproxy_binary()` finds the binary or skips the test (fails it under CI, which installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support.etcdserver import BIND_ATTEMPTS, free_port

START_TIMEOUT = 10.0
BINARY = "/usr/bin/tinyproxy"  # Debian's `tinyproxy` package
ADDRESS_IN_USE = b"Could not create listening sockets"
READY = b"Accepting connections"


def tinyproxy_binary() -> str:
    """tinyproxy's path ($TINYPROXY_BINARY, PATH, Debian's); skips the test without it (fails under CI)."""
    found = os.environ.get("TINYPROXY_BINARY") or shutil.which("tinyproxy") or (
        BINARY if Path(BINARY).exists() else None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("tinyproxy is required under CI (install Debian's `tinyproxy` package)")
        pytest.skip("tinyproxy not installed (apt-get install tinyproxy)")
    return found


class TinyProxy:
    """One tinyproxy on 127.0.0.1."""

    def __init__(self, tmp_dir: Path, name: str = "tinyproxy", *, basic_auth: tuple[str, str] | None = None,
                 connect_ports: Sequence[int] = ()) -> None:
        self.binary = tinyproxy_binary()
        self.name = name
        self.basic_auth = basic_auth
        self.connect_ports = tuple(connect_ports)
        self.config_path = Path(tmp_dir) / f"{name}.conf"
        self.log_path = Path(tmp_dir) / f"{name}.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.bind_retries = 0

    @property
    def url(self) -> str:
        """The proxy's URL with this proxy's credentials (if any) in it."""
        auth = f"{self.basic_auth[0]}:{self.basic_auth[1]}@" if self.basic_auth else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    def url_with(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def config(self) -> str:
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Allow 127.0.0.1", "Timeout 60", "MaxClients 100",
                 "LogLevel Info", "DisableViaHeader Yes"]
        if self.basic_auth is not None:
            lines.append(f"BasicAuth {self.basic_auth[0]} {self.basic_auth[1]}")
        lines += [f"ConnectPort {port}" for port in self.connect_ports]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        for attempt in range(1, BIND_ATTEMPTS + 1):
            if self._start_once():
                return
            if attempt == BIND_ATTEMPTS:
                raise RuntimeError(f"tinyproxy {self.name}: no free port in {BIND_ATTEMPTS} attempts; "
                                   f"see {self.log_path}")
            self.bind_retries += 1
            self.port = free_port()

    def _start_once(self) -> bool:
        """Start and wait until it listens; False when the port was taken in between."""
        self.config_path.write_text(self.config())
        with open(self.log_path, "ab") as log:
            log_start = log.tell()
            self.process = subprocess.Popen([self.binary, "-d", "-c", str(self.config_path)],
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as log:
                log.seek(log_start)
                output = log.read()
            if self.process.poll() is not None:
                self.process = None
                if ADDRESS_IN_USE in output:
                    return False
                raise RuntimeError(f"tinyproxy exited at start; see {self.log_path}")
            if READY in output:  # logged once it listens: the port is its own, not another process's
                return True
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"tinyproxy not accepting on {self.port} within {START_TIMEOUT} s; see {self.log_path}")

    def kill(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
