#!/usr/bin/env python3
"""Benchmark entry point: `python3 benchmarks/run.py [--quick] [--profile]` (`scripts/dev bench`).

Theory of operation. One run measures the same work over every path, against the same internal
host process, and reports each path relative to `ssh -N -R` with OpenSSH's default cipher:

1. Start the demo cluster (`connector.demo.Demo`: etcd, cloud side, two nodes, demo backend) in a
   temporary directory. If it does not start, the report says why (with the log tails) and the
   run continues with direct and ssh only, against our launcher of the same backend handlers.
   Beside it, the cloud cluster's front door twice: HAProxy (`connector.haproxy`, the demo's
   configuration) in front of that one cloud process ("1 replica"), and a second demo with
   `--cloud-replicas 2` (a cloud etcd, two replicas behind HAProxy, two nodes dialling both; its own
   backend process, the same code). These two rows measure the request rate only.
2. Start one private sshd + `ssh -N -R` per cipher (benchmarks/sshtunnel.py).
3. Throughput, then request rate, path after path, for `rounds` rounds (median kept), so slow
   drifts of the shared machine spread over all paths. Latency: one loop with paths interleaved.
   Memory: per path, 1,000 idle streams held open while VmRSS is read.
   Each measurement is a separate generator process (benchmarks/load.py) with a count bound, a
   time bound inside, and a kill deadline outside.
   In the same rounds, the C generator wrk (benchmarks/wrk.py) measures what the Python one is
   too slow to measure on 2 cores: the request rate at 16 connections with the CPU per request of
   the path's own processes (read from /proc before and after), and p50/p99 latency at a moderate
   load in slices interleaved over the paths (added p99 = p99 - direct's p99).
4. With --profile, after the measurements: py-spy samples the connector's cloud and node
   processes under the same wrk load (benchmarks/profile.py), and the report gets a summary.
5. Stop everything it started, print the table, write docs/benchmarks.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import attrs
import trio

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)

from benchmarks import procs, profile, report, wrk  # noqa: E402
from benchmarks.load import raise_fd_limit  # noqa: E402
from benchmarks.sshtunnel import SshTunnel  # noqa: E402
from benchmarks.stats import (  # noqa: E402
    PathResult,
    WrkRow,
    check_goals,
    median,
    percentile,
    render_table,
    render_wrk_table,
)

DEFAULT_CIPHERS = ("default", "aes256-gcm@openssh.com")
PROJECT = "connector"
# The memory test holds 1,000 idle streams of one token from one address: above the hostile-client
# defaults ([proxy] max_streams_per_token 256, max_streams_per_client_address 512), so the
# benchmark's cloud raises both (the documented way to tune them), or it would measure refusals.
STREAM_LIMITS = "max_streams_per_token = 2000\nmax_streams_per_client_address = 2000"
FRONT_1 = "connector via HAProxy, 1 replica"
FRONT_2 = "connector via HAProxy, 2 replicas"
DIRECT = "direct"
LOAD_SLACK = 30.0  # seconds a generator may exceed its own time bound before it is killed


@attrs.frozen
class Settings:
    rounds: int
    throughput_bytes: int
    throughput_max_seconds: float
    rate_seconds: float
    rate_warmup: float
    connections: int
    latency_requests: int
    latency_max_seconds: float
    idle_streams: int
    hold_max_seconds: float
    wrk_seconds: float  # wrk request rate: `connections` connections, 2 threads
    wrk_warmup: float  # an uncounted wrk run before it (tunnel streams opened, caches warm)
    wrk_latency_seconds: float  # wrk latency at moderate load: slices of this length,
    wrk_latency_slices: int  # this many per path and round, paths interleaved slice by slice,
    wrk_latency_connections: int  # this many connections, one thread,
    wrk_latency_delay_ms: float  # each pausing this long before each request
    profile_seconds: float  # --profile: py-spy on cloud and node under the wrk rate load


QUICK = Settings(1, 256 << 20, 3.0, 4.0, 0.5, 16, 1000, 20.0, 1000, 60.0, 5.0, 1.0, 3.0, 3, 4, 20.0, 10.0)
FULL = Settings(3, 512 << 20, 10.0, 8.0, 1.0, 16, 3000, 60.0, 1000, 120.0, 10.0, 2.0, 4.0, 3, 4, 20.0, 20.0)
WRK_THREADS = 2


@attrs.define
class BenchPath:
    """One way to reach the internal host, and the processes whose memory it costs."""

    name: str
    http: dict[str, Any]
    tcp: dict[str, Any] | None
    processes: dict[str, int] = attrs.Factory(dict)  # label -> pid (tree) whose RSS counts
    note: str = ""
    throughput: list[float] = attrs.Factory(list)
    rates: list[float] = attrs.Factory(list)
    errors: list[str] = attrs.Factory(list)
    rss_idle: dict[str, float] = attrs.Factory(dict)
    rss_loaded: dict[str, float] = attrs.Factory(dict)
    opened: int = 0
    cpu_us_per_request: dict[str, list[float]] = attrs.Factory(dict)
    wrk_rates: list[float] = attrs.Factory(list)
    wrk_cpu_us: dict[str, list[float]] = attrs.Factory(dict)  # label -> per round, rate test
    wrk_latency: list[dict[int, float]] = attrs.Factory(list)  # per slice: percentile -> ms
    profiles: dict[str, profile.ProfileSummary] = attrs.Factory(dict)
    profile_requests: int = 0

    def hops(self) -> dict[str, int]:
        """The processes of the path itself (not the backend every path ends at)."""
        return {label: pid for label, pid in self.processes.items() if label != "backend"}


class Bench:
    def __init__(self, settings: Settings, ciphers: list[str], workdir: Path) -> None:
        self.settings = settings
        self.ciphers = ciphers
        self.workdir = workdir
        self.paths: list[BenchPath] = []
        self.commands: list[str] = []
        self.project_error = ""
        self.front_errors: list[str] = []  # why a HAProxy row is missing
        self.latencies: dict[str, list[float]] = {}
        self.baseline = ""
        self.backend_pid = 0
        self.profile: bool = False
        self.profile_dir: Path | None = None
        self.profile_error = ""

    # --- running one generator ----------------------------------------------------------------

    def _load_argv(self, mode: str, spec: dict[str, Any]) -> list[str]:
        return [sys.executable, "-m", "benchmarks.load", mode, json.dumps(spec)]

    def _record(self, mode: str, spec: dict[str, Any]) -> None:
        text = json.dumps(spec)
        for path in self.paths:
            token = (path.http or {}).get("proxy_token")
            if token:
                text = text.replace(token, "<token>")
        command = f"python3 -m benchmarks.load {mode} {shlex.quote(text)}"
        if command not in self.commands:
            self.commands.append(command)

    async def load(self, mode: str, spec: dict[str, Any], bound: float) -> dict[str, Any]:
        self._record(mode, spec)
        with trio.move_on_after(bound + LOAD_SLACK) as scope:
            done = await trio.run_process(
                self._load_argv(mode, spec),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=REPO,
            )
        if scope.cancelled_caught:
            return {"error": f"load generator killed after {bound + LOAD_SLACK:.0f} s"}
        lines = done.stdout.decode().strip().splitlines()
        try:
            return dict(json.loads(lines[-1]))
        except (IndexError, ValueError):
            return {"error": f"generator exited {done.returncode}: {done.stderr.decode()[-500:]}"}

    async def wrk(self, path: BenchPath, *, connections: int, threads: int, seconds: float,
                  latency: bool = False, delay_ms: float = 0.0) -> wrk.WrkResult | str:
        """One wrk run against a path: its parsed report, or why there is none (a string)."""
        argv = wrk.wrk_argv(path.http, connections=connections, threads=threads, seconds=seconds,
                            latency=latency)
        env = wrk.wrk_env(path.http, delay_ms=delay_ms)
        shown = wrk.shown_command(argv, env)
        if shown not in self.commands:
            self.commands.append(shown)
        with trio.move_on_after(seconds + LOAD_SLACK) as scope:
            done = await trio.run_process(argv, env=wrk.child_env(env), capture_stdout=True,
                                          capture_stderr=True, check=False)
        if scope.cancelled_caught:
            return f"wrk killed after {seconds + LOAD_SLACK:.0f} s"
        output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        try:
            result = wrk.parse_wrk(output)
        except wrk.WrkError as exc:
            return f"wrk exited {done.returncode}: {exc}"
        return result.error or result

    async def measure_wrk_rate(self, path: BenchPath) -> None:
        s = self.settings
        warm = await self.wrk(path, connections=s.connections, threads=WRK_THREADS, seconds=s.wrk_warmup)
        cpu_before = self._cpu(path)
        result = await self.wrk(path, connections=s.connections, threads=WRK_THREADS, seconds=s.wrk_seconds)
        cpu_after = self._cpu(path)
        if isinstance(warm, str) or isinstance(result, str):
            path.errors.append(f"wrk rate: {result if isinstance(result, str) else warm}")
        else:
            path.wrk_rates.append(result.requests_per_s)
            for label, seconds in cpu_after.items():  # wrk's count covers its whole run
                used = seconds - cpu_before.get(label, seconds)
                path.wrk_cpu_us.setdefault(label, []).append(used / result.requests * 1e6)
        shown = result if isinstance(result, str) else f"{result.requests_per_s:.0f} req/s"
        print(f"  wrk rate   {path.name:<40} {shown}", flush=True)

    async def measure_wrk_latency(self, path: BenchPath) -> None:
        s = self.settings
        result = await self.wrk(path, connections=s.wrk_latency_connections, threads=1,
                                seconds=s.wrk_latency_seconds, latency=True, delay_ms=s.wrk_latency_delay_ms)
        if isinstance(result, str):
            path.errors.append(f"wrk latency: {result}")
        else:
            path.wrk_latency.append(result.latency_ms)
        shown = result if isinstance(result, str) else (
            f"{result.requests_per_s:.0f} req/s, p50 {result.latency_ms.get(50)} ms, "
            f"p99 {result.latency_ms.get(99)} ms")
        print(f"  wrk lat.   {path.name:<40} {shown}", flush=True)

    async def profile_path(self, path: BenchPath) -> None:
        """py-spy on the path's hops while wrk loads it as in the rate test (not a measurement)."""
        s = self.settings
        assert self.profile_dir is not None
        try:
            py_spy = await trio.to_thread.run_sync(profile.ensure_py_spy)
        except (OSError, subprocess.SubprocessError) as exc:
            self.profile_error = f"py-spy could not be installed: {exc}"
            return
        outputs = {label: self.profile_dir / f"{label.split()[0]}.txt" for label in path.hops()}
        spies = []
        for label, pid in path.hops().items():
            with open(outputs[label].with_suffix(".log"), "wb") as log:  # noqa: ASYNC230 - the child's
                spies.append(await trio.lowlevel.open_process(
                    profile.record_argv(py_spy, pid, outputs[label], s.profile_seconds),
                    stdout=log, stderr=subprocess.STDOUT))
        try:
            result = await self.wrk(path, connections=s.connections, threads=WRK_THREADS,
                                    seconds=s.profile_seconds)
            with trio.move_on_after(LOAD_SLACK):
                for spy in spies:
                    await spy.wait()
        finally:
            for spy in spies:
                if spy.poll() is None:
                    spy.kill()
                    await spy.wait()
        if isinstance(result, str):
            self.profile_error = f"wrk under the profiler: {result}"
            return
        path.profile_requests = result.requests
        for label in path.hops():
            try:
                path.profiles[label] = profile.summarize(outputs[label].read_text())
            except (OSError, ValueError) as exc:
                said = _tail(outputs[label].with_suffix(".log"), 3).replace("\n", " ")
                self.profile_error += f"{label}: {exc} (py-spy said: {said}). "
        print(f"  profile    {path.name:<40} {result.requests} requests; raw stacks in {self.profile_dir}",
              flush=True)

    # --- measurements -------------------------------------------------------------------------

    async def measure_throughput(self, path: BenchPath) -> None:
        s = self.settings
        if path.tcp is None:
            return
        result = await self.load(
            "throughput",
            {"tcp": path.tcp, "bytes": s.throughput_bytes, "max_seconds": s.throughput_max_seconds},
            s.throughput_max_seconds,
        )
        if "error" in result:
            path.errors.append(f"throughput: {result['error']}")
        else:
            path.throughput.append(result["mb_s"])
        print(f"  throughput {path.name:<40} {result}", flush=True)

    def _cpu(self, path: BenchPath) -> dict[str, float]:
        watched = {"backend": self.backend_pid, **path.processes}  # a path with its own backend names it
        return {label: procs.cpu_seconds(pid) for label, pid in watched.items() if pid}

    async def measure_rate(self, path: BenchPath) -> None:
        s = self.settings
        cpu_before = self._cpu(path)
        result = await self.load(
            "rate",
            {
                "http": path.http,
                "connections": s.connections,
                "seconds": s.rate_seconds,
                "warmup": s.rate_warmup,
            },
            s.rate_seconds + s.rate_warmup,
        )
        if "error" in result:
            path.errors.append(f"rate: {result['error']}")
        else:
            path.rates.append(result["requests_per_s"])
            # CPU over warm-up and measurement, per request of the measured part: an upper bound
            requests = result["requests"] * (s.rate_seconds + s.rate_warmup) / s.rate_seconds
            for label, seconds in self._cpu(path).items():
                used = seconds - cpu_before.get(label, seconds)
                path.cpu_us_per_request.setdefault(label, []).append(used / requests * 1e6)
        print(f"  rate       {path.name:<40} {result}", flush=True)

    async def measure_latency(self) -> None:
        s = self.settings
        spec = {
            "paths": [{"name": p.name, "http": p.http} for p in self.paths],
            "requests": s.latency_requests,
            "max_seconds": s.latency_max_seconds,
        }
        result = await self.load("latency", spec, s.latency_max_seconds)
        if "error" in result:
            for path in self.paths:
                path.errors.append(f"latency: {result['error']}")
            print(f"  latency    {result}", flush=True)
            return
        self.latencies = result["latencies_ms"]
        for name, values in self.latencies.items():
            print(
                f"  latency    {name:<40} n={len(values)} p50={percentile(values, 50):.3f} "
                f"p99={percentile(values, 99):.3f} ms",
                flush=True,
            )

    def _read_rss(self, path: BenchPath) -> dict[str, float]:
        return {label: procs.tree_rss_mib(pid) for label, pid in path.processes.items()}

    async def measure_memory(self, path: BenchPath) -> None:
        s = self.settings
        if path.tcp is None or not path.processes:
            return
        spec = {
            "tcp": path.tcp,
            "count": s.idle_streams,
            "max_seconds": s.hold_max_seconds,
            "hold_seconds": s.hold_max_seconds,
        }
        self._record("hold", spec)
        path.rss_idle = self._read_rss(path)
        process = await trio.lowlevel.open_process(
            self._load_argv("hold", spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO
        )
        assert process.stdout is not None and process.stdin is not None
        try:
            with trio.move_on_after(s.hold_max_seconds + 5.0):
                line = b""
                while not line.endswith(b"\n"):
                    chunk = await process.stdout.receive_some(4096)
                    if not chunk:
                        break
                    line += chunk
            reply = (
                json.loads(line.decode().splitlines()[0])
                if line.strip()
                else {"error": "no answer"}
            )
            if "opened" in reply:
                path.opened = int(reply["opened"])
                await trio.sleep(0.5)  # let buffers settle before reading
                path.rss_loaded = self._read_rss(path)
            else:
                path.errors.append(f"memory: {reply.get('error')}")
            print(
                f"  memory     {path.name:<40} {reply} idle={path.rss_idle} loaded={path.rss_loaded}",
                flush=True,
            )
            await process.stdin.send_all(b"close\n")
        finally:
            with trio.move_on_after(10.0):
                await process.wait()
            if process.poll() is None:
                process.kill()
                await process.wait()

    # --- the run ------------------------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        for r in range(s.rounds):
            print(f"round {r + 1}/{s.rounds}", flush=True)
            for path in self.paths:
                await self.measure_throughput(path)
            for path in self.paths:
                await self.measure_rate(path)
            for path in self.paths:
                await self.measure_wrk_rate(path)
            for _ in range(s.wrk_latency_slices):  # interleaved: a burst of noise hits one slice
                for path in self.paths:
                    await self.measure_wrk_latency(path)
        await self.measure_latency()
        for path in self.paths:
            await self.measure_memory(path)
        if self.profile:
            ours = [path for path in self.paths if path.name == PROJECT]
            if ours:
                await self.profile_path(ours[0])
            else:
                self.profile_error = "the connector path did not run"

    def results(self) -> list[PathResult]:
        direct = self.latencies.get(DIRECT)
        rows = []
        for path in self.paths:
            p50 = p99 = None
            own = self.latencies.get(path.name)
            if direct and own and path.name != DIRECT:
                p50 = percentile(own, 50) - percentile(direct, 50)
                p99 = percentile(own, 99) - percentile(direct, 99)
            rss = sum(path.rss_loaded.values()) if path.rss_loaded else None
            detail = " + ".join(f"{label} {value:.1f}" for label, value in path.rss_loaded.items())
            rows.append(
                PathResult(
                    path=path.name,
                    throughput_mb_s=median(path.throughput) if path.throughput else None,
                    requests_per_s=median(path.rates) if path.rates else None,
                    p50_added_ms=p50,
                    p99_added_ms=p99,
                    rss_mib=rss,
                    rss_detail=detail if len(path.rss_loaded) > 1 else "",
                    note=path.note,
                )
            )
        return rows

    def wrk_rows(self) -> list[WrkRow]:
        def latency(path: BenchPath, q: int) -> float | None:
            values = [round_[q] for round_ in path.wrk_latency if q in round_]
            return median(values) if values else None

        direct = next((p for p in self.paths if p.name == DIRECT), None)
        direct_p99 = latency(direct, 99) if direct else None
        rows = []
        for path in self.paths:
            hops = {label: median(v) for label, v in path.wrk_cpu_us.items() if label in path.hops()}
            p99 = latency(path, 99)
            rows.append(WrkRow(
                path=path.name,
                requests_per_s=median(path.wrk_rates) if path.wrk_rates else None,
                cpu_us_per_request=sum(hops.values()) if hops else None,
                cpu_detail=" + ".join(f"{label} {v:.0f}" for label, v in hops.items()) if len(hops) > 1 else "",
                p50_ms=latency(path, 50),
                p99_ms=p99,
                p99_added_ms=(p99 - direct_p99) if p99 is not None and direct_p99 is not None
                and path is not direct else None,
                note=path.note,
            ))
        return rows


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def start_demo(workdir: Path, spec: Any = None) -> tuple[Any, dict[str, Any] | None, str]:
    from connector.demo import Demo, DemoSpec

    demo = Demo(workdir, spec or DemoSpec(http_port=0, socks5_port=0, proxy_extra=STREAM_LIMITS))
    try:
        with trio.fail_after(60.0):
            state = await demo.start()
        return demo, state, ""
    except BaseException as exc:  # noqa: BLE001 - any failure: report it, measure the rest
        with trio.CancelScope(shield=True):
            await demo.stop()
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        logs = ""
        for log in sorted((workdir / "logs").glob("*.log")):
            logs += f"\n--- {log.name} (last lines)\n{_tail(log)}\n"
        return None, None, f"{type(exc).__name__}: {exc}\n{logs}"


async def master_node(state: dict[str, Any]) -> str | None:
    from connector.admin import http_request

    status, body = await http_request(
        "127.0.0.1", state["cloud"]["admin_port"], "/status", timeout=2.0
    )
    if status != 200:
        return None
    for location in json.loads(body).get("locations", []):
        if location.get("master"):
            return str(location["master"])
    return None


def front_config(workdir: Path, state: dict[str, Any]) -> tuple[str, Any, Path]:
    """The binary, the front door and the checked configuration of HAProxy before one cloud."""
    from connector import haproxy
    from connector.demo import free_port

    binary = haproxy.find_haproxy()
    cloud = state["cloud"]
    front = haproxy.Front("127.0.0.1", free_port(), free_port(), free_port())
    backend = haproxy.Backend("cloud", "127.0.0.1", cloud["http_proxy_port"], cloud["socks5_port"],
                              cloud["destinations_port"], cloud["admin_port"])
    workdir.mkdir(parents=True, exist_ok=True)
    config = haproxy.write_config(workdir / "haproxy.cfg", front, [backend])
    haproxy.check_config(binary, config)
    return binary, front, config


async def start_front(workdir: Path, state: dict[str, Any]) -> tuple[trio.Process | None, dict[str, Any] | None, str]:
    """HAProxy with the demo's configuration in front of the demo's single cloud process."""
    from connector import haproxy

    try:
        binary, front, config = front_config(workdir, state)
    except (haproxy.HAProxyError, OSError) as exc:
        return None, None, str(exc)
    with open(workdir / "haproxy.log", "ab") as log:  # noqa: ASYNC230 - owned by the child
        process = await trio.lowlevel.open_process(haproxy.haproxy_command(binary, config), stdout=log,
                                                   stderr=subprocess.STDOUT)
    # HAProxy starts with its server up (its checks may only take it out): it is ready when it listens
    with trio.move_on_after(15.0):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", front.http_proxy_port)
                await stream.aclose()
                break
            except OSError:
                await trio.sleep(0.05)  # another process: its port is all there is to poll
    return process, {"http_proxy_port": front.http_proxy_port}, ""


async def start_cluster_demo(workdir: Path) -> tuple[Any, dict[str, Any] | None, str]:
    """The demo with two cloud replicas behind HAProxy (and a cloud etcd)."""
    from connector.demo import DemoSpec

    return await start_demo(workdir, DemoSpec(http_port=0, socks5_port=0, cloud_replicas=2,
                                              proxy_extra=STREAM_LIMITS))


def front_path(name: str, port: int, state: dict[str, Any], processes: dict[str, int], note: str) -> BenchPath:
    return BenchPath(
        name,
        {"host": "127.0.0.1", "port": port, "proxy_token": state["token"], "virtual_host": "erp.virtual:8000",
         "location_id": state["location_id"]},
        None,
        processes,
        note=note,
    )


async def main_async(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else FULL
    if args.rounds:
        settings = attrs.evolve(settings, rounds=args.rounds)
    raise_fd_limit()  # children (demo, sshd, ssh) inherit it: 1,000 streams need 2,000+ descriptors
    workdir = Path(tempfile.mkdtemp(prefix="connector-bench-"))
    print(f"workdir {workdir}", flush=True)
    bench = Bench(settings, args.ciphers, workdir)
    if args.profile:
        bench.profile = True
        bench.profile_dir = Path(tempfile.mkdtemp(prefix="connector-bench-profile-"))
    if args.no_connector:
        demo, state, bench.project_error = None, None, "skipped (--no-connector)"
    else:
        demo, state, bench.project_error = await start_demo(workdir / "demo")
    backend: trio.Process | None = None
    front1: trio.Process | None = None
    demo2: Any = None
    tunnels: list[SshTunnel] = []
    try:
        if state is not None:
            http_port, tcp_port = state["backend"]["http_port"], state["backend"]["tcp_port"]
            bench.backend_pid = state["backend"]["pid"]
        else:
            print(f"connector path unavailable:\n{bench.project_error}", flush=True)
            backend = await trio.lowlevel.open_process(
                [sys.executable, "-m", "benchmarks.backend"], stdout=subprocess.PIPE, cwd=REPO
            )
            assert backend.stdout is not None
            with trio.fail_after(15.0):
                ports = json.loads((await backend.stdout.receive_some(4096)).decode())
            http_port, tcp_port = ports["http_port"], ports["tcp_port"]
            bench.backend_pid = backend.pid
        bench.paths.append(
            BenchPath(
                DIRECT,
                {"host": "127.0.0.1", "port": http_port},
                {"host": "127.0.0.1", "port": tcp_port},
            )
        )
        if state is not None:
            master = await master_node(state)
            processes = {"cloud": state["cloud"]["pid"]}
            if master:
                processes[f"node ({master}, master)"] = state["nodes"][master]["pid"]
            bench.paths.append(
                BenchPath(
                    PROJECT,
                    {
                        "host": "127.0.0.1",
                        "port": state["cloud"]["http_proxy_port"],
                        "proxy_token": state["token"],
                        "virtual_host": "erp.virtual:8000",
                        "location_id": state["location_id"],
                    },
                    {
                        "host": "127.0.0.1",
                        "port": state["cloud"]["socks5_port"],
                        "socks5": {
                            "username": state["subaccount"],
                            "password": state["token"],
                            "target_host": "echo.virtual",
                            "target_port": 7000,
                        },
                    },
                    processes,
                    note="proxy + tunnel + node",
                )
            )
            front1, front1_state, error = await start_front(workdir / "front-1", state)
            if front1_state is not None:
                bench.paths.append(front_path(FRONT_1, front1_state["http_proxy_port"], state,
                                              {"haproxy": front1.pid, **processes},  # type: ignore[union-attr]
                                              "HAProxy + proxy + tunnel + node"))
            else:
                bench.front_errors.append(f"{FRONT_1}: {error}")
            demo2, state2, error = await start_cluster_demo(workdir / "demo-2")
            if state2 is not None:
                master2 = await master_node(state2)
                processes2 = {"haproxy": state2["front"]["pid"],
                              **{r["id"]: r["pid"] for r in state2["cloud_replicas"]}}
                if master2:
                    processes2[f"node ({master2}, master)"] = state2["nodes"][master2]["pid"]
                processes2["backend"] = state2["backend"]["pid"]  # that demo's own
                bench.paths.append(front_path(FRONT_2, state2["front"]["http_proxy_port"], state2, processes2,
                                              "HAProxy + 2 replicas + tunnels + node"))
            else:
                bench.front_errors.append(f"{FRONT_2}: {error}")
        for index, cipher in enumerate(args.ciphers):
            tunnel = SshTunnel(
                workdir / f"ssh-{index}",
                http_port,
                tcp_port,
                None if cipher == "default" else cipher,
            )
            await tunnel.start()
            tunnels.append(tunnel)
            name = f"ssh -R, {tunnel.negotiated_cipher}" + (
                " (default)" if cipher == "default" else ""
            )
            if not bench.baseline:
                bench.baseline = name
            bench.paths.append(
                BenchPath(
                    name,
                    {"host": "127.0.0.1", "port": tunnel.http_port},
                    {"host": "127.0.0.1", "port": tunnel.tcp_port},
                    {"sshd": tunnel.sshd_pid(), "ssh": tunnel.ssh_pid()},
                )
            )
            bench.commands.append(f"/usr/sbin/sshd -D -e -f {tunnel.directory}/sshd_config")
            bench.commands.append(shlex.join(tunnel.ssh.args) if tunnel.ssh else "")  # type: ignore[arg-type]
        await bench.run()
    finally:
        with trio.CancelScope(shield=True):
            for tunnel in tunnels:
                await tunnel.stop()
            if front1 is not None:
                front1.terminate()
                await front1.wait()
            if demo2 is not None:
                await demo2.stop()
            if demo is not None:
                await demo.stop()
            if backend is not None:
                backend.kill()
                await backend.wait()
    body = render(bench, args)
    print("\n" + body, flush=True)
    if not args.no_write:
        report.write(args.output, body)
        print(f"\nwrote {args.output}", flush=True)
    failed = any(p.errors for p in bench.paths)
    if failed or (bench.project_error and not args.no_connector):
        print(f"kept {workdir} (logs of the failed run)", flush=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)  # it holds keys and the demo's token
    return 1 if failed or not bench.paths else 0


def render(bench: Bench, args: argparse.Namespace) -> str:
    rows, wrk_rows = bench.results(), bench.wrk_rows()
    s = bench.settings
    mode = "--quick" if args.quick else "default"
    out = [
        f"## Results ({mode} mode, {s.rounds} round(s), ratios to `{bench.baseline}`)",
        "",
    ]
    for goal in check_goals(rows, wrk_rows, project=PROJECT, baseline=bench.baseline):
        verdict = {True: "met", False: "**not met**", None: "not measured"}[goal.met]
        out.append(f"- Aim: {goal.text}: {verdict}" + (f" ({goal.measured})." if goal.measured else "."))
    out += [
        "",
        "### wrk (C load generator): request rate, CPU per request, latency at moderate load",
        "",
        f"Request rate: `wrk -c{s.connections} -t{WRK_THREADS}` for {s.wrk_seconds:g} s (after an uncounted "
        f"{s.wrk_warmup:g} s run); CPU per request: user + system CPU of the path's own processes "
        "(cloud + node; sshd with its children + ssh; HAProxy included in its rows) over that run, "
        "divided by its requests. Latency: "
        f"`wrk -c{s.wrk_latency_connections} -t1 --latency`, each connection "
        f"pausing {s.wrk_latency_delay_ms:g} ms before each request (at most "
        f"{s.wrk_latency_connections * 1000 / s.wrk_latency_delay_ms:.0f} requests/s, well below every "
        f"path's capacity), {s.wrk_latency_slices} slices of {s.wrk_latency_seconds:g} s per path and round, "
        "paths interleaved slice by slice; p50 and p99 are the medians of the slices' own; "
        "added p99 = the path's p99 - direct's p99.",
        "",
        render_wrk_table(wrk_rows, bench.baseline) if bench.baseline else "(no ssh baseline)",
        "",
        "### Python load generator (benchmarks/load.py)",
        "",
        render_table(rows, bench.baseline) if bench.baseline else "(no ssh baseline)",
    ]
    if bench.project_error:
        out += [
            "",
            "### The connector path did not run",
            "",
            "Only direct and ssh were measured. Why:",
            "",
            "```",
            bench.project_error.strip(),
            "```",
        ]
    for error in bench.front_errors:
        out += ["", f"- Not measured: {error}"]
    for path in bench.paths:
        for error in path.errors:
            out.append(f"- Error on {path.name}: {error}")
    out += [
        "",
        "### Memory detail (VmRSS, MiB)",
        "",
        "| path | process | idle | with 1k streams | per stream KiB |",
        "|---|---|---:|---:|---:|",
    ]
    for path in bench.paths:
        for label, loaded in path.rss_loaded.items():
            idle = path.rss_idle.get(label, 0.0)
            per = (loaded - idle) * 1024 / path.opened if path.opened else 0.0
            out.append(f"| {path.name} | {label} | {idle:.1f} | {loaded:.1f} | {per:.1f} |")
    out += [
        "",
        "### CPU per request during the request-rate test (µs, median of rounds)",
        "",
        "CPU time of each process over warm-up and measurement, divided by the requests of both;",
        "it shows where the time goes (the generator's own share is not included).",
        "",
        "| path | process | CPU µs per request |",
        "|---|---|---:|",
    ]
    for path in bench.paths:
        for label, values in path.cpu_us_per_request.items():
            out.append(f"| {path.name} | {label} | {median(values):.0f} |")
    out += render_profiles(bench)
    out += ["", "### Raw samples", ""]
    for path in bench.paths:
        tput = ", ".join(f"{v:.1f}" for v in path.throughput) or "—"
        rates = ", ".join(f"{v:.0f}" for v in path.rates) or "—"
        lat = bench.latencies.get(path.name)
        lat_text = (
            f"p50 {percentile(lat, 50):.3f} ms, p99 {percentile(lat, 99):.3f} ms, n={len(lat)}"
            if lat
            else "—"
        )
        wrk_rates = ", ".join(f"{v:.0f}" for v in path.wrk_rates) or "—"
        wrk_lat = "; ".join(
            ", ".join(f"p{q} {ms:.3f}" for q, ms in sorted(round_.items())) for round_ in path.wrk_latency
        ) or "—"
        out.append(
            f"- {path.name}: throughput MB/s [{tput}]; requests/s [{rates}]; latency {lat_text}; "
            f"wrk requests/s [{wrk_rates}]; wrk latency ms [{wrk_lat}]"
        )
    out += ["", "### Machine", ""]
    out += [f"- {key}: {value}" for key, value in report.machine_facts(REPO)]
    out += [
        "",
        "### Settings and exact commands",
        "",
        f"`{' '.join(['python3', 'benchmarks/run.py', *sys.argv[1:]])}`: {s.rounds} round(s); throughput "
        f"{s.throughput_bytes >> 20} MiB echoed (at most {s.throughput_max_seconds:g} s); request rate "
        f"{s.connections} connections for {s.rate_seconds:g} s after {s.rate_warmup:g} s warm-up; latency "
        f"{s.latency_requests} requests per path; memory {s.idle_streams} idle streams; wrk as above.",
        "",
        "```",
    ]
    out += bench.commands
    out += ["```"]
    return "\n".join(out)


def render_profiles(bench: Bench) -> list[str]:
    if not bench.profile:
        return []
    s = bench.settings
    out = [
        "",
        "### Profile (--profile): where the connector's CPU goes",
        "",
        f"py-spy ({profile.RATE} Hz, idle samples dropped) on each process of the connector path for "
        f"{s.profile_seconds:g} s of `wrk -c{s.connections} -t{WRK_THREADS}`, after the measurements (its "
        "figures are not reported as measurements). Self: samples in the function itself; on the stack "
        "and cumulative: samples with the area or function anywhere on the stack (lower bounds: py-spy "
        "--nonblocking sometimes reads a stack cut short at the root). Area: library or module "
        "(benchmarks/profile.py). ≈ CPU: samples / rate.",
    ]
    if bench.profile_error:
        out += ["", f"- Profile incomplete: {bench.profile_error}"]
    for path in bench.paths:
        for label, summary in path.profiles.items():
            out += [""] + profile.render(label, summary, s.profile_seconds, path.profile_requests)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description="direct vs connector vs ssh -R, written to docs/benchmarks.md"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--rounds", type=int, default=0, help="override the number of rounds")
    parser.add_argument(
        "--ciphers",
        type=lambda v: [c for c in v.split(",") if c],
        default=list(DEFAULT_CIPHERS),
        help="ssh ciphers to measure, comma-separated; the first is the baseline (default: %(default)s)",
    )
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument(
        "--no-connector", action="store_true", help="measure direct and ssh only (no demo cluster)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only, do not write the report"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the measurements, sample the cloud and node processes with py-spy under wrk load "
        "(installs py-spy with pip into this interpreter's environment if it is missing)",
    )
    args = parser.parse_args()
    try:
        return trio.run(main_async, args)
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
