"""Fetching OAuth2 tokens for destinations: one HTTPS client call, and a cache in front of it.

Theory of operation. The destination service hands applications ready-made tokens for their
OAuth2 destinations (`authTokens`), as SAP's does: it posts the destination's grant to its
`tokenServiceURL` with the destination's client credentials (HTTP Basic, form-urlencoded parts,
RFC 6749 2.3.1) and passes on the answer. `fetch_token` is that one exchange: h11 over a trio
TLS stream, the server's certificate verified against the configured trust store (the system's
by default), HTTPS only, one connection per call (`Connection: close`), the whole exchange
within `timeout` and the answer within `max_response_bytes`. Every failure, the token service's
own OAuth2 errors included, is a `TokenError` whose sentence the destination service reports in
`authTokens[].error`.

`TokenCache` keeps the tokens: keyed by what makes a token the same token (`TokenRequest.key`:
token URL, client id, grant, and a digest of every secret that went into the request, so a
destination holding a client id but not its secret never receives a token fetched with it),
reused until `refresh_fraction` of `expires_in` has passed, then fetched again. Callers of one
key wait for one fetch. Times come from trio's clock; failures are not cached (the next find
tries again). At most `max_entries` tokens are kept; the one expiring first makes room.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any

import attrs
import h11
import trio

from connector import pki
from connector.http1 import next_event

_CHUNK = 16384
MAX_ERROR_CHARS = 200  # of a token service's error and description, passed on in authTokens[].error


class TokenError(Exception):
    """A token could not be fetched; the message says why, for `authTokens[].error`."""


@attrs.frozen
class TokenClientSettings:
    """[destinations] token_service_ca and token_timeout: how tokens are fetched."""

    ca: Path | None = None  # trust store for token services (None: the system's)
    timeout: float = 10.0  # connect, TLS, request and answer
    max_response_bytes: int = 65536

    def __attrs_post_init__(self) -> None:
        if self.timeout <= 0 or self.max_response_bytes < 1:
            raise ValueError("token_timeout must be positive")

    def ssl_context(self) -> ssl.SSLContext:
        return pki.client_context(self.ca)


@attrs.frozen
class TokenRequest:
    """One grant to post: the token endpoint, the client, the grant and its parameters."""

    url: str  # the token endpoint, https://host[:port]/path
    client_id: str
    client_secret: str = attrs.field(repr=False)
    grant: str
    params: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)  # username/password, assertion...

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What the cache keys the token by: URL, client, grant, digest of the secrets and the user."""
        secrets = json.dumps([self.client_secret, *self.params]).encode("utf-8")
        return (self.url, self.client_id, self.grant, hashlib.sha256(secrets).hexdigest())

    def form(self) -> bytes:
        return urllib.parse.urlencode([("grant_type", self.grant), *self.params]).encode("ascii")

    def authorization(self) -> bytes:
        pair = f"{urllib.parse.quote_plus(self.client_id)}:{urllib.parse.quote_plus(self.client_secret)}"
        return b"Basic " + base64.b64encode(pair.encode("utf-8"))


async def fetch_token(request: TokenRequest, settings: TokenClientSettings,
                      ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """Post `request` to its token endpoint; the JSON answer (with `access_token`), or TokenError."""
    body = request.form()
    status, _, payload = await https_exchange(
        request.url, settings, method="POST", body=body, ssl_context=ssl_context, what="the token service",
        url_name="tokenServiceURL", headers=[
            ("content-type", "application/x-www-form-urlencoded"), ("accept", "application/json"),
            ("authorization", request.authorization().decode("ascii")), ("content-length", str(len(body)))])
    try:
        document = json.loads(payload)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise TokenError(f"the token service answered {status} without a JSON object")
    if status != 200:
        error, description = str(document.get("error", "?")), str(document.get("error_description", ""))
        said = f"{error[:MAX_ERROR_CHARS]}" + (f": {description[:MAX_ERROR_CHARS]}" if description else "")
        raise TokenError(f"the token service answered {status} {said}")
    return document


async def https_exchange(url: str, settings: TokenClientSettings, *, method: str = "GET", body: bytes = b"",
                         headers: list[tuple[str, str]] | None = None, ssl_context: ssl.SSLContext | None = None,
                         what: str = "the server", url_name: str = "the URL",
                         ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One HTTPS request to `url` (its certificate verified, `Connection: close`), within
    `settings.timeout` and `settings.max_response_bytes`: the status, headers and body of the
    answer, or TokenError naming `what` failed. Token services and identity providers' JWKS
    (`connector.cloud.idp_keys`) are fetched with it."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        raise TokenError(f"{url_name} {url!r} is not an https:// URL")
    try:
        port = parsed.port or 443
    except ValueError as exc:
        raise TokenError(f"{url_name} {url!r}: {exc}") from None
    host = parsed.hostname
    target = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
    try:
        with trio.fail_after(settings.timeout):
            sock = await trio.open_tcp_stream(host, port)
            stream = trio.SSLStream(sock, ssl_context or settings.ssl_context(), server_hostname=host,
                                    https_compatible=True)
            try:
                return await _exchange(stream, h11.Request(method=method, target=target, headers=[
                    ("host", parsed.netloc.rpartition("@")[2]), ("connection", "close"), *(headers or []),
                ]), body, settings.max_response_bytes)
            finally:
                await trio.aclose_forcefully(stream)
    except trio.TooSlowError:
        raise TokenError(f"{what} at {host}:{port} did not answer within {settings.timeout:g} s") from None
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:  # ssl.SSLError is an OSError
        reason = exc.__cause__ or exc  # trio wraps a TLS failure: its cause says what failed
        raise TokenError(f"{what} at {host}:{port} could not be reached: {reason}") from None
    except h11.ProtocolError as exc:
        raise TokenError(f"{what} at {host}:{port} broke HTTP: {exc}") from None


async def _exchange(stream: trio.SSLStream[trio.SocketStream], request: h11.Request, body: bytes,
                    limit: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=limit)
    await stream.send_all(conn.send(request) + (conn.send(h11.Data(data=body)) if body else b"")
                          + conn.send(h11.EndOfMessage()))
    status, headers, payload = 0, [], bytearray()
    while True:
        event = await next_event(conn, stream, _CHUNK)
        if isinstance(event, h11.Response):
            status, headers = event.status_code, list(event.headers)
        elif isinstance(event, h11.Data):
            payload += event.data
            if len(payload) > limit:
                raise h11.RemoteProtocolError(f"an answer over {limit} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, bytes(payload)
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("the connection closed before the answer was whole")


@attrs.frozen
class CachedToken:
    """A token as the cache holds it; times on trio's clock."""

    access_token: str
    token_type: str
    expires_at: float
    refresh_at: float  # fetched again from here on

    def expires_in(self) -> int:
        """Whole seconds left, as `authTokens[].expires_in` reports them."""
        return max(0, int(self.expires_at - trio.current_time()))


class TokenCache:
    """Tokens by `TokenRequest.key`, fetched by `fetch` (see the module docstring)."""

    def __init__(self, fetch: Callable[[TokenRequest], Awaitable[dict[str, Any]]], *,
                 refresh_fraction: float = 0.9, max_entries: int = 1024) -> None:
        if not 0 < refresh_fraction <= 1:
            raise ValueError("refresh_fraction must be in (0, 1]")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.fetch = fetch
        self.refresh_fraction = refresh_fraction
        self.max_entries = max_entries
        self._entries: dict[Hashable, CachedToken] = {}
        self._locks: dict[Hashable, tuple[trio.Lock, int]] = {}  # only while someone waits or fetches
        self.fetches = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, request: TokenRequest) -> CachedToken:
        """A token for `request`: the cached one until its refresh time, else a fresh one
        (TokenError if it cannot be fetched; nothing is cached then)."""
        key = request.key
        lock, waiting = self._locks.get(key, (trio.Lock(), 0))
        self._locks[key] = (lock, waiting + 1)
        try:
            async with lock:
                entry = self._entries.get(key)
                if entry is not None and trio.current_time() < entry.refresh_at:
                    return entry
                return self._keep(key, await self.fetch(request))
        finally:
            lock, waiting = self._locks[key]
            if waiting == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, waiting - 1)

    def _keep(self, key: Hashable, response: dict[str, Any]) -> CachedToken:
        self.fetches += 1
        token, expires_in = response.get("access_token"), response.get("expires_in")
        if isinstance(expires_in, str) and expires_in.isdigit():  # some services send a string
            expires_in = int(expires_in)
        if not isinstance(token, str) or not token or not isinstance(expires_in, (int, float)) or expires_in <= 0:
            raise TokenError("the token service's answer lacks access_token or a positive expires_in")
        now = trio.current_time()
        entry = CachedToken(token, str(response.get("token_type") or "bearer"), now + expires_in,
                            now + expires_in * self.refresh_fraction)
        for old in [k for k, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[old]
        if len(self._entries) >= self.max_entries and key not in self._entries:
            del self._entries[min(self._entries, key=lambda k: self._entries[k].expires_at)]
        self._entries[key] = entry
        return entry
