"""Exponential backoff with full jitter (AWS architecture blog's "full jitter"), time-free.

`next_delay()` returns how long to wait before attempt n+1: uniform(0, min(cap, base * 2**n)).
Full jitter spreads the reconnects of many nodes after a cloud restart instead of synchronising
them. The random source is injectable so tests are exact; the caller sleeps on trio's clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    def __init__(
        self, base: float = 0.1, cap: float = 5.0, *, uniform: Callable[[float, float], float] = random.uniform
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._uniform = uniform

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap, self.base * (2 ** min(self.attempt, 32)))

    def next_delay(self) -> float:
        delay = self._uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Call once a connection succeeded: the next failure starts from `base` again."""
        self.attempt = 0
