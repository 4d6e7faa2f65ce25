"""The C load generator: `wrk` (Debian's, /usr/bin/wrk) for the request-rate and latency rows.

Theory of operation. On 2 cores the Python generator (benchmarks/load.py) spends CPU that the
measured path then lacks, so its request-rate ceiling is partly its own; wrk spends a fraction
of it. One run of wrk is one measurement: `wrk_argv` builds the command (connections, threads,
a duration, `--latency` for the percentiles), `wrk_env` the environment read by
benchmarks/wrk_request.lua, which sets the request: origin-form to the backend or to the
`ssh -R` forward, absolute-form with `Proxy-Authorization` and `SAP-Connectivity-SCC-Location_ID`
through our HTTP proxy (wrk cannot use a proxy itself; it connects to the proxy's port and sends
what an application sends to a proxy), and optionally a pause per request per connection, which
keeps the latency test at a moderate load instead of the path's saturation.

`parse_wrk` reads wrk's text report (pure, unit-tested on real outputs). A run with any non-2xx
answer or any socket error is void, as in the Python generator: a rate that counts error pages
or broken connections is worse than none.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

import attrs

WRK = "/usr/bin/wrk"
SCRIPT = Path(__file__).resolve().parent / "wrk_request.lua"
HTTP_PATH = "/sap/opu/odata/x"  # the Python generator's (benchmarks/load.py)

_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


class WrkError(Exception):
    """wrk's output is not a report (it could not connect, or printed something else)."""


@attrs.frozen
class WrkResult:
    """What one wrk run reports. Latencies in ms; percentiles only with `--latency`."""

    requests: int
    seconds: float
    requests_per_s: float
    latency_ms: dict[int, float]  # 50, 75, 90, 99 -> ms
    non_2xx: int = 0
    socket_errors: dict[str, int] = attrs.Factory(dict)  # connect, read, write, timeout

    @property
    def error(self) -> str:
        """Why the figure is void, or "" when it is sound."""
        problems = []
        if self.non_2xx:
            problems.append(f"{self.non_2xx} non-2xx/3xx responses")
        failed = {kind: n for kind, n in self.socket_errors.items() if n}
        if failed:
            problems.append("socket errors " + ", ".join(f"{k} {n}" for k, n in failed.items()))
        if not self.requests:
            problems.append("no request completed")
        return "; ".join(problems)


def duration_ms(text: str) -> float:
    """One of wrk's durations ("452.00us", "1.97ms", "2.10s", "1.00m") in ms."""
    found = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not found:
        raise WrkError(f"not a wrk duration: {text!r}")
    return float(found.group(1)) * _UNIT_US[found.group(2)] / 1e3


def parse_wrk(output: str) -> WrkResult:
    """wrk's text report as a WrkResult; WrkError if it has no request count or rate."""
    total = re.search(r"^\s*(\d+) requests in ([0-9.]+(?:us|ms|s|m|h)),", output, re.M)
    rate = re.search(r"^Requests/sec:\s*([0-9.]+)\s*$", output, re.M)
    if not total or not rate:
        raise WrkError(f"not a wrk report: {output.strip()[-300:]!r}")
    latency = {
        int(q): duration_ms(value)
        for q, value in re.findall(r"^\s*(\d+)%\s+(\S+)\s*$", output, re.M)
    }
    non_2xx = re.search(r"^\s*Non-2xx or 3xx responses:\s*(\d+)", output, re.M)
    errors = re.search(
        r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output, re.M
    )
    return WrkResult(
        requests=int(total.group(1)),
        seconds=duration_ms(total.group(2)) / 1e3,
        requests_per_s=float(rate.group(1)),
        latency_ms=latency,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=(
            dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True))
            if errors
            else {}
        ),
    )


def wrk_argv(http: dict[str, Any], *, connections: int, threads: int, seconds: float,
             latency: bool = False, timeout_s: float = 5.0) -> list[str]:
    """The wrk command for one path (`http` as in benchmarks/load.py: host, port, [proxy_token])."""
    argv = [WRK, f"-c{connections}", f"-t{threads}", f"-d{max(1, round(seconds))}s",
            f"--timeout={max(1, round(timeout_s))}s", "-s", str(SCRIPT)]
    if latency:
        argv.append("--latency")
    return [*argv, f"http://{http['host']}:{http['port']}{HTTP_PATH}"]


def wrk_env(http: dict[str, Any], *, delay_ms: float = 0.0) -> dict[str, str]:
    """The variables wrk_request.lua reads, for one path (and an optional pause per request)."""
    env = {"BENCH_DELAY_MS": f"{delay_ms:g}"}
    if http.get("proxy_token"):
        env["BENCH_TARGET"] = f"http://{http['virtual_host']}{HTTP_PATH}"
        env["BENCH_HOST"] = str(http["virtual_host"])
        env["BENCH_PROXY_TOKEN"] = str(http["proxy_token"])
        env["BENCH_LOCATION_ID"] = str(http.get("location_id", ""))
    return env


def shown_command(argv: list[str], env: dict[str, str]) -> str:
    """The command as the report shows it: the environment first, the token hidden."""
    shown = {k: ("<token>" if k == "BENCH_PROXY_TOKEN" else v) for k, v in env.items()}
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in shown.items()), shlex.join(argv)])


def child_env(env: dict[str, str]) -> dict[str, str]:
    """The process environment for wrk: ours with BENCH_* replaced by this run's."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    return {**base, **env}
