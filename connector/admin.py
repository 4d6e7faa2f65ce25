"""A small admin HTTP server (health, readiness, metrics, status, switch) and a matching client.

Theory of operation: routes are a `{(method, path): handler}` table; a handler receives the
parsed query and request body and returns a `Reply`. HTTP parsing is h11's; the server is
trio-native, so `/metrics` (prometheus-client's `generate_latest`) needs no extra thread.
Every process (cloud side and nodes) serves one of these on its admin port.

Who may act: *open* routes (`/healthz`, `/readyz`, `/metrics`: probes, load balancers, Prometheus)
answer anyone. *Guarded* routes (a node's `/status`, `/switch`, `/audit`) need the bearer token of
an `AdminGuard`, and a `Host` naming this admin (so a DNS-rebinding page cannot reach it under a
name of its own). Any route refuses a request that a browser sent on behalf of another origin (an
`Origin` that is not this admin's own) and a POST with a form content type (the bodies of the
"simple" cross-origin requests a page may send without asking). `admit` decides; it is pure.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from connector.http1 import next_event
from connector.listen import serve_tcp

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
REQUEST_TIMEOUT = 10.0


@attrs.frozen
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

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

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# The content types of a "simple" request, which a browser sends cross-origin without a preflight.
FORM_CONTENT_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})


@attrs.frozen
class AdminGuard:
    """What a guarded route requires: this bearer token (None: refuse everyone, none configured),
    and a `Host` header naming one of `hosts` (lower case, without port)."""

    token: str | None = attrs.field(repr=False)
    hosts: frozenset[str] = LOCAL_HOSTS


def admit(guard: AdminGuard | None, guarded: bool, method: str, headers: dict[str, str]) -> Reply | None:
    """The refusal for a request with these (lower-cased) `headers`, or None to serve it.

    Pure: the table in tests/unit/test_admin_guard.py is its specification.
    """
    host = _host_name(headers.get("host", ""))
    origin = headers.get("origin")
    if origin is not None and (origin.lower() != f"http://{headers.get('host', '').lower()}" or not guard
                               or host not in guard.hosts):
        return Reply.json(403, {"error": "cross_origin", "message": f"requests from origin {origin!r} are refused"})
    content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if method == "POST" and content_type in FORM_CONTENT_TYPES:
        return Reply.json(415, {"error": "unsupported_media_type",
                                "message": f"{content_type} is refused (what a cross-origin form sends)"})
    if not guarded:
        return None
    if guard is None or guard.token is None:
        return Reply.json(403, {"error": "admin_token_not_configured",
                                "message": "this route needs [admin] token_file in the node configuration"})
    if host not in guard.hosts:
        return Reply.json(421, {"error": "misdirected", "message": f"this admin API does not answer to host {host!r}"})
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), guard.token.encode()):
        return attrs.evolve(
            Reply.json(401, {"error": "unauthorized", "message": "a valid admin bearer token is required"}),
            headers=(("www-authenticate", 'Bearer realm="connector admin"'),),
        )
    return None


def create_token_file(path: Path, *, force: bool = False) -> Path:
    """Write a new random admin token (256 bits, URL-safe text) to `path`, mode 0600 from the start;
    an existing file is kept unless `force`. Nodes read it through `[admin] token_file`."""
    from connector import pki

    path.parent.mkdir(parents=True, exist_ok=True)
    pki.write_private(path, secrets.token_urlsafe(32).encode() + b"\n", overwrite=force)
    return path


def _host_name(host: str) -> str:
    """The host name of a Host header, lower case, without port and brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


async def metrics_handler(request: AdminRequest) -> Reply:
    return Reply(200, generate_latest(), CONTENT_TYPE_LATEST)


async def healthz_handler(request: AdminRequest) -> Reply:
    return Reply.json(200, {"status": "alive"})


class AdminServer:
    """Serve `routes` (open) and `guarded` routes (see `admit`) over HTTP/1.1; `/metrics` and
    `/healthz` are always present and open."""

    def __init__(
        self,
        routes: dict[tuple[str, str], Handler],
        *,
        guarded: dict[tuple[str, str], Handler] | None = None,
        guard: AdminGuard | None = None,
    ) -> None:
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/metrics"): metrics_handler,
            ("GET", "/healthz"): healthz_handler,
            **routes,
            **(guarded or {}),
        }
        self.guarded = frozenset(guarded or {})
        self.guard = guard

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
                        *reply.headers,
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
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers}
        refusal = admit(self.guard, (method, target.path) in self.guarded, method, headers)
        if refusal is not None:
            log.warning("admin %s %s refused (%d): %s", method, target.path, refusal.status, refusal.body.decode().strip())
            return refusal
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
        event = await next_event(conn, stream)
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
    host: str, port: int, path: str, *, method: str = "GET", body: bytes = b"", timeout: float = 2.0,  # noqa: ASYNC109 - one deadline for connect + exchange, applied with fail_after
    token: str | None = None, headers: list[tuple[str, str]] | None = None,
) -> tuple[int, bytes]:
    """Tiny HTTP/1.1 client for admin endpoints (probes, CLI): `token` is sent as a bearer token,
    `headers` as they are. Raises OSError/TooSlowError (a connection reset or broken mid-exchange,
    as by a killed peer, is an OSError too: callers catch those two and nothing else)."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
        try:
            conn = h11.Connection(h11.CLIENT)
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            head = [("host", authority), ("connection", "close"), ("content-length", str(len(body)))]
            if token is not None:
                head.append(("authorization", f"Bearer {token}"))
            head += headers or []
            await _send(conn, stream, h11.Request(method=method, target=path, headers=head), body)
            response, data = await _read_message(conn, stream)
            if response is None:
                raise OSError("admin endpoint closed the connection without answering")
            return response.status_code, data
        except h11.ProtocolError as exc:
            raise OSError(f"bad HTTP from admin endpoint: {exc}") from None
        except trio.BrokenResourceError as exc:
            raise OSError(f"admin endpoint {exc}") from exc
        finally:
            await stream.aclose()
