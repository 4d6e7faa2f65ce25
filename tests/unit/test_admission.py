"""Per-client bounds of the proxies, as pure logic on trio's virtual clock: streams per token and
per client address (`connector.cloud.admission`), failed authentications per client address
(`connector.cloud.clients.AuthThrottle`)."""

import pytest
import trio

from connector.cloud.admission import (
    AdmissionStatistics,
    AdmittedStream,
    StreamAdmission,
    StreamLimits,
)
from connector.cloud.clients import (
    AuthThrottle,
    AuthThrottleSettings,
    ClientConnection,
    ConnectionCounter,
    ConnectionLimits,
    Principal,
    address_key,
)
from connector.cloud.router import NoConnectorError
from connector.tunnel.streams import TunnelStream
from connector.tunnel.testing import session_pair
from connector.tunnel.types import ErrorCode, StreamProtocol, Target

TARGET = Target("erp.virtual", 8000)


def client(address: str, token: str | None = "t1", subaccount: str = "acme") -> ClientConnection:
    principal = Principal(subaccount, token) if token is not None else None
    return ClientConnection(address, principal=principal)


# --- address_key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # one host's /64 is one client
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_address_key(host: str, key: str) -> None:
    assert address_key(host) == key


# --- streams per token and per client address -------------------------------------------------


def test_token_limit_refuses_at_once_and_other_tokens_pass() -> None:
    admission = StreamAdmission(StreamLimits(per_token=2, per_client_address=0))
    tickets = [admission.admit("acme", client("10.0.0.1")) for _ in range(2)]
    with pytest.raises(NoConnectorError) as refused:
        admission.admit("acme", client("10.0.0.2"))  # same token, another address
    assert refused.value.code == "stream_limit_token"
    admission.admit("acme", client("10.0.0.1", token="t2"))
    tickets[0].release()
    admission.admit("acme", client("10.0.0.1"))  # a returned ticket makes room
    assert admission.statistics() == AdmissionStatistics(streams=3, tokens=2, client_addresses=1)


def test_client_address_limit_counts_every_token_of_the_address() -> None:
    admission = StreamAdmission(StreamLimits(per_token=0, per_client_address=2))
    admission.admit("acme", client("10.0.0.1", token="t1"))
    admission.admit("acme", client("10.0.0.1", token="t2"))
    with pytest.raises(NoConnectorError) as refused:
        admission.admit("acme", client("10.0.0.1", token="t3"))
    assert refused.value.code == "stream_limit_client"
    admission.admit("acme", client("10.0.0.2", token="t3"))


def test_per_subaccount_token_limit_overrides_the_default() -> None:
    admission = StreamAdmission(StreamLimits(per_token=1, per_client_address=0, per_token_by_subaccount={"big": 3}))
    for _ in range(3):
        admission.admit("big", client("10.0.0.1", subaccount="big"))
    with pytest.raises(NoConnectorError):
        admission.admit("big", client("10.0.0.1", subaccount="big"))
    admission.admit("acme", client("10.0.0.1", token="t2"))
    with pytest.raises(NoConnectorError):
        admission.admit("acme", client("10.0.0.1", token="t2"))


def test_requests_without_a_client_connection_are_not_counted() -> None:
    admission = StreamAdmission(StreamLimits(per_token=1, per_client_address=1))
    for _ in range(3):
        admission.admit("acme", None)
    assert admission.statistics() == AdmissionStatistics(0, 0, 0)


def test_release_is_counted_once() -> None:
    admission = StreamAdmission(StreamLimits(per_token=1, per_client_address=1))
    ticket = admission.admit("acme", client("10.0.0.1"))
    ticket.release()
    ticket.release()
    assert admission.statistics() == AdmissionStatistics(0, 0, 0)
    admission.admit("acme", client("10.0.0.1"))


@pytest.mark.parametrize("ending", ["aclose", "reset"])
async def test_admitted_stream_returns_its_ticket_when_closed_or_reset(ending: str) -> None:
    admission = StreamAdmission(StreamLimits(per_token=1, per_client_address=0))
    received: list[bytes] = []
    node_done = trio.Event()

    async def node(stream: TunnelStream) -> None:
        received.append(await stream.receive_some(10))
        node_done.set()
        await stream.wait_reset()  # until the cloud side ends the stream

    async with session_pair(node) as (cloud, _node):
        opener = cloud.open_stream_nowait(Target("db.virtual", 5432, StreamProtocol.TCP))
        stream = admission.admit("acme", client("10.0.0.1")).attach(opener)
        assert isinstance(stream, AdmittedStream)
        assert (stream.stream_id, stream.target) == (opener.stream_id, opener.target)
        await stream.send_all(b"ping")
        await node_done.wait()
        with pytest.raises(NoConnectorError):
            admission.admit("acme", client("10.0.0.1"))
        if ending == "aclose":
            await stream.aclose()
        else:
            await stream.reset(ErrorCode.CANCEL, "done")
        assert admission.statistics() == AdmissionStatistics(0, 0, 0)
        await stream.aclose()  # closing again returns nothing twice
        assert admission.statistics() == AdmissionStatistics(0, 0, 0)
    assert received == [b"ping"]


async def test_wait_streams_returns_when_the_count_is_reached(nursery) -> None:
    admission = StreamAdmission()
    ticket = admission.admit("acme", client("10.0.0.1"))
    done = trio.Event()

    async def waiter() -> None:
        await admission.wait_streams(0)
        done.set()

    nursery.start_soon(waiter)
    await trio.testing.wait_all_tasks_blocked()
    assert not done.is_set()
    ticket.release()
    await done.wait()


# --- failed authentications per client address --------------------------------------------------

SETTINGS = AuthThrottleSettings(failures=3, delay=1.0, max_delay=4.0, forget_after=60.0, max_addresses=3)


async def test_failures_past_the_threshold_are_spaced_delay_apart(autojump_clock) -> None:
    throttle = AuthThrottle(SETTINGS)
    assert [throttle.failed("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    # a sequential guesser: each answer after the previous one, one per second
    for expected_answer in (1.0, 2.0, 3.0):
        delay = throttle.failed("a")
        await trio.sleep(delay)
        assert trio.current_time() == expected_answer
    # another address is not affected
    assert throttle.failed("b") == 0.0


async def test_parallel_failures_queue_for_the_same_slots_up_to_max_delay(autojump_clock) -> None:
    throttle = AuthThrottle(SETTINGS)
    for _ in range(3):
        throttle.failed("a")
    # guessers on parallel connections, all failing at t=0: answers at 1, 2, 3, 4, then 4 (max)
    assert [throttle.failed("a") for _ in range(6)] == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    await trio.sleep(4.0)
    assert throttle.failed("a") == 1.0  # at t=4 the next slot is t=5


async def test_an_address_is_forgotten_forget_after_its_last_failure(autojump_clock) -> None:
    throttle = AuthThrottle(SETTINGS)
    for _ in range(4):
        throttle.failed("a")
    await trio.sleep(59.0)
    assert throttle.failures("a") == 4
    await trio.sleep(1.0)
    assert throttle.failures("a") == 0 and throttle.tracked == 0
    assert throttle.failed("a") == 0.0


async def test_tracked_addresses_are_bounded_least_recently_failing_dropped(autojump_clock) -> None:
    throttle = AuthThrottle(SETTINGS)
    for address in ("a", "b", "c"):
        throttle.failed(address)
        await trio.sleep(1.0)
    throttle.failed("a")  # "a" failed most recently now; "b" is the oldest
    throttle.failed("d")
    assert throttle.tracked == 3
    assert (throttle.failures("a"), throttle.failures("b"), throttle.failures("c"), throttle.failures("d")) == (
        2, 0, 1, 1,
    )


@pytest.mark.parametrize(
    "settings",
    [
        {"failures": -1},
        {"delay": 0.0},
        {"delay": 2.0, "max_delay": 1.0},
        {"forget_after": 0.0},
        {"max_addresses": 0},
    ],
)
def test_inconsistent_settings_are_refused(settings: dict) -> None:
    with pytest.raises(ValueError):
        AuthThrottleSettings(**settings)


async def test_many_connections_of_one_address_buy_no_extra_guesses(autojump_clock) -> None:
    # Before: past max_delay every further failure was still evaluated and answered at now +
    # max_delay, so C parallel guessers got C / max_delay guesses a second (200 -> 40/s).
    settings = AuthThrottleSettings(failures=10, delay=1.0, max_delay=5.0)
    throttle = AuthThrottle(settings)
    evaluated = 0

    def wrong_token() -> None:
        nonlocal evaluated
        evaluated += 1
        return None

    async def guesser() -> None:
        while True:
            assert await throttle.check("203.0.113.9", wrong_token) is None

    duration = 60.0
    with trio.move_on_after(duration):
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(guesser)
    # the free failures, one queue of max_delay / delay, then one guess per delay
    assert evaluated <= settings.failures + (settings.max_delay + duration) / settings.delay + 1, evaluated
    # a correct token from another address is answered at once
    start = trio.current_time()
    assert await throttle.check("198.51.100.7", lambda: "acme") == "acme"
    assert trio.current_time() == start


def test_connection_counter_bounds_each_address_and_the_total() -> None:
    counter = ConnectionCounter(ConnectionLimits(total=3, per_client_address=2))
    assert counter.admit("10.0.0.1") is None and counter.admit("10.0.0.1") is None
    assert counter.admit("10.0.0.1") == "too_many_connections_from_address"
    assert counter.admit("10.0.0.2") is None
    assert counter.admit("10.0.0.3") == "too_many_connections"
    counter.release("10.0.0.1")
    assert counter.admit("10.0.0.3") is None  # a released connection frees its place at once
    assert (counter.total, counter.held_by("10.0.0.1"), counter.held_by("10.0.0.3")) == (3, 1, 1)


def test_connection_limits_of_zero_mean_no_limit() -> None:
    counter = ConnectionCounter(ConnectionLimits(total=0, per_client_address=0))
    assert all(counter.admit("10.0.0.1") is None for _ in range(100))
    with pytest.raises(ValueError):
        ConnectionLimits(total=-1)
