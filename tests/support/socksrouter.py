"""A Router over real in-memory tunnel session pairs, for the SOCKS5 proxy's tests.

Each "master" is a `connector.tunnel.testing.session_pair` whose node end serves the streams the
cloud opens with a handler: the real node (`Node.serve`: `connector.agent.forward.serve_stream`
with TCP mappings onto real loopback servers) or a small one where a test needs a specific reset.
`open_stream` opens on the current master; an `avoid` on the current master's tunnel makes the
next master current first, as the registry's hold does when a node hands over (none left:
NoConnectorError, as the hold's timeout).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import trio

from connector.agent.acl import AccessControl, BackendProtocol, Mapping
from connector.agent.audit import AuditLog
from connector.agent.forward import StreamContext, serve_stream
from connector.cloud.router import NoConnectorError
from connector.tunnel.session import SessionStream, TunnelSession
from connector.tunnel.streams import TunnelStream
from connector.tunnel.testing import session_pair
from connector.tunnel.types import ErrorCode, Target

StreamHandler = Callable[[SessionStream], Awaitable[None]]


class Node:
    """The real node's forwarding with TCP mappings: `tcp(host, port, internal_port)` adds one."""

    def __init__(self) -> None:
        self.mappings: list[Mapping] = []
        self.audit = AuditLog(None)

    def tcp(self, virtual_host: str, virtual_port: int, internal_port: int) -> None:
        self.mappings.append(Mapping(virtual_host, virtual_port, "127.0.0.1", internal_port,
                                     protocol=BackendProtocol.TCP))

    async def serve(self, stream: SessionStream) -> None:
        await serve_stream(stream, AccessControl(self.mappings), StreamContext("sub1", "", self.audit))


async def refuse(stream: SessionStream) -> None:
    """A node that is not (or no longer) the master (`connector.agent.node`)."""
    await stream.reset(ErrorCode.REFUSED, "this node is not the master")


class SessionRouter:
    """Routes (subaccount, location_id) in `locations` to the current master; records each call."""

    def __init__(self, stack: AsyncExitStack, locations: frozenset[tuple[str, str]] = frozenset({("sub1", "")})) -> None:
        self.stack = stack
        self.locations = locations
        self.masters: list[TunnelSession] = []  # the cloud ends, in the order they become master
        self.current = 0
        self.opened: list[tuple[str, str, Target]] = []
        self.streams: list[TunnelStream] = []  # every stream opened, in order
        self.avoided: list[TunnelStream | None] = []  # the `avoid` of each open_stream call
        self.stream_opened = trio.Event()  # set at the first stream

    async def add_master(self, handler: StreamHandler) -> tuple[TunnelSession, TunnelSession]:
        """A new tunnel whose node serves with `handler`; master once those before it handed over."""
        cloud, node = await self.stack.enter_async_context(session_pair(handler))
        self.masters.append(cloud)
        return cloud, node

    async def open_stream(self, subaccount: str, location_id: str, target: Target, *,
                          avoid: TunnelStream | None = None) -> TunnelStream:
        await trio.lowlevel.checkpoint()
        self.opened.append((subaccount, location_id, target))
        self.avoided.append(avoid)
        if (subaccount, location_id) not in self.locations:
            raise NoConnectorError("no connector connected")
        if (avoid is not None and self.current < len(self.masters)
                and getattr(avoid, "session", None) is self.masters[self.current]):
            self.current += 1  # the refusing master handed over
        if self.current >= len(self.masters):
            raise NoConnectorError("no master registered within the hold")
        stream = self.masters[self.current].open_stream_nowait(target)
        self.streams.append(stream)
        self.stream_opened.set()
        return stream


async def reset_code(stream: TunnelStream) -> ErrorCode:
    """The code `stream` was reset with (it must be reset, or be about to be)."""
    with trio.fail_after(5):
        await stream.wait_reset()
    error = getattr(stream, "reset_error", None)  # a SessionStream's: read without racing its handler
    if error is None:
        raise AssertionError("the stream was not reset")
    return ErrorCode(error.code)
