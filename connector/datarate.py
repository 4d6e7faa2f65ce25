"""Minimum data rates for HTTP bodies: how long a slow peer may keep a request in progress.

Theory of operation (Kestrel's MinRequestBodyDataRate and MinResponseDataRate). A deadline per
request head is not enough for bodies: a large upload legitimately takes minutes. What gives a
slow-drip client away is its *rate*, so a body must move at `bytes_per_second` or more once a
`grace_period` has passed (the grace lets a connection ramp up and covers small bodies).

* Reading (`ReadTiming`): only the time spent waiting for the peer counts, not the time we are
  blocked elsewhere (a slow node, a full tunnel window): those are not the peer's fault. After the
  grace period, bytes read / time waited must stay at or above the rate. The deadline of one wait
  is therefore the moment at which the waiting time would exceed `max(grace, bytes / rate)`.
* Writing (`WriteTiming`): a peer that does not read stalls our writes once the socket buffers
  are full. Each write of n bytes must complete within `max(grace, n / rate)`; time a previous
  write did not need carries over (a fast peer is not punished for a small write that follows a
  large one), but the grace period never accumulates. Counting the whole response instead would
  credit the megabytes the kernel buffers took at once and let a peer that never reads stall us
  for hours.

Pure: callers pass the time (trio.current_time()), so the decisions are tested under
`autojump_clock` and at exact virtual times.
"""

from __future__ import annotations

import math

import attrs


@attrs.frozen
class MinDataRate:
    """A minimum rate in bytes per second after a grace period in seconds; 0 bytes/s: no limit."""

    bytes_per_second: float
    grace_period: float

    def __attrs_post_init__(self) -> None:
        if self.bytes_per_second < 0 or self.grace_period < 0:
            raise ValueError("a minimum data rate and its grace period cannot be negative")

    @property
    def enabled(self) -> bool:
        return self.bytes_per_second > 0


@attrs.define
class ReadTiming:
    """The waits for one body being read: `deadline` for the next wait, `record` after it."""

    rate: MinDataRate
    waited: float = 0.0  # seconds spent waiting for the peer so far
    received: int = 0  # bytes the peer sent so far

    def deadline(self, now: float) -> float:
        """When a wait starting `now` without any byte arriving makes the body too slow."""
        if not self.rate.enabled:
            return math.inf
        allowed = max(self.rate.grace_period, self.received / self.rate.bytes_per_second)
        return now + allowed - self.waited

    def record(self, started: float, ended: float, nbytes: int) -> None:
        self.waited += ended - started
        self.received += nbytes


@attrs.define
class WriteTiming:
    """The writes of one body to a peer: `deadline` before each write of `nbytes`."""

    rate: MinDataRate
    _due: float = -math.inf  # the deadline of the previous write (time it did not use carries over)

    def deadline(self, now: float, nbytes: int) -> float:
        """When a write of `nbytes` starting `now` makes the body too slow."""
        if not self.rate.enabled:
            return math.inf
        needed = nbytes / self.rate.bytes_per_second
        self._due = max(now + max(self.rate.grace_period, needed), self._due + needed)
        return self._due
