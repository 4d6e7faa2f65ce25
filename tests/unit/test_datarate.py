"""Minimum data rates (connector.datarate): exact deadlines, and slow peers under autojump_clock."""

from __future__ import annotations

import math

import pytest
import trio

from connector.datarate import MinDataRate, ReadTiming, WriteTiming


def test_a_read_may_wait_the_grace_period_until_the_bytes_earn_more_time() -> None:
    timing = ReadTiming(MinDataRate(100, 5))
    assert timing.deadline(0.0) == 5.0  # nothing received yet: the grace period
    timing.record(0.0, 2.0, 1000)  # 1000 bytes earn 10 s at 100 bytes/s; 2 s of them used
    assert timing.deadline(2.0) == 10.0
    timing.record(2.0, 10.0, 0)
    assert timing.deadline(10.0) == 10.0  # used up: the next wait is already too late


def test_time_not_spent_waiting_for_the_peer_does_not_count() -> None:
    timing = ReadTiming(MinDataRate(100, 5))
    timing.record(0.0, 1.0, 10)
    # 50 s blocked on the node (not waiting for the peer) cost the peer nothing
    assert timing.deadline(51.0) == 55.0


def test_writes_get_the_grace_or_their_size_at_the_rate_and_the_grace_never_accumulates() -> None:
    timing = WriteTiming(MinDataRate(1000, 2))
    assert timing.deadline(0.0, 500) == 2.0  # a small write: the grace period
    assert timing.deadline(0.1, 10_000) == 12.0  # 10 s at the rate, after the time left of the last one
    assert timing.deadline(20.0, 10) == 22.0  # much later: a fresh grace period, nothing carried over
    assert timing.deadline(20.0, 1000) == 23.0  # right after: 1 s more, not one more grace period


def test_zero_bytes_per_second_means_no_minimum() -> None:
    off = MinDataRate(0, 5)
    assert ReadTiming(off).deadline(3.0) == math.inf
    assert WriteTiming(off).deadline(3.0, 1 << 20) == math.inf
    with pytest.raises(ValueError, match="negative"):
        MinDataRate(-1, 5)


async def _read_until_too_slow(rate: MinDataRate, chunk: bytes, interval: float, total: int) -> int:
    """A peer sends `chunk` every `interval` s, `total` bytes in all; read with a `ReadTiming`.

    Returns the bytes read; stops when the timing says the peer is too slow.
    """
    send, receive = trio.open_memory_channel[bytes](100)

    async def peer() -> None:
        sent = 0
        while sent < total:
            await trio.sleep(interval)
            await send.send(chunk)
            sent += len(chunk)

    timing = ReadTiming(rate)
    received = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        while received < total:
            started = trio.current_time()
            with trio.move_on_at(timing.deadline(started)):
                data = await receive.receive()
                timing.record(started, trio.current_time(), len(data))
                received += len(data)
                continue
            break
        nursery.cancel_scope.cancel()
    return received


async def test_a_trickling_peer_is_cut_once_its_average_falls_below_the_rate(autojump_clock: trio.abc.Clock) -> None:
    # 10 bytes every 1.5 s: 30 bytes by t=4.5, far below 240 bytes/s; the grace ends at t=5
    received = await _read_until_too_slow(MinDataRate(240, 5), b"x" * 10, 1.5, 10_000)
    assert trio.current_time() == 5.0
    assert received == 30


async def test_a_peer_above_the_rate_is_never_cut(autojump_clock: trio.abc.Clock) -> None:
    # 480 bytes once a second against a minimum of 240 bytes/s, for 100 s (a peer sending in
    # bursts needs some margin: just before a burst its average is below what it sends)
    received = await _read_until_too_slow(MinDataRate(240, 5), b"x" * 480, 1.0, 48_000)
    assert received == 48_000
    assert trio.current_time() == 100.0
