"""The seam between the application-facing services and the tunnel registry.

The HTTP proxy, the SOCKS5 proxy and anything else that reaches an internal host asks a `Router`
for a stream to a virtual target of a (subaccount, location_id). The real router is
`connector.cloud.registry` (it finds the master tunnel of that location, holds the request while
no master is connected, and opens a stream on it); tests use routers over real in-memory
tunnel session pairs (`tests/support/tunnelrouter.py`).
A router that cannot deliver a stream raises `NoConnectorError` (its `code` says why); a stream
that the node refuses or that dies later raises `StreamResetError` from its I/O (see
docs/CONTRACTS.md).

`ProxyService` serves each application connection in its own task with the connection's
`ClientConnection` in `connector.cloud.clients.current_client`, and authenticates through
`authenticate_header` / `authenticate_token`, which record the accepted token there (the
registry counts streams per token and per client address from it) and delay the answers to
an address that fails too often (`AuthThrottle`).
"""

from __future__ import annotations

import logging
from typing import ClassVar, Generic, Protocol, TypeVar

import trio

from connector import metrics
from connector.cloud.auth import Authenticator, Credentials, parse_authorization
from connector.cloud.clients import ClientConnection, ConnectionCounter, current_client
from connector.cloud.drain import Drain
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import Target

SettingsT = TypeVar("SettingsT")


log = logging.getLogger(__name__)


class NoConnectorError(Exception):
    """No stream can be had for this request now; the proxies answer 503 (SOCKS5: reply 0x03).

    `code` is a stable token for the error body and logs: ``no_connector`` (no connector serves
    this (subaccount, location_id): none connected, hold timed out or full), ``tunnel_busy``
    (every stream of the master's tunnel stayed in use for the whole wait), ``stream_limit_token``
    / ``stream_limit_client`` (this token / client address holds its limit of streams),
    ``client_gone`` (the application closed its connection while waiting). `reason` is a sentence.
    """

    def __init__(self, reason: str, code: str = "no_connector") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Router(Protocol):
    """Opens streams to virtual targets through the master tunnel of a location."""

    async def open_stream(self, subaccount: str, location_id: str, target: Target, *,
                          avoid: TunnelStream | None = None) -> TunnelStream:
        """Return an open stream to `target`, or raise NoConnectorError. `avoid`: a stream whose
        tunnel refused this request; the new one is opened on another (the next master)."""
        ...


class ProxyService(Generic[SettingsT]):
    """An application-facing proxy: authenticates with `authenticator`, reaches internal hosts
    through `router`, listens on TCP; subclasses name themselves and serve one connection in
    `_handle`."""

    name: ClassVar[str]
    default_port: ClassVar[int]

    def __init__(self, router: Router, authenticator: Authenticator, *, settings: SettingsT,
                 drain: Drain | None = None) -> None:
        self.router = router
        self.authenticator = authenticator
        self.settings = settings
        self.connections = ConnectionCounter(gauge=metrics.PROXY_CONNECTIONS)  # the cloud shares one
        self.drain = drain if drain is not None else Drain()

    async def run(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; `task_status.started` gets the bound port (0 picks a free one).

        Once the drain stops accepting (`Drain.stop_accepting`), the listener closes and this
        returns when the connections being served ended."""
        await self.drain.serve(self._serve_client, host, self.default_port if port is None else port,
                               name=self.name, task_status=task_status)

    async def _serve_client(self, sock: trio.SocketStream) -> None:
        client = ClientConnection.of(sock)
        refused = self.connections.admit(client.address)
        if refused is not None:
            # Closed before a byte is read: nothing to answer yet, and an answer would cost more.
            metrics.PROXY_CONNECTIONS_REFUSED.labels(refused).inc()
            log.info("%s: connection from %s closed at once: %s", self.name, client.address, refused)
            await trio.aclose_forcefully(sock)
            return
        try:
            current_client.set(client)  # this connection's task only
            with self.drain.connection():
                await self._handle(sock)
        finally:
            self.connections.release(client.address)

    async def _handle(self, sock: trio.SocketStream) -> None:
        raise NotImplementedError

    async def authenticate_header(self, value: bytes | str | None) -> str | None:
        """The subaccount of a `Proxy-Authorization`-style header, or None (see `_check_credentials`)."""
        return await self._check_credentials(parse_authorization(value))

    async def authenticate_token(self, token: str, subaccount: str | None = None) -> str | None:
        """The subaccount of `token` (which must belong to `subaccount` if given), or None."""
        return await self._check_credentials(Credentials(token, subaccount))

    async def _check_credentials(self, credentials: Credentials | None) -> str | None:
        """Authenticate for the current connection: an accepted token becomes its principal; a
        refusal is counted for its client address and answered only after the throttle's delay."""
        client = current_client.get()
        principal = await self.authenticator.throttle.check(
            client.address if client is not None else None, lambda: self.authenticator.identify(credentials)
        )
        if client is not None:
            client.principal = principal
        return principal.subaccount if principal is not None else None
