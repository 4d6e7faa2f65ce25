"""Run real single-member etcd servers for tests: own ports, own data dir, SIGKILL at the end.

Theory of operation
-------------------
``EtcdServer(tmp_dir)`` picks two free loopback ports (client and peer), and ``start()`` runs
the ``etcd`` binary (``$ETCD_BINARY``, else the one on PATH) with fast test timers
(``--heartbeat-interval 10 --election-timeout 100``: healthy in about 0.1 s) and waits until a
client request succeeds. ``kill()`` is SIGKILL; ``stop()`` is SIGTERM, a graceful stop that
flushes etcd's backend (so whatever was applied, issued auth tokens included, is not replayed
from the WAL on the next start); ``restart(graceful=...)`` stops it either way and starts it
again on the same ports and data (so revisions survive); ``freeze()``/``thaw()`` are
SIGSTOP/SIGCONT, the "frozen etcd" fault. Every wait is bounded.

etcd cannot listen on port 0 usefully (it must advertise the port it listens on), so a port is
picked, released, and bound by etcd a moment later; on a shared machine another process may take
it in between. ``start()`` recognises that exact failure (``bind: address already in use`` in
this start's log) and tries again, on new ports for a first start and on the same ports (which
its clients know) for a restart, at most ``BIND_ATTEMPTS`` times.
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
STOP_TIMEOUT = 10.0
BIND_ATTEMPTS = 5
BIND_RETRY_DELAY = 0.2  # a restart waits this long for a taken port to be released
ADDRESS_IN_USE = b"bind: address already in use"


class PortTaken(RuntimeError):
    """etcd exited because another process holds one of its ports."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def etcd_binary() -> str:
    found = os.environ.get("ETCD_BINARY") or shutil.which("etcd")
    if not found:
        raise RuntimeError("no etcd binary: sudo apt-get install etcd-server (scripts/dev does), "
                           "or set ETCD_BINARY=PATH")
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
        self.started_once = False  # after the first start, clients know the ports: keep them
        self.bind_retries = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"etcd {self.name} is already running")
        for attempt in range(1, BIND_ATTEMPTS + 1):
            try:
                self._start_once()
                self.started_once = True
                return
            except PortTaken:
                if attempt == BIND_ATTEMPTS:
                    raise
                self.bind_retries += 1
                if self.started_once:
                    time.sleep(BIND_RETRY_DELAY)  # another process's port: nothing to wait on
                else:  # nothing of value yet: bootstrap afresh on new ports
                    shutil.rmtree(self.data_dir, ignore_errors=True)
                    self.client_port, self.peer_port = free_port(), free_port()

    def command(self) -> list[str]:
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
            "--initial-cluster-token", f"test-{self.name}",
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
        ]
        if self.tls:
            cert, key, _ = self.tls
            args += ["--cert-file", str(cert), "--key-file", str(key)]
        return args

    def _start_once(self) -> None:
        with open(self.log_path, "ab") as log:
            log_start = log.tell()
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except RuntimeError:
            if self.process.poll() is not None:
                with open(self.log_path, "rb") as log:
                    log.seek(log_start)
                    if ADDRESS_IN_USE in log.read():
                        self.process = None
                        raise PortTaken(f"etcd {self.name}: a port was taken; see {self.log_path}") from None
            raise

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
            time.sleep(0.05)  # another process (in a worker thread): only its answers to poll
        raise RuntimeError(f"etcd not ready within {timeout} s ({last}); see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL and reap (thawing first is unnecessary: SIGKILL works on stopped processes)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        """SIGTERM and reap: etcd stops gracefully, committing its backend."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
        self.process = None

    def restart(self, *, graceful: bool = False) -> None:
        self.stop() if graceful else self.kill()
        self.start()

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
