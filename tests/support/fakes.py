"""Stand-ins for unit tests of logic only (routing, admission): a stream that carries nothing."""

from __future__ import annotations

import trio

from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, Target


class InertStream(TunnelStream):
    """A stream a registry unit test can hand out and close; any I/O on it is a test bug."""

    def __init__(self, target: Target, stream_id: int = 1) -> None:
        self.target = target
        self.stream_id = stream_id
        self.peer_started = False
        self.trailers = None
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("InertStream carries no data")

    async def wait_send_all_might_not_block(self) -> None:
        raise AssertionError("InertStream carries no data")

    async def send_eof(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise AssertionError("InertStream carries no data")

    async def accept(self) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_accepted(self) -> None:
        await trio.lowlevel.checkpoint()

    async def reset(self, code: ErrorCode, reason: str = "") -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()
