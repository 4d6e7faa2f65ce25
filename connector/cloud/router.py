"""The seam between the application-facing services and the tunnel registry.

The HTTP proxy, the SOCKS5 proxy and anything else that reaches an internal host asks a `Router`
for a stream to a virtual target of a (subaccount, location_id). The real router is
`connector.cloud.registry` (it finds the master tunnel of that location, holds the request while
no master is connected, and opens a stream on it); tests use a fake over in-memory streams.
A router that cannot deliver a stream raises `NoConnectorError`; a stream that the node refuses
or that dies later raises `StreamResetError` from its I/O (see docs/CONTRACTS.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

import trio

from connector.listen import serve_tcp
from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import Target

if TYPE_CHECKING:
    from connector.cloud.auth import Authenticator

SettingsT = TypeVar("SettingsT")


class NoConnectorError(Exception):
    """No connector serves this (subaccount, location_id): none connected, hold timed out or full."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Router(Protocol):
    """Opens streams to virtual targets through the master tunnel of a location."""

    async def open_stream(self, subaccount: str, location_id: str, target: Target) -> TunnelStream:
        """Return an open stream to `target`, or raise NoConnectorError."""
        ...


class ProxyService(Generic[SettingsT]):
    """An application-facing proxy: authenticates with `authenticator`, reaches internal hosts
    through `router`, listens on TCP; subclasses name themselves and serve one connection in
    `_handle`."""

    name: ClassVar[str]
    default_port: ClassVar[int]

    def __init__(self, router: Router, authenticator: Authenticator, *, settings: SettingsT) -> None:
        self.router = router
        self.authenticator = authenticator
        self.settings = settings

    async def run(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; `task_status.started` gets the bound port (0 picks a free one)."""
        await serve_tcp(self._handle, host, self.default_port if port is None else port,
                        name=self.name, task_status=task_status)

    async def _handle(self, sock: trio.SocketStream) -> None:
        raise NotImplementedError
