"""The stream interface the rest of the system sees: a trio HalfCloseableStream plus reset/accept.

The cloud side *opens* streams (one per proxied client connection) and the node *accepts* them.
`connector.tunnel.session` implements it over the real tunnel; `connector.tunnel.testing`
implements it in memory so the proxy and the node's forwarder are tested without a tunnel.
"""

from __future__ import annotations

import abc

import trio

from connector.tunnel.types import ErrorCode, Target


class TunnelStream(trio.abc.HalfCloseableStream):
    """One multiplexed stream. I/O raises `StreamResetError` once either side reset it.

    `receive_some()` returns b"" at end of stream (the peer half-closed).
    `aclose()` finishes the stream gracefully if possible (half-close both ways), else resets it
    with CANCEL.
    """

    stream_id: int
    target: Target

    @abc.abstractmethod
    async def accept(self) -> None:
        """Acceptor side: tell the opener the internal host is reachable (SOCKS5 waits for this)."""

    @abc.abstractmethod
    async def wait_accepted(self) -> None:
        """Opener side: wait until the acceptor called `accept()`; raise StreamResetError if reset."""

    async def wait_reset(self) -> None:
        """Return once the stream is reset (by either side, or because the tunnel died), so that
        a task not reading it learns it is gone. A stream that cannot tell waits forever."""
        await trio.sleep_forever()

    @abc.abstractmethod
    async def reset(self, code: ErrorCode, reason: str = "") -> None:
        """Abort the stream in both directions, telling the peer why. Idempotent."""
