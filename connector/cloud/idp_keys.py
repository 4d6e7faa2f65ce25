"""The public keys of the identity providers a subaccount trusts: from a file, or fetched from their JWKS URL.

Theory of operation. A `[[subaccounts.trusted_issuers]]` entry names its provider's keys either
as a JWKS file read at load (`StaticKeys`) or as the provider's `jwks_uri` (`RemoteJwks`), which
the cloud fetches over HTTPS with `connector.cloud.token_client.https_exchange` (the provider's
certificate verified against the entry's `ca`, or the system's trust store; the answer within
`timeout` and `max_response_bytes`). Both answer `key(kid)`, the RSA public key a token's `kid`
names, or None.

`RemoteJwks` keeps the last key set it fetched and fetches again:

- periodically (`run`): every `refresh_seconds` (600), sooner if the provider's
  `Cache-Control: max-age` says so, but never sooner than `MIN_FETCH_INTERVAL` (60 s) after the
  last fetch began;
- when a token names a `kid` it does not know (a key the provider added since), at once, but
  again only if the last fetch began `MIN_FETCH_INTERVAL` ago or more: a flood of tokens with
  forged kids makes at most one fetch a minute. Callers of one issuer wait for one fetch (a lock),
  then look the kid up in what it brought; callers with a known kid never wait.

A fetch that fails (unreachable, TLS, not 200, not a JWKS with an RSA key) keeps the last good key
set, is logged and counted (`connector_trusted_issuer_key_fetches_total{result="failed"}`), and is
tried again after `MIN_FETCH_INTERVAL`. Until a first fetch succeeds every token of the issuer is
refused (`unknown_key`). Times come from trio's clock.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from connector import metrics
from connector.cloud.token_client import TokenClientSettings, TokenError, https_exchange

log = logging.getLogger(__name__)

MIN_FETCH_INTERVAL = 60.0  # seconds between two fetches of one issuer's keys, whatever asks
DEFAULT_REFRESH = 600.0
DEFAULT_MAX_JWKS_BYTES = 65536

Fetch = Callable[[], Awaitable[tuple[Any, float | None]]]  # the JWKS document and its max-age, or TokenError


class KeySource(Protocol):
    """Where a trusted issuer's public keys come from."""

    async def key(self, kid: str) -> Any | None: ...


@attrs.frozen
class StaticKeys:
    """Keys read once (a JWKS file): `keys` maps each `kid` to its RSA public key."""

    keys: dict[str, Any] = attrs.field(eq=False, repr=False)

    async def key(self, kid: str) -> Any | None:
        return self.keys.get(kid)


def max_age(headers: list[tuple[bytes, bytes]]) -> float | None:
    """`Cache-Control: max-age` of an answer in seconds, or None (absent or malformed)."""
    for name, value in headers:
        if name.lower() != b"cache-control":
            continue
        for directive in value.decode("latin-1").split(","):
            field, _, number = directive.strip().partition("=")
            if field.lower() == "max-age" and number.strip().isdigit():
                return float(number.strip())
    return None


async def fetch_jwks(uri: str, settings: TokenClientSettings) -> tuple[Any, float | None]:
    """GET `uri`: its JSON document and `Cache-Control: max-age`; TokenError if it fails."""
    status, headers, payload = await https_exchange(uri, settings, headers=[("accept", "application/json")],
                                                    what="the JWKS endpoint", url_name="jwks_uri")
    if status != 200:
        raise TokenError(f"the JWKS endpoint {uri} answered {status}")
    try:
        return json.loads(payload), max_age(headers)
    except ValueError:
        raise TokenError(f"the JWKS endpoint {uri} did not answer JSON") from None


class RemoteJwks:
    """An identity provider's keys from its `jwks_uri`, cached and refreshed (module docstring).
    `parse` turns a JWKS document into {kid: key} (ValueError if it holds none); `fetch` is
    `fetch_jwks` unless a test gives its own."""

    def __init__(self, uri: str, settings: TokenClientSettings, parse: Callable[[Any], dict[str, Any]], *,
                 refresh_seconds: float = DEFAULT_REFRESH, fetch: Fetch | None = None) -> None:
        if refresh_seconds < MIN_FETCH_INTERVAL:
            raise ValueError(f"refresh_seconds must be at least {MIN_FETCH_INTERVAL:g}")
        self.uri = uri
        self.settings = settings
        self.parse = parse
        self.refresh_seconds = refresh_seconds
        self.fetch: Fetch = fetch if fetch is not None else (lambda: fetch_jwks(uri, settings))
        self.keys: dict[str, Any] = {}
        self.fetches = 0  # begun, successful or not
        self.completed = 0  # ended, successful or not
        self.failures = 0
        self.last_error: str | None = None  # why the last fetch failed (None: it succeeded)
        self._last_fetch = -math.inf  # when the last fetch began (trio's clock)
        self._next_refresh = -math.inf  # when `run` fetches next: at once at first
        self._lock = trio.Lock()
        self._fetched = trio.Event()  # set after each fetch, then replaced

    def __repr__(self) -> str:
        return f"RemoteJwks({self.uri!r})"

    async def key(self, kid: str) -> Any | None:
        """The key `kid` names: from the cache, else after a fetch if one may be made now; None if unknown."""
        found = self.keys.get(kid)
        if found is not None:
            return found
        async with self._lock:
            found = self.keys.get(kid)  # the fetch this caller waited for may have brought it
            if found is None and trio.current_time() >= self._last_fetch + MIN_FETCH_INTERVAL:
                log.info("trusted issuer keys %s: unknown kid %r, fetching the keys again", self.uri, kid[:64])
                await self._refresh()
                found = self.keys.get(kid)
        return found

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch the keys now and whenever they are due again, forever."""
        task_status.started()
        while True:
            await trio.sleep_until(self._next_refresh)
            async with self._lock:
                if trio.current_time() >= self._next_refresh:  # not refreshed meanwhile for an unknown kid
                    await self._refresh()

    async def wait_fetched(self, count: int) -> None:
        """Until at least `count` fetches have ended (tests)."""
        while self.completed < count:
            await self._fetched.wait()

    async def _refresh(self) -> None:
        self._last_fetch = trio.current_time()
        self.fetches += 1
        try:
            document, age = await self.fetch()
            keys = self.parse(document)
        except (TokenError, ValueError) as exc:
            self.failures += 1
            self.last_error = str(exc)
            metrics.TRUSTED_ISSUER_KEY_FETCHES.labels(self.uri, "failed").inc()
            log.error("trusted issuer keys %s could not be fetched (keeping the %d keys of the last fetch, trying "
                      "again in %g s): %s", self.uri, len(self.keys), MIN_FETCH_INTERVAL, exc)
            self._next_refresh = self._last_fetch + MIN_FETCH_INTERVAL
        else:
            metrics.TRUSTED_ISSUER_KEY_FETCHES.labels(self.uri, "ok").inc()
            self.last_error = None
            if set(keys) != set(self.keys):
                log.info("trusted issuer keys %s: now %s", self.uri, sorted(keys))
            self.keys = keys
            interval = self.refresh_seconds if age is None else min(max(age, MIN_FETCH_INTERVAL), self.refresh_seconds)
            self._next_refresh = self._last_fetch + interval
        finally:
            self.completed += 1
            self._fetched.set()
            self._fetched = trio.Event()
