#!/usr/bin/env python3
"""Chaos drills against a running connector cluster: the local demo by default.

Theory of operation
-------------------
A drill reads the cluster's pids and ports from the state file `connector demo --state-file`
writes, asks the cloud side's admin endpoint (``GET /status``) which node is the master of the
location, and then, in one trio nursery:

1. a *watcher* polls ``/status`` every ``POLL_INTERVAL`` and records (time, master, epoch);
2. a *load* of ``--concurrency`` workers sends GET requests through the HTTP connectivity proxy,
   bounded in count (``--requests``) and time (the drill's window), recording each outcome;
3. after a warm-up that must be clean (otherwise the drill refuses to act), the *fault* is applied:
   kill -9 the master, SIGSTOP/SIGCONT it, hand over (``POST /switch`` or SIGTERM), or
   SIGSTOP/SIGCONT etcd. SIGCONT is sent in a ``finally``, so Ctrl-C never leaves a process frozen.
   Against a cloud cluster (``connector demo --cloud-replicas N``, whose state file lists the
   replicas and the cloud etcd): kill -9 a replica and start it again after SECONDS, a rolling
   restart (SIGTERM, drain, exit, start again, ready; replica after replica), or SIGSTOP/SIGCONT the
   cloud etcd. A replica is started again with the command line and working directory it had (read
   from /proc before it is signalled), in a session of its own, its output appended to its log. It
   is no child of the demo, so the demo's stop does not stop it: the drill prints its pid to kill
   after the demo (the demo's parent watch, ``CONNECTOR_PARENT_PID``, compares the parent pid and so
   cannot be handed on).

The report is computed by pure functions from the recorded samples: *master changed after* (fault
to the first ``/status`` naming another master), *takeover* (fault to the first request that
completed successfully once another master was named, i.e. the first request served by another
node), the *disruption* (`benchmarks.stats.disruption`: the longest gap between successful requests
that begins in the fault window) and the count of failed requests by reason. Times come from
``trio.current_time()``.

Safety: the drill only signals pids from the state file after checking them (a node's pid must
match what its own admin endpoint reports and its command line must name the connector; etcd's
must name etcd; a replica's must run ``connector cloud`` and its admin endpoint answer), and it
only talks to loopback addresses.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import h11
import trio

REPO = Path(__file__).resolve().parents[2]
try:
    import connector  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
if str(REPO) not in sys.path:  # the benchmarks package (one definition of the disruption)
    sys.path.append(str(REPO))

from benchmarks.stats import disruption  # noqa: E402

POLL_INTERVAL = 0.05
ADMIN_TIMEOUT = 2.0
READY_TIMEOUT = 60.0  # a restarted replica must be ready (its /readyz 200) within this
DEFAULT_URL = "http://erp.virtual:8000/sap/opu/odata/chaos-drill"


class DrillError(Exception):
    """The drill cannot run (bad state file, unhealthy cluster, unsafe target); nothing was done."""


# --- the state file ------------------------------------------------------------------------------

@attrs.frozen
class NodeInfo:
    name: str
    pid: int
    admin_port: int
    config: str | None


@attrs.frozen
class ReplicaInfo:
    name: str
    pid: int
    admin_port: int


@attrs.frozen
class ClusterTarget:
    """What a drill acts on, from the state file of `connector demo --state-file`."""

    host: str
    subaccount: str
    location_id: str
    token: str
    admin_token: str | None  # the nodes' admin token (read from the demo's admin_token_file)
    cloud_admin_port: int
    http_proxy_port: int
    nodes: dict[str, NodeInfo]
    etcd_pid: int | None
    replicas: dict[str, ReplicaInfo] = attrs.field(factory=dict)  # a cloud cluster's (state key cloud_replicas)
    cloud_etcd_pid: int | None = None
    workdir: str | None = None  # the demo's: its logs/ takes a restarted replica's output


def _field(data: Any, path: str, kind: type | tuple[type, ...], source: str) -> Any:
    value = data
    for part in path.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
            continue
        if not isinstance(value, dict) or part not in value:
            raise DrillError(f"{source}: missing {path!r} (is this a `connector demo --state-file` file?)")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise DrillError(f"{source}: {path!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def parse_state(text: str, *, source: str = "state file", host: str = "127.0.0.1") -> ClusterTarget:
    """Parse and check a demo state file; every problem raises DrillError naming the key."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DrillError(f"{source}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DrillError(f"{source}: must be a JSON object")
    raw_nodes = _field(data, "nodes", dict, source)
    if not raw_nodes:
        raise DrillError(f"{source}: 'nodes' is empty")
    nodes = {}
    for name in raw_nodes:
        nodes[name] = NodeInfo(
            name=name,
            pid=_field(data, f"nodes.{name}.pid", int, source),
            admin_port=_field(data, f"nodes.{name}.admin_port", int, source),
            config=raw_nodes[name].get("config") if isinstance(raw_nodes[name], dict) else None,
        )
    etcd = data.get("etcd") or {}
    etcd_pid = etcd.get("pid") if isinstance(etcd, dict) else None
    raw_replicas = data.get("cloud_replicas") or []
    if not isinstance(raw_replicas, list):
        raise DrillError(f"{source}: 'cloud_replicas' must be a list")
    replicas = {}
    for index in range(len(raw_replicas)):
        name = _field(data, f"cloud_replicas.{index}.id", str, source)
        replicas[name] = ReplicaInfo(name, _field(data, f"cloud_replicas.{index}.pid", int, source),
                                     _field(data, f"cloud_replicas.{index}.admin_port", int, source))
    cloud_etcd_pid = _field(data, "cloud_etcd.pid", int, source) if "cloud_etcd" in data else None
    workdir = data.get("workdir")
    return ClusterTarget(
        host=require_loopback(host),
        subaccount=_field(data, "subaccount", str, source),
        location_id=_field(data, "location_id", str, source),
        token=_field(data, "token", str, source),
        admin_token=_read_admin_token(data.get("admin_token_file")),
        cloud_admin_port=_field(data, "cloud.admin_port", int, source),
        http_proxy_port=_field(data, "cloud.http_proxy_port", int, source),
        nodes=nodes,
        etcd_pid=etcd_pid if isinstance(etcd_pid, int) and not isinstance(etcd_pid, bool) else None,
        replicas=replicas,
        cloud_etcd_pid=cloud_etcd_pid,
        workdir=workdir if isinstance(workdir, str) else None,
    )


def _read_admin_token(path: Any) -> str | None:
    if not isinstance(path, str):
        return None  # a state file from before the admin token: /status and /switch will say 401
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise DrillError(f"cannot read the nodes' admin token {path}: {exc.strerror}") from None


def require_loopback(host: str) -> str:
    """Drills run against loopback only: refuse anything else."""
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise DrillError(f"refusing to drill against {host!r}: chaos drills run on loopback only")


def default_state_file() -> Path:
    """The running demo's pointer file (the same one `connector status` uses)."""
    override = os.environ.get("CONNECTOR_DEMO_POINTER")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return base / "connector" / "demo.json"


# --- pure analysis ---------------------------------------------------------------------------------

def master_of(status: Any, subaccount: str, location_id: str) -> tuple[str | None, int | None]:
    """(master, epoch) of one location in the cloud's ``GET /status`` answer; (None, None) if none."""
    if not isinstance(status, dict) or not isinstance(status.get("locations"), list):
        raise DrillError("cloud /status answer has no 'locations' list")
    for location in status["locations"]:
        if location.get("subaccount") == subaccount and location.get("location_id") == location_id:
            return location.get("master"), location.get("epoch")
    return None, None


@attrs.frozen
class MasterSample:
    at: float
    master: str | None
    epoch: int | None


@attrs.frozen
class RequestResult:
    started: float
    finished: float
    ok: bool
    reason: str  # "200", "503", "timeout", "connection refused"...


@attrs.frozen
class Report:
    drill: str
    old_master: str | None
    old_epoch: int | None
    new_master: str | None
    new_epoch: int | None
    fault_seconds: float  # how long the fault was applied (0 for kill and handover)
    master_changed_after: float | None
    takeover_seconds: float | None
    requests: int
    succeeded: int
    failed: int
    failures: dict[str, int]
    max_latency: float | None
    p99_latency: float | None
    disruption: float | None = None  # seconds; None when nothing succeeded after the fault window

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def first_master_change(
    samples: Sequence[MasterSample], fault_at: float, old_master: str | None
) -> MasterSample | None:
    """The first sample at or after the fault that names a master other than the old one."""
    for sample in samples:
        if sample.at >= fault_at and sample.master is not None and sample.master != old_master:
            return sample
    return None


def takeover_time(
    fault_at: float, change: MasterSample | None, results: Sequence[RequestResult]
) -> float | None:
    """Fault to the first successful request that completed once another master was named."""
    if change is None:
        return None
    served = [r.finished for r in results if r.ok and r.finished >= change.at]
    return min(served) - fault_at if served else None


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def analyse(
    drill: str,
    *,
    fault_at: float,
    fault_seconds: float,
    old_master: str | None,
    old_epoch: int | None,
    samples: Sequence[MasterSample],
    results: Sequence[RequestResult],
) -> Report:
    change = first_master_change(samples, fault_at, old_master)
    latencies = [r.finished - r.started for r in results]
    failures = Counter(r.reason for r in results if not r.ok)
    return Report(
        drill=drill,
        old_master=old_master,
        old_epoch=old_epoch,
        new_master=change.master if change else None,
        new_epoch=change.epoch if change else None,
        fault_seconds=fault_seconds,
        master_changed_after=(change.at - fault_at) if change else None,
        takeover_seconds=takeover_time(fault_at, change, results),
        requests=len(results),
        succeeded=sum(1 for r in results if r.ok),
        failed=sum(failures.values()),
        failures=dict(sorted(failures.items())),
        max_latency=max(latencies) if latencies else None,
        p99_latency=percentile(latencies, 0.99),
        disruption=_finite(disruption([(r.finished, r.ok) for r in results], fault_at, fault_at + fault_seconds)),
    )


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def format_report(report: Report) -> str:
    old = f"{report.old_master} (epoch {report.old_epoch})"
    new = f"{report.new_master} (epoch {report.new_epoch})" if report.new_master else "unchanged"
    lines = [
        f"drill {report.drill}: master {old} -> {new}",
        f"  fault applied for     {_seconds(report.fault_seconds)}",
        f"  master changed after  {_seconds(report.master_changed_after)}",
        f"  takeover (first request served by another node) {_seconds(report.takeover_seconds)}",
        f"  requests              {report.requests} sent, {report.succeeded} ok, {report.failed} failed",
        f"  latency               max {_seconds(report.max_latency)}, p99 {_seconds(report.p99_latency)}",
        "  disruption (longest gap between successful requests around the fault) "
        + ("none succeeded after it" if report.disruption is None else _seconds(report.disruption)),
    ]
    for reason, count in report.failures.items():
        lines.append(f"    failed: {count} x {reason}")
    return "\n".join(lines)


# --- processes -------------------------------------------------------------------------------------

def process_cmdline(pid: int) -> str:
    """The command line of a running process ("" if it does not exist or cannot be read)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def check_process(pid: int, must_contain: str, what: str) -> None:
    """Refuse to signal a pid that is gone or is not what the state file says it is."""
    cmdline = process_cmdline(pid)
    if not cmdline:
        raise DrillError(f"{what} (pid {pid}) is not running; is the demo still up?")
    if must_contain not in cmdline:
        raise DrillError(f"pid {pid} is {cmdline!r}, not {what}; refusing to signal it (stale state file?)")


# --- I/O -------------------------------------------------------------------------------------------

async def admin_json(host: str, port: int, path: str, *, method: str = "GET", time_limit: float = ADMIN_TIMEOUT,
                     token: str | None = None) -> Any:
    from connector.admin import http_request

    status, body = await http_request(host, port, path, method=method, timeout=time_limit, token=token)
    if status != 200:
        raise DrillError(f"{method} http://{host}:{port}{path} answered {status}: {body[:200]!r}")
    return json.loads(body)


async def proxy_get(host: str, port: int, url: str, token: str, time_limit: float) -> str:
    """One GET through the HTTP connectivity proxy; returns the status code or the error as text."""
    target = url.encode()
    authority = url.split("//", 1)[-1].split("/", 1)[0]
    try:
        with trio.fail_after(time_limit):
            stream = await trio.open_tcp_stream(host, port)
            try:
                conn = h11.Connection(h11.CLIENT)
                request = h11.Request(method="GET", target=target, headers=[
                    ("host", authority), ("proxy-authorization", f"Bearer {token}"), ("connection", "close")])
                await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                status = 0
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.EndOfMessage):
                        return str(status)
                    elif isinstance(event, h11.ConnectionClosed):
                        return "connection closed"
            finally:
                await trio.aclose_forcefully(stream)
    except trio.TooSlowError:
        return "timeout"
    except h11.ProtocolError as exc:
        return f"bad HTTP: {exc}"
    except OSError as exc:
        return type(exc).__name__


@attrs.frozen
class LoadBounds:
    concurrency: int = 4
    requests: int = 5000
    rate: float = 100.0  # requests per second over all workers, so a long drill keeps load throughout
    timeout: float = 10.0
    url: str = DEFAULT_URL


class Recorder:
    """Collects master samples and request results while the drill runs."""

    def __init__(self) -> None:
        self.samples: list[MasterSample] = []
        self.results: list[RequestResult] = []
        self.stop = trio.Event()

    async def watch(self, target: ClusterTarget) -> None:
        while not self.stop.is_set():
            now = trio.current_time()
            try:
                status = await admin_json(target.host, target.cloud_admin_port, "/status", time_limit=1.0)
                master, epoch = master_of(status, target.subaccount, target.location_id)
                self.samples.append(MasterSample(now, master, epoch))
            except (OSError, trio.TooSlowError, ValueError, DrillError):
                pass  # a missed poll is just a gap (the polled replica may be the one restarted)
            await trio.sleep(POLL_INTERVAL)

    async def load(self, target: ClusterTarget, bounds: LoadBounds) -> None:
        budget = [bounds.requests]
        next_slot = [trio.current_time()]

        async def worker() -> None:
            while not self.stop.is_set() and budget[0] > 0:
                budget[0] -= 1
                slot = next_slot[0] = max(next_slot[0], trio.current_time())
                next_slot[0] += 1.0 / bounds.rate
                await trio.sleep_until(slot)
                if self.stop.is_set():
                    return
                started = trio.current_time()
                outcome = await proxy_get(target.host, target.http_proxy_port, bounds.url, target.token, bounds.timeout)
                self.results.append(RequestResult(started, trio.current_time(), outcome == "200", outcome))

        async with trio.open_nursery() as nursery:
            for _ in range(bounds.concurrency):
                nursery.start_soon(worker)


# --- the drills ------------------------------------------------------------------------------------

Fault = Callable[[ClusterTarget, NodeInfo], Any]  # async; returns how long the fault was applied


def _signal(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


async def fault_kill(target: ClusterTarget, master: NodeInfo) -> float:
    _signal(master.pid, signal.SIGKILL)
    return 0.0


def fault_freeze(seconds: float) -> Fault:
    async def freeze(target: ClusterTarget, master: NodeInfo) -> float:
        started = trio.current_time()
        _signal(master.pid, signal.SIGSTOP)
        try:
            await trio.sleep(seconds)
        finally:
            _signal(master.pid, signal.SIGCONT)  # synchronous: runs even when cancelled
        return trio.current_time() - started
    return freeze


def fault_handover(method: str) -> Fault:
    async def handover(target: ClusterTarget, master: NodeInfo) -> float:
        if method == "sigterm":
            _signal(master.pid, signal.SIGTERM)
        else:
            await admin_json(target.host, master.admin_port, "/switch", method="POST", time_limit=15.0,
                             token=target.admin_token)
        return 0.0
    return handover


async def _freeze(pid: int | None, seconds: float) -> float:
    """SIGSTOP `pid` for `seconds` (SIGCONT on every exit); the seconds it was stopped."""
    assert pid is not None
    started = trio.current_time()
    _signal(pid, signal.SIGSTOP)
    try:
        await trio.sleep(seconds)
    finally:
        _signal(pid, signal.SIGCONT)
    return trio.current_time() - started


def fault_etcd_outage(seconds: float) -> Fault:
    async def outage(target: ClusterTarget, master: NodeInfo) -> float:
        return await _freeze(target.etcd_pid, seconds)
    return outage


def process_cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError as exc:
        raise DrillError(f"cannot read the working directory of pid {pid}: {exc.strerror}") from None


def process_argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as exc:
        raise DrillError(f"cannot read the command line of pid {pid}: {exc.strerror}") from None
    return [part.decode() for part in raw.split(b"\0") if part]


async def check_replica(target: ClusterTarget, replica: ReplicaInfo) -> None:
    """The replica's pid runs `connector cloud` and its admin endpoint answers."""
    check_process(replica.pid, "connector cloud", f"cloud replica {replica.name}")
    try:
        await admin_json(target.host, replica.admin_port, "/status")
    except (OSError, trio.TooSlowError) as exc:
        raise DrillError(f"{replica.name}'s admin endpoint does not answer: {exc}") from None


async def wait_gone(pid: int, what: str) -> None:
    """Until `pid` is no longer a running connector (gone, or a zombie its parent has not reaped)."""
    with trio.move_on_after(READY_TIMEOUT):
        while True:
            if "connector" not in process_cmdline(pid):
                return
            await trio.sleep(POLL_INTERVAL)  # another process: /proc is all there is to poll
    raise DrillError(f"{what} (pid {pid}) still runs {READY_TIMEOUT:g} s after the signal")


async def wait_ready(target: ClusterTarget, replica: ReplicaInfo) -> None:
    from connector.admin import http_request

    last = ""
    with trio.move_on_after(READY_TIMEOUT):
        while True:
            try:
                status, body = await http_request(target.host, replica.admin_port, "/readyz", timeout=1.0)
                if status == 200:
                    return
                last = f"{status} {body[:120]!r}"
            except (OSError, trio.TooSlowError) as exc:
                last = repr(exc)
            await trio.sleep(POLL_INTERVAL)
    raise DrillError(f"{replica.name} not ready {READY_TIMEOUT:g} s after its restart (last /readyz: {last})")


async def wait_in_rotation(target: ClusterTarget, replica: ReplicaInfo) -> None:
    """Until the load balancer sends to `replica` again: it answered a request of the load (its own
    counter). Ready is not enough: HAProxy takes a replica back after 2 passing checks, and
    stopping the next one before that leaves HAProxy with none in rotation for a moment."""
    from connector.admin import http_request

    pattern = re.compile(rb'connector_proxy_requests_total\{[^}]*proxy="http"[^}]*status="200"[^}]*\} (\S+)')
    with trio.move_on_after(READY_TIMEOUT):
        while True:
            try:
                _, body = await http_request(target.host, replica.admin_port, "/metrics", timeout=1.0)
                match = pattern.search(body)
                if match and float(match.group(1)) > 0:
                    return
            except (OSError, trio.TooSlowError):
                pass
            await trio.sleep(POLL_INTERVAL)  # another process: its metrics are all there is to poll
    raise DrillError(f"{replica.name} took no request through the load balancer {READY_TIMEOUT:g} s after its restart")


def start_again(target: ClusterTarget, name: str, argv: list[str], cwd: str) -> int:
    """Start a replica with the command line it had, in a session of its own: it outlives this
    drill and, no child of the demo, the demo's stop too (its pid is printed to stop it after)."""
    env = {k: v for k, v in os.environ.items() if k != "CONNECTOR_PARENT_PID"}
    log_dir = Path(target.workdir or cwd) / "logs"
    log_path = log_dir / f"{name}.log" if log_dir.is_dir() else Path(os.devnull)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"{name} started again: pid {process.pid}; the state file still names the old pid, and the demo's "
          f"stop does not stop it: `kill {process.pid}` after the demo", file=sys.stderr)
    return process.pid


def pick_replica(target: ClusterTarget, name: str | None) -> ReplicaInfo:
    if not target.replicas:
        raise DrillError("the state file lists no cloud replicas (start `connector demo --cloud-replicas 2`)")
    if name is None:
        return list(target.replicas.values())[-1]
    if name not in target.replicas:
        raise DrillError(f"no replica {name!r} in the state file; there are {sorted(target.replicas)}")
    return target.replicas[name]


def fault_kill_replica(name: str | None, seconds: float) -> Fault:
    async def kill_replica(target: ClusterTarget, master: NodeInfo) -> float:
        replica = pick_replica(target, name)
        argv, cwd = process_argv(replica.pid), process_cwd(replica.pid)
        started = trio.current_time()
        _signal(replica.pid, signal.SIGKILL)
        await wait_gone(replica.pid, replica.name)
        await trio.sleep(seconds)
        pid = start_again(target, replica.name, argv, cwd)
        await wait_ready(target, attrs.evolve(replica, pid=pid))
        return trio.current_time() - started
    return kill_replica


async def fault_rolling_restart(target: ClusterTarget, master: NodeInfo) -> float:
    if not target.replicas:
        raise DrillError("the state file lists no cloud replicas (start `connector demo --cloud-replicas 2`)")
    started = trio.current_time()
    for replica in target.replicas.values():
        argv, cwd = process_argv(replica.pid), process_cwd(replica.pid)
        _signal(replica.pid, signal.SIGTERM)
        await wait_gone(replica.pid, replica.name)
        pid = start_again(target, replica.name, argv, cwd)
        await wait_ready(target, attrs.evolve(replica, pid=pid))
        await wait_in_rotation(target, replica)
    return trio.current_time() - started


def fault_cloud_etcd_outage(seconds: float) -> Fault:
    async def outage(target: ClusterTarget, master: NodeInfo) -> float:
        return await _freeze(target.cloud_etcd_pid, seconds)
    return outage


async def find_master(target: ClusterTarget) -> tuple[NodeInfo, int | None]:
    try:
        status = await admin_json(target.host, target.cloud_admin_port, "/status")
    except (OSError, trio.TooSlowError) as exc:
        raise DrillError(f"cloud admin endpoint on port {target.cloud_admin_port} does not answer: {exc}") from None
    name, epoch = master_of(status, target.subaccount, target.location_id)
    if name is None:
        raise DrillError(f"location {target.location_id!r} of {target.subaccount} has no master; not acting")
    if name not in target.nodes:
        raise DrillError(f"the master {name!r} is not a node of the state file; not acting")
    node = target.nodes[name]
    check_process(node.pid, "connector", f"connector node {name}")
    try:
        live = await admin_json(target.host, node.admin_port, "/status", token=target.admin_token)
    except (OSError, trio.TooSlowError) as exc:
        raise DrillError(f"{name}'s admin endpoint does not answer: {exc}") from None
    if live.get("pid") != node.pid:
        raise DrillError(f"{name} reports pid {live.get('pid')}, the state file says {node.pid}; not acting")
    return node, epoch


async def run_drill(
    name: str, target: ClusterTarget, fault: Fault, bounds: LoadBounds, *, warmup: float, observe: float,
    log: Callable[[str], None] = print,
) -> Report:
    if name == "etcd-outage":
        if target.etcd_pid is None:
            raise DrillError("the state file has no etcd pid (was etcd started by the demo?)")
        check_process(target.etcd_pid, "etcd", "etcd")
    if name == "cloud-etcd-outage":
        if target.cloud_etcd_pid is None:
            raise DrillError("the state file has no cloud etcd (start `connector demo --cloud-replicas 2`)")
        check_process(target.cloud_etcd_pid, "etcd", "the cloud etcd")
    if name in ("kill-replica", "rolling-restart"):
        if not target.replicas:
            raise DrillError("the state file lists no cloud replicas (start `connector demo --cloud-replicas 2`)")
        for replica in target.replicas.values():
            await check_replica(target, replica)
    master, epoch = await find_master(target)
    recorder = Recorder()
    fault_at = fault_seconds = 0.0
    refused: DrillError | None = None  # raised after the nursery, so it is not wrapped in a group
    async with trio.open_nursery() as nursery:
        nursery.start_soon(recorder.watch, target)
        nursery.start_soon(recorder.load, target, bounds)
        try:
            await trio.sleep(warmup)
            warm = list(recorder.results)
            if not warm or not all(r.ok for r in warm):
                bad = Counter(r.reason for r in warm if not r.ok)
                raise DrillError(f"warm-up was not clean ({len(warm)} requests, failures {dict(bad)}); not acting")
            log(f"{name}: master is {master.name} (pid {master.pid}, epoch {epoch}); "
                f"{len(warm)} warm-up requests ok; applying the fault")
            fault_at = trio.current_time()
            fault_seconds = await fault(target, master)
            await trio.sleep(observe)
        except (DrillError, OSError, trio.TooSlowError) as exc:
            refused = exc if isinstance(exc, DrillError) else DrillError(f"{name} failed: {exc}")
        finally:
            recorder.stop.set()
    if refused is not None:
        raise refused
    return analyse(name, fault_at=fault_at, fault_seconds=fault_seconds, old_master=master.name,
                   old_epoch=epoch, samples=recorder.samples, results=recorder.results)


# --- command line ----------------------------------------------------------------------------------

DRILLS: dict[str, str] = {
    "kill-master": "kill -9 the master; a shadow takes over (the node stays dead: restart it after)",
    "freeze-master": "SIGSTOP the master for SECONDS, then SIGCONT; a shadow takes over, the old master is fenced",
    "handover": "graceful handover: POST /switch to the master (like `connector switch`) or SIGTERM it",
    "etcd-outage": "SIGSTOP etcd for SECONDS, then SIGCONT; the master keeps serving, no failover",
    "kill-replica": "kill -9 a cloud replica (--replica, default the last), start it again after SECONDS; "
                    "the others serve meanwhile",
    "rolling-restart": "SIGTERM each cloud replica in turn (it drains and exits), start it again, wait until "
                       "ready, then the next; no request may fail",
    "cloud-etcd-outage": "SIGSTOP the cloud etcd for SECONDS, then SIGCONT; the replicas keep serving",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drill.py",
        description="Chaos drills against a running connector cluster (loopback only). "
                    "Each runs a bounded request load through the HTTP proxy while it acts, then reports "
                    "the takeover time and the failed requests. See deploy/chaos/README.md.",
    )
    sub = parser.add_subparsers(dest="drill", required=True, metavar="DRILL")
    for name, help_text in DRILLS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("freeze-master", "etcd-outage", "cloud-etcd-outage"):
            p.add_argument("seconds", type=float, metavar="SECONDS", help="how long to keep the process stopped")
        if name == "kill-replica":
            p.add_argument("seconds", type=float, metavar="SECONDS", help="how long the replica stays down")
            p.add_argument("--replica", default=None, help="the replica's id (default: the last in the state file)")
        if name == "handover":
            p.add_argument("--method", choices=["switch", "sigterm"], default="switch",
                           help="switch: POST /switch, the node stays a shadow (default); sigterm: the node exits")
        p.add_argument("--state-file", type=Path, default=None,
                       help="JSON written by `connector demo --state-file` (default: the running demo's)")
        p.add_argument("--host", default="127.0.0.1", help="loopback address of the cluster (default 127.0.0.1)")
        p.add_argument("--url", default=DEFAULT_URL, help=f"URL requested through the proxy (default {DEFAULT_URL})")
        p.add_argument("--concurrency", type=int, default=4, help="parallel request workers (default 4)")
        p.add_argument("--requests", type=int, default=5000, help="at most this many requests in all (default 5000)")
        p.add_argument("--rate", type=float, default=100.0, help="at most this many requests per second (default 100)")
        p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in seconds (default 10)")
        p.add_argument("--warmup", type=float, default=1.0, help="seconds of clean load before the fault (default 1)")
        p.add_argument("--observe", type=float, default=6.0, help="seconds of load after the fault (default 6)")
        p.add_argument("--max-failed", type=int, default=None, help="exit 1 if more requests than this failed")
        p.add_argument("--max-takeover", type=float, default=None,
                       help="exit 1 if there was no takeover within this many seconds")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _check_bounds(args: argparse.Namespace) -> None:
    if not 1 <= args.concurrency <= 64:
        raise DrillError("--concurrency must be between 1 and 64")
    if not 1 <= args.requests <= 100_000:
        raise DrillError("--requests must be between 1 and 100000")
    if not 0 < args.rate <= 10_000:
        raise DrillError("--rate must be > 0 and <= 10000 requests per second")
    for name in ("timeout", "warmup", "observe"):
        if not 0 < getattr(args, name) <= 600:
            raise DrillError(f"--{name} must be > 0 and <= 600 seconds")
    if getattr(args, "seconds", 1.0) is not None and not 0 < getattr(args, "seconds", 1.0) <= 600:
        raise DrillError("SECONDS must be > 0 and <= 600")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_bounds(args)
        state_file = args.state_file or default_state_file()
        try:
            text = state_file.read_text()
        except OSError as exc:
            raise DrillError(f"cannot read state file {state_file}: {exc.strerror} "
                             "(start `connector demo --state-file state.json` first)") from None
        target = parse_state(text, source=str(state_file), host=args.host)
        fault: Fault
        if args.drill == "kill-master":
            fault = fault_kill
        elif args.drill == "freeze-master":
            fault = fault_freeze(args.seconds)
        elif args.drill == "handover":
            fault = fault_handover(args.method)
        elif args.drill == "kill-replica":
            fault = fault_kill_replica(args.replica, args.seconds)
        elif args.drill == "rolling-restart":
            fault = fault_rolling_restart
        elif args.drill == "cloud-etcd-outage":
            fault = fault_cloud_etcd_outage(args.seconds)
        else:
            fault = fault_etcd_outage(args.seconds)
        bounds = LoadBounds(concurrency=args.concurrency, requests=args.requests, rate=args.rate,
                            timeout=args.timeout, url=args.url)
        report = trio.run(lambda: run_drill(args.drill, target, fault, bounds, warmup=args.warmup,
                                            observe=args.observe, log=lambda s: print(s, file=sys.stderr)))
    except DrillError as exc:
        print(f"drill: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    if args.drill in ("kill-master",) or getattr(args, "method", None) == "sigterm":
        node = target.nodes.get(report.old_master or "")
        if node is not None and node.config:
            print(f"{report.old_master} is down; restart it with: connector node --config {node.config}", file=sys.stderr)
    verdict = 0
    if args.max_failed is not None and report.failed > args.max_failed:
        print(f"drill: {report.failed} failed requests > --max-failed {args.max_failed}", file=sys.stderr)
        verdict = 1
    if args.max_takeover is not None and (report.takeover_seconds is None or report.takeover_seconds > args.max_takeover):
        print(f"drill: takeover {_seconds(report.takeover_seconds)} not within --max-takeover {args.max_takeover} s",
              file=sys.stderr)
        verdict = 1
    return verdict


if __name__ == "__main__":
    sys.exit(main())
