"""A router over real in-memory tunnel sessions, the node behind it, and an internal host: the
harness of the cloud proxies' tests.

`open_router(handler, ...)` starts one "master" per handler: a real `TunnelSession` pair over
memory streams (`connector.tunnel.testing.session_pair`) whose node side serves every stream the
cloud opens with that handler. `TunnelRouter.open_stream` is the `Router` the proxies call: it opens
the stream on the first live master, or, with `avoid` (a stream whose tunnel refused the request),
on the first other one, as the registry routes to the next master after a refusal.

A handler is either the real node (`real_node`: `connector.agent.forward.serve_stream` with an
`AccessControl` whose mappings point at internal hosts on 127.0.0.1, such as `EchoBackend`), or a
few lines speaking typed heads where a test needs the node to misbehave; `by_virtual_host` puts
both behind one master.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import h11
import trio

from connector.agent.acl import AccessControl
from connector.agent.acl import Mapping as AclMapping
from connector.agent.audit import AuditLog
from connector.agent.forward import ForwardSettings, StreamContext, serve_stream
from connector.cloud.router import NoConnectorError
from connector.tunnel.session import SessionStream, TunnelSession
from connector.tunnel.streams import TunnelStream
from connector.tunnel.testing import session_pair
from connector.tunnel.types import Target

Handler = Callable[[SessionStream], Awaitable[None]]
CHUNK = 65536


@attrs.define(eq=False)
class Master:
    """One tunnel: the cloud's session and the node's, the node serving streams with `handler`."""

    cloud: TunnelSession
    node: TunnelSession
    handler: Handler


@attrs.define(eq=False)
class TunnelRouter:
    """The proxies' `Router` over real sessions; records what it was asked."""

    locations: frozenset[tuple[str, str]]
    masters: list[Master] = attrs.Factory(list)
    opened: list[tuple[str, str, Target]] = attrs.Factory(list)  # every call, routed or not
    avoided: list[TunnelStream | None] = attrs.Factory(list)  # `avoid` of every call
    streams: list[SessionStream] = attrs.Factory(list)  # every stream handed out

    async def open_stream(self, subaccount: str, location_id: str, target: Target, *,
                          avoid: TunnelStream | None = None) -> SessionStream:
        self.opened.append((subaccount, location_id, target))
        self.avoided.append(avoid)
        if (subaccount, location_id) not in self.locations:
            raise NoConnectorError(f"no connector connected for location {location_id!r}")
        refused_by = getattr(avoid, "session", None)
        for master in self.masters:
            if not master.cloud.closed and master.cloud is not refused_by:
                stream = await master.cloud.open_stream(target)
                self.streams.append(stream)
                return stream
        raise NoConnectorError("no other master connected")

    def streams_open(self) -> int:
        """Streams open on the cloud side of every tunnel."""
        return sum(master.cloud.statistics().streams_open for master in self.masters)

    async def wait_no_streams(self) -> None:
        for master in self.masters:
            await master.cloud.wait_no_streams()


@asynccontextmanager
async def open_router(*handlers: Handler, locations: Iterable[tuple[str, str]] = (("sub1", ""),)
                      ) -> AsyncIterator[TunnelRouter]:
    """A router with one master per handler (in that order of preference)."""
    router = TunnelRouter(frozenset(locations))
    async with AsyncExitStack() as stack:
        for handler in handlers:
            cloud, node = await stack.enter_async_context(session_pair(handler))
            router.masters.append(Master(cloud, node, handler))
        yield router


def by_virtual_host(default: Handler, handlers: Mapping[str, Handler]) -> Handler:
    """A node that serves streams to the virtual hosts in `handlers` with theirs, others with `default`."""

    async def handle(stream: SessionStream) -> None:
        await handlers.get(stream.target.virtual_host, default)(stream)

    return handle


@attrs.define(eq=False)
class RealNode:
    """The node's forwarder for `mappings`; its audit log is kept in memory."""

    acl: AccessControl
    ctx: StreamContext

    async def __call__(self, stream: SessionStream) -> None:
        await serve_stream(stream, self.acl, self.ctx)

    @property
    def audit(self) -> AuditLog:
        return self.ctx.audit


def real_node(mappings: Iterable[AclMapping], settings: ForwardSettings | None = None) -> RealNode:
    ctx = StreamContext(subaccount="sub1", location_id="", audit=AuditLog(None),
                        settings=settings or ForwardSettings())
    return RealNode(AccessControl(mappings), ctx)


# --- an internal host ------------------------------------------------------------------------------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_GREETING = b"NODE-HELLO"


@attrs.define(eq=False)
class EchoBackend:
    """An HTTP/1.1 internal host (h11, keep-alive) on 127.0.0.1. Every request is answered 200,
    chunked, with `x-echo-method`, `x-echo-target`, `x-echo-headers` (JSON) and its body streamed
    back as it arrives, its trailers as the answer's; `requests` records (method, target, headers,
    body, trailers). By path:

    /gate...   the answer waits for `gate` (set at first): the body is not read meanwhile
    /early...  `200 early` (Content-Length 5) before a byte of the body is read
    /ws...     an upgrade: `101` (with Sec-WebSocket-Accept and the request headers as
               `x-echo-headers`) and `WS_GREETING`, then every byte echoed; EOF is echoed too
    """

    gate: trio.Event = attrs.Factory(trio.Event)
    requests: list[dict[str, Any]] = attrs.Factory(list)
    websocket_finished: trio.Event = attrs.Factory(trio.Event)  # a WebSocket echo ended cleanly
    port: int = 0

    def __attrs_post_init__(self) -> None:
        self.gate.set()

    async def start(self, nursery: trio.Nursery) -> int:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1"))
        self.port = int(listeners[0].socket.getsockname()[1])
        return self.port

    async def handle(self, sock: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)

        async def next_event() -> Any:
            while (event := conn.next_event()) is h11.NEED_DATA:
                conn.receive_data(await sock.receive_some(CHUNK))
            return event

        async def send(*events: h11.Event) -> None:
            await sock.send_all(b"".join(conn.send(event) or b"" for event in events))

        try:
            while isinstance(request := await next_event(), h11.Request):
                path = request.target
                echoed = json.dumps([[n.decode(), v.decode()] for n, v in request.headers]).encode()
                record: dict[str, Any] = {"method": request.method, "target": path,
                                          "headers": list(request.headers), "body": b"", "trailers": []}
                body = bytearray()
                self.requests.append(record)
                if path.startswith(b"/ws"):
                    await self._websocket(sock, conn, request, echoed)
                    return
                if path.startswith(b"/early"):
                    await send(h11.Response(status_code=200, headers=[(b"content-length", b"5")]),
                               h11.Data(data=b"early"), h11.EndOfMessage())
                    return  # the body is never read; the node must not reuse this connection
                if path.startswith(b"/gate"):
                    await self.gate.wait()
                await send(h11.Response(status_code=200, headers=[
                    (b"x-echo-method", request.method), (b"x-echo-target", path), (b"x-echo-headers", echoed),
                    (b"transfer-encoding", b"chunked"), (b"connection", b"keep-alive")]))
                while isinstance(event := await next_event(), h11.Data):
                    body += event.data
                    await send(h11.Data(data=event.data))
                assert isinstance(event, h11.EndOfMessage), event
                record["body"] = bytes(body)
                record["trailers"] = list(event.headers)
                await send(h11.EndOfMessage(headers=list(event.headers)))
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(sock)

    async def _websocket(self, sock: trio.SocketStream, conn: h11.Connection, request: h11.Request,
                         echoed: bytes) -> None:
        while not isinstance(conn.next_event(), h11.EndOfMessage):
            conn.receive_data(await sock.receive_some(CHUNK))
        key = dict(request.headers)[b"sec-websocket-key"]
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        head = conn.send(h11.InformationalResponse(status_code=101, reason=b"Switching Protocols", headers=[
            (b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"sec-websocket-accept", accept),
            (b"sec-websocket-protocol", b"chat"), (b"keep-alive", b"timeout=5"), (b"x-echo-headers", echoed)]))
        await sock.send_all((head or b"") + WS_GREETING)  # one write: both arrive together
        leftover, _ = conn.trailing_data
        if leftover:
            await sock.send_all(bytes(leftover))
        while data := await sock.receive_some(CHUNK):
            await sock.send_all(data)
        await sock.send_eof()
        self.websocket_finished.set()
