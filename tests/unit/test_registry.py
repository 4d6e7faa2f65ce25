"""Fencing and failover-hold decisions of the cloud registry, on trio's virtual clock.

The sessions here are recording fakes: these tests are about the registry's decisions; the real
tunnel under the real registry is exercised by the integration and failover tests.
"""


import pytest
import trio
import trio.testing

from connector.cloud.admission import AdmissionStatistics, StreamAdmission, StreamLimits
from connector.cloud.clients import ClientConnection, Principal, current_client
from connector.cloud.registry import Fence, Registry, RegistryStatistics, TunnelHandle
from connector.cloud.router import NoConnectorError
from connector.tunnel.session import TunnelError
from connector.tunnel.types import ErrorCode, Target
from tests.support.fakes import InertStream

TARGET = Target("erp.virtual", 8000)
HOLD = 5.0


class FakeSession:
    """Records what the registry does; `max_streams` streams at once, as a real session's peer allows."""

    def __init__(self, name: str, max_streams: int = 1000) -> None:
        self.name = name
        self.controls: list[tuple[str, dict]] = []
        self.closed: tuple[ErrorCode, str] | None = None
        self.opened: list[Target] = []
        self.max_streams = max_streams
        self.streams_open = 0
        self.memory_streams = False
        self._freed = trio.lowlevel.ParkingLot()

    def open_stream_nowait(self, target):
        if self.closed:
            raise TunnelError(ErrorCode.TUNNEL_LOST, "closed")
        if self.streams_open >= self.max_streams:
            raise trio.WouldBlock
        self.streams_open += 1
        self.opened.append(target)
        if self.memory_streams:  # streams the proxy-facing wrappers can use
            return InertStream(target)
        return (self.name, target)

    async def open_stream(self, target):
        await trio.lowlevel.checkpoint()
        while True:
            try:
                return self.open_stream_nowait(target)
            except trio.WouldBlock:
                await self._freed.park()

    def free_stream(self) -> None:
        self.streams_open -= 1
        self._freed.unpark_all()

    async def send_control(self, op, body):
        self.controls.append((op, body))

    async def aclose(self, code=ErrorCode.NO_ERROR, reason=""):
        self.closed = (code, reason)
        self._freed.unpark_all()


def handle(name: str, location: str = "", *, max_streams: int = 1000) -> TunnelHandle:
    return TunnelHandle(FakeSession(name, max_streams), "acme", location, name)  # type: ignore[arg-type]


@pytest.fixture
async def registry(nursery):
    reg = Registry(hold_seconds=HOLD, hold_max=3, known_locations=[("acme", "")])
    await nursery.start(reg.run)
    return reg


async def test_routes_to_registered_master(registry):
    a = handle("a")
    registry.add(a)
    assert registry.register(a, 7).accepted
    assert await registry.open_stream("acme", "", TARGET) == ("a", TARGET)


async def test_lower_epoch_is_refused_and_current_master_kept(registry):
    a, b = handle("a"), handle("b")
    registry.add(a)
    registry.add(b)
    assert registry.register(a, 10).accepted
    result = registry.register(b, 9)
    assert (result.accepted, result.reason, result.highest_epoch) == (False, "stale_epoch", 10)
    assert registry.master_of("acme", "") is a


async def test_higher_epoch_replaces_and_fences_old_master(registry):
    a, b = handle("a"), handle("b")
    registry.add(a)
    registry.add(b)
    registry.register(a, 10)
    assert registry.register(b, 11).accepted
    await trio.testing.wait_all_tasks_blocked()
    assert a.session.controls == [("fenced", {"epoch": 11})]
    assert a.session.closed[0] == ErrorCode.STALE_EPOCH
    assert await registry.open_stream("acme", "", TARGET) == ("b", TARGET)
    # the fenced master, reconnected, cannot come back with its old epoch
    a2 = handle("a")
    registry.add(a2)
    assert not registry.register(a2, 10).accepted


async def test_draining_master_is_not_closed_when_replaced(registry):
    a, b = handle("a"), handle("b")
    registry.add(a)
    registry.add(b)
    registry.register(a, 10)
    registry.unregister(a, draining=True)
    registry.register(b, 11)
    await trio.testing.wait_all_tasks_blocked()
    assert a.session.closed is None


async def test_unknown_location_fails_at_once(registry, autojump_clock):
    start = trio.current_time()
    with pytest.raises(NoConnectorError, match="no connector is connected"):
        await registry.open_stream("acme", "elsewhere", TARGET)
    assert trio.current_time() == start


async def test_hold_times_out_after_hold_seconds(registry, autojump_clock):
    start = trio.current_time()
    with pytest.raises(NoConnectorError, match="within 5 s"):
        await registry.open_stream("acme", "", TARGET)
    assert trio.current_time() - start == HOLD


async def test_held_request_released_when_a_master_registers(registry, nursery, autojump_clock):
    results = []

    async def request():
        results.append((await registry.open_stream("acme", "", TARGET), trio.current_time()))

    start = trio.current_time()
    nursery.start_soon(request)
    await trio.sleep(1.5)
    b = handle("b")
    registry.add(b)
    registry.register(b, 3)
    await trio.testing.wait_all_tasks_blocked()
    assert results == [(("b", TARGET), start + 1.5)]


async def test_hold_is_bounded_in_count(registry, nursery, autojump_clock):
    for _ in range(3):
        nursery.start_soon(registry.open_stream, "acme", "", TARGET)
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(NoConnectorError, match="hold is full"):
        await registry.open_stream("acme", "", TARGET)
    nursery.cancel_scope.cancel()


async def test_master_tunnel_loss_tells_standbys_and_holds(registry, nursery, autojump_clock):
    a, b = handle("a"), handle("b")
    registry.add(a)
    registry.add(b)
    registry.register(a, 4)
    registry.remove(a)
    await trio.testing.wait_all_tasks_blocked()
    assert b.session.controls == [("master_lost", {"epoch": 4, "node": "a"})]
    results = []

    async def request():
        results.append(await registry.open_stream("acme", "", TARGET))

    nursery.start_soon(request)
    await trio.sleep(0.2)
    registry.register(b, 5)
    await trio.testing.wait_all_tasks_blocked()
    assert results == [("b", TARGET)]


async def test_tunnel_dying_under_open_stream_waits_for_next_master(registry, nursery, autojump_clock):
    a, b = handle("a"), handle("b")
    registry.add(a)
    registry.add(b)
    registry.register(a, 1)
    a.session.closed = (ErrorCode.TUNNEL_LOST, "gone")  # died, but the endpoint has not noticed yet
    results = []

    async def request():
        results.append(await registry.open_stream("acme", "", TARGET))

    nursery.start_soon(request)
    await trio.sleep(0.3)
    registry.register(b, 2)
    await trio.testing.wait_all_tasks_blocked()
    assert results == [("b", TARGET)]


async def test_routing_log_records_epochs_in_order(registry):
    a, b = handle("a"), handle("b")
    registry.add(a)
    registry.add(b)
    registry.register(a, 1)
    for _ in range(3):
        await registry.open_stream("acme", "", TARGET)
    registry.register(b, 2)
    await registry.open_stream("acme", "", TARGET)
    routing = registry.snapshot()[0]["routing"]
    assert [(r["node"], r["epoch"], r["streams"]) for r in routing] == [("a", 1, 3), ("b", 2, 1)]


async def test_epochs_survive_a_cloud_restart(tmp_path, nursery):
    state = tmp_path / "epochs.json"
    first = Registry(state_file=state)
    await nursery.start(first.run)
    a = handle("a")
    first.add(a)
    first.register(a, 42)
    second = Registry(state_file=state)
    await nursery.start(second.run)
    stale = handle("old")
    second.add(stale)
    assert not second.register(stale, 41).accepted
    assert second.register(handle("a"), 42).accepted


async def test_request_waiting_for_a_free_stream_follows_a_master_change(registry, nursery, autojump_clock):
    """Every stream of a's tunnel is in use; a drains while a request waits for one of them: the
    request is not given a stream of the draining master, it is held and served by the next one,
    and the routing log records each stream with the epoch of the master that carried it."""
    a = handle("a", max_streams=1)
    registry.add(a)
    registry.register(a, 7)
    assert await registry.open_stream("acme", "", TARGET) == ("a", TARGET)
    got = []

    async def request():
        got.append(await registry.open_stream("acme", "", TARGET))

    nursery.start_soon(request)
    await registry.wait_waiting(1)
    registry.unregister(a, draining=True)
    await trio.testing.wait_all_tasks_blocked()
    assert registry.statistics() == RegistryStatistics(held=1, waiting_for_streams=0)  # held for a master
    a.session.free_stream()  # a finishes its stream while draining: not given to the request
    await trio.testing.wait_all_tasks_blocked()
    assert got == []
    b = handle("b")
    registry.add(b)
    registry.register(b, 8)
    await trio.testing.wait_all_tasks_blocked()
    assert got == [("b", TARGET)]
    assert [(r["node"], r["epoch"]) for r in registry.snapshot()[0]["routing"]] == [("a", 7), ("b", 8)]


# --- waiting for a free stream, admission per client -----------------------------------------

STREAM_WAIT = 2.0


@pytest.fixture
async def limited(nursery):
    """A registry with a master whose tunnel takes 2 streams, limits of 2 per token and 3 per address."""
    reg = Registry(
        hold_seconds=HOLD, hold_max=3, known_locations=[("acme", "")], stream_wait_seconds=STREAM_WAIT,
        admission=StreamAdmission(StreamLimits(per_token=2, per_client_address=3)),
    )
    await nursery.start(reg.run)
    a = handle("a", max_streams=2)
    a.session.memory_streams = True
    reg.add(a)
    reg.register(a, 1)
    return reg, a


def as_client(address: str, token: str, sock: trio.SocketStream | None = None) -> ClientConnection:
    """Make the current task (and tasks it starts from now on) serve this client, as ProxyService does."""
    connection = ClientConnection(address, sock, Principal("acme", token))
    current_client.set(connection)
    return connection


async def test_waiting_for_a_free_stream_ends_after_stream_wait_seconds(limited, autojump_clock):
    registry, a = limited
    await registry.open_stream("acme", "", TARGET)
    await registry.open_stream("acme", "", TARGET)  # the tunnel's streams are all in use
    with pytest.raises(NoConnectorError) as refused:
        await registry.open_stream("acme", "", TARGET)
    assert refused.value.code == "tunnel_busy"
    assert trio.current_time() == STREAM_WAIT
    assert registry.statistics() == RegistryStatistics(held=0, waiting_for_streams=0)


async def test_a_freed_stream_goes_to_the_waiting_request(limited, nursery, autojump_clock):
    registry, a = limited
    await registry.open_stream("acme", "", TARGET)
    await registry.open_stream("acme", "", TARGET)
    got = []

    async def request():
        got.append(await registry.open_stream("acme", "", TARGET))

    nursery.start_soon(request)
    await registry.wait_waiting(1)
    await trio.sleep(1.0)
    a.session.free_stream()
    await registry.wait_waiting(0)
    assert len(got) == 1 and trio.current_time() == 1.0


async def test_the_token_limit_refuses_at_once_and_another_token_is_served(limited, nursery, autojump_clock):
    registry, a = limited
    as_client("10.0.0.1", "t1")
    held = [await registry.open_stream("acme", "", TARGET) for _ in range(2)]
    with pytest.raises(NoConnectorError) as refused:
        await registry.open_stream("acme", "", TARGET)
    assert refused.value.code == "stream_limit_token" and trio.current_time() == 0
    await held[0].aclose()
    a.session.free_stream()
    as_client("10.0.0.2", "t2")
    assert await registry.open_stream("acme", "", TARGET) is not None
    assert registry.admission.statistics() == AdmissionStatistics(streams=2, tokens=2, client_addresses=2)


async def test_a_request_that_times_out_or_is_cancelled_returns_its_ticket(limited, nursery, autojump_clock):
    registry, a = limited
    as_client("10.0.0.1", "t1")
    await registry.open_stream("acme", "", TARGET)
    as_client("10.0.0.1", "t2")
    await registry.open_stream("acme", "", TARGET)
    with pytest.raises(NoConnectorError):  # times out waiting for a stream
        await registry.open_stream("acme", "", TARGET)
    with trio.move_on_after(1.0):  # cancelled while waiting
        await registry.open_stream("acme", "", TARGET)
    assert registry.admission.statistics() == AdmissionStatistics(streams=2, tokens=2, client_addresses=1)
    assert registry.statistics() == RegistryStatistics(held=0, waiting_for_streams=0)
    assert len(a.session.opened) == 2


@pytest.mark.parametrize("no_master", [False, True], ids=["tunnel_busy", "held"])
async def test_a_client_that_leaves_while_waiting_leaves_nothing_behind(limited, nursery, autojump_clock, no_master):
    """The application closes its connection while its request waits (for a free stream, or held
    for a master): the wait ends at once, its ticket is returned, no stream is ever opened for it."""
    registry, a = limited
    await registry.open_stream("acme", "", TARGET)
    await registry.open_stream("acme", "", TARGET)
    if no_master:
        registry.unregister(a, draining=True)
    ours, theirs = trio.socket.socketpair()
    as_client("10.0.0.1", "t1", trio.SocketStream(ours))
    refused = []

    async def request():
        try:
            await registry.open_stream("acme", "", TARGET)
        except NoConnectorError as exc:
            refused.append((exc.code, trio.current_time()))

    nursery.start_soon(request)
    await trio.testing.wait_all_tasks_blocked()
    assert registry.admission.statistics().streams == 1
    await trio.sleep(0.5)
    theirs.close()
    await registry.admission.wait_streams(0)
    await trio.testing.wait_all_tasks_blocked()
    assert refused == [("client_gone", 0.5)]
    assert registry.statistics() == RegistryStatistics(held=0, waiting_for_streams=0)
    a.session.free_stream()  # a stream frees up, or a master registers: nobody takes it now
    b = handle("b")
    registry.add(b)
    registry.register(b, 2)
    await trio.testing.wait_all_tasks_blocked()
    assert len(a.session.opened) == 2 and b.session.opened == []
    ours.close()


async def test_a_client_that_sent_more_bytes_waits_for_the_deadline(limited, nursery, autojump_clock):
    """Bytes after the request (a body) belong to the proxy: the wait cannot tell whether the
    client is still there, and ends by its deadline."""
    registry, a = limited
    await registry.open_stream("acme", "", TARGET)
    await registry.open_stream("acme", "", TARGET)
    ours, theirs = trio.socket.socketpair()
    await theirs.send(b"body")
    as_client("10.0.0.1", "t1", trio.SocketStream(ours))
    with pytest.raises(NoConnectorError) as refused:
        await registry.open_stream("acme", "", TARGET)
    assert (refused.value.code, trio.current_time()) == ("tunnel_busy", STREAM_WAIT)
    assert await ours.recv(10) == b"body"  # not consumed
    ours.close()
    theirs.close()


async def test_wait_master_returns_when_a_master_registers_and_at_once_if_there_is_one(registry, nursery, autojump_clock):
    found = []

    async def wait(node=None):
        found.append((await registry.wait_master("acme", "", node=node), trio.current_time()))

    nursery.start_soon(wait)
    nursery.start_soon(wait, "b")
    a, b = handle("a"), handle("b")
    registry.add(a)
    registry.add(b)
    await trio.sleep(1.0)
    assert found == []  # no master yet: no return
    registry.register(a, 1)
    await trio.testing.wait_all_tasks_blocked()
    assert found == [(a, 1.0)]  # the waiter for b still waits
    await trio.sleep(1.0)
    registry.register(b, 2)
    await trio.testing.wait_all_tasks_blocked()
    assert found == [(a, 1.0), (b, 2.0)]
    with trio.fail_after(1.0):  # already there: at once (virtual time: a hang fails fast)
        assert await registry.wait_master("acme", "") is b
        assert await registry.wait_master("acme", "", node="b") is b
    assert trio.current_time() == 2.0


async def test_wait_no_master_returns_when_the_master_goes_and_at_once_if_there_is_none(registry, nursery, autojump_clock):
    with trio.fail_after(1.0):  # none yet: at once (virtual time: a hang fails fast)
        await registry.wait_no_master("acme", "")
        await registry.wait_no_master("acme", "unknown")  # a location never seen has none either
    assert trio.current_time() == 0.0
    a = handle("a")
    registry.add(a)
    registry.register(a, 1)
    gone = []

    async def wait():
        await registry.wait_no_master("acme", "")
        gone.append(trio.current_time())

    nursery.start_soon(wait)
    await trio.sleep(1.0)
    assert gone == []
    registry.remove(a)
    await trio.testing.wait_all_tasks_blocked()
    assert gone == [1.0]
    assert [loc["location_id"] for loc in registry.snapshot()] == [""]  # waiting created no location


async def test_wait_fence_returns_when_the_fence_is_reached_and_at_once_if_it_is(registry, nursery, autojump_clock):
    key = ("acme", "")
    with trio.fail_after(1.0):  # the fence of a location never registered: at once
        await registry.wait_fence(key, Fence())
    reached = []

    async def wait():
        await registry.wait_fence(key, Fence(5, "c1"))
        reached.append(trio.current_time())

    nursery.start_soon(wait)
    await trio.sleep(1.0)
    registry.apply_shared_fence(key, Fence(3, "c1"))  # another replica's write, not the one awaited
    await trio.testing.wait_all_tasks_blocked()
    assert reached == []
    await trio.sleep(1.0)
    registry.apply_shared_fence(key, Fence(5, "c1"))
    await trio.testing.wait_all_tasks_blocked()
    assert reached == [2.0]
    with trio.fail_after(1.0):
        await registry.wait_fence(key, Fence(5, "c1"))
