import pytest
import trio

from connector.backoff import Backoff


def test_ceiling_doubles_until_cap():
    backoff = Backoff(base=0.1, cap=1.0, uniform=lambda lo, hi: hi)
    delays = [backoff.next_delay() for _ in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_full_jitter_draws_from_zero_to_ceiling():
    seen = []
    backoff = Backoff(base=0.5, cap=8.0, uniform=lambda lo, hi: seen.append((lo, hi)) or lo)
    for _ in range(3):
        assert backoff.next_delay() == 0.0
    assert seen == [(0.0, 0.5), (0.0, 1.0), (0.0, 2.0)]


def test_reset_starts_over():
    backoff = Backoff(base=0.1, cap=5.0, uniform=lambda lo, hi: hi)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.1)


def test_invalid_parameters_rejected():
    with pytest.raises(ValueError):
        Backoff(base=0, cap=1)
    with pytest.raises(ValueError):
        Backoff(base=2, cap=1)


async def test_sleeping_the_delays_on_trio_clock(autojump_clock):
    backoff = Backoff(base=0.25, cap=1.0, uniform=lambda lo, hi: hi)
    start = trio.current_time()
    for _ in range(4):
        await trio.sleep(backoff.next_delay())
    assert trio.current_time() - start == pytest.approx(0.25 + 0.5 + 1.0 + 1.0)
