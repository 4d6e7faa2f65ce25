"""An in-memory `TunnelStream` pair for tests of the proxy and the node that are not about the tunnel."""

from __future__ import annotations

import trio

from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import ErrorCode, StreamResetError, Target


class _Shared:
    def __init__(self) -> None:
        self.reset: StreamResetError | None = None
        self.accepted = trio.Event()
        self.reset_event = trio.Event()


class MemoryTunnelStream(TunnelStream):
    """One end of `memory_stream_pair`; a bounded buffer per direction gives real back-pressure."""

    def __init__(
        self,
        target: Target,
        shared: _Shared,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
        stream_id: int,
    ) -> None:
        self.target = target
        self.stream_id = stream_id
        self._shared = shared
        self._send = send
        self._receive = receive
        self._pending = b""
        self._eof_sent = False

    def _check(self) -> None:
        if self._shared.reset is not None:
            raise StreamResetError(self._shared.reset.code, self._shared.reset.reason)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        if self._eof_sent:
            raise trio.ClosedResourceError("send after send_eof")
        if data:
            try:
                await self._send.send(bytes(data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._check()
                raise
        self._check()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self._check()
        if not self._eof_sent:
            self._eof_sent = True
            await self._send.aclose()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check()
        if not self._pending:
            try:
                self._pending = await self._receive.receive()
            except trio.EndOfChannel:
                self._check()
                return b""
            except trio.ClosedResourceError:
                self._check()
                raise
        n = len(self._pending) if max_bytes is None else max_bytes
        chunk, self._pending = self._pending[:n], self._pending[n:]
        return chunk

    async def accept(self) -> None:
        self._shared.accepted.set()
        await trio.lowlevel.checkpoint()

    async def wait_accepted(self) -> None:
        async with trio.open_nursery() as nursery:
            async def _on_reset() -> None:
                await self._shared.reset_event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(_on_reset)
            await self._shared.accepted.wait()
            nursery.cancel_scope.cancel()
        self._check()

    async def wait_reset(self) -> None:
        await self._shared.reset_event.wait()

    async def reset(self, code: ErrorCode, reason: str = "") -> None:
        if self._shared.reset is None:
            self._shared.reset = StreamResetError(code, reason)
            self._shared.reset_event.set()
        await self._send.aclose()
        await self._receive.aclose()

    async def aclose(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            await self._send.aclose()
        await self._receive.aclose()


def memory_stream_pair(
    target: Target, buffer_chunks: int = 4
) -> tuple[MemoryTunnelStream, MemoryTunnelStream]:
    """Return (opener, acceptor) joined in memory; each direction buffers `buffer_chunks` writes."""
    shared = _Shared()
    a_to_b_send, a_to_b_recv = trio.open_memory_channel[bytes](buffer_chunks)
    b_to_a_send, b_to_a_recv = trio.open_memory_channel[bytes](buffer_chunks)
    opener = MemoryTunnelStream(target, shared, a_to_b_send, b_to_a_recv, stream_id=1)
    acceptor = MemoryTunnelStream(target, shared, b_to_a_send, a_to_b_recv, stream_id=1)
    return opener, acceptor
