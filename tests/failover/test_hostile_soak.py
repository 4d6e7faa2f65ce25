"""Soak: hostile clients against a running demo while a well-behaved application keeps its rate.

Run on request: ``scripts/dev test -m soak tests/failover/test_hostile_soak.py``
(``HOSTILE_ROUNDS`` and ``HOSTILE_ROUND_SECONDS`` change the length; defaults: 4 rounds of 45 s).

Theory of operation
-------------------
A real demo cluster (etcd, cloud, two nodes, the demo backend as processes) is started with a
second application credential: the hostile clients use their own token and connect from
127.0.0.2, the well-behaved `Load` from 127.0.0.1 with the demo's token, as two applications of one
subaccount would. Each round runs every kind of attack of the hostile-clients issue at once, each
bounded in count and in time, while the load runs:

* SOCKS5 CONNECT then a reset before the reply (the stream leak);
* silent and vanishing connections to the tunnel endpoint (plain TCP and TLS with a valid node
  certificate);
* request heads and bodies trickled a byte at a time; responses never read;
* CL+TE requests with a smuggled second request; malformed chunk sizes; ``Connection:
  Content-Length``;
* a flood of wrong tokens on one connection;
* idle kept-alive connections that each made one request (stream pinning);
* 100,000 nested brackets to the destination service.

After each round every hostile socket is closed; the cloud's and the nodes' open file descriptors
and ``connector_streams_open`` must come back to their baseline, and the processes' RSS must not
grow from round to round. The well-behaved client must see zero failures over the whole soak.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from connector.admin import http_request
from connector.cloud.auth import hash_token, new_token
from tests.failover.harness import Cluster, describe_failures, fast_spec

pytestmark = [pytest.mark.soak, pytest.mark.slow]

ROUNDS = int(os.environ.get("HOSTILE_ROUNDS", "4"))
ROUND_SECONDS = float(os.environ.get("HOSTILE_ROUND_SECONDS", "45"))
SETTLE_SECONDS = 45.0  # the longest default deadline (idle keep-alive, body rate) plus slack
HOSTILE_SOURCE = "127.0.0.2"  # the attacker's own address: per-address limits must not hit the load
RSS_GROWTH_LIMIT = 1.25  # the last round's RSS against the first round's (allocator warm-up is round 0)
VIRTUAL_HTTP = "http://erp.virtual:8000/sap/opu/odata/soak"


# --- measuring the processes ---------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def streams_open(metrics_port: int) -> float:
    status, body = await http_request("127.0.0.1", metrics_port, "/metrics", timeout=5.0)
    assert status == 200
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "connector_streams_open":
            total += sum(sample.value for sample in family.samples)
    return total


class Watched:
    """The processes whose resources must come back after each round."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        state = cluster.state
        self.pids = {"cloud": int(state["cloud"]["pid"])} | {
            node: int(info["pid"]) for node, info in state["nodes"].items()
        }
        self.admin_ports = {"cloud": int(state["cloud"]["admin_port"])} | {
            node: int(info["admin_port"]) for node, info in state["nodes"].items()
        }

    async def snapshot(self) -> dict[str, tuple[int, float]]:
        return {
            name: (open_fds(pid), await streams_open(self.admin_ports[name])) for name, pid in self.pids.items()
        }

    def rss(self) -> dict[str, int]:
        return {name: rss_kib(pid) for name, pid in self.pids.items()}

    async def wait_baseline(self, baseline: dict[str, tuple[int, float]], within: float) -> dict[str, Any]:
        """Poll (these are other processes: there is nothing to await) until back at the baseline.

        The load's own requests may hold a stream or two at any moment, so a process is back when
        its fds and streams are within the load's concurrency of the baseline.
        """
        slack = 4
        last: dict[str, tuple[int, float]] = {}
        with trio.move_on_after(within):
            while True:
                last = await self.snapshot()
                if all(
                    last[name][0] <= fds + slack and last[name][1] <= streams + slack
                    for name, (fds, streams) in baseline.items()
                ):
                    return {"ok": True, "now": last}
                await trio.sleep(0.5)
        return {"ok": False, "now": last, "baseline": baseline}


# --- the hostile clients -------------------------------------------------------------------------


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=HOSTILE_SOURCE)


def reset_on_close(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def quietly(counts: dict[str, int], action: Callable[[], Awaitable[None]]) -> None:
    """Run one attack. The server may cut it off at any point (that is the server doing its job);
    `counts` records how each kind ended: finished, cut off, or still going when the round ended."""
    name = action.__name__
    outcome = "still_going"
    try:
        await action()
        outcome = "finished"
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
        outcome = "cut_off"
    finally:
        counts[f"{name}:{outcome}"] = counts.get(f"{name}:{outcome}", 0) + 1


class Attacks:
    """Every attack of the issue; each one bounded in count and in time (the round's cancel scope)."""

    def __init__(self, cluster: Cluster, token: str) -> None:
        state = cluster.state
        self.token = token
        self.subaccount = str(state["subaccount"])
        self.http = int(state["cloud"]["http_proxy_port"])
        self.socks5 = int(state["cloud"]["socks5_port"])
        self.tunnel = int(state["cloud"]["tunnel_port"])
        self.destinations = int(state["cloud"]["destinations_port"])
        certs = cluster.workdir / "certs"
        node = cluster.nodes[0]
        # A valid node certificate: the attacks after the TLS handshake need one (see connector.cli.init_certs).
        self.tls = ssl.create_default_context(cafile=str(certs / "cloud-ca.pem"))
        self.tls.load_cert_chain(str(certs / f"node-{node}.pem"), str(certs / f"node-{node}.key"))
        self.destination_admin = str(state["destination_admin_token"])  # the deep JSON must be parsed
        self.counts: dict[str, int] = {}

    def head(self, method: str = "GET", extra: str = "") -> bytes:
        return (
            f"{method} {VIRTUAL_HTTP} HTTP/1.1\r\nHost: erp.virtual:8000\r\n"
            f"Proxy-Authorization: Bearer {self.token}\r\n{extra}"
        ).encode()

    async def socks5_reset_before_reply(self) -> None:
        stream = await connect(self.socks5)
        user, password = self.subaccount.encode(), self.token.encode()
        await stream.send_all(b"\x05\x01\x02")
        await stream.receive_some(2)
        await stream.send_all(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        await stream.receive_some(2)
        host = b"echo.virtual"
        await stream.send_all(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + struct.pack("!H", 7000))
        reset_on_close(stream)
        await stream.aclose()

    async def tunnel_silent_tcp(self) -> None:
        stream = await connect(self.tunnel)
        await stream.receive_some(1)  # the endpoint must hang up on us

    async def tunnel_tls_then_silent(self) -> None:
        stream = trio.SSLStream(await connect(self.tunnel), self.tls, server_hostname="127.0.0.1")
        await stream.do_handshake()
        await stream.receive_some(1)

    async def tunnel_tls_then_vanish(self) -> None:
        stream = trio.SSLStream(await connect(self.tunnel), self.tls, server_hostname="127.0.0.1")
        await stream.do_handshake()
        await stream.transport_stream.aclose()

    async def slow_head(self) -> None:
        stream = await connect(self.http)
        await stream.send_all(self.head())
        for _ in range(int(ROUND_SECONDS)):
            await stream.send_all(b"X")
            await trio.sleep(1.0)

    async def slow_body(self) -> None:
        stream = await connect(self.http)
        await stream.send_all(self.head("POST", "Content-Length: 1000000\r\n\r\n"))
        for _ in range(int(ROUND_SECONDS)):
            await stream.send_all(b"x")
            await trio.sleep(1.0)

    async def unread_response(self) -> None:
        stream = await connect(self.http)
        size = 8 * 1024 * 1024
        await stream.send_all(self.head("POST", f"Content-Length: {size}\r\n\r\n"))
        chunk = b"y" * 65536
        for _ in range(size // len(chunk)):
            await stream.send_all(chunk)
        await trio.sleep(ROUND_SECONDS)  # never read the echo

    async def smuggle_cl_te(self) -> None:
        stream = await connect(self.http)
        smuggled = b"GET http://erp.virtual:8000/sap/opu/odata/smuggled HTTP/1.1\r\nHost: erp.virtual:8000\r\n\r\n"
        await stream.send_all(
            self.head("POST", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n") + b"0\r\n\r\n" + smuggled
        )
        await _read_until_closed(stream)

    async def malformed_chunk(self) -> None:
        stream = await connect(self.http)
        await stream.send_all(self.head("POST", "Transfer-Encoding: chunked\r\n\r\n") + b"-1\r\nxx\r\n0\r\n\r\n")
        await _read_until_closed(stream)

    async def connection_names_content_length(self) -> None:
        stream = await connect(self.http)
        await stream.send_all(self.head("POST", "Connection: Content-Length\r\nContent-Length: 3\r\n\r\n") + b"abc")
        await _read_until_closed(stream)

    async def wrong_tokens(self) -> None:
        stream = await connect(self.http)
        for _ in range(200):
            await stream.send_all(
                f"GET {VIRTUAL_HTTP} HTTP/1.1\r\nHost: erp.virtual:8000\r\n"
                f"Proxy-Authorization: Bearer wrong-{new_token()}\r\n\r\n".encode()
            )
            if not await stream.receive_some(65536):
                break

    async def idle_keepalive(self) -> None:
        stream = await connect(self.http)
        await stream.send_all(self.head(extra="\r\n"))
        await stream.receive_some(65536)
        await trio.sleep(ROUND_SECONDS)

    async def deep_json(self) -> None:
        stream = await connect(self.destinations)
        body = b"[" * 100_000
        await stream.send_all(
            f"POST /destination-configuration/v1/subaccountDestinations HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {self.destination_admin}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await _read_until_closed(stream)

    def plan(self) -> list[tuple[Callable[[], Awaitable[None]], int]]:
        """(attack, how many at once) for one round."""
        return [
            (self.socks5_reset_before_reply, 20),
            (self.tunnel_silent_tcp, 20),
            (self.tunnel_tls_then_silent, 10),
            (self.tunnel_tls_then_vanish, 10),
            (self.slow_head, 10),
            (self.slow_body, 10),
            (self.unread_response, 4),
            (self.smuggle_cl_te, 5),
            (self.malformed_chunk, 5),
            (self.connection_names_content_length, 5),
            (self.wrong_tokens, 2),
            (self.idle_keepalive, 100),
            (self.deep_json, 2),
        ]


async def _read_until_closed(stream: trio.abc.ReceiveStream, limit: float = 10.0) -> None:
    with trio.move_on_after(limit):
        while await stream.receive_some(65536):
            pass


# --- the soak ------------------------------------------------------------------------------------


async def test_hostile_clients_cost_the_well_behaved_application_nothing() -> None:
    hostile_token = new_token()
    spec = fast_spec(extra_token_sha256=(hash_token(hostile_token),))
    async with Cluster(spec) as cluster:
        watched = Watched(cluster)
        attacks = Attacks(cluster, hostile_token)
        load = cluster.load("soak", concurrency=2, interval=0.02,
                            max_requests=1_000_000, max_seconds=(ROUNDS + 1) * (ROUND_SECONDS + SETTLE_SECONDS))
        rss_per_round: list[dict[str, int]] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(load.run)
            baseline = await watched.snapshot()
            for round_no in range(ROUNDS + 1):  # round 0 warms the allocators up
                with trio.move_on_after(ROUND_SECONDS):
                    async with trio.open_nursery() as round_nursery:
                        for attack, many in attacks.plan():
                            for _ in range(many):
                                round_nursery.start_soon(quietly, attacks.counts, attack)
                settled = await watched.wait_baseline(baseline, SETTLE_SECONDS)
                assert settled["ok"], f"round {round_no}: resources not back to baseline: {settled}\n{cluster.log_tails()}"
                rss_per_round.append(watched.rss())
            load.stop()

        print(f"well-behaved requests: {len(load.results)}; attacks: {sorted(attacks.counts.items())}; "
              f"RSS per round (KiB): {rss_per_round}")
        failures = [r for r in load.results if not r.ok]
        assert load.results, "the well-behaved client made no request"
        assert failures == [], describe_failures(failures)
        first, last = rss_per_round[1], rss_per_round[-1]
        grown = {name: (first[name], last[name]) for name in first if last[name] > first[name] * RSS_GROWTH_LIMIT}
        assert grown == {}, f"RSS grew from round 1 to round {ROUNDS} (KiB): {grown}; all rounds: {rss_per_round}"
        # Every attack really ran, so the zero above means something.
        ran = {key.split(":")[0] for key in attacks.counts}
        assert ran == {attack.__name__ for attack, _ in attacks.plan()}, attacks.counts
