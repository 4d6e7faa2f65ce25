"""Failover drills on real processes: a cluster, a bounded load, faults, and the checkers.

Theory of operation
-------------------
`Cluster` wraps `connector.demo.Demo`: etcd (or none, when the test brings its own), the cloud
side, N nodes and the demo backend as real child processes in a temporary directory, on free
loopback ports. It finds the master the way an operator would, from the cloud's admin
``GET /status``, and signals node processes by pid; frozen (SIGSTOPped) nodes are thawed before
the cluster stops, so teardown never waits on a stopped process.

`Load` sends GET requests through the cloud's HTTP connectivity proxy, one fresh connection per
request (as a cloud application without pooling would), from a few workers, bounded both in count
and in time. Each request has a unique path ``/sap/opu/odata/drill/<label>/<seq>`` and records
its start and end (``trio.current_time()``), status, and failure reason (the proxy's
``X-Connector-Error`` token, or the exception's type). Which node served a request is read back
from the nodes' audit logs (one JSON line per request, naming the path), so the time of "the
first request served by the new master" needs no clock shared between processes.

`SocksLoad` is the same for the SOCKS5 proxy: each connect (SAP's method 0x80) goes to the demo's
TCP echo mapping (``echo.virtual:7000``), sends a unique line and must read it back; it counts as
status 200 when it did, else records the SOCKS5 reply code (or the exception's type).

The checkers are pure functions over what was recorded, returning a list of violations (empty
when the drill passed), so they are unit-tested on hand-made records:

1. `check_routing`: the cloud's routing log (which node/epoch got each new stream, in order)
   never goes back to a lower epoch and gives each epoch to one node only, i.e. at most one
   node served at any moment;
2. `check_epoch_increased`: the new master's epoch is higher than the old one;
3. `check_requests`: every request returned 200, or was in flight when the fault hit (started
   before the end of a fault window and ended after its start) and failed as a lost connector
   does (502 ``connector_connection_lost``/``no_response``/``stale_epoch``, or a reset).
   For a crash or a freeze the window lasts until the cloud names the new master: until then
   the cloud still routes new streams to the old one (a killed process needs milliseconds to exit
   and its tunnel's end to be read; a stopped one looks merely slow until it is fenced).
   A 503 (the failover hold timed out) or a timeout is always a failure;
4. `check_fenced_after`: no stream went to the old (node, epoch) after the new epoch's first one.
"""

# The wait helpers take a `timeout` on purpose: on expiry they fail with what they last saw.
# ruff: noqa: ASYNC109

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import h11
import trio

from connector import haproxy
from connector.admin import http_request
from connector.cloud.shared import FENCE_PREFIX, parse_fence
from connector.demo import Demo, DemoSpec, etcd_command, find_etcd, replica_ids
from tests.support.httpclient import HttpClient
from tests.support.socks import socks5_connect

TARGET_PREFIX = "http://erp.virtual:8000/sap/opu/odata/drill"
REPLICA_SERVICES = ("tunnel", "admin", "http_proxy", "socks5", "destinations")  # a replica's ports
CLOUD_PREFIX = "/connector-cloud"  # the demo's [shared] prefix
ADMIN_TIMEOUT = 1.0
POLL = 0.02  # seconds between polls of another process's admin API (all a real process offers)

# How a request that was in flight on a lost master may fail.
IN_FLIGHT_REASONS = frozenset({"connector_connection_lost", "no_response", "stale_epoch", "tunnel_lost"})
RESET_ERRORS = frozenset({"BrokenResourceError", "ClosedResourceError", "ConnectionResetError",
                          "RemoteProtocolError", "EndOfStream"})


# --- records ------------------------------------------------------------------------------------


@attrs.frozen
class RequestResult:
    """One request of the load, as the client saw it."""

    seq: int
    path: str
    start: float
    end: float
    status: int | None  # None: no response (reset, timeout)
    reason: str = ""  # X-Connector-Error token, exception type name, or "timeout"
    method: str = "GET"

    @property
    def ok(self) -> bool:
        return self.status == 200


@attrs.frozen
class FaultWindow:
    """When a fault could have cost in-flight requests: [start, end] in trio time."""

    start: float
    end: float

    @classmethod
    def at(cls, moment: float) -> FaultWindow:
        return cls(moment, moment)


# --- checkers (pure) -----------------------------------------------------------------------------


def check_routing(routing: Sequence[dict[str, Any]]) -> list[str]:
    """Epochs never go back, and each epoch is carried by exactly one node."""
    problems: list[str] = []
    owner: dict[int, str] = {}
    previous: int | None = None
    for index, entry in enumerate(routing):
        node, epoch = str(entry.get("node")), entry.get("epoch")
        if epoch is None:
            problems.append(f"routing[{index}]: stream to {node} recorded without an epoch")
            continue
        if previous is not None and epoch < previous:
            problems.append(f"routing[{index}]: epoch went back from {previous} to {epoch} ({node})")
        if owner.setdefault(epoch, node) != node:
            problems.append(f"routing[{index}]: epoch {epoch} served by both {owner[epoch]} and {node}")
        previous = epoch if previous is None else max(previous, epoch)
    return problems


def check_epoch_increased(old_epoch: int, new_epoch: int | None) -> list[str]:
    if new_epoch is None:
        return [f"no new master after the fault (old epoch {old_epoch})"]
    if new_epoch <= old_epoch:
        return [f"new epoch {new_epoch} is not higher than the old epoch {old_epoch}"]
    return []


def in_flight(result: RequestResult, windows: Iterable[FaultWindow]) -> bool:
    return any(result.start <= w.end and result.end >= w.start for w in windows)


def lost_with_master(result: RequestResult) -> bool:
    """Failed the way a request on a lost connector does (not a hold timeout, not a hang)."""
    if result.status == 502:
        return result.reason in IN_FLIGHT_REASONS
    if result.status is None:
        return result.reason in RESET_ERRORS
    return False


def check_requests(results: Sequence[RequestResult], windows: Iterable[FaultWindow] = ()) -> list[str]:
    windows = list(windows)
    problems = []
    for r in results:
        if r.ok:
            continue
        if in_flight(r, windows) and lost_with_master(r):
            continue
        problems.append(
            f"request {r.seq} failed: status {r.status} {r.reason!r} "
            f"(started {r.start:.3f}, ended {r.end:.3f}; fault windows "
            f"{[(round(w.start, 3), round(w.end, 3)) for w in windows]})"
        )
    return problems


def failed(results: Sequence[RequestResult]) -> list[RequestResult]:
    return [r for r in results if not r.ok]


def check_fenced_after(routing: Sequence[dict[str, Any]], old_node: str, old_epoch: int, new_epoch: int) -> list[str]:
    """After the first stream of `new_epoch`, none went to (old_node, old_epoch)."""
    first_new = next((i for i, e in enumerate(routing) if e.get("epoch") == new_epoch), None)
    if first_new is None:
        return [f"no stream was routed with the new epoch {new_epoch}"]
    return [
        f"routing[{i}]: {old_node} served with its old epoch {old_epoch} after epoch {new_epoch} began"
        for i, e in enumerate(routing)
        if i > first_new and e.get("node") == old_node and e.get("epoch") == old_epoch
    ]


def takeover_time(
    results: Sequence[RequestResult], fault: float, served_by: dict[str, str], new_master: str
) -> float | None:
    """Fault to the end of the first successful request the new master served."""
    ends = [r.end for r in results if r.ok and served_by.get(r.path) == new_master and r.end >= fault]
    return min(ends) - fault if ends else None


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction in [0, 1]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# --- load ----------------------------------------------------------------------------------------

CONNECTION_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, AssertionError)


def classify_error(exc: BaseException) -> str:
    """The reason to record for a request that got no complete response; re-raises anything else.

    HttpClient runs send and receive in a nursery, so errors may come wrapped in exception groups.
    An AssertionError from HttpClient means the connection closed instead of answering.
    """
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            leaves.append(e)

    walk(exc)
    if not leaves or not all(isinstance(e, CONNECTION_ERRORS) for e in leaves):
        raise exc
    first = leaves[0]
    if isinstance(first, AssertionError | h11.RemoteProtocolError):
        return "RemoteProtocolError"
    return type(first).__name__


class Load:
    """Bounded load through the HTTP proxy: at most `max_requests`, for at most `max_seconds`.

    GET requests, and with `post_every` = n every n-th one a POST with a body the demo's internal
    host echoes (a POST answered with anything but its own body counts as failed: "echo_mismatch").
    """

    def __init__(
        self,
        proxy_port: int,
        token: str,
        *,
        label: str = "load",
        concurrency: int = 2,
        max_requests: int = 2000,
        max_seconds: float = 30.0,
        interval: float = 0.01,
        request_timeout: float = 15.0,
        post_every: int = 0,
    ) -> None:
        self.post_every = post_every
        self.proxy_port = proxy_port
        self.token = token
        self.label = label
        self.concurrency = concurrency
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.interval = interval
        self.request_timeout = request_timeout
        self.results: list[RequestResult] = []
        self._next = 0
        self._stop = trio.Event()
        self._progress = trio.Event()  # set (and replaced) at every result

    def stop(self) -> None:
        self._stop.set()

    def path(self, seq: int) -> str:
        return f"/sap/opu/odata/drill/{self.label}/{seq}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.move_on_after(self.max_seconds):
            async with trio.open_nursery() as nursery:
                for _ in range(self.concurrency):
                    nursery.start_soon(self._worker)
                task_status.started()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

    async def _worker(self) -> None:
        while self._next < self.max_requests and not self._stop.is_set():
            seq = self._next
            self._next += 1
            self.results.append(await self.one(seq))
            self._progress.set()
            self._progress = trio.Event()
            await trio.sleep(self.interval)
        if self._next >= self.max_requests:
            self._stop.set()

    async def one(self, seq: int) -> RequestResult:
        path = self.path(seq)
        start = trio.current_time()
        status: int | None = None
        reason = "timeout"
        post = self.post_every > 0 and seq % self.post_every == self.post_every - 1
        body = f"POST {self.label} {seq} ".encode() * 64 if post else None
        with trio.move_on_after(self.request_timeout):
            client: HttpClient | None = None
            try:
                client = await HttpClient.connect(self.proxy_port)
                response = await client.request(
                    "POST" if post else "GET", f"http://erp.virtual:8000{path}",
                    [("Proxy-Authorization", f"Bearer {self.token}")], body)
                status, reason = response.status, response.headers.get("x-connector-error", "")
                if post and status == 200 and response.body != body:
                    status, reason = None, "echo_mismatch"
            except (Exception, BaseExceptionGroup) as exc:  # noqa: B902 - classified, or re-raised
                status, reason = None, classify_error(exc)
            finally:
                if client is not None:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(client.stream)
        return RequestResult(seq, path, start, trio.current_time(), status, reason, "POST" if post else "GET")

    async def wait_ok(self, count: int, *, since: float | None = None, timeout: float = 15.0) -> None:
        """Until `count` more requests succeeded (started at `since` or later, if given): the load
        is being served. Fails with the failures seen when that takes longer than `timeout`."""
        def ok() -> int:
            return sum(1 for r in self.results if r.ok and (since is None or r.start >= since))

        target = ok() + count
        with trio.move_on_after(timeout):
            while ok() < target:
                await self._progress.wait()
            return
        raise AssertionError(f"timed out after {timeout} s waiting for {count} successful requests; "
                             + describe_failures(self.results))

    def results_by_start(self) -> list[RequestResult]:
        return sorted(self.results, key=lambda r: r.start)


SOCKS_TARGET = ("echo.virtual", 7000)  # the demo's TCP echo mapping


class SocksLoad(Load):
    """Bounded SOCKS5 connects (`Load` for the SOCKS5 proxy, `proxy_port` its port): each carries
    one unique line to the echo mapping and reads it back. `status` 200 means just that; a refused
    connect records its reply code, with reason ``socks5 reply 0xNN``."""

    async def one(self, seq: int) -> RequestResult:
        path = self.path(seq)
        start = trio.current_time()
        status: int | None = None
        reason = "timeout"
        with trio.move_on_after(self.request_timeout):
            stream: trio.SocketStream | None = None
            try:
                stream, code = await socks5_connect(self.proxy_port, *SOCKS_TARGET, token=self.token, method=0x80)
                if code != 0:
                    status, reason = code, f"socks5 reply {code:#04x}"
                else:
                    line = path.encode() + b"\n"
                    await stream.send_all(line)
                    echoed = b""
                    while len(echoed) < len(line) and (data := await stream.receive_some(len(line))):
                        echoed += data
                    status, reason = (200, "") if echoed == line else (None, "EndOfStream")
            except EOFError:  # closed during the handshake
                status, reason = None, "EndOfStream"
            except (Exception, BaseExceptionGroup) as exc:  # noqa: B902 - classified, or re-raised
                status, reason = None, classify_error(exc)
            finally:
                if stream is not None:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(stream)
        return RequestResult(seq, path, start, trio.current_time(), status, reason)


# --- cluster -------------------------------------------------------------------------------------


def fast_spec(**changes: Any) -> DemoSpec:
    """The demo's defaults on free proxy ports (tests never take the demo's fixed ports)."""
    return DemoSpec(**{"http_port": 0, "socks5_port": 0, **changes})


class Cluster:
    """A running demo cluster with drill helpers. Use as ``async with Cluster(spec) as c:``."""

    def __init__(self, spec: DemoSpec | None = None, workdir: Path | None = None) -> None:
        self._owned = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="connector-failover-")).resolve()
        self.demo = Demo(self.workdir, spec or fast_spec())
        self.state: dict[str, Any] = {}
        self.frozen: set[int] = set()
        self.added_replicas: list[str] = []

    async def __aenter__(self) -> Cluster:
        # Ports are picked free and then bound by the children: another process on the machine
        # may take one in between. That (and only that) is retried once, on new ports.
        for attempt in (1, 2):
            try:
                self.state = await self.demo.start()
                return self
            except BaseException as exc:
                tails = self.log_tails()
                with trio.CancelScope(shield=True):
                    await self.demo.stop()
                if attempt == 1 and isinstance(exc, Exception) and "Address already in use" in tails:
                    for sub in ("logs", "state"):  # etcd's data names the old peer port
                        shutil.rmtree(self.workdir / sub, ignore_errors=True)
                    self.demo = Demo(self.workdir, self.demo.spec)
                    continue
                self._owned = False  # keep the logs of a cluster that failed to start
                if isinstance(exc, Exception):
                    raise RuntimeError(f"cluster failed to start: {exc}\n{tails}") from exc
                raise
        raise AssertionError("unreachable")

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for path in sorted((self.workdir / "logs").glob("*.log")):
            text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    async def aclose(self) -> None:
        for pid in list(self.frozen):
            self._kill(pid, signal.SIGCONT)
        self.frozen.clear()
        # Nodes get SIGKILL: a graceful stop waits for drains and teaches these tests nothing.
        for node in self.demo.spec.nodes:
            process = self.demo.processes.get(node)
            if process is not None and process.poll() is None:
                process.kill()
        await self.demo.stop()
        if self._owned and not os.environ.get("FAILOVER_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- where things are

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.demo.spec.nodes

    @property
    def proxy_port(self) -> int:
        return int(self.demo.ports["http_proxy"])

    @property
    def token(self) -> str:
        return str(self.state["token"])

    @property
    def socks5_port(self) -> int:
        return int(self.demo.ports["socks5_proxy"])

    def load(self, label: str, *, proxy: str = "http", **kwargs: Any) -> Load:
        """A `Load` through the HTTP proxy, or a `SocksLoad` through the SOCKS5 proxy."""
        if proxy == "socks5":
            return SocksLoad(self.socks5_port, self.token, label=label, **kwargs)
        return Load(self.proxy_port, self.token, label=label, **kwargs)

    def pid(self, node: str) -> int:
        return int(self.demo.processes[node].pid)

    def alive(self, node: str) -> bool:
        process = self.demo.processes.get(node)
        return process is not None and process.poll() is None

    # --- the cloud's view (`replica`: one replica's own; None: the single cloud, or cloud-1)

    def admin_port(self, replica: str | None = None) -> int:
        return int(self.demo.ports["cloud_admin" if replica is None else f"{replica}_admin"])

    async def cloud_status(self, replica: str | None = None) -> dict[str, Any]:
        status, body = await http_request("127.0.0.1", self.admin_port(replica), "/status", timeout=ADMIN_TIMEOUT)
        if status != 200:
            raise RuntimeError(f"{replica or 'cloud'} /status answered {status}")
        locations = json.loads(body)["locations"]
        return dict(locations[0]) if locations else {}

    async def routing(self, replica: str | None = None) -> list[dict[str, Any]]:
        """The replica's routing log: which node/epoch got each new stream, in order."""
        return list((await self.cloud_status(replica)).get("routing", []))

    async def master(self, replica: str | None = None) -> tuple[str | None, int | None]:
        location = await self.cloud_status(replica)
        return location.get("master"), location.get("epoch")

    async def wait_cloud(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str,
                         replica: str | None = None) -> dict[str, Any]:
        last: dict[str, Any] | str = {}
        with trio.move_on_after(timeout):
            while True:
                try:
                    last = await self.cloud_status(replica)
                    if predicate(last):
                        return last
                except (OSError, trio.TooSlowError, ValueError, RuntimeError) as exc:
                    last = repr(exc)
                await trio.sleep(POLL)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                             f"{replica or 'cloud'} status: {last}")

    async def wait_master(self, *, other_than: str | None = None, above_epoch: int = -1, timeout: float = 15.0,
                          replica: str | None = None) -> tuple[str, int]:
        location = await self.wait_cloud(
            lambda loc: loc.get("master") is not None and loc.get("master") != other_than
            and (loc.get("epoch") or -1) > above_epoch,
            timeout, f"a master other than {other_than} above epoch {above_epoch}", replica,
        )
        return str(location["master"]), int(location["epoch"])

    async def wait_tunnels(self, count: int, timeout: float = 15.0) -> dict[str, Any]:
        """Until the cloud has a master and `count` tunnels (the shadows' standby connections)."""
        return await self.wait_cloud(
            lambda loc: loc.get("master") is not None and len(loc.get("tunnels", [])) == count,
            timeout, f"a master and {count} tunnels",
        )

    # --- a node's own view

    async def node_status(self, node: str) -> dict[str, Any]:
        port = self.demo.ports[f"{node}_admin"]
        token = (await trio.Path(self.demo.state["admin_token_file"]).read_text()).strip()
        status, body = await http_request("127.0.0.1", port, "/status", timeout=ADMIN_TIMEOUT, token=token)
        if status != 200:
            raise RuntimeError(f"{node} /status answered {status}")
        return dict(json.loads(body))

    async def wait_node(self, node: str, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        last: dict[str, Any] | str = {}
        with trio.move_on_after(timeout):
            while True:
                try:
                    last = await self.node_status(node)
                    if predicate(last):
                        return last
                except (OSError, trio.TooSlowError, ValueError, RuntimeError) as exc:
                    last = repr(exc)
                await trio.sleep(POLL)
        raise AssertionError(f"timed out after {timeout} s waiting for {node} to be {what}; last: {last}")

    # --- faults

    def _kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def signal(self, node: str, sig: int) -> float:
        """Send `sig` to the process `node` (a node, or a cloud replica); returns the trio time it
        was sent."""
        pid = self.pid(node)
        if sig == signal.SIGSTOP:
            self.frozen.add(pid)
        moment = trio.current_time()
        self._kill(pid, sig)
        if sig == signal.SIGCONT:
            self.frozen.discard(pid)
        return moment

    async def reap(self, node: str, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            await self.demo.processes[node].wait()

    async def restart(self, node: str, timeout: float = 20.0) -> None:
        """Start a killed node again and wait until it is back as a standby tunnel."""
        if self.alive(node):
            raise RuntimeError(f"{node} is still running")
        await self.demo.start_node(node)
        await self.wait_cloud(
            lambda loc: any(t["node"] == node for t in loc.get("tunnels", [])) and loc.get("master") is not None,
            timeout, f"{node} to reconnect",
        )
        await self.wait_node(node, lambda s: s.get("role") in ("shadow", "master"), timeout, "shadow or master")

    # --- cloud replicas (`fast_spec(cloud_replicas=N)`, N >= 2)

    @property
    def replicas(self) -> list[str]:
        """The running cluster's replica ids: the demo's, then those `add_replica` prepared."""
        return [*replica_ids(self.demo.spec), *self.added_replicas]

    async def readyz(self, replica: str) -> tuple[bool, str]:
        """The replica's `/readyz`: (ready, reason)."""
        status, body = await http_request("127.0.0.1", self.admin_port(replica), "/readyz", timeout=ADMIN_TIMEOUT)
        return status == 200, str(json.loads(body).get("reason", ""))

    async def wait_ready(self, replica: str, predicate: Callable[[bool, str], bool], timeout: float,
                         what: str) -> tuple[bool, str]:
        last: tuple[bool, str] | str = ""
        with trio.move_on_after(timeout):
            while True:
                try:
                    last = await self.readyz(replica)
                    if predicate(*last):
                        return last
                except (OSError, trio.TooSlowError, ValueError) as exc:
                    last = repr(exc)
                await trio.sleep(POLL)
        raise AssertionError(f"timed out after {timeout} s waiting for {replica} to be {what}; /readyz: {last}")

    async def wait_replica_serving(self, replica: str, timeout: float = 15.0) -> dict[str, Any]:
        """Until `replica` is ready and holds the master's tunnel and every node's."""
        await self.wait_ready(replica, lambda ready, _: ready, timeout, "ready")
        return await self.wait_cloud(
            lambda loc: loc.get("master") is not None and len(loc.get("tunnels", [])) == len(self.nodes),
            timeout, f"a master and {len(self.nodes)} tunnels", replica)

    async def served(self, replica: str) -> float:
        """Requests `replica`'s HTTP proxy answered 200 since it started (its own counter)."""
        _, body = await http_request("127.0.0.1", self.admin_port(replica), "/metrics", timeout=ADMIN_TIMEOUT)
        match = re.search(rb'connector_proxy_requests_total\{proxy="http",status="200"[^}]*\} (\S+)', body)
        return float(match.group(1)) if match else 0.0

    async def wait_served(self, replica: str, timeout: float = 10.0) -> float:
        """Until `replica` answered a request (the load must be running); returns the count."""
        last: float | str = 0.0
        with trio.move_on_after(timeout):
            while True:
                try:
                    last = await self.served(replica)
                    if last > 0:
                        return last
                except (OSError, trio.TooSlowError) as exc:
                    last = repr(exc)
                await trio.sleep(POLL)
        raise AssertionError(f"timed out after {timeout} s waiting for {replica} to serve a request; last: {last}")

    async def start_replica(self, replica: str) -> None:
        """Start a (killed or prepared) replica with its configuration; returns once its admin
        port answers (not once it is ready: that may be the point of the test)."""
        if self.alive(replica):
            raise RuntimeError(f"{replica} is still running")
        await self.demo.start_process(replica, [sys.executable, "-m", "connector", "cloud", "--config",
                                                str(self.workdir / f"{replica}.toml")])
        await self.demo.wait_http(replica, self.admin_port(replica), "/healthz")

    async def add_replica(self, replica: str, *, like: str = "cloud-2") -> None:
        """Prepare one more replica without starting it: its configuration (that of `like` on new
        ports) and its slot in HAProxy, which is restarted with it (call this before any load).

        The load balancer knows the slot in advance, as HAProxy's ``server-template`` or a
        Kubernetes Service does; the nodes' configurations are left as they are."""
        text = (self.workdir / f"{like}.toml").read_text()
        for service in REPLICA_SERVICES:
            port = self.demo.ports[f"{replica}_{service}"] = free_port()
            text, count = re.subn(rf"127\.0\.0\.1:{self.demo.ports[f'{like}_{service}']}\b", f"127.0.0.1:{port}", text)
            if count == 0:
                raise AssertionError(f"{like}.toml names no {service} port to move")
        for old, new in ((f'id = "{like}"', f'id = "{replica}"'), (f"state/{like}/", f"state/{replica}/")):
            if old not in text:
                raise AssertionError(f"{like}.toml has no {old!r}")
            text = text.replace(old, new)
        (self.workdir / "state" / replica).mkdir(parents=True, exist_ok=True)
        (self.workdir / f"{replica}.toml").write_text(text)
        self.added_replicas.append(replica)
        await self.restart_front()

    async def restart_front(self) -> None:
        """HAProxy again, with every replica of `replicas` as a server (down until it is ready)."""
        ports = self.demo.ports
        old = self.demo.processes["haproxy"]
        old.terminate()
        with trio.fail_after(10.0):
            await old.wait()
        front = haproxy.Front("127.0.0.1", ports["http_proxy"], ports["socks5_proxy"], ports["destinations"])
        backends = [haproxy.Backend(r, "127.0.0.1", ports[f"{r}_http_proxy"], ports[f"{r}_socks5"],
                                    ports[f"{r}_destinations"], ports[f"{r}_admin"]) for r in self.replicas]
        binary = haproxy.find_haproxy()
        config = haproxy.write_config(self.workdir / "haproxy.cfg", front, backends)
        haproxy.check_config(binary, config)
        await self.demo.start_process("haproxy", haproxy.haproxy_command(binary, config))
        await self.demo.wait_tcp("haproxy", [ports["http_proxy"], ports["socks5_proxy"], ports["destinations"]])

    def stop_cloud_etcd(self) -> float:
        """SIGKILL the cloud's etcd; returns the trio time it was sent."""
        return self.signal("cloud-etcd", signal.SIGKILL)

    async def start_cloud_etcd(self) -> None:
        """The cloud's etcd again, on its data and ports; returns once it answers /health."""
        if self.alive("cloud-etcd"):
            raise RuntimeError("cloud-etcd is still running")
        ports = self.demo.ports
        await self.demo.start_process("cloud-etcd", etcd_command(
            find_etcd(self.demo.spec.etcd), self.workdir / "state" / "cloud-etcd", ports["cloud_etcd_client"],
            ports["cloud_etcd_peer"], name="cloud-etcd"))
        await self.demo.wait_http("cloud-etcd", ports["cloud_etcd_client"], "/health")

    async def shared_fence(self) -> dict[tuple[str, str], int]:
        """(subaccount, location) -> epoch, as the cloud's etcd holds the fence (its JSON gateway)."""
        prefix = f"{CLOUD_PREFIX}/{FENCE_PREFIX}".encode()
        query = {"key": base64.b64encode(prefix).decode(),
                 "range_end": base64.b64encode(prefix[:-1] + bytes([prefix[-1] + 1])).decode()}
        status, body = await http_request("127.0.0.1", self.demo.ports["cloud_etcd_client"], "/v3/kv/range",
                                          method="POST", body=json.dumps(query).encode(), timeout=ADMIN_TIMEOUT)
        if status != 200:
            raise RuntimeError(f"cloud etcd range answered {status}: {body[:200]!r}")
        fences = {}
        for kv in json.loads(body).get("kvs", []):
            parsed = parse_fence(base64.b64decode(kv["key"]).decode()[len(CLOUD_PREFIX) + 1:],
                                 base64.b64decode(kv["value"]))
            if parsed is not None:
                fences[parsed[0]] = parsed[1].epoch
        return fences

    async def wait_shared_fence(self, expected: dict[tuple[str, str], int], timeout: float) -> None:
        last: dict[tuple[str, str], int] | str = {}
        with trio.move_on_after(timeout):
            while True:
                try:
                    last = await self.shared_fence()
                    if last == expected:
                        return
                except (OSError, trio.TooSlowError, ValueError, RuntimeError) as exc:
                    last = repr(exc)
                await trio.sleep(POLL)
        raise AssertionError(f"timed out after {timeout} s waiting for the shared fence {expected}; last: {last}")

    # --- audit: who served what

    def tcp_sessions(self, node: str) -> int:
        """TCP sessions (SOCKS5 connects) `node` served, from its audit log."""
        path = self.workdir / "logs" / f"{node}-audit.jsonl"
        if not path.exists():
            return 0
        count = 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill -9
            count += record.get("kind") == "request" and str(record.get("virtual_target", "")).startswith("tcp://")
        return count

    def served_by(self) -> dict[str, str]:
        """Request path -> node, from every node's audit log (allowed requests only)."""
        result: dict[str, str] = {}
        for node in self.nodes:
            path = self.workdir / "logs" / f"{node}-audit.jsonl"
            if not path.exists():
                continue
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill -9
                if record.get("kind") == "request" and record.get("path"):
                    result[str(record["path"])] = node
        return result


def describe_failures(results: Sequence[RequestResult], limit: int = 5) -> str:
    bad = failed(results)
    return f"{len(bad)} failed of {len(results)}: " + "; ".join(
        f"#{r.seq} {r.status} {r.reason} [{r.start:.3f}..{r.end:.3f}]" for r in bad[:limit]
    )


# --- a 3-member etcd cluster ---------------------------------------------------------------------


def free_port() -> int:
    from tests.support.etcdserver import free_port as _free

    return _free()


class EtcdCluster:
    """Three etcd members on loopback, each with its own client and peer port; SIGKILL to stop."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = Path(workdir)
        self.names = [f"m{i}" for i in range(size)]
        self.client_ports = {n: free_port() for n in self.names}
        self.peer_ports = {n: free_port() for n in self.names}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def client_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.client_ports[name]}"

    @property
    def endpoints(self) -> list[str]:
        return [self.client_url(n) for n in self.names]

    def command(self, name: str) -> list[str]:
        from tests.support.etcdserver import etcd_binary

        initial = ",".join(f"{n}=http://127.0.0.1:{self.peer_ports[n]}" for n in self.names)
        peer = f"http://127.0.0.1:{self.peer_ports[name]}"
        return [
            etcd_binary(), "--name", name, "--data-dir", str(self.workdir / f"{name}.etcd"),
            "--listen-client-urls", self.client_url(name), "--advertise-client-urls", self.client_url(name),
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"failover-{self.client_ports[self.names[0]]}",
            "--heartbeat-interval", "10", "--election-timeout", "100",
            "--logger", "zap", "--log-level", "warn",
        ]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            with open(self.workdir / f"{name}.log", "ab") as log:
                self.processes[name] = subprocess.Popen(self.command(name), stdout=log, stderr=subprocess.STDOUT)

    async def wait_healthy(self, timeout: float = 20.0) -> None:
        """Until every running member answers /health with health true (a leader exists)."""
        with trio.fail_after(timeout):
            for name, process in self.processes.items():
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"etcd member {name} exited; see {self.workdir}/{name}.log")
                    try:
                        status, body = await http_request("127.0.0.1", self.client_ports[name], "/health", timeout=1.0)
                        if status == 200 and json.loads(body).get("health") in (True, "true"):
                            break
                    except (OSError, trio.TooSlowError, ValueError):
                        pass
                    await trio.sleep(0.05)

    async def leader(self) -> str:
        """The member name of the current raft leader (from /v3/maintenance/status)."""
        ids: dict[str, str] = {}
        leader_id = ""
        for name in self.names:
            if self.processes[name].poll() is not None:
                continue
            status, body = await http_request(
                "127.0.0.1", self.client_ports[name], "/v3/maintenance/status", method="POST", body=b"{}", timeout=1.0
            )
            data = json.loads(body)
            ids[str(data["header"]["member_id"])] = name
            leader_id = str(data["leader"])
        return ids[leader_id]

    def kill(self, name: str) -> float:
        moment = trio.current_time()
        process = self.processes[name]
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        return moment

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            process.wait(timeout=10)


# --- one drill -----------------------------------------------------------------------------------

SIGNALS = {"crash": signal.SIGKILL, "freeze": signal.SIGSTOP, "graceful": signal.SIGTERM}


@attrs.frozen
class DrillResult:
    kind: str
    old_master: str
    old_epoch: int
    new_master: str | None
    new_epoch: int | None
    takeover: float | None  # fault to the first request served by the new master, seconds
    master_changed: float | None  # fault to the cloud naming the new master, seconds
    requests: int
    failed: int
    problems: list[str]
    results: list[RequestResult] = attrs.field(repr=False, factory=list)


async def run_drill(
    cluster: Cluster,
    kind: str,
    label: str,
    *,
    warmup: float = 0.5,
    after: float = 0.7,
    freeze_seconds: float = 0.0,
    takeover_timeout: float = 15.0,
    concurrency: int = 2,
    post_every: int = 0,
    proxy: str = "http",
) -> DrillResult:
    """Apply one fault ("crash", "freeze", "graceful") to the master under load and check it all.

    `proxy`: the load goes through the HTTP proxy ("http": `Load`) or the SOCKS5 proxy
    ("socks5": `SocksLoad`); the takeover time is measured for HTTP only (an audit line of a TCP
    session names no request), a SOCKS5 drill checks that the new master served connects.

    For "freeze" the master stays stopped until a new master is named and at least
    `freeze_seconds` passed, then gets SIGCONT and must come back as a shadow. The killed or
    handed-over old master is left stopped: restart it with `Cluster.restart` to drill again.

    With cloud replicas the load goes through the front door (HAProxy) and every replica is
    checked: each must name the new master (the same one, with the same epoch), and each
    replica's own routing log must pass `check_routing` and `check_fenced_after`. The fault's
    window ends when the last replica named the new master (a request may have reached any).
    """
    replicas: list[str | None] = [*cluster.replicas] or [None]
    old, old_epoch = await cluster.wait_master()
    mix = {"post_every": post_every} if post_every else {}  # HTTP loads only
    load = cluster.load(label, proxy=proxy, concurrency=concurrency,
                        max_seconds=warmup + takeover_timeout + after + 20.0, max_requests=5000, **mix)
    new: str | None = None
    new_epoch: int | None = None
    changed_at: float | None = None
    problems: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(load.run)
        try:
            await trio.sleep(warmup)
            if failed(load.results):
                problems.append("load failed before the fault: " + describe_failures(load.results))
            fault = cluster.signal(old, SIGNALS[kind])
            try:
                seen = {r: await cluster.wait_master(  # every replica within the one budget
                    other_than=old, above_epoch=old_epoch, replica=r,
                    timeout=max(POLL, fault + takeover_timeout - trio.current_time())) for r in replicas}
                changed_at = trio.current_time()
                new, new_epoch = seen[replicas[0]]
                if len(set(seen.values())) > 1:
                    problems.append(f"the replicas name different new masters: {seen}")
            except AssertionError as exc:
                problems.append(str(exc))
            if kind == "freeze":
                await trio.sleep_until(fault + freeze_seconds)
                await trio.sleep(after)
                cluster.signal(old, signal.SIGCONT)
                try:
                    await cluster.wait_node(old, lambda s: s.get("role") == "shadow" and s.get("epoch") is None,
                                            takeover_timeout, "a shadow again after SIGCONT")
                except AssertionError as exc:
                    problems.append(str(exc))
            else:
                await trio.sleep(after)
        finally:
            load.stop()
            if kind == "freeze" and cluster.pid(old) in cluster.frozen:
                cluster.signal(old, signal.SIGCONT)
    if kind in ("crash", "graceful"):
        await cluster.reap(old)
    routings = {r: await cluster.routing(r) for r in replicas}
    results = load.results_by_start()
    for replica, routing in routings.items():
        problems += [f"{replica}: {p}" if replica else p for p in check_routing(routing)]
    problems += check_epoch_increased(old_epoch, new_epoch)
    # Until the cloud learns that the master is gone it routes new streams to it: a killed
    # process takes some milliseconds to exit and its tunnel's end to be read, and a frozen one is
    # just slow until the new master fences it. Requests sent in between are in flight on the lost
    # master too (each load worker has at most one: it waits for the answer), so the window ends
    # when the cloud names another master. A handover must lose nothing (asserted by the tests).
    lossy = kind in ("crash", "freeze") and changed_at is not None
    window = FaultWindow(fault, changed_at) if lossy and changed_at is not None else FaultWindow.at(fault)
    problems += check_requests(results, [window])
    if len(failed(results)) > concurrency:
        problems.append(f"{len(failed(results))} requests failed, more than the {concurrency} that can be in flight")
    takeover = None
    if new is not None and new_epoch is not None:
        for replica, routing in routings.items():
            problems += [f"{replica}: {p}" if replica else p for p in check_fenced_after(routing, old, old_epoch, new_epoch)]
        if proxy == "socks5":
            if cluster.tcp_sessions(new) == 0:
                problems.append(f"no SOCKS5 connect was served by the new master {new}")
        else:
            takeover = takeover_time(results, fault, cluster.served_by(), new)
            if takeover is None:
                problems.append(f"no request was served by the new master {new}")
    return DrillResult(
        kind, old, old_epoch, new, new_epoch, takeover,
        None if changed_at is None else changed_at - fault,
        len(results), len(failed(results)), problems, results,
    )


async def repeat_drills(
    kind: str,
    repeat: int,
    *,
    spec: DemoSpec | None = None,
    on_result: Callable[[int, DrillResult], None] | None = None,
    **drill_options: Any,
) -> list[DrillResult]:
    """Run the same drill `repeat` times on one cluster, bringing the old master back each time.

    Killed or handed-over masters are restarted and must reconnect as standbys before the next
    drill; a frozen one is thawed by the drill itself. If the cluster cannot be brought back
    (which a drill's problems then name), a fresh cluster is started for the remaining drills.
    """
    results: list[DrillResult] = []
    while len(results) < repeat:
        async with Cluster(spec) as cluster:
            while len(results) < repeat:
                index = len(results)
                result = await run_drill(cluster, kind, f"{kind}-{index}", **drill_options)
                results.append(result)
                if on_result is not None:
                    on_result(index, result)
                try:
                    if not cluster.alive(result.old_master):
                        await cluster.restart(result.old_master)
                    await cluster.wait_tunnels(len(cluster.nodes))
                    await trio.sleep(0.3)  # the restarted node settles as a shadow
                except (AssertionError, RuntimeError) as exc:
                    result.problems.append(f"cluster not restored after the drill: {exc}")
                    break
    return results
