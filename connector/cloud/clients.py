"""The client of an application connection, and the throttle on its failed authentications.

Theory of operation
-------------------
`ProxyService` (`connector.cloud.router`) serves every application connection in its own task
and records, in the context variable `current_client`, a `ClientConnection`: the client's address
(`address_key`: an IPv4 address, or the /64 of an IPv6 one, since one host commonly owns a whole
/64) and, once a token was accepted, the `Principal` (subaccount and token digest). Code running
in that task (the registry's `open_stream`, through `connector.cloud.admission`) reads it there;
context variables are per task in trio, so connections never see each other's.

Failed authentications are counted per client address (`AuthThrottle`). The first `failures`
failures of an address are answered at once; past them, the answers to that address's failures
are spaced `delay` apart (a sequential guesser gets one answer per `delay`; guessers on parallel
connections queue for the same slots), and no answer waits longer than `max_delay`. An address is
forgotten `forget_after` seconds after its last failure; at most `max_addresses` are tracked (the
least recently failing one is dropped first), so memory is bounded whatever the attacker's
address space. Successful authentications are never delayed and do not clear the count: holding
one valid token does not buy faster guessing of others.

Times are trio's clock; nothing here does I/O except `ClientConnection.wait_gone`.
"""

from __future__ import annotations

import contextvars
import ipaddress
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import attrs
import trio
from prometheus_client import Gauge

from connector import metrics

T = TypeVar("T")


def address_key(host: str) -> str:
    """The unit a client is counted by: the IPv4 address, or the /64 network of an IPv6 one."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@attrs.frozen
class Principal:
    """Who an accepted token is: its subaccount and the SHA-256 hex digest of the token."""

    subaccount: str
    token_digest: str


@attrs.define(eq=False)
class ClientConnection:
    """One application connection to a proxy: where it comes from, whom it authenticated as."""

    address: str  # address_key of the peer
    sock: trio.SocketStream | None = None
    principal: Principal | None = None

    @classmethod
    def of(cls, sock: trio.SocketStream) -> ClientConnection:
        try:
            host = sock.socket.getpeername()[0]
        except OSError:
            host = "?"
        return cls(address_key(str(host)), sock)

    async def wait_gone(self) -> None:
        """Return once the client closed (or reset) its connection; wait forever if that cannot
        be told without reading: the client sent more bytes (a body, a pipelined request), which
        belong to the proxy. Only while the proxy itself does not read the socket (its task is
        waiting for a stream). A client that merely half-closes (shuts down its sending side)
        looks the same as one that left, and is taken as gone."""
        if self.sock is None:
            await trio.sleep_forever()
        assert self.sock is not None
        try:
            peeked = await self.sock.socket.recv(1, socket.MSG_PEEK)
        except OSError:
            return  # reset by the client
        except (trio.BusyResourceError, trio.ClosedResourceError):
            peeked = b"?"  # the proxy is reading (or closed) it itself: cannot tell from here
        if not peeked:
            return
        await trio.sleep_forever()


current_client: contextvars.ContextVar[ClientConnection | None] = contextvars.ContextVar(
    "current_client", default=None
)


@attrs.frozen
class AuthThrottleSettings:
    failures: int = 10  # failures of one address answered at once
    delay: float = 1.0  # past them, its failures are answered this far apart
    max_delay: float = 5.0  # no answer waits longer
    forget_after: float = 60.0  # an address is forgotten this long after its last failure
    max_addresses: int = 10000  # addresses tracked at once

    def __attrs_post_init__(self) -> None:
        if self.failures < 0 or self.delay <= 0 or self.max_delay < self.delay or self.forget_after <= 0:
            raise ValueError(f"inconsistent authentication throttle settings: {self}")
        if self.max_addresses < 1:
            raise ValueError("max_addresses must be at least 1")


@attrs.define
class _Failures:
    count: int
    last: float  # time of the last failure
    next_answer: float  # the earliest time the next delayed answer may leave


class AuthThrottle:
    """Counts failed authentications per client address; tells how long to delay each answer."""

    def __init__(self, settings: AuthThrottleSettings = AuthThrottleSettings()) -> None:
        self.settings = settings
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()  # least recently failing first

    async def check(self, address: str | None, identify: Callable[[], T | None]) -> T | None:
        """Authenticate through `identify` on behalf of `address`; refusals are counted and delayed.

        While an address's queue of delayed answers is full, its credentials are not even looked
        at: the refusal comes after `max_delay` without an evaluation. So an address gets about one
        evaluated guess per `delay` however many connections it opens (with a cap alone, C
        connections would buy C guesses per `max_delay`). A correct token is answered at once,
        except from an address that is guessing hard right now. `address` None: not throttled.
        """
        if address is not None and self._saturated(address):
            metrics.PROXY_AUTH_FAILURES.inc()
            metrics.PROXY_AUTH_DELAYED.inc()
            await trio.sleep(self.settings.max_delay)
            return None
        result = identify()
        if result is not None:
            return result
        metrics.PROXY_AUTH_FAILURES.inc()
        if address is not None:
            delay = self.failed(address)
            if delay > 0:
                metrics.PROXY_AUTH_DELAYED.inc()
                await trio.sleep(delay)
        return None

    def _saturated(self, address: str) -> bool:
        entry = self._addresses.get(address)
        if entry is None or entry.count < self.settings.failures:
            return False
        return entry.next_answer - trio.current_time() > self.settings.max_delay - self.settings.delay

    def failed(self, address: str) -> float:
        """Record a failure of `address` now; return the seconds its answer must wait."""
        settings = self.settings
        now = trio.current_time()
        self._forget(now)
        entry = self._addresses.pop(address, None)
        if entry is None:
            entry = _Failures(0, now, now)
            while len(self._addresses) >= settings.max_addresses:
                self._addresses.popitem(last=False)
        self._addresses[address] = entry  # now the most recently failing
        entry.count += 1
        entry.last = now
        metrics.PROXY_AUTH_FAILING_ADDRESSES.set(len(self._addresses))
        if entry.count <= settings.failures:
            return 0.0
        answer = min(max(now, entry.next_answer) + settings.delay, now + settings.max_delay)
        entry.next_answer = answer
        return answer - now

    def _forget(self, now: float) -> None:
        addresses = self._addresses
        while addresses:
            oldest = next(iter(addresses.values()))
            if now - oldest.last < self.settings.forget_after:
                break
            addresses.popitem(last=False)
        metrics.PROXY_AUTH_FAILING_ADDRESSES.set(len(addresses))

    def failures(self, address: str) -> int:
        """Failures of `address` still remembered now."""
        self._forget(trio.current_time())
        entry = self._addresses.get(address)
        return entry.count if entry is not None else 0

    @property
    def tracked(self) -> int:
        return len(self._addresses)


@attrs.frozen
class ConnectionLimits:
    """How many application connections the proxies hold at once (0 = no limit)."""

    total: int = 8192  # both proxies together
    per_client_address: int = 1024  # per address_key, whatever it authenticates as

    def __attrs_post_init__(self) -> None:
        if self.total < 0 or self.per_client_address < 0:
            raise ValueError(f"connection limits cannot be negative: {self}")


class ConnectionCounter:
    """Counts the proxies' open connections; `admit` refuses one beyond a limit.

    Every connection holds a file descriptor and a task from its first byte, before any token is
    checked, and the tunnel endpoint shares the process's descriptors: without a bound, one
    address opening sockets could leave no descriptor for a node's reconnect.
    """

    def __init__(self, limits: ConnectionLimits = ConnectionLimits(), *, gauge: Gauge | None = None) -> None:
        self.limits = limits
        self.gauge = gauge  # follows `total`, if given
        self.total = 0
        self._by_address: dict[str, int] = {}
        self._changed = trio.lowlevel.ParkingLot()

    def admit(self, address: str) -> str | None:
        """Count a new connection of `address`; None if admitted (then `release` it), else why not."""
        limits = self.limits
        if limits.total and self.total >= limits.total:
            return "too_many_connections"
        held = self._by_address.get(address, 0)
        if limits.per_client_address and held >= limits.per_client_address:
            return "too_many_connections_from_address"
        self.total += 1
        self._by_address[address] = held + 1
        if self.gauge is not None:
            self.gauge.set(self.total)
        self._changed.unpark_all()
        return None

    def release(self, address: str) -> None:
        self.total -= 1
        held = self._by_address.pop(address) - 1
        if held:
            self._by_address[address] = held
        if self.gauge is not None:
            self.gauge.set(self.total)
        self._changed.unpark_all()

    def held_by(self, address: str) -> int:
        return self._by_address.get(address, 0)

    async def wait_held(self, address: str, count: int) -> None:
        """Return once `address` holds exactly `count` connections."""
        while self.held_by(address) != count:
            await self._changed.park()

    async def wait_total(self, count: int) -> None:
        """Return once exactly `count` connections are held."""
        while self.total != count:
            await self._changed.park()
