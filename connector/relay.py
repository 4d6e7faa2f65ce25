"""One bidirectional byte relay, for every byte pipe: SOCKS5 sessions and TCP mappings, and
WebSocket connections after their `101`, on both sides of the tunnel.

Each direction copies one read at a time (at most `chunk` bytes in flight per direction, so memory
is bounded whatever the traffic) and half-closes its sink at its source's EOF; the relay ends when
both directions ended, or at once when either side fails: then the other direction is cancelled
and `Relayed.failed` names the side that failed first ("a" or "b"), so the caller can close or
reset each end as it must.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from connector.tunnel.types import StreamResetError

__all__ = ["Relayed", "relay"]

# what a failed read or write raises, on sockets, TLS streams and tunnel streams
ERRORS = (StreamResetError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@attrs.define
class Relayed:
    a_to_b: int = 0  # bytes copied
    b_to_a: int = 0
    failed: str | None = None  # "a" or "b": the side whose I/O failed first
    error: BaseException | None = None


def _no_count(_n: int) -> None:
    pass


async def relay(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    chunk: int,
    a_first: bytes = b"",
    b_first: bytes = b"",
    a_ended: bool = False,
    b_ended: bool = False,
    count_a_to_b: Callable[[int], None] = _no_count,
    count_b_to_a: Callable[[int], None] = _no_count,
) -> Relayed:
    """Copy `a` -> `b` and `b` -> `a` until both ended or one failed; closes neither.

    `a_first` / `b_first`: bytes already read from `a` / `b` (past a parsed head), sent first;
    `a_ended` / `b_ended`: that side's EOF was already read.
    """
    result = Relayed()

    async def one_way(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, first: bytes, ended: bool,
                      source_name: str, sink_name: str, count: Callable[[int], None], forward: bool) -> None:
        failing = sink_name
        try:
            if first:
                await sink.send_all(first)
                count(len(first))
                _add(forward, len(first))
            while not ended:
                failing = source_name
                data = await source.receive_some(chunk)
                if not data:
                    break
                failing = sink_name
                await sink.send_all(data)
                count(len(data))
                _add(forward, len(data))
            failing = sink_name
            if isinstance(sink, trio.abc.HalfCloseableStream):
                await sink.send_eof()
        except ERRORS as exc:
            if result.failed is None:
                result.failed, result.error = failing, exc
            nursery.cancel_scope.cancel()

    def _add(forward: bool, n: int) -> None:
        if forward:
            result.a_to_b += n
        else:
            result.b_to_a += n

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_way, a, b, a_first, a_ended, "a", "b", count_a_to_b, True)
        nursery.start_soon(one_way, b, a, b_first, b_ended, "b", "a", count_b_to_a, False)
    return result
