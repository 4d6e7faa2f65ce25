"""The proxies through the whole in-process stack (cloud, node, internal hosts): no stream leaks.

An application that goes away before its answer (SOCKS5: before the CONNECT reply; HTTP: before
the response) must leave nothing behind: the cloud's and the node's tunnel streams close, and the
node's connection to the internal host ends (TCP), or is either closed or idle in the node's pool
of internal-host connections (HTTP: a request the internal host answered whole leaves its
connection reusable, however far the answer got). The internal hosts here count their open
connections and the requests they answered, and can be awaited.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import trio.testing
from prometheus_client import REGISTRY

from connector.cli import init_certs
from connector.tunnel.session import TunnelSession
from tests.support.socks import _read_exactly
from tests.support.stack import SUBACCOUNT, TOKEN, Stack, node_toml, start_cloud, start_node

TRIES = 20
SETTLE_TIMEOUT = 10.0  # bound of each wait below; a leak never settles


class CountingBackend:
    """An internal host that counts connections and requests; `wait` wakes on every change.
    TCP: echo (a connection is a request); `http=True`: answers each request head with `200 ok`
    (keep-alive)."""

    def __init__(self, *, http: bool = False) -> None:
        self.http = http
        self.accepted = 0
        self.open = 0
        self.requests = 0
        self._changed = trio.Event()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def handle(self, sock: trio.SocketStream) -> None:
        self.accepted += 1
        self.open += 1
        if not self.http:
            self.requests += 1
        self._signal()
        try:
            head = b""
            while data := await sock.receive_some(65536):
                if not self.http:
                    await sock.send_all(data)
                    continue
                head += data
                while b"\r\n\r\n" in head:
                    _, _, head = head.partition(b"\r\n\r\n")
                    self.requests += 1
                    self._signal()
                    await sock.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await sock.aclose()
            self.open -= 1
            self._signal()

    async def wait(self, *, requests: int | None = None, open: int | None = None) -> None:
        while (requests is not None and self.requests != requests) or (open is not None and self.open != open):
            await self._changed.wait()


def streams_open_metric(side: str) -> float:
    return REGISTRY.get_sample_value("connector_streams_open", {"side": side}) or 0.0


async def serve(nursery: trio.Nursery, backend: CountingBackend) -> int:
    listeners = await nursery.start(trio.serve_tcp, backend.handle, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def start(nursery: trio.Nursery, workdir: Path, backend: CountingBackend) -> Stack:
    """The stack with `backend` behind echo.virtual:7000 (TCP) or erp.virtual:8000 (HTTP)."""
    port = await serve(nursery, backend)
    certs = init_certs(workdir / "certs", SUBACCOUNT, ["node-a"], ["127.0.0.1", "localhost"])
    cloud, ports, scope = await start_cloud(nursery, workdir, certs)
    http_port, tcp_port = (port, 1) if backend.http else (1, port)
    stack = Stack(workdir, certs, http_port, tcp_port, cloud, ports, cloud_scope=scope)
    await start_node(nursery, stack, node_toml(workdir, certs, ports.tunnel, http_port, tcp_port))
    with trio.fail_after(SETTLE_TIMEOUT):
        await stack.wait_registered()
    return stack


def sessions(stack: Stack) -> tuple[TunnelSession, TunnelSession]:
    """(cloud's, node's) session of the one tunnel; no stream may be open yet."""
    assert stack.node is not None and stack.node.session is not None
    master = stack.cloud.registry.master_of(SUBACCOUNT, "")
    assert master is not None
    assert master.session.statistics().streams_open == 0
    return master.session, stack.node.session


async def reset(sock: trio.SocketStream) -> None:
    """Close abortively (SO_LINGER 0): the proxy sees a TCP RST."""
    sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await sock.aclose()


async def assert_nothing_left(stack: Stack, backend: CountingBackend, run_tries: Callable[[], Awaitable[None]]) -> None:
    """Run `run_tries` (TRIES requests abandoned by their clients); every stream they opened
    must end, every backend connection must end or be idle in the node's pool, and the
    streams-open metric return to its value."""
    cloud_session, node_session = sessions(stack)
    opened_before = cloud_session.statistics().streams_opened
    metric_before = {side: streams_open_metric(side) for side in ("cloud", "node")}
    await run_tries()
    with trio.fail_after(SETTLE_TIMEOUT):
        # the premise: every try reached the internal host through a tunnel stream
        await backend.wait(requests=TRIES)
        assert cloud_session.statistics().streams_opened == opened_before + TRIES
        # and left nothing open anywhere
        await cloud_session.wait_no_streams()
        await node_session.wait_no_streams()
        await trio.testing.wait_all_tasks_blocked()  # the node's exchanges ran their ends
        assert stack.node is not None
        await backend.wait(open=stack.node.origins.idle_count())
    assert {side: streams_open_metric(side) for side in ("cloud", "node")} == metric_before


async def connect_then_reset(port: int) -> None:
    """Authenticate, send CONNECT to echo.virtual:7000, and reset (SO_LINGER 0) before the reply."""
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    user = SUBACCOUNT.encode()
    await sock.send_all(bytes([5, 1, 2]))
    assert await _read_exactly(sock, 2) == bytes([5, 2])
    await sock.send_all(bytes([1, len(user)]) + user + bytes([len(TOKEN)]) + TOKEN.encode())
    assert await _read_exactly(sock, 2) == b"\x01\x00"
    host = b"echo.virtual"
    await sock.send_all(bytes([5, 1, 0, 3, len(host)]) + host + struct.pack("!H", 7000))
    await reset(sock)


async def request_then_reset(port: int) -> None:
    """Send a request for erp.virtual through the HTTP proxy and reset before the response."""
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    await sock.send_all(
        b"GET http://erp.virtual:8000/sap/opu/odata/x HTTP/1.1\r\nhost: erp.virtual:8000\r\n"
        b"proxy-authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
    )
    await reset(sock)


async def test_socks5_client_reset_before_the_connect_reply_leaks_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = CountingBackend()
    stack = await start(nursery, tmp_path, backend)

    async def tries() -> None:
        for _ in range(TRIES):
            await connect_then_reset(stack.ports.socks5_proxy)

    await assert_nothing_left(stack, backend, tries)


async def test_http_client_reset_before_the_response_leaks_nothing(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = CountingBackend(http=True)
    stack = await start(nursery, tmp_path, backend)

    async def tries() -> None:
        for _ in range(TRIES):
            await request_then_reset(stack.ports.http_proxy)

    await assert_nothing_left(stack, backend, tries)
