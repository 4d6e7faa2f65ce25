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

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        d = self.directory
        for key in ("host_ed25519", "client_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
        (d / "authorized_keys").write_text((d / "client_ed25519.pub").read_text())
        os.chmod(d / "authorized_keys", 0o600)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        sshd_port = free_port()
        (d / "sshd_config").write_text(sshd_config(d, sshd_port))
        subprocess.run([SSHD, "-t", "-f", str(d / "sshd_config")], check=True)
        self.sshd = await trio.lowlevel.open_process(
            [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
            stdout=open(d / "sshd.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        await _wait_listening(sshd_port, self.sshd, d / "sshd.log")
        self.http_port, self.tcp_port = free_port(), free_port()
        argv = [
            "ssh", "-v", "-N", "-T", "-F", "/dev/null",
            "-R", f"127.0.0.1:{self.http_port}:127.0.0.1:{self.backend_http_port}",
            "-R", f"127.0.0.1:{self.tcp_port}:127.0.0.1:{self.backend_tcp_port}",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=VERBOSE",
            "-i", str(d / "client_ed25519"), "-p", str(sshd_port),
        ]
        if self.cipher:
            argv += ["-c", self.cipher]
        argv.append("root@127.0.0.1")
        self.ssh = await trio.lowlevel.open_process(
            argv, stdout=subprocess.DEVNULL, stderr=open(d / "ssh.log", "ab")  # noqa: SIM115
        )
        await _wait_listening(self.http_port, self.ssh, d / "ssh.log")
        await _wait_listening(self.tcp_port, self.ssh, d / "ssh.log")
        found = re.search(r"kex: server->client cipher: (\S+)", (d / "ssh.log").read_text())
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
    with trio.fail_after(READY_TIMEOUT):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode}; see {log}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return
