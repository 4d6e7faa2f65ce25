"""The cloud drills of `benchmarks/failover.py`: faults of the cloud cluster under steady load.

Theory of operation. One demo cluster with `--cloud-replicas 2` (`connector.demo`: the nodes' etcd,
a cloud etcd, two `connector cloud` replicas behind HAProxy, two nodes dialling both replicas, the
backend) is driven by `tests.failover.harness.Cluster`, and the load (`harness.Load`: 2 workers,
one fresh connection per request, so HAProxy balances every request) goes through the front door.
Each drill applies one fault and restores the cluster while the load runs:

* replica-kill: kill -9 of one replica (they alternate), then it is started again;
* rolling-restart: SIGTERM of each replica in turn (it drains and exits), started again, ready
  with both nodes' tunnels, and back in HAProxy's rotation (it answered a request of the load)
  before the next one is stopped: a rolling update must wait for the load balancer, not only for
  the replica's readiness, or for a moment no replica is in rotation;
* cloud-etcd-outage: kill -9 of the cloud etcd, `outage` seconds without it, started again on
  its data.

The fault window runs from the first fault action to the moment everything is restored (every
replica ready, `/readyz` 200, with a master and both nodes' tunnels; etcd answering /health).
Per drill it records the *disruption* (`benchmarks.stats.disruption`: the longest gap between
successful requests that begins in the window), the requests that failed, and the problems seen
(a replica not restored, more failures than the drill allows: none for a rolling restart or an
etcd outage, at most the requests in flight on the killed replica for a kill).

The helpers here belong to the benchmark: `tests/failover/harness.py` is used, never changed.
"""

# The wait helpers take a `timeout` on purpose: on expiry they fail with what they last saw.
# ruff: noqa: ASYNC109

from __future__ import annotations

import json
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import trio

from benchmarks.stats import disruption
from connector.admin import http_request
from connector.demo import etcd_command, find_etcd, replica_ids
from tests.failover.harness import Cluster, RequestResult, failed, fast_spec

CLOUD_KINDS = ("replica-kill", "rolling-restart", "cloud-etcd-outage")
CLOUD_DESCRIPTIONS = {
    "replica-kill": "kill -9 of one of 2 replicas, then started again",
    "rolling-restart": "SIGTERM (drain) and restart of each of 2 replicas in turn",
    "cloud-etcd-outage": "kill -9 of the cloud etcd, restarted after 3 s",
}
REPLICAS = 2
CONCURRENCY = 2
OUTAGE_SECONDS = 3.0
RESTORE_TIMEOUT = 40.0
POLL = 0.05


@attrs.frozen
class CloudDrillResult:
    kind: str
    target: str  # the replica, or "cloud-etcd"
    disruption: float  # seconds; inf when no request succeeded after the window
    quiet_gap: float  # the same measure over the warm-up, before any fault: the load's normal gap
    window: float  # fault window length, seconds
    requests: int
    failed: int
    problems: list[str]
    failures: dict[str, int] = attrs.field(factory=dict)  # "status reason @ phase" -> count
    marks: list[tuple[str, float]] = attrs.field(factory=list)  # the fault's steps, seconds after it began
    results: list[RequestResult] = attrs.field(repr=False, factory=list)


def phase(marks: list[tuple[str, float]], offset: float) -> str:
    """The last step of the fault at or before `offset` (seconds after the fault began)."""
    return next((label for label, at in reversed(marks) if at <= offset), "before the fault")


def cloud_spec() -> Any:
    return fast_spec(cloud_replicas=REPLICAS)


async def admin(cluster: Cluster, replica: str, path: str) -> tuple[int, bytes]:
    return await http_request("127.0.0.1", cluster.demo.ports[f"{replica}_admin"], path, timeout=1.0)


async def wait_replica_serving(cluster: Cluster, replica: str, timeout: float = RESTORE_TIMEOUT) -> None:
    """Until `replica` is ready and holds a master tunnel and every node's tunnel."""
    last = ""
    with trio.move_on_after(timeout):
        while True:
            try:
                status, body = await admin(cluster, replica, "/readyz")
                if status == 200:
                    _, body = await admin(cluster, replica, "/status")
                    locations = json.loads(body)["locations"]
                    if any(loc.get("master") and len(loc.get("tunnels", [])) == len(cluster.nodes)
                           for loc in locations):
                        return
                    last = f"ready, locations {locations}"
                else:
                    last = f"/readyz {status} {body[:200]!r}"
            except (OSError, trio.TooSlowError, ValueError, KeyError) as exc:
                last = repr(exc)
            await trio.sleep(POLL)  # another process: its admin API is all there is to poll
    raise AssertionError(f"{replica} not serving after {timeout} s; last: {last}")


async def served(cluster: Cluster, replica: str) -> float:
    """Requests `replica` answered 200 since it started (its own counter)."""
    _, body = await admin(cluster, replica, "/metrics")
    match = re.search(rb'connector_proxy_requests_total\{[^}]*proxy="http"[^}]*status="200"[^}]*\} (\S+)', body)
    return float(match.group(1)) if match else 0.0


async def wait_in_rotation(cluster: Cluster, replica: str, timeout: float = RESTORE_TIMEOUT) -> None:
    """Until the load balancer sends to `replica` again: it answered a request through the front
    door. Ready is not enough: HAProxy takes a replica back after 2 passing checks (400 ms), and
    stopping the next replica before that leaves HAProxy with none in rotation."""
    with trio.move_on_after(timeout):
        while True:
            try:
                if await served(cluster, replica) > 0:
                    return
            except (OSError, trio.TooSlowError):
                pass
            await trio.sleep(POLL)  # another process: its metrics are all there is to poll
    raise AssertionError(f"{replica} took no request through the front door within {timeout} s")


async def start_replica(cluster: Cluster, replica: str) -> None:
    await cluster.demo.start_process(
        replica, [sys.executable, "-m", "connector", "cloud", "--config", str(cluster.demo.configs[replica])])


async def start_cloud_etcd(cluster: Cluster) -> None:
    demo = cluster.demo
    await demo.start_process("cloud-etcd", etcd_command(
        find_etcd(demo.spec.etcd), demo.workdir / "state" / "cloud-etcd", demo.ports["cloud_etcd_client"],
        demo.ports["cloud_etcd_peer"], name="cloud-etcd"))
    await demo.wait_http("cloud-etcd", demo.ports["cloud_etcd_client"], "/health")


async def restored(cluster: Cluster) -> None:
    for replica in replica_ids(cluster.demo.spec):
        await wait_replica_serving(cluster, replica)


Mark = Callable[[str], None]


async def fault_replica_kill(cluster: Cluster, index: int, mark: Mark) -> str:
    replica = replica_ids(cluster.demo.spec)[index % REPLICAS]
    process = cluster.demo.processes[replica]
    mark(f"kill -9 {replica}")
    process.kill()
    with trio.fail_after(10.0):
        await process.wait()
    await trio.sleep(1.0)  # the other replica serves alone for a while
    mark(f"{replica} started")
    await start_replica(cluster, replica)
    return replica


async def fault_rolling_restart(cluster: Cluster, index: int, mark: Mark) -> str:
    for replica in replica_ids(cluster.demo.spec):
        process = cluster.demo.processes[replica]
        mark(f"SIGTERM {replica}")
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(RESTORE_TIMEOUT):
            await process.wait()
        mark(f"{replica} exited")
        if process.returncode != 0:
            raise AssertionError(f"{replica} exited with {process.returncode} after SIGTERM")
        await start_replica(cluster, replica)
        await wait_replica_serving(cluster, replica)
        mark(f"{replica} ready")
        await wait_in_rotation(cluster, replica)
        mark(f"{replica} in rotation")
    return "every replica"


async def fault_cloud_etcd_outage(cluster: Cluster, index: int, mark: Mark) -> str:
    process = cluster.demo.processes["cloud-etcd"]
    mark("kill -9 cloud-etcd")
    process.kill()
    with trio.fail_after(10.0):
        await process.wait()
    await trio.sleep(OUTAGE_SECONDS)
    mark("cloud-etcd started")
    await start_cloud_etcd(cluster)
    return "cloud-etcd"


FAULTS: dict[str, Callable[[Cluster, int, Mark], Any]] = {
    "replica-kill": fault_replica_kill,
    "rolling-restart": fault_rolling_restart,
    "cloud-etcd-outage": fault_cloud_etcd_outage,
}


def allowed_failures(kind: str) -> int:
    """A kill may cost the requests in flight on the killed replica (one per worker at most)."""
    return CONCURRENCY if kind == "replica-kill" else 0


async def run_cloud_drill(cluster: Cluster, kind: str, index: int, *, warmup: float = 0.5,
                          after: float = 0.5) -> CloudDrillResult:
    load = cluster.load(f"{kind}-{index}", concurrency=CONCURRENCY, max_requests=20000,
                        max_seconds=warmup + 2 * RESTORE_TIMEOUT + after + 20.0)
    problems: list[str] = []
    target = "?"
    async with trio.open_nursery() as nursery:
        await nursery.start(load.run)
        began = trio.current_time()
        try:
            await trio.sleep(warmup)
            if failed(load.results):
                problems.append(f"load failed before the fault: {len(failed(load.results))} requests")
            fault = trio.current_time()
            marks: list[tuple[str, float]] = []
            try:
                target = await FAULTS[kind](cluster, index, lambda label: marks.append(
                    (label, trio.current_time() - fault)))
                await restored(cluster)
            except (AssertionError, RuntimeError, trio.TooSlowError) as exc:
                problems.append(f"not restored: {exc}")
            done = trio.current_time()
            await trio.sleep(after)
        finally:
            load.stop()
    results = load.results_by_start()
    outcomes = [(r.end, r.ok) for r in results]
    warm = sorted(r.end for r in results if r.ok and began + 0.1 <= r.end <= fault)
    quiet = max((b - a for a, b in zip(warm, warm[1:], strict=False)), default=float("nan"))
    lost = len(failed(results))
    if lost > allowed_failures(kind):
        problems.append(f"{lost} requests failed, more than the {allowed_failures(kind)} this drill allows")
    failures = Counter(f"{r.status or 'no response'} {r.reason} @ {phase(marks, r.start - fault)}"
                       for r in results if not r.ok)
    return CloudDrillResult(kind, target, disruption(outcomes, fault, done), quiet, done - fault,
                            len(results), lost, problems, dict(failures), marks, results)


async def repeat_cloud_drills(kind: str, repeat: int,
                              on_result: Callable[[int, CloudDrillResult], None] | None = None,
                              **options: Any) -> list[CloudDrillResult]:
    """`repeat` drills on one cluster; a cluster that was not restored is replaced by a fresh one."""
    results: list[CloudDrillResult] = []
    while len(results) < repeat:
        async with Cluster(cloud_spec()) as cluster:
            await restored(cluster)
            while len(results) < repeat:
                result = await run_cloud_drill(cluster, kind, len(results), **options)
                results.append(result)
                if on_result is not None:
                    on_result(len(results) - 1, result)
                if any(p.startswith("not restored") for p in result.problems):
                    break
    return results
