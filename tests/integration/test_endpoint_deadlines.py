"""The tunnel endpoint drops peers that are silent or gone in every phase before the tunnel runs.

Real TLS clients holding a valid node certificate (made by `connector.pki` through `init_certs`)
stop at each phase: before TLS, after TLS, halfway through the WebSocket upgrade, on a wrong
path, after the upgrade (before HELLO); silent or closing. The endpoint runs with short
deadlines; its connection count (`wait_connections`) and this process's open file descriptors
must return to where they were.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request

from connector import pki
from connector.cli import init_certs
from connector.cloud.endpoint import EndpointSettings, TunnelEndpoint
from connector.cloud.registry import Registry
from connector.tunnel.session import TunnelSettings

SUBACCOUNT = "acme"
DEADLINE = 1.0  # every phase's deadline in these tests
SETTLE = DEADLINE + 3.0  # bound of each wait for the endpoint to drop its connections (a loaded CI)
BATCH = 100


@attrs.define
class Env:
    endpoint: TunnelEndpoint
    port: int
    client_ssl: ssl.SSLContext


@pytest.fixture
async def env(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Env]:
    certs = init_certs(tmp_path / "certs", SUBACCOUNT, ["node-a"], ["127.0.0.1", "localhost"])
    endpoint = TunnelEndpoint(
        Registry(hold_seconds=1.0),
        cert=certs["server_cert"],
        key=certs["server_key"],
        subaccount_cas={SUBACCOUNT: certs["subaccount_ca"]},
        settings=TunnelSettings(ping_interval=0.2, ping_timeout=DEADLINE, hello_timeout=DEADLINE),
        endpoint_settings=EndpointSettings(tls_handshake_timeout=DEADLINE, upgrade_timeout=DEADLINE),
    )
    port = await nursery.start(endpoint.run, "127.0.0.1", 0)
    client_ssl = pki.client_context(certs["cloud_ca"], certs["node_node-a_cert"], certs["node_node-a_key"])
    yield Env(endpoint, port, client_ssl)


def open_fds(port: int) -> int:
    """This process's file descriptors on sockets of `port` (the endpoint's listener, its
    connections and the clients' ends). Not every fd: in a full test run, resources of earlier
    tests (gRPC channels, subprocess pipes) close in the background and would move the count."""
    inodes = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if int(local.rsplit(":", 1)[1], 16) == port or int(remote.rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


# --- clients, each stopping at one phase; they return what they keep open -------------------


async def tls(env: Env) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", env.port)
    stream = trio.SSLStream(tcp, env.client_ssl, server_hostname="127.0.0.1")
    await stream.do_handshake()
    return stream


def upgrade_request(path: str = "/tunnel") -> bytes:
    return WSConnection(ConnectionType.CLIENT).send(Request(host="127.0.0.1", target=path))


async def read_handshake_answer(stream: trio.abc.Stream, path: str) -> type:
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target=path)))
    while True:
        data = await stream.receive_some(65536)
        assert data, "endpoint closed before answering the upgrade"
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, (AcceptConnection, RejectConnection)):
                return type(event)


async def tcp_silent(env: Env) -> trio.abc.AsyncResource:
    return await trio.open_tcp_stream("127.0.0.1", env.port)


async def tls_silent(env: Env) -> trio.abc.AsyncResource:
    return await tls(env)


async def tls_then_close(env: Env) -> None:
    stream = await tls(env)
    await stream.transport_stream.aclose()


async def partial_upgrade(env: Env) -> trio.abc.AsyncResource:
    stream = await tls(env)
    await stream.send_all(upgrade_request()[:-10])
    return stream


async def wrong_path_silent(env: Env) -> trio.abc.AsyncResource:
    stream = await tls(env)
    assert await read_handshake_answer(stream, "/other") is RejectConnection
    return stream


async def upgraded_silent(env: Env) -> trio.abc.AsyncResource:
    stream = await tls(env)
    assert await read_handshake_answer(stream, "/tunnel") is AcceptConnection
    return stream


async def upgraded_then_close(env: Env) -> None:
    stream = await tls(env)
    assert await read_handshake_answer(stream, "/tunnel") is AcceptConnection
    await stream.transport_stream.aclose()


Client = Callable[[Env], Awaitable["trio.abc.AsyncResource | None"]]
CLIENTS: list[Client] = [
    tcp_silent, tls_silent, tls_then_close, partial_upgrade, wrong_path_silent, upgraded_silent,
    upgraded_then_close,
]


async def run_clients(env: Env, clients: list[Client]) -> None:
    """Run `clients` one after the other; assert the endpoint drops every connection in time and
    that, once the clients closed their ends, no file descriptor is left over."""
    await env.endpoint.wait_connections(0)
    fds = open_fds(env.port)
    kept = []
    try:
        for client in clients:
            resource = await client(env)
            if resource is not None:
                kept.append(resource)
        with trio.fail_after(SETTLE):
            await env.endpoint.wait_connections(0)
    finally:
        for resource in kept:
            await trio.aclose_forcefully(resource)
    assert open_fds(env.port) == fds


@pytest.mark.parametrize("client", CLIENTS, ids=[c.__name__ for c in CLIENTS])
async def test_a_dead_peer_is_dropped_in_every_phase(env: Env, client: Client) -> None:
    await run_clients(env, [client])


async def test_a_batch_of_dead_peers_is_dropped(env: Env) -> None:
    await run_clients(env, [CLIENTS[i % len(CLIENTS)] for i in range(BATCH)])


CLOSING = [tls_then_close, upgraded_then_close]


@pytest.mark.parametrize("client", CLOSING, ids=[c.__name__ for c in CLOSING])
async def test_a_closed_peer_is_dropped_before_the_deadline(env: Env, client: Client) -> None:
    """A peer that closes is noticed at once, not when the phase's deadline expires."""
    await client(env)
    with trio.fail_after(DEADLINE / 2):
        await env.endpoint.wait_connections(0)
