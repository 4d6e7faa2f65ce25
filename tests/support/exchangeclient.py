"""The cloud's end of exchange streams, for tests of the node: one HTTP request as typed heads.

Tests open streams on the cloud session of `connector.tunnel.testing.session_pair` (a real tunnel
session pair in memory) and speak to the node as the proxy does (`connector.cloud.exchange`): a
`RequestHead` (FIN on it when there is no body), the body as DATA, the end with trailers; then the
node's 1xx heads, its final head, the body and its trailers. No HTTP is parsed here: the heads are
the typed ones the tunnel carries.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from connector.tunnel.heads import RequestHead, ResponseHead
from connector.tunnel.session import SessionStream, TunnelSession
from connector.tunnel.testing import session_pair
from connector.tunnel.types import StreamResetError, Target

CHUNK = 65536
Headers = list[tuple[bytes, bytes]]
Body = bytes | AsyncIterable[bytes]


@attrs.define
class Reply:
    head: ResponseHead
    body: bytes
    body_len: int
    trailers: Headers
    informational: list[ResponseHead]

    @property
    def status(self) -> int:
        return self.head.status

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.head.headers)

    def json(self) -> Any:
        return json.loads(self.body)


async def start_pair(nursery: trio.Nursery, handler: Callable[[SessionStream], Awaitable[None]]) -> TunnelSession:
    """A session pair running in `nursery` until it is cancelled; the cloud's session."""

    async def run(task_status: trio.TaskStatus[TunnelSession]) -> None:
        async with session_pair(handler) as (cloud, _node):  # type: ignore[arg-type]
            task_status.started(cloud)
            await trio.sleep_forever()

    cloud: TunnelSession = await nursery.start(run)
    return cloud


def request_head(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]] = (),
                 body: Body = b"") -> RequestHead:
    """A head as the proxy sends it: the application's Host, and Content-Length for a bytes body
    unless the caller framed it."""
    fields: Headers = [(b"host", b"ignored.example"), *headers]
    names = {name.lower() for name, _ in fields}
    if isinstance(body, bytes) and body and not names & {b"content-length", b"transfer-encoding"}:
        fields.append((b"content-length", b"%d" % len(body)))
    return RequestHead(method, target, fields)


async def send_body(stream: SessionStream, body: Body, trailers: Headers | None = None) -> None:
    """The body and the end of the request; stops quietly if the node reset the stream (an early
    answer, a refusal), as the proxy's body pump does."""
    try:
        if isinstance(body, bytes):
            if body:
                await stream.send_all(body)
        else:
            async for piece in body:
                await stream.send_all(piece)
        await stream.send_eof(trailers)
    except (StreamResetError, trio.ClosedResourceError):
        return


async def read_reply(stream: SessionStream, *, keep_body: bool = True) -> Reply:
    """The node's answer: 1xx heads, the final head, the body until FIN, the trailers. Raises
    StreamResetError if the node reset the stream before its FIN."""
    informational = []
    head = await stream.receive_head()
    while isinstance(head, ResponseHead) and 100 <= head.status < 200 and head.status != 101:
        informational.append(head)
        head = await stream.receive_head()
    assert isinstance(head, ResponseHead), head
    parts = []
    size = 0
    if head.status != 101:
        while data := await stream.receive_some(CHUNK):
            size += len(data)
            if keep_body:
                parts.append(data)
    return Reply(head, b"".join(parts), size, stream.trailers or [], informational)


async def request(cloud: TunnelSession, target: Target, head: RequestHead, body: Body = b"", *,
                  trailers: Headers | None = None, keep_body: bool = True) -> Reply:
    """One exchange on a new stream: the head, the body sent beside reading the answer (the node
    may answer before the body is whole), the whole answer."""
    bodyless = isinstance(body, bytes) and not body and not trailers
    stream = await cloud.open_stream(target)
    try:
        await stream.send_head(head, end_stream=bodyless)
        if bodyless:
            return await read_reply(stream, keep_body=keep_body)
        failed: list[StreamResetError] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body, stream, body, trailers)
            try:
                reply = await read_reply(stream, keep_body=keep_body)
            except StreamResetError as exc:  # raised below, not as an exception group
                failed.append(exc)
                nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]
        return reply
    finally:
        await stream.aclose()


async def repeated(piece: bytes, count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield piece


async def read_until_closed(stream: SessionStream, limit: int = 1 << 20, within: float = 5.0) -> bytes:
    """Raw bytes (a TCP or switched stream) until the node's FIN; fails after `within` seconds."""
    data = b""
    with trio.fail_after(within):
        while len(data) < limit:
            piece = await stream.receive_some(CHUNK)
            if not piece:
                break
            data += piece
    return data
