"""The node's origin pool as pure logic on trio's virtual clock: when idle connections expire
(`OriginPool.run`'s sweep and `take`), how many stay (`max_idle`), which are kept at all, and the
metrics. The connections are memory streams with a finished h11 cycle; through real backends:
tests/integration/test_origin_pool.py."""

from __future__ import annotations

import math

import h11
import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from connector.agent.acl import Mapping
from connector.agent.origin import BackendError, OriginConnection, OriginPool, PoolSettings

MAPPING = Mapping("pool.virtual", 80, "127.0.0.1", 9)  # never dialled but by the expiry test (refused)
OUTCOMES = ("new", "reused", "expired", "closed_by_origin", "pool_full")


class Tracked(trio.abc.Stream):
    """An idle connection's stream: nothing is sent or read while it is in the pool."""

    closed = False
    gauge_at_close: float | None = None  # what the idle gauge said when the pool closed it

    async def aclose(self) -> None:
        self.closed = True
        self.gauge_at_close = idle_gauge()
        await trio.lowlevel.checkpoint()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("the pool sends nothing")

    async def wait_send_all_might_not_block(self) -> None:
        raise AssertionError("the pool sends nothing")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise AssertionError("the pool reads nothing")


def finished(mapping: Mapping = MAPPING) -> OriginConnection:
    """A connection whose request and response are complete: h11 lets it carry the next one."""
    return OriginConnection(Tracked(), one_cycle(h11.Connection(h11.CLIENT)), mapping)


def one_cycle(conn: h11.Connection) -> h11.Connection:
    conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Response)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    return conn


def counts() -> dict[str, float]:
    return {o: REGISTRY.get_sample_value("connector_origin_connections_total",
                                         {"mapping": MAPPING.name, "outcome": o}) or 0.0 for o in OUTCOMES}


def counted_since(before: dict[str, float]) -> dict[str, float]:
    now = counts()
    return {o: now[o] - before[o] for o in OUTCOMES if now[o] != before[o]}


def idle_gauge() -> float | None:
    return REGISTRY.get_sample_value("connector_origin_pool_idle_connections", {"mapping": MAPPING.name})


async def test_run_closes_idle_connections_after_idle_seconds(autojump_clock: trio.abc.Clock,
                                                              nursery: trio.Nursery) -> None:
    pool = OriginPool(PoolSettings(idle_seconds=30.0))
    nursery.start_soon(pool.run)
    await trio.testing.wait_all_tasks_blocked()
    before = counts()
    first, second = finished(), finished()
    start = trio.current_time()
    await pool.give_back(first)
    await trio.sleep(10)
    await pool.give_back(second)
    assert (pool.idle_count(), idle_gauge()) == (2, 2)
    await trio.sleep_until(start + 29.9)
    assert not first.stream.closed and pool.idle_count() == 2
    await trio.sleep_until(start + 30.1)
    assert first.stream.closed and not second.stream.closed
    assert (pool.idle_count(), idle_gauge()) == (1, 1)
    assert first.stream.gauge_at_close == 1  # the gauge never counts a connection being closed
    await trio.sleep_until(start + 40.1)
    assert second.stream.closed
    assert (pool.idle_count(), idle_gauge()) == (0, 0)
    assert counted_since(before) == {"expired": 2}
    # an empty pool's sweeper waits for the next connection given back, not on a timer
    third = finished()
    await trio.sleep(1000)
    await pool.give_back(third)
    await trio.sleep(29.9)
    assert not third.stream.closed
    await trio.sleep(0.2)
    assert third.stream.closed


async def test_take_reuses_a_fresh_connection_and_drops_an_expired_one(autojump_clock: trio.abc.Clock) -> None:
    pool = OriginPool(PoolSettings(idle_seconds=30.0))
    before = counts()
    origin = finished()
    await pool.give_back(origin)
    await trio.sleep(29.9)
    taken = await pool.take(MAPPING, 5.0, max_header_bytes=65536)
    assert taken is origin and taken.reused
    assert taken.conn.our_state is h11.IDLE  # ready for the next request
    assert (pool.idle_count(), idle_gauge()) == (0, 0)
    one_cycle(taken.conn)
    await pool.give_back(taken)
    assert pool.idle_count() == 1
    await trio.sleep(30.0)  # expired, and no sweeper ran: take drops it and dials (refused here)
    with pytest.raises(BackendError):
        await pool.take(MAPPING, math.inf, max_header_bytes=65536)
    assert origin.stream.closed
    assert pool.idle_count() == 0
    assert counted_since(before) == {"reused": 1, "expired": 1}


async def test_take_prefers_the_most_recently_used_connection(autojump_clock: trio.abc.Clock) -> None:
    pool = OriginPool()
    older, newer = finished(), finished()
    await pool.give_back(older)
    await trio.sleep(1)
    await pool.give_back(newer)
    assert await pool.take(MAPPING, 5.0, max_header_bytes=65536) is newer
    assert await pool.take(MAPPING, 5.0, max_header_bytes=65536) is older


async def test_max_idle_bounds_the_pool_per_mapping() -> None:
    pool = OriginPool(PoolSettings(max_idle=2))
    other = Mapping("other.virtual", 80, "127.0.0.1", 9)
    before = counts()
    kept = [finished(), finished()]
    extra = finished()
    for origin in kept:
        await pool.give_back(origin)
    await pool.give_back(extra)
    await pool.give_back(finished(other))  # another mapping has its own bound
    assert extra.stream.closed and not any(origin.stream.closed for origin in kept)
    assert (pool.idle_count(MAPPING), pool.idle_count(other), idle_gauge()) == (2, 1, 2)
    assert counted_since(before) == {"pool_full": 1}
    await pool.aclose()
    assert all(origin.stream.closed for origin in kept)
    assert (pool.idle_count(), idle_gauge()) == (0, 0)


async def test_max_idle_zero_keeps_nothing() -> None:
    pool = OriginPool(PoolSettings(max_idle=0))
    origin = finished()
    await pool.give_back(origin)
    assert origin.stream.closed and pool.idle_count() == 0


async def test_a_connection_in_the_middle_of_a_message_is_not_kept() -> None:
    pool = OriginPool()
    origin = finished()
    origin.conn.start_next_cycle()
    origin.conn.send(h11.Request(method=b"POST", target=b"/", headers=[(b"host", b"x"), (b"content-length", b"5")]))
    await pool.give_back(origin)  # the request body was not sent whole: h11 says not DONE
    assert origin.stream.closed and pool.idle_count() == 0


@pytest.mark.parametrize("after", [b"", b"HTTP/1.1 200 OK\r\n"], ids=["closed", "unasked_bytes"])
async def test_a_connection_the_host_closed_or_talked_on_is_not_kept(after: bytes) -> None:
    """A body ended by the close leaves h11 at DONE/DONE with the close noted; bytes after the
    answer are nothing the next request may read. Neither connection is pooled."""
    pool = OriginPool()
    origin = finished()
    origin.conn.receive_data(after)
    await pool.give_back(origin)
    assert origin.stream.closed and pool.idle_count() == 0
