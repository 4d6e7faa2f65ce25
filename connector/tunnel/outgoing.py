"""The tunnel's outgoing frames: one queue, drained by one writer task into websocket messages.

Everybody who sends on a tunnel appends encoded frames here (whole frames only, so frames of
different streams never interleave badly); PING, PONG and WINDOW_UPDATE go to a small urgent queue
that jumps ahead, since they carry no ordering with stream data. The writer (`run`) sends whatever
has gathered as one binary message of up to `message_target` bytes: small writes coalesce for free
while a large one is in flight. Senders wait (`wait_writable`) while more than `high_water` bytes
are queued, so a slow websocket pushes back on them instead of buffering.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable

import trio
from trio.lowlevel import ParkingLot

__all__ = ["Outgoing"]


class Outgoing:
    """Frames waiting for the websocket; `run` is the writer, `send_message` its only way out."""

    def __init__(self, send_message: Callable[[bytes], Awaitable[None]], *, message_target: int,
                 high_water: int) -> None:
        self._send_message = send_message
        self.message_target = message_target
        self.high_water = high_water
        self._queue: collections.deque[bytes] = collections.deque()
        self._urgent: list[bytes] = []
        self.queued = 0  # bytes in both queues
        self.sent = 0  # bytes handed to the websocket
        self._writing = False
        self._writer_lot = ParkingLot()  # the writer waits here for frames
        self._drain_lot = ParkingLot()  # senders wait here for the queue to drain
        self.closed = False  # no more waiting: the tunnel is closing

    def put(self, data: bytes, *, urgent: bool = False) -> None:
        """Queue encoded frames for the writer."""
        (self._urgent.append if urgent else self._queue.append)(data)
        self.queued += len(data)
        self._writer_lot.unpark_all()

    def close(self) -> None:
        """Release every sender and flusher waiting here (the tunnel is closing)."""
        self.closed = True
        self._drain_lot.unpark_all()

    async def wait_writable(self) -> None:
        """Back-pressure: wait while more than `high_water` bytes are queued."""
        if self.queued <= self.high_water or self.closed:
            # a cancel point but no yield: queueing a frame needs no trip through the scheduler
            # (the writer runs at the caller's next wait; the queue's bound keeps that near)
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        while self.queued > self.high_water and not self.closed:
            await self._drain_lot.park()

    async def wait_flushed(self) -> None:
        """Wait until everything queued went to the websocket (or the tunnel closed)."""
        while (self._queue or self._urgent or self._writing) and not self.closed:
            await self._drain_lot.park()

    async def run(self) -> None:
        """The writer: send what gathered, as one message, for ever (the websocket's errors escape)."""
        queue, urgent = self._queue, self._urgent
        while True:
            while not queue and not urgent:
                await self._writer_lot.park()
            parts: list[bytes] = urgent[:]
            urgent.clear()
            size = sum(map(len, parts))
            while queue and size < self.message_target:
                part = queue.popleft()
                parts.append(part)
                size += len(part)
            message = parts[0] if len(parts) == 1 else b"".join(parts)
            self._writing = True
            try:
                await self._send_message(message)
            finally:
                self._writing = False
                self.queued -= size
            self.sent += size
            self._drain_lot.unpark_all()
