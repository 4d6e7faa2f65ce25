"""The seam between the application-facing services and the tunnel registry.

The HTTP proxy, the SOCKS5 proxy and anything else that reaches an internal host asks a `Router`
for a stream to a virtual target of a (subaccount, location_id). The real router is
`connector.cloud.registry` (it finds the master tunnel of that location, holds the request while
no master is connected, and opens a stream on it); tests use a fake over in-memory streams.
A router that cannot deliver a stream raises `NoConnectorError`; a stream that the node refuses
or that dies later raises `StreamResetError` from its I/O (see docs/CONTRACTS.md).
"""

from __future__ import annotations

from typing import Protocol

from connector.tunnel.streams import TunnelStream
from connector.tunnel.types import Target


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
