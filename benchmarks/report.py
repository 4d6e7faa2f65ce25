"""Writes docs/benchmarks.md: a hand-written preamble (kept), then the generated report.

Everything above the marker line is the preamble and survives regeneration unchanged (edit it by
hand); everything below is rewritten by each run. A missing file gets the default preamble.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

MARKER = (
    "<!-- everything below this line is written by benchmarks/run.py; edit the text above it -->"
)

DEFAULT_PREAMBLE = """\
# Benchmarks

`scripts/dev bench` (or `python3 benchmarks/run.py [--quick]`) measures, in one run, the same work
three ways: **direct** to the internal host, **through the connector** (HTTP via the connectivity
proxy, TCP via SOCKS5, tunnel, master node) and **through `ssh -N -R`** to a private sshd on
127.0.0.1 that the benchmark starts (never the system one), with OpenSSH's default cipher and with
aes256-gcm. All paths end at the same internal host process (the demo backend).

How to read it:

- The machine is shared and noisy, so every figure is compared with the `ssh -R` (default cipher)
  row of the *same run*: `(×r)` is value / baseline. Above 1 is better for throughput and request
  rate, worse for latency and memory. Absolute numbers move between runs; ratios much less.
- Throughput: one TCP stream to the echo service; the bytes travel there and back, so the path
  carries twice the figure. MB = 10^6 bytes.
- Request rate: 16 keep-alive connections of small `GET`s (about 100-byte JSON answers). Through
  the connector every request is parsed, authenticated, checked against the allow-list and audited.
- Added latency: sequential `GET`s on one connection per path, paths interleaved request by
  request; p50 (p99) of a path minus p50 (p99) of direct.
- Memory: VmRSS of the cloud-side and node-side processes with 1,000 idle TCP streams open
  (SOCKS5 for the connector; forwarded connections for ssh), each proven end to end by one echoed
  byte. For ssh the sshd figure sums its process tree (listener, monitor, session).
- CPU per request: CPU time of each process of a path during the request-rate test, divided by
  the requests served; it shows where the time goes.
- The load generator (`benchmarks/load.py`, trio with a minimal HTTP/1.1 client) is a separate
  process per measurement, but the machine has 2 cores: the generator, the proxy (or sshd), the
  node (or ssh) and the backend all compete for them, and other work on the machine adds noise.
  The connector's two hops are Python processes where ssh's are C; that is part of what is
  measured, not corrected for. The direct row is bounded by the generator and the backend.
- wrk (the C load generator, benchmarks/wrk.py) measures the request rate at 16 connections with
  the CPU per request of each path's own processes, and latency at a moderate load; the aims of
  issue 11 are judged on its rows.
- Options: `--quick` (about 3 minutes), `--rounds N`, `--ciphers default,aes256-gcm@openssh.com`
  (the first is the baseline), `--no-connector` (direct and ssh only), `--no-write`, `--profile`
  (py-spy on the cloud and node processes under wrk load; installs py-spy if it is missing).
"""


def split_preamble(text: str) -> str:
    """The hand-written part of an existing report (up to the marker), or the default preamble."""
    if MARKER in text:
        return text.split(MARKER, 1)[0].rstrip() + "\n"
    return DEFAULT_PREAMBLE


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout or done.stderr).strip() or "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_facts(repo: Path) -> list[tuple[str, str]]:
    commit = _run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    if dirty not in ("?", ""):
        commit += " (with uncommitted changes in the working tree)"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")),
        ("commit", commit),
        ("CPU", cpu_model()),
        ("cores", f"{os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", sys.version.split()[0]),
        ("OpenSSH", _run(["ssh", "-V"])),
        ("load average at the end (1/5/15 min)", load),
    ]


def write(path: Path, body: str) -> None:
    existing = path.read_text() if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(split_preamble(existing) + "\n" + MARKER + "\n\n" + body.rstrip() + "\n")
