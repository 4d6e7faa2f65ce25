"""A small admin HTTP server (health, readiness, metrics, status, switch) and a matching client.

Theory of operation: routes are a `{(method, path): handler}` table; a handler receives the
parsed query and request body and returns a `Reply`. HTTP parsing is h11's; the server is
trio-native, so `/metrics` (prometheus-client's `generate_latest`) needs no extra thread.
Every process (cloud side and nodes) serves one of these on its admin port.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from connector.listen import serve_tcp

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
REQUEST_TIMEOUT = 10.0


@attrs.frozen
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, value: Any) -> Reply:
        return cls(status, json.dumps(value, sort_keys=True).encode() + b"\n")


@attrs.frozen
class AdminRequest:
    method: str
    path: str
    query: dict[str, str]
    body: bytes


Handler = Callable[[AdminRequest], Awaitable[Reply]]


async def metrics_handler(request: AdminRequest) -> Reply:
    return Reply(200, generate_latest(), CONTENT_TYPE_LATEST)


async def healthz_handler(request: AdminRequest) -> Reply:
    return Reply.json(200, {"status": "alive"})


class AdminServer:
    """Serve `routes` over HTTP/1.1; `/metrics` and `/healthz` are always present."""

    def __init__(self, routes: dict[tuple[str, str], Handler]) -> None:
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/metrics"): metrics_handler,
            ("GET", "/healthz"): healthz_handler,
            **routes,
        }

    async def run(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_tcp(self._serve, host, port, name="admin API", task_status=task_status)

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                while True:
                    request, body = await _read_message(conn, stream)
                    if request is None:
                        return
                    reply = await self._dispatch(request, body)
                    await _send(conn, stream, h11.Response(status_code=reply.status, headers=[
                        ("content-type", reply.content_type),
                        ("content-length", str(len(reply.body))),
                    ]), reply.body)
                    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("admin connection ended: %s", exc)
        finally:
            await stream.aclose()

    async def _dispatch(self, request: h11.Request, body: bytes) -> Reply:
        target = urllib.parse.urlsplit(request.target.decode("ascii", "replace"))
        method = request.method.decode("ascii", "replace")
        handler = self.routes.get((method, target.path))
        if handler is None:
            known = any(path == target.path for (_, path) in self.routes)
            return Reply.json(405 if known else 404, {"error": "method_not_allowed" if known else "not_found"})
        query = dict(urllib.parse.parse_qsl(target.query))
        try:
            return await handler(AdminRequest(method, target.path, query, body))
        except Exception as exc:  # an admin bug must not kill the process; report it
            log.exception("admin handler %s failed", target.path)
            return Reply.json(500, {"error": "internal_error", "message": str(exc)})


async def _read_message(conn: h11.Connection, stream: trio.abc.Stream) -> tuple[Any, bytes]:
    head = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like
            continue
        if isinstance(event, (h11.Request, h11.Response)):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("body too large")
        elif isinstance(event, h11.EndOfMessage):
            return head, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""


async def _send(conn: h11.Connection, stream: trio.abc.Stream, head: Any, body: bytes) -> None:
    data = conn.send(head) + (conn.send(h11.Data(data=body)) if body else b"") + conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def http_request(
    host: str, port: int, path: str, *, method: str = "GET", body: bytes = b"", timeout: float = 2.0  # noqa: ASYNC109 - one deadline for connect + exchange, applied with fail_after
) -> tuple[int, bytes]:
    """Tiny HTTP/1.1 client for admin endpoints (probes, CLI). Raises OSError/TooSlowError."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
        try:
            conn = h11.Connection(h11.CLIENT)
            headers = [("host", f"{host}:{port}"), ("connection", "close"), ("content-length", str(len(body)))]
            await _send(conn, stream, h11.Request(method=method, target=path, headers=headers), body)
            response, data = await _read_message(conn, stream)
            if response is None:
                raise OSError("admin endpoint closed the connection without answering")
            return response.status_code, data
        except h11.ProtocolError as exc:
            raise OSError(f"bad HTTP from admin endpoint: {exc}") from None
        finally:
            await stream.aclose()
