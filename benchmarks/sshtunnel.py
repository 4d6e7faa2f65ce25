"""The `ssh -N -R` baseline: a private sshd on 127.0.0.1 and an ssh client forwarding to the backend.

Theory of operation: the on-premise side of a reverse tunnel is the ssh client (like a connector
node it dials out), the cloud side is sshd, which listens on the forwarded ports (like the
connectivity proxy). Everything is private to one benchmark run: a temporary directory holds the
sshd config, its own host key, a fresh client key and its authorized_keys; sshd runs in the
foreground (`-D`) on a free port with `UsePAM no`, so the system sshd and its config are never
touched. The client runs with `-F /dev/null` (no user config) and `-v`, and the negotiated cipher
is read back from its log, so the report names the cipher actually measured. `stop()` kills only
the two processes it started (sshd's per-connection children exit with their connection).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import attrs
import trio

SSHD = "/usr/sbin/sshd"
READY_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sshd_config(directory: Path, port: int) -> str:
    return f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {directory}/host_ed25519
PidFile {directory}/sshd.pid
AuthorizedKeysFile {directory}/authorized_keys
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
AllowTcpForwarding remote
GatewayPorts no
X11Forwarding no
PrintMotd no
MaxStartups 100:30:200
LogLevel ERROR
"""


@attrs.define
class SshTunnel:
    """One private sshd plus one `ssh -N -R` client forwarding the backend's HTTP and TCP ports."""

    directory: Path
    backend_http_port: int
    backend_tcp_port: int
    cipher: str | None = None  # None: OpenSSH's default preference
    http_port: int = 0  # the forwarded ports, on sshd's side
    tcp_port: int = 0
    negotiated_cipher: str = "?"
    sshd: trio.Process | None = None
    ssh: trio.Process | None = None

    def _prepare(self) -> int:
        """Blocking set-up (keys, config, `sshd -t`), run in a thread; returns sshd's port."""
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        for key in ("host_ed25519", "client_ed25519"):
            command = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)]
            subprocess.run(command, check=True)
        (d / "authorized_keys").write_text((d / "client_ed25519.pub").read_text())
        os.chmod(d / "authorized_keys", 0o600)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        sshd_port = free_port()
        (d / "sshd_config").write_text(sshd_config(d, sshd_port))
        subprocess.run([SSHD, "-t", "-f", str(d / "sshd_config")], check=True)
        return sshd_port

    def ssh_argv(self, sshd_port: int) -> list[str]:
        d = self.directory
        argv = ["ssh", "-v", "-N", "-T", "-F", "/dev/null"]
        argv += ["-R", f"127.0.0.1:{self.http_port}:127.0.0.1:{self.backend_http_port}"]
        argv += ["-R", f"127.0.0.1:{self.tcp_port}:127.0.0.1:{self.backend_tcp_port}"]
        for option in (
            "BatchMode=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "ExitOnForwardFailure=yes",
            "LogLevel=VERBOSE",
        ):
            argv += ["-o", option]
        argv += ["-i", str(d / "client_ed25519"), "-p", str(sshd_port)]
        if self.cipher:
            argv += ["-c", self.cipher]
        return [*argv, "root@127.0.0.1"]

    async def start(self) -> None:
        d = self.directory
        sshd_port = await trio.to_thread.run_sync(self._prepare)
        sshd_log = await trio.to_thread.run_sync(open, d / "sshd.log", "ab")
        with sshd_log:
            self.sshd = await trio.lowlevel.open_process(
                [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                stdout=sshd_log,
                stderr=subprocess.STDOUT,
            )
        await _wait_listening(sshd_port, self.sshd, d / "sshd.log")
        self.http_port, self.tcp_port = free_port(), free_port()
        ssh_log = await trio.to_thread.run_sync(open, d / "ssh.log", "ab")
        with ssh_log:
            self.ssh = await trio.lowlevel.open_process(
                self.ssh_argv(sshd_port), stdout=subprocess.DEVNULL, stderr=ssh_log
            )
        await _wait_listening(self.http_port, self.ssh, d / "ssh.log")
        await _wait_listening(self.tcp_port, self.ssh, d / "ssh.log")
        log_text = await trio.Path(d / "ssh.log").read_text()
        found = re.search(r"kex: server->client cipher: (\S+)", log_text)
        self.negotiated_cipher = found.group(1) if found else "?"

    def sshd_pid(self) -> int:
        assert self.sshd is not None
        return self.sshd.pid

    def ssh_pid(self) -> int:
        assert self.ssh is not None
        return self.ssh.pid

    async def stop(self) -> None:
        for process in (self.ssh, self.sshd):
            if process is not None and process.poll() is None:
                process.terminate()
        with trio.move_on_after(5.0):
            for process in (self.ssh, self.sshd):
                if process is not None:
                    await process.wait()
        for process in (self.ssh, self.sshd):
            if process is not None and process.poll() is None:
                process.kill()
                await process.wait()


async def _wait_listening(port: int, process: trio.Process, log: Path) -> None:
    name = Path(str(process.args[0] if isinstance(process.args, list) else process.args)).name
    with trio.fail_after(READY_TIMEOUT):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {log}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return
