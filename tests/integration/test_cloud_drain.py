"""A cloud replica's graceful shutdown, phase by phase, on a real cloud, node and backend in-process.

`connector.cloud.drain` describes the phases: not ready and `Connection: close` on every response
(`Drain.begin`), listeners closed and idle connections closed (`Drain.stop_accepting`), requests
under way finish, then GOAWAY to the nodes. The end-to-end run (real processes behind HAProxy,
under load) is tests/failover/test_cloud_rolling.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from connector.admin import http_request
from tests.support.httpclient import HttpClient
from tests.support.socks import socks5_connect
from tests.support.stack import SUBACCOUNT, TOKEN, start_stack

TEST_TIMEOUT = 20.0
URL = "http://erp.virtual:8000/sap/opu/odata/x"
DRAIN = "\n[drain]\nnotice_seconds = 0.2\ndrain_seconds = 10\n"
DESTINATIONS = '\n[destinations]\nlisten = "127.0.0.1:0"\nstore = "destinations.json"\n'
FIND = "/destination-configuration/v1/destinations/nothing-here"


async def _eof(client: HttpClient) -> bytes:
    """What the proxy still sends on `client`'s connection until it closes it."""
    data = b""
    while chunk := await client.stream.receive_some(65536):
        data += chunk
    return data


async def test_drain_phases(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            stack = await start_stack(nursery, tmp_path, extra=DRAIN + DESTINATIONS)
            cloud, ports = stack.cloud, stack.ports
            assert ports.destinations is not None
            kept, idle = await HttpClient.connect(ports.http_proxy), await HttpClient.connect(ports.http_proxy)
            for client in (kept, idle):
                response = await client.request("GET", URL, [stack.proxy_auth])
                assert response.status == 200 and "connection" not in response.headers
            # the destination service, fronted by the load balancer too
            bearer = ("Authorization", f"Bearer {TOKEN}")
            dest_kept, dest_idle = (await HttpClient.connect(ports.destinations),
                                    await HttpClient.connect(ports.destinations))
            for client in (dest_kept, dest_idle):
                response = await client.request("GET", FIND, [bearer])
                assert response.status == 404 and "connection" not in response.headers
            status, body = await http_request("127.0.0.1", ports.admin, "/readyz")
            assert status == 200, body

            # a request under way: its body waits for `release`
            release = trio.Event()
            slow = await HttpClient.connect(ports.http_proxy)
            slow_result: list[int] = []

            async def body() -> AsyncIterator[bytes]:
                yield b"first "
                await release.wait()
                yield b"second"

            async def slow_request() -> None:
                response = await slow.request("POST", "http://erp.virtual:8000/sap/opu/odata/echo",
                                              [stack.proxy_auth], body())
                assert response.body == b"first second"
                slow_result.append(response.status)
                await slow.aclose()  # it was told Connection: close

            nursery.start_soon(slow_request)
            # a SOCKS5 session under way (the echo service through the node)
            session, code = await socks5_connect(ports.socks5_proxy, "echo.virtual", 7000, token=TOKEN,
                                                 subaccount=SUBACCOUNT)
            assert code == 0
            await session.send_all(b"ping")
            assert await session.receive_some(4) == b"ping"
            await cloud.drain.wait_connections(6)  # kept, idle, dest_kept, dest_idle, slow, SOCKS5

            # phase 1: not ready at once; the next response closes its connection
            cloud.drain.begin()
            status, body = await http_request("127.0.0.1", ports.admin, "/readyz")
            assert status == 503 and b"draining" in body
            response = await kept.request("GET", URL, [stack.proxy_auth])
            assert response.status == 200 and response.headers["connection"] == "close"
            assert await _eof(kept) == b""
            await kept.aclose()
            response = await dest_kept.request("GET", FIND, [bearer])
            assert response.status == 404 and response.headers["connection"] == "close"
            assert await _eof(dest_kept) == b""
            await dest_kept.aclose()
            # a connection the load balancer still sends is served, once
            late = await HttpClient.connect(ports.http_proxy)
            response = await late.request("GET", URL, [stack.proxy_auth])
            assert response.status == 200 and response.headers["connection"] == "close"
            await late.aclose()

            # a connection the load balancer opened just before the listener closes: its first
            # request is on the way and must be served
            fresh = await HttpClient.connect(ports.http_proxy)
            await cloud.drain.wait_connections(5)  # idle, dest_idle, slow, SOCKS5, fresh

            # phase 2: the listener closes, the idle connection is closed, the slow one goes on
            cloud.drain.stop_accepting()
            assert await _eof(idle) == b""
            assert await _eof(dest_idle) == b""
            await idle.aclose()
            await dest_idle.aclose()
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", ports.destinations)
            response = await fresh.request("GET", URL, [stack.proxy_auth])
            assert response.status == 200 and response.headers["connection"] == "close"
            await fresh.aclose()
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", ports.http_proxy)
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", ports.socks5_proxy)
            assert slow_result == []
            release.set()
            await cloud.drain.wait_connections(1)
            assert slow_result == [200]
            await session.send_all(b"still here")  # the SOCKS5 session runs to its end
            echoed = b""
            while len(echoed) < len(b"still here"):
                echoed += await session.receive_some(64)
            assert echoed == b"still here"
            await session.send_eof()
            assert await session.receive_some(64) == b""
            await session.aclose()
            await cloud.drain.wait_connections(0)

            # phase 4: GOAWAY; the node's tunnel goes, and a redial is sent away too
            await cloud.endpoint.go_away("replica shutting down")
            await cloud.endpoint.wait_connections(0)
            assert all(not loc["tunnels"] for loc in cloud.registry.snapshot())
            nursery.cancel_scope.cancel()


async def test_shutdown_returns_once_the_last_request_finished(tmp_path: Path) -> None:
    """`CloudServer.shutdown` (what SIGTERM runs) waits for a request under way, not longer."""
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            stack = await start_stack(nursery, tmp_path, extra=DRAIN)
            release = trio.Event()
            client = await HttpClient.connect(stack.ports.http_proxy)
            statuses: list[int] = []

            async def body() -> AsyncIterator[bytes]:
                yield b"a"
                await release.wait()
                yield b"b"

            async def request() -> None:
                response = await client.request("POST", "http://erp.virtual:8000/sap/opu/odata/echo",
                                                [stack.proxy_auth], body())
                statuses.append(response.status)

            nursery.start_soon(request)
            await stack.cloud.drain.wait_connections(1)
            done = trio.Event()

            async def shutdown() -> None:
                await stack.cloud.shutdown()
                done.set()

            nursery.start_soon(shutdown)
            await stack.cloud.drain.wait_stopped_accepting()  # after the notice period (0.2 s)
            assert not done.is_set()  # the request is still under way
            started = trio.current_time()
            release.set()
            await done.wait()
            assert statuses == [200]
            assert trio.current_time() - started < 5.0  # not drain_seconds (10 s)
            await client.aclose()
            nursery.cancel_scope.cancel()
