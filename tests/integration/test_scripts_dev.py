"""`scripts/dev` installs what the demo and the docs use, on a machine that lacks it.

A real run of the script with a PATH holding only the tools it needs and an `apt-get` that records
what it was asked to install (and then fails, so nothing else runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("bash", "cat", "cut", "dirname", "id", "sha256sum", "python3")  # what scripts/dev calls


def test_a_machine_without_etcd_gets_etcd_and_etcdctl(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool, path="/usr/bin:/bin")
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    record = tmp_path / "apt-get.args"
    fake = bin_dir / "apt-get"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {record}\n[ "$1" = update ]\n')  # install fails: stop there
    fake.chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "CONNECTOR_VENV": str(tmp_path / "venv")}
    sudo = "" if os.getuid() == 0 else "sudo"
    if sudo:
        (bin_dir / "sudo").symlink_to(shutil.which("env") or "/usr/bin/env")  # sudo apt-get ... -> apt-get ...
    result = subprocess.run(["bash", str(REPO / "scripts" / "dev"), "demo"], capture_output=True, text=True,
                            env=env, timeout=60, check=False)
    assert result.returncode != 0
    assert "apt-get install" in result.stderr and "failed" in result.stderr  # stops with apt's failure
    install = next(line.split() for line in record.read_text().splitlines() if line.startswith("install"))
    assert {"etcd-server", "etcd-client", "curl"} <= set(install)  # etcdctl: the runbook's commands
