"""The minimum body data rate, at exact virtual times (autojump_clock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from connector.datarate import MinDataRate, RateBudget, receive_some_at_rate

RATE = MinDataRate(bytes_per_second=240, grace_period=5.0)


async def _sender(stream: trio.abc.SendStream, plan: list[tuple[float, bytes]]) -> None:
    for delay, data in plan:
        await trio.sleep(delay)
        await stream.send_all(data)


async def _read_until_too_slow(stream: trio.abc.ReceiveStream, budget: RateBudget) -> int:
    total = 0
    with pytest.raises(trio.TooSlowError):
        while True:
            total += len(await receive_some_at_rate(stream, budget, 65536))
    return total


async def test_a_trickle_is_cut_when_the_grace_period_ends(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    nursery.start_soon(_sender, send, [(4.0, b"x")] * 100)  # 1 byte every 4 s
    assert await _read_until_too_slow(receive, RateBudget(RATE)) == 1
    assert trio.current_time() == 5.0


async def test_bytes_sent_ahead_buy_time_at_the_minimum_rate(nursery: trio.Nursery,
                                                              autojump_clock: trio.abc.Clock) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    nursery.start_soon(_sender, send, [(0.0, b"x" * 2400)])  # ten seconds' worth, then nothing
    assert await _read_until_too_slow(receive, RateBudget(RATE)) == 2400
    assert trio.current_time() == 10.0


async def test_time_the_reader_does_not_wait_is_not_counted(autojump_clock: trio.abc.Clock) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    budget = RateBudget(RATE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sender, send, [(1.0, b"x")])
        assert await receive_some_at_rate(receive, budget, 10) == b"x"
    await trio.sleep(100)  # the reader is busy elsewhere (its next hop does not read)
    with pytest.raises(trio.TooSlowError):
        await receive_some_at_rate(receive, budget, 10)
    assert trio.current_time() == 1.0 + 100 + 4.0
    assert (budget.waited, budget.received) == (5.0, 1)


async def test_a_sender_above_the_rate_is_never_cut(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    nursery.start_soon(_sender, send, [(1.0, b"x" * 400)] * 600)  # 400 bytes/s for ten minutes
    budget = RateBudget(RATE)
    total = 0
    while total < 400 * 600:
        total += len(await receive_some_at_rate(receive, budget, 65536))
    assert trio.current_time() == 600.0


def test_deadline_is_pure_arithmetic() -> None:
    budget = RateBudget(RATE)
    assert budget.deadline(now=100.0) == 105.0  # the grace period
    budget.record(waited=3.0, received=4800)  # twenty seconds' worth
    assert budget.deadline(now=200.0) == 217.0
    budget.record(waited=30.0, received=0)
    assert budget.deadline(now=300.0) == 287.0  # already past: the next wait fails at once


@pytest.mark.parametrize(("rate", "grace"), [(0, 5.0), (-1, 5.0), (240, 0), (240, -1)])
def test_rate_and_grace_must_be_positive(rate: float, grace: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        MinDataRate(rate, grace)
