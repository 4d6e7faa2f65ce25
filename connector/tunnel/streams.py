"""The stream interface the rest of the system sees: a trio HalfCloseableStream plus reset/accept.

The cloud side *opens* streams (one per proxied request or SOCKS5 connection) and the node
*accepts* them. `connector.tunnel.session` implements it over the real tunnel; tests use a real
session pair in memory (`connector.tunnel.testing.session_pair`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import trio

from connector.tunnel.heads import Head
from connector.tunnel.types import ErrorCode, Target


class TunnelStream(trio.abc.HalfCloseableStream):
    """One multiplexed stream. I/O raises `StreamResetError` once either side reset it.

    `receive_some()` returns b"" at end of stream (the peer half-closed).
    `aclose()` finishes the stream gracefully if possible (half-close both ways), else resets it
    with CANCEL.
    """

    stream_id: int
    target: Target
    # (annotations only: a wrapper such as AdmittedStream forwards them to the stream it wraps)
    peer_started: bool  # the peer sent something on the stream: it is processing it
    trailers: list[tuple[bytes, bytes]] | None  # the peer's trailers, once its message ended

    async def send_head(self, head: Head, *, end_stream: bool = False) -> None:
        """Exchange streams: send an HTTP head (`end_stream`: no body follows)."""
        raise NotImplementedError

    async def receive_head(self) -> Head:
        """Exchange streams: the peer's next HTTP head; StreamResetError if reset first."""
        raise NotImplementedError

    @abc.abstractmethod
    async def send_eof(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        """End our side (FIN); on an exchange stream, with `trailers` if given."""

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

    def on_reset(self, callback: Callable[[], object]) -> None:
        """Call `callback` (synchronously) when the peer resets the stream or the tunnel dies,
        e.g. a cancel scope's `cancel`: a task waiting on something else learns it at once."""

    @abc.abstractmethod
    async def reset(self, code: ErrorCode, reason: str = "") -> None:
        """Abort the stream in both directions, telling the peer why. Idempotent."""
