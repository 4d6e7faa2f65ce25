"""Drills of the cloud cluster (issue 10), all under load through the front door: a replica
killed and restarted; the cloud's etcd killed and restarted (a replica started meanwhile stays out;
an on-premise failover meanwhile is accepted and written back); a third replica added and removed;
the on-premise master killed or frozen under three replicas.

Real processes: `Cluster(fast_spec(cloud_replicas=N))` runs what `connector demo --cloud-replicas N`
runs: N `connector cloud` replicas sharing a cloud etcd of their own, HAProxy in front of them
health-checking each replica's ``/readyz`` (the front door every request of the load goes
through), two nodes electing through their own etcd, and the demo backend. The faults are the
real ones: SIGKILL, SIGSTOP or SIGTERM of a replica, a node or the cloud's etcd; a replica process
started later.

What each drill asserts comes from the client's records (`harness.Load`), each replica's own
``/status`` (its routing log, its master, its tunnels), ``/readyz`` and ``/metrics`` (how many
requests it answered), the nodes' ``/status`` and the cloud's etcd, read with deadlines
(`Cluster.wait_*`), never after a fixed sleep. Each drill prints a one-line summary (``-s``).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any

import pytest
import trio

from connector.demo import LOCATION, SUBACCOUNT
from tests.failover.harness import (
    Cluster,
    FaultWindow,
    check_fenced_after,
    check_requests,
    check_routing,
    describe_failures,
    failed,
    fast_spec,
    run_drill,
)

pytestmark = pytest.mark.slow

CONCURRENCY = 2  # load workers: each has at most one request in flight
STEADY = 30  # successful requests between two steps of a drill: each step happens under load
LOAD_SECONDS = 60.0  # bounds of every load (a drill stops its load long before)
LOAD_REQUESTS = 6000
REDIAL_WITHIN = 10.0  # nodes redial a replica within their backoff's cap (5 s) plus a dial
HAPROXY_NOTICE = 2.0  # HAProxy takes a replica in or out within 2 checks of 200 ms; margin for a busy host
ETCD_NOTICE = 10.0  # a replica notices its etcd is gone at its next read or write (about 1 s)
NOT_READY_WATCH = 2.5  # how long the replica started during the outage is watched staying out
TAKEOVER_WITHIN = 15.0  # the on-premise failover, seen on every replica
LEASE_SECONDS = 3.0  # the nodes' default leader lease (ha/timing.py: ttl)
SCALE_OUT_WITHIN = 10.0  # "a replica added under load starts serving within seconds"
DRAIN_EXIT_WITHIN = 15.0  # the demo's [drain]: notice 1 s, then up to 10 s for connections

LOCATION_KEY = (SUBACCOUNT, LOCATION)


def check_every_routing(routings: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [f"{replica}: {problem}" for replica, routing in routings.items() for problem in check_routing(routing)]


async def routings(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    return {replica: await cluster.routing(replica) for replica in cluster.replicas if cluster.alive(replica)}


async def test_kill9_of_one_replica_under_load_loses_only_its_requests_in_flight() -> None:
    async with Cluster(fast_spec(cloud_replicas=2)) as cluster:
        victim, survivor = "cloud-2", "cloud-1"
        master = await cluster.wait_master(replica=survivor)
        load = cluster.load("replica-kill", concurrency=CONCURRENCY, max_seconds=LOAD_SECONDS,
                            max_requests=LOAD_REQUESTS)
        async with trio.open_nursery() as nursery:
            await nursery.start(load.run)
            await cluster.wait_served(victim)  # it takes its share before the crash
            await load.wait_ok(STEADY)
            fault = cluster.signal(victim, signal.SIGKILL)
            await cluster.reap(victim)
            gone = trio.current_time()
            await load.wait_ok(STEADY, since=gone)  # the survivor carries the service meanwhile
            await cluster.start_replica(victim)
            restarted = trio.current_time()
            # the nodes redial it: it holds the master's tunnel and the shadow's again, and is ready
            await cluster.wait_replica_serving(victim, timeout=REDIAL_WITHIN)
            redialled = trio.current_time() - restarted
            await cluster.wait_served(victim, timeout=HAPROXY_NOTICE + 5.0)  # back in rotation
            await load.wait_ok(STEADY)
            load.stop()
        results = load.results_by_start()
        print(f"replica kill: {len(results)} requests, {len(failed(results))} failed "
              f"({describe_failures(results)}); redialled in {redialled:.2f} s")
        # A request fails only if it was in flight on the killed replica: it was sent before the
        # process was gone (its connection is reset). HAProxy retries a refused connect elsewhere.
        assert check_requests(results, [FaultWindow(fault, gone)]) == [], describe_failures(results)
        assert len(failed(results)) <= CONCURRENCY, describe_failures(results)
        assert check_every_routing(await routings(cluster)) == []
        # a replica's crash is no on-premise failover: the same master, the same epoch, everywhere
        for replica in cluster.replicas:
            assert await cluster.master(replica) == master, replica
        assert redialled < REDIAL_WITHIN
        assert len(results) > 3 * STEADY


async def test_cloud_etcd_outage_under_load_keeps_serving_and_a_replica_started_meanwhile_stays_out() -> None:
    async with Cluster(fast_spec(cloud_replicas=2)) as cluster:
        serving, late = "cloud-1", "cloud-2"
        master = await cluster.wait_master(replica=serving)
        # `late` leaves gracefully (a rolling update, say) and is started again during the outage
        cluster.signal(late, signal.SIGTERM)
        await cluster.reap(late)
        load = cluster.load("cloud-etcd-outage", concurrency=CONCURRENCY, max_seconds=LOAD_SECONDS,
                            max_requests=LOAD_REQUESTS)
        async with trio.open_nursery() as nursery:
            await nursery.start(load.run)
            await load.wait_ok(STEADY)
            cluster.stop_cloud_etcd()
            await cluster.reap("cloud-etcd")
            ready, reason = await cluster.wait_ready(serving, lambda ready, why: "unreachable" in why, ETCD_NOTICE,
                                                     "aware that the cloud's etcd is unreachable")
            assert ready, f"{serving} left the rotation when the cloud's etcd went away: {reason}"
            await cluster.start_replica(late)
            started = trio.current_time()
            answers: list[tuple[bool, str]] = []
            while trio.current_time() - started < NOT_READY_WATCH:  # watched, not waited on
                with contextlib.suppress(OSError, trio.TooSlowError):  # a busy host: no answer is not ready
                    answers.append(await cluster.readyz(late))
                await trio.sleep(0.05)
            assert len(answers) >= 5, f"{late} hardly answered /readyz: {answers}"
            assert {ready for ready, _ in answers} == {False}, set(answers)
            assert all("shared state not loaded" in why for _, why in answers), set(answers)
            location = await cluster.cloud_status(late)
            assert location.get("master") is None and not location.get("tunnels"), location
            await load.wait_ok(STEADY, since=started)  # the service went on, from `serving` alone
            assert await cluster.served(late) == 0.0, f"{late} answered requests while not ready"
            await cluster.start_cloud_etcd()
            # `late` reads the fence, the nodes redial it (their backoff grew while it refused them)
            await cluster.wait_replica_serving(late, timeout=REDIAL_WITHIN + ETCD_NOTICE)
            await cluster.wait_served(late, timeout=HAPROXY_NOTICE + 5.0)
            await cluster.wait_ready(serving, lambda ready, why: ready and "unreachable" not in why, ETCD_NOTICE,
                                     "serving with its etcd back")
            await load.wait_ok(STEADY)
            load.stop()
        results = load.results_by_start()
        print(f"cloud etcd outage: {len(results)} requests, {len(failed(results))} failed; "
              f"{late} answered {len(answers)} times {sorted(set(answers))}")
        assert failed(results) == [], describe_failures(results)
        assert check_every_routing(await routings(cluster)) == []
        for replica in cluster.replicas:
            assert await cluster.master(replica) == master, replica


async def test_master_failover_during_a_cloud_etcd_outage_is_accepted_and_written_back() -> None:
    """A replica that knows the fence keeps serving through the outage and accepts a higher epoch
    (always safe) from its cache; etcd holds the new epoch once it is back."""
    async with Cluster(fast_spec(cloud_replicas=2)) as cluster:
        old, old_epoch = await cluster.wait_master()
        assert await cluster.shared_fence() == {LOCATION_KEY: old_epoch}
        load = cluster.load("failover-in-outage", concurrency=CONCURRENCY, max_seconds=LOAD_SECONDS,
                            max_requests=LOAD_REQUESTS)
        async with trio.open_nursery() as nursery:
            await nursery.start(load.run)
            await load.wait_ok(STEADY)
            cluster.stop_cloud_etcd()
            await cluster.reap("cloud-etcd")
            for replica in cluster.replicas:
                await cluster.wait_ready(replica, lambda ready, why: ready and "unreachable" in why, ETCD_NOTICE,
                                         "serving from its cached fence")
            fault = cluster.signal(old, signal.SIGKILL)
            seen = {r: await cluster.wait_master(other_than=old, above_epoch=old_epoch, replica=r,
                                                 timeout=max(0.1, fault + TAKEOVER_WITHIN - trio.current_time()))
                    for r in cluster.replicas}
            changed = trio.current_time()
            assert len(set(seen.values())) == 1, f"the replicas name different masters: {seen}"
            new, new_epoch = seen[cluster.replicas[0]]
            for replica in cluster.replicas:  # accepted here, not yet in etcd
                ready, why = await cluster.readyz(replica)
                assert ready and "unreachable" in why and "(0 fence advances" not in why, (replica, why)
            await load.wait_ok(STEADY, since=changed)
            await cluster.start_cloud_etcd()
            restored = trio.current_time()
            await cluster.wait_shared_fence({LOCATION_KEY: new_epoch}, ETCD_NOTICE)
            written_back = trio.current_time() - restored
            for replica in cluster.replicas:
                await cluster.wait_ready(replica, lambda ready, why: ready and why == "serving", ETCD_NOTICE,
                                         "serving with its etcd back")
            await load.wait_ok(STEADY)
            load.stop()
        results = load.results_by_start()
        print(f"failover during a cloud etcd outage: {len(results)} requests, {len(failed(results))} failed; "
              f"epoch {old_epoch} -> {new_epoch} written back {written_back:.2f} s after etcd returned")
        # only the requests in flight on the killed master may fail (see harness.run_drill)
        assert check_requests(results, [FaultWindow(fault, changed)]) == [], describe_failures(results)
        assert len(failed(results)) <= CONCURRENCY, describe_failures(results)
        every = await routings(cluster)
        assert check_every_routing(every) == []
        assert [f"{r}: {p}" for r, routing in every.items()
                for p in check_fenced_after(routing, old, old_epoch, new_epoch)] == []
        assert await cluster.shared_fence() == {LOCATION_KEY: new_epoch}


async def test_scale_out_from_two_to_three_replicas_under_load_and_back() -> None:
    """2 -> 3: the nodes learn of the third replica from the others' announcements (not from their
    configurations), dial it, and it serves within seconds. 3 -> 2 (SIGTERM): the nodes drop it."""
    async with Cluster(fast_spec(cloud_replicas=2)) as cluster:
        added = "cloud-3"
        await cluster.add_replica(added)
        tunnel_port = str(cluster.demo.ports[f"{added}_tunnel"])
        for node in cluster.nodes:  # the nodes can only learn of it from the replicas
            assert tunnel_port not in (cluster.workdir / f"{node}.toml").read_text()
        master = await cluster.wait_master()
        load = cluster.load("scale-out", concurrency=CONCURRENCY, max_seconds=LOAD_SECONDS,
                            max_requests=LOAD_REQUESTS)
        async with trio.open_nursery() as nursery:
            await nursery.start(load.run)
            await load.wait_ok(STEADY)
            await cluster.start_replica(added)
            started = trio.current_time()
            await cluster.wait_replica_serving(added, timeout=SCALE_OUT_WITHIN)
            await cluster.wait_served(added, timeout=SCALE_OUT_WITHIN - (trio.current_time() - started))
            took = trio.current_time() - started
            for node in cluster.nodes:
                status = await cluster.node_status(node)
                assert added in {t["replica"] for t in status["tunnels"]}, (node, status["tunnels"])
            await load.wait_ok(STEADY)
            assert await cluster.master(added) == master
            routing_of_added = await cluster.routing(added)
            # scale in: the replica drains and leaves the replica set; the nodes retire its tunnel
            stopping = cluster.signal(added, signal.SIGTERM)
            await cluster.reap(added, timeout=DRAIN_EXIT_WITHIN)
            assert cluster.demo.processes[added].returncode == 0
            for node in cluster.nodes:
                await cluster.wait_node(node, lambda s: added not in {t["replica"] for t in s["tunnels"]},
                                        SCALE_OUT_WITHIN, f"without a tunnel to {added}")
            dropped = trio.current_time() - stopping
            await load.wait_ok(STEADY)
            load.stop()
        results = load.results_by_start()
        print(f"scale out and in: {len(results)} requests, {len(failed(results))} failed; {added} serving "
              f"{took:.2f} s after it started, dropped by the nodes {dropped:.2f} s after SIGTERM")
        assert failed(results) == [], describe_failures(results)
        assert check_every_routing({**await routings(cluster), added: routing_of_added}) == []
        assert took < SCALE_OUT_WITHIN


async def test_master_kill9_with_three_replicas_every_replica_switches_and_never_serves_two() -> None:
    async with Cluster(fast_spec(cloud_replicas=3)) as cluster:
        result = await run_drill(cluster, "crash", "replicas-failover", concurrency=CONCURRENCY)
        print(f"failover with 3 replicas: {result.requests} requests, {result.failed} failed, takeover "
              f"{result.takeover}, every replica switched {result.master_changed} s after the kill")
        # run_drill checks every replica: each names the same new master, higher epoch; each routing
        # log goes one epoch at a time, one node per epoch, nothing to the old master afterwards
        assert result.problems == [], result.problems
        assert result.new_epoch is not None and result.new_epoch > result.old_epoch
        assert result.takeover is not None and result.takeover < 5.0, result
        assert result.failed <= CONCURRENCY
        for replica in cluster.replicas:
            location = await cluster.cloud_status(replica)
            assert (location["master"], location["epoch"]) == (result.new_master, result.new_epoch), replica
            assert {e["node"] for e in location["routing"]} == {result.old_master, result.new_master}, replica


async def test_master_frozen_past_its_lease_with_three_replicas_is_fenced_on_every_replica() -> None:
    """SIGSTOP of the master for longer than its lease (3 s): a new master registers on every
    replica; thawed, the old one is fenced on each and comes back as a standby everywhere."""
    async with Cluster(fast_spec(cloud_replicas=3)) as cluster:
        result = await run_drill(cluster, "freeze", "replicas-freeze", freeze_seconds=LEASE_SECONDS + 1.0,
                                 concurrency=CONCURRENCY)
        print(f"freeze with 3 replicas: {result.requests} requests, {result.failed} failed, takeover "
              f"{result.takeover}")
        assert result.problems == [], result.problems  # includes: a shadow again after SIGCONT
        for replica in cluster.replicas:
            location = await cluster.wait_cloud(
                lambda loc: len(loc.get("tunnels", [])) == len(cluster.nodes), REDIAL_WITHIN,
                "the thawed node's standby tunnel", replica)
            assert (location["master"], location["epoch"]) == (result.new_master, result.new_epoch), replica
            roles = {t["node"]: t["role"] for t in location["tunnels"]}
            assert roles == {result.new_master: "master", result.old_master: "standby"}, (replica, roles)
        assert check_every_routing(await routings(cluster)) == []
