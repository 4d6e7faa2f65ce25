"""Graceful shutdown of a cloud replica: leave the load balancer's rotation without failing a request.

Theory of operation
-------------------
A replica that gets SIGTERM runs `CloudServer.drain` (see `connector.cloud.server`), which walks
through these phases; this module holds the state the application-facing services consult:

1. **Not ready** (`Drain.begin`): `/readyz` answers 503 at once, so the load balancer's health
   check takes the replica out of rotation. Every HTTP response (connectivity proxy, destination
   service) from now on says
   ``Connection: close`` (an application's kept-alive connection ends after its next response,
   and its next request opens a connection the load balancer sends elsewhere). The listeners
   stay open for `DrainSettings.notice_seconds`: connections the load balancer still sends
   before its health check noticed are served, one request each.
2. **Stop accepting** (`Drain.stop_accepting`): the listeners close, and every kept-alive
   connection that waits for its next request without having sent a byte of it is closed
   (`while_idle`). A connection with a request under way is never interrupted, nor one accepted
   just before that has not sent its first request yet (it is on the way).
3. **In-flight requests finish**: the replica waits until every application connection ended
   (`wait_connections(0)`), at most `DrainSettings.drain_seconds`; what is left then is cut.
4. **GOAWAY**: the tunnel endpoint closes every node's tunnel with GOAWAY(GOING_AWAY); the
   nodes keep their tunnels to the other replicas and redial this one when it returns.

The notice must cover the load balancer's detection time (HAProxy with ``inter 200ms fall 2``:
well under a second; a Kubernetes readiness probe: ``periodSeconds * failureThreshold``), and
the pod's ``terminationGracePeriodSeconds`` must cover ``notice_seconds + drain_seconds`` and a
few seconds for GOAWAY.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator

import attrs
import trio

from connector.listen import serve_tcp


@attrs.frozen
class DrainSettings:
    """[drain] of cloud.toml; seconds of trio time."""

    notice_seconds: float = 2.0  # not ready but still accepting: the load balancer notices meanwhile
    drain_seconds: float = 20.0  # at most this long for in-flight requests after the listeners closed


@attrs.frozen
class DrainStatistics:
    draining: bool
    accepting: bool
    connections: int  # application connections being served (HTTP proxy, SOCKS5, destinations)


class Drain:
    """The drain state one replica's application-facing services share."""

    def __init__(self) -> None:
        self.draining = False  # phase 1 on: not ready, `Connection: close` on every response
        self.accepting = True  # phase 2 off: listeners closed, idle connections closed
        self._connections = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._idle: set[trio.CancelScope] = set()
        self._accept_scopes: set[trio.CancelScope] = set()
        self._stopped = trio.Event()

    def statistics(self) -> DrainStatistics:
        return DrainStatistics(self.draining, self.accepting, self._connections)

    def begin(self) -> None:
        """Phase 1: not ready; responses close their connections."""
        self.draining = True

    def stop_accepting(self) -> None:
        """Phase 2: close the listeners and the connections that wait idle for a request."""
        self.draining = True
        self.accepting = False
        for scope in [*self._accept_scopes, *self._idle]:
            scope.cancel()
        self._stopped.set()

    async def wait_stopped_accepting(self) -> None:
        await self._stopped.wait()

    @contextlib.contextmanager
    def connection(self) -> Iterator[None]:
        """Count one application connection for the length of the block."""
        self._connections += 1
        self._lot.unpark_all()
        try:
            yield
        finally:
            self._connections -= 1
            self._lot.unpark_all()

    @contextlib.contextmanager
    def while_idle(self) -> Iterator[trio.CancelScope]:
        """A scope around a wait for a connection's next request (no byte of it read yet):
        cancelled by `stop_accepting` (at once if that already happened). The caller checks
        `cancelled_caught` and closes the connection."""
        with trio.CancelScope() as scope:
            if not self.accepting:
                scope.cancel()
            self._idle.add(scope)
            try:
                yield scope
            finally:
                self._idle.discard(scope)

    async def serve(
        self,
        handler: Callable[[trio.SocketStream], Awaitable[object]],
        host: str,
        port: int,
        *,
        name: str,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """`connector.listen.serve_tcp` for an application-facing service: `stop_accepting` closes
        the listener, the connections being served run on, and this returns once they ended."""
        async with trio.open_nursery() as connections:
            with self.accepting_scope():
                await serve_tcp(handler, host, port, name=name, handler_nursery=connections, task_status=task_status)

    @contextlib.contextmanager
    def accepting_scope(self) -> Iterator[trio.CancelScope]:
        """The scope a listener accepts in; `stop_accepting` cancels it (closing the listener)."""
        with trio.CancelScope() as scope:
            if not self.accepting:
                scope.cancel()
            self._accept_scopes.add(scope)
            try:
                yield scope
            finally:
                self._accept_scopes.discard(scope)

    async def wait_connections(self, count: int) -> None:
        """Return once exactly `count` application connections are being served."""
        while self._connections != count:
            await self._lot.park()
        await trio.lowlevel.checkpoint()
