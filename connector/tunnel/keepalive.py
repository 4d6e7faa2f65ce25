"""The tunnel's keepalive: a PING every `interval`; no PONG within `timeout` ends the tunnel.

Only PONG counts as an answer, not "any frame": a peer whose reader is stuck can still send (its
own pings, stream data), but it cannot answer ours. PONGs come in order, so one answers every
earlier PING too. The round-trip time of each answered PING is observed (`last_rtt`, the metric).
Times are trio's clock.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["Keepalive"]

log = logging.getLogger(__name__)


class Keepalive:
    """`send_ping(payload)` queues a PING (False: the tunnel is closing); `on_timeout()` ends it."""

    def __init__(self, *, interval: float, timeout: float, send_ping: Callable[[bytes], bool],
                 on_timeout: Callable[[], None], rtt_metric: Any) -> None:
        self.interval = interval
        self.timeout = timeout
        self._send_ping = send_ping
        self._on_timeout = on_timeout
        self._rtt_metric = rtt_metric
        self._pings: dict[bytes, float] = {}  # payload -> sent at, oldest first
        self._counter = 0
        self.last_rtt: float | None = None

    async def run(self) -> None:
        """Ping until a PING goes unanswered for `timeout` (then `on_timeout`, and return)."""
        next_ping = trio.current_time() + self.interval
        while True:
            oldest = next(iter(self._pings.values()), None)
            deadline = next_ping if oldest is None else min(next_ping, oldest + self.timeout)
            await trio.sleep_until(deadline)
            now = trio.current_time()
            oldest = next(iter(self._pings.values()), None)
            if oldest is not None and now >= oldest + self.timeout:
                log.warning("tunnel ping timeout: no PONG within %.3f s", self.timeout)
                self._on_timeout()
                return
            if now >= next_ping:
                self._counter += 1
                payload = struct.pack(">Q", self._counter)
                if self._send_ping(payload):
                    self._pings[payload] = now
                next_ping = now + self.interval

    def pong(self, payload: bytes) -> None:
        """A PONG arrived: it answers its PING and every earlier one."""
        sent_at = self._pings.get(payload)
        if sent_at is None:
            return
        for earlier in list(self._pings):
            del self._pings[earlier]
            if earlier == payload:
                break
        self.last_rtt = trio.current_time() - sent_at
        self._rtt_metric.observe(self.last_rtt)
