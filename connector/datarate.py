"""A minimum data rate for a body, after a grace period (ASP.NET Kestrel's MinRequestBodyDataRate).

Theory of operation. A client that sends a body one byte every few seconds holds a stream, a task
and a connection to the internal host for as long as it likes; a plain deadline on the whole body
would cut off large uploads. So a body must arrive at `bytes_per_second` on average, measured from
its start, once `grace_period` has passed (slow starts and TCP slow-start are forgiven). Only the
time spent *waiting for the sender* counts: while the receiver does not read (its own next hop is
slow, back-pressure), the sender cannot be blamed.

`RateBudget` is the pure decision: given the bytes received and the time waited so far, the latest
moment a wait that starts now may end without data. With no further data a body is too slow once
waited > max(grace_period, received / bytes_per_second), so that is the deadline: each byte that
arrives pushes it later by 1 / bytes_per_second. `receive_some_at_rate` is the thin shell that puts
the deadline on one `receive_some`, so nothing polls.
"""

from __future__ import annotations

import attrs
import trio


def _positive(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name}: must be > 0, not {value!r}")


@attrs.frozen
class MinDataRate:
    """At least `bytes_per_second` on average once `grace_period` seconds were spent waiting."""

    bytes_per_second: float = attrs.field(validator=_positive)
    grace_period: float = attrs.field(validator=_positive)


@attrs.define
class RateBudget:
    """One body's reading so far, against a `MinDataRate`."""

    rate: MinDataRate
    waited: float = 0.0  # seconds spent waiting for the sender
    received: int = 0

    def deadline(self, now: float) -> float:
        """The latest time a wait that starts at `now` may end without data (maybe already past)."""
        allowed = max(self.rate.grace_period, self.received / self.rate.bytes_per_second)
        return now + allowed - self.waited

    def record(self, waited: float, received: int) -> None:
        """Account one wait of `waited` seconds that brought `received` bytes."""
        self.waited += waited
        self.received += received


async def receive_some_at_rate(
    stream: trio.abc.ReceiveStream, budget: RateBudget, max_bytes: int
) -> bytes | bytearray:
    """`stream.receive_some(max_bytes)`, or trio.TooSlowError once the body fell below its rate."""
    started = trio.current_time()
    with trio.CancelScope(deadline=budget.deadline(started)):
        data = await stream.receive_some(max_bytes)
        budget.record(trio.current_time() - started, len(data))
        return data
    budget.record(trio.current_time() - started, 0)
    raise trio.TooSlowError(
        f"{budget.received} bytes in {budget.waited:.1f} s, below {budget.rate.bytes_per_second:g} bytes/s"
    )
