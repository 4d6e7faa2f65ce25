"""The tunnel's outgoing queue and keepalive, on their own (trio's virtual clock)."""

from __future__ import annotations

import trio
import trio.testing

from connector.tunnel.keepalive import Keepalive
from connector.tunnel.outgoing import Outgoing


class _Histogram:
    def __init__(self) -> None:
        self.observed: list[float] = []

    def observe(self, value: float) -> None:
        self.observed.append(value)


async def test_frames_gathered_meanwhile_leave_as_one_message_urgent_ones_first(nursery: trio.Nursery) -> None:
    sent: list[bytes] = []
    gate = trio.Event()

    async def send_message(message: bytes) -> None:
        sent.append(message)
        await gate.wait()

    out = Outgoing(send_message, message_target=10, high_water=100)
    nursery.start_soon(out.run)
    out.put(b"a")
    await trio.testing.wait_all_tasks_blocked()  # the writer is in its first send
    out.put(b"bbbb")
    out.put(b"cccccccc")
    out.put(b"P", urgent=True)
    gate.set()
    await trio.testing.wait_all_tasks_blocked()
    # up to message_target per message: the urgent frame leads the next one
    assert sent == [b"a", b"Pbbbbcccccccc"]
    assert out.sent == 14 and out.queued == 0


async def test_senders_wait_over_the_high_water_mark_until_the_writer_drains(
        nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    release = trio.Event()

    async def send_message(message: bytes) -> None:
        await release.wait()

    out = Outgoing(send_message, message_target=1000, high_water=10)
    nursery.start_soon(out.run)
    out.put(b"x" * 20)
    waited: list[float] = []

    async def sender() -> None:
        await out.wait_writable()
        waited.append(trio.current_time())

    nursery.start_soon(sender)
    await trio.sleep(5)
    assert waited == []  # 20 bytes queued, over 10: the sender waits
    release.set()
    await trio.testing.wait_all_tasks_blocked()
    assert waited == [5.0]
    with trio.fail_after(1):
        await out.wait_flushed()


async def test_keepalive_pings_every_interval_and_a_pong_answers_earlier_pings_too(
        nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    pings: list[tuple[bytes, float]] = []
    timed_out: list[float] = []
    rtt = _Histogram()
    keepalive = Keepalive(interval=1.0, timeout=3.0, send_ping=lambda p: pings.append((p, trio.current_time())) or True,
                          on_timeout=lambda: timed_out.append(trio.current_time()), rtt_metric=rtt)
    nursery.start_soon(keepalive.run)
    await trio.sleep(2.5)
    assert [t for _, t in pings] == [1.0, 2.0]
    keepalive.pong(pings[1][0])  # answers the first ping as well
    assert keepalive.last_rtt == 0.5 and rtt.observed == [0.5]
    await trio.sleep(10)
    # nothing answered since: the oldest unanswered ping (sent at 3.0) times out at 6.0
    assert timed_out == [6.0]


async def test_an_unknown_pong_changes_nothing() -> None:
    keepalive = Keepalive(interval=1.0, timeout=3.0, send_ping=lambda p: True, on_timeout=lambda: None,
                          rtt_metric=_Histogram())
    keepalive.pong(b"\0" * 8)
    assert keepalive.last_rtt is None
