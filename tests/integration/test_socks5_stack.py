"""SOCKS5 through the whole in-process stack (cloud, node, a TCP internal host): no stream leaks.

A client that goes away at any point of the CONNECT exchange must leave nothing behind: the
cloud's and the node's tunnel streams close and the node's connection to the internal host ends.
The internal host here counts its open connections and can be awaited.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import trio
from prometheus_client import REGISTRY

from connector.cli import init_certs
from tests.support.socks import _read_exactly
from tests.support.stack import SUBACCOUNT, TOKEN, Stack, node_toml, start_cloud, start_node

TRIES = 20
SETTLE_TIMEOUT = 10.0  # bound of each wait below; a leak never settles


class CountingBackend:
    """A TCP echo internal host that counts connections; `wait_*` wake on every change."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self._changed = trio.Event()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def handle(self, sock: trio.SocketStream) -> None:
        self.accepted += 1
        self.open += 1
        self._signal()
        try:
            while data := await sock.receive_some(65536):
                await sock.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await sock.aclose()
            self.open -= 1
            self._signal()

    async def wait(self, *, accepted: int | None = None, open: int | None = None) -> None:
        while (accepted is not None and self.accepted != accepted) or (open is not None and self.open != open):
            await self._changed.wait()


def streams_open_metric(side: str) -> float:
    return REGISTRY.get_sample_value("connector_streams_open", {"side": side}) or 0.0


async def start(nursery: trio.Nursery, workdir: Path) -> tuple[Stack, CountingBackend]:
    backend = CountingBackend()
    listeners = await nursery.start(trio.serve_tcp, backend.handle, 0)
    backend_port = listeners[0].socket.getsockname()[1]
    certs = init_certs(workdir / "certs", SUBACCOUNT, ["node-a"], ["127.0.0.1", "localhost"])
    cloud, ports, scope = await start_cloud(nursery, workdir, certs)
    stack = Stack(workdir, certs, 0, backend_port, cloud, ports, cloud_scope=scope)
    # echo.virtual:7000 (TCP) maps to the counting backend
    await start_node(nursery, stack, node_toml(workdir, certs, ports.tunnel, 1, backend_port))
    with trio.fail_after(SETTLE_TIMEOUT):
        await stack.wait_registered()
    return stack, backend


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
    sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await sock.aclose()


async def test_client_reset_before_the_connect_reply_leaks_nothing(nursery: trio.Nursery, tmp_path: Path) -> None:
    stack, backend = await start(nursery, tmp_path)
    assert stack.node is not None and stack.node.session is not None
    master = stack.cloud.registry.master_of(SUBACCOUNT, "")
    assert master is not None
    cloud_session, node_session = master.session, stack.node.session
    assert cloud_session.statistics().streams_open == 0
    opened_before = cloud_session.statistics().streams_opened
    metric_before = {side: streams_open_metric(side) for side in ("cloud", "node")}

    for _ in range(TRIES):
        await connect_then_reset(stack.ports.socks5_proxy)
    with trio.fail_after(SETTLE_TIMEOUT):
        # the premise: every try reached the internal host through a tunnel stream
        await backend.wait(accepted=TRIES)
        assert cloud_session.statistics().streams_opened == opened_before + TRIES
        # and left nothing open anywhere
        await cloud_session.wait_no_streams()
        await node_session.wait_no_streams()
        await backend.wait(open=0)
    assert {side: streams_open_metric(side) for side in ("cloud", "node")} == metric_before
