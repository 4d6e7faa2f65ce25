"""The token service: OAuth2 access tokens (RS256 JWTs) for applications holding a binding.

Theory of operation. SAP's clients (the Cloud SDK, xssec, any OAuth2 library) fetch a token with
`POST {url}/oauth/token`, form-encoded, authenticating the client with HTTP Basic
(`clientid:clientsecret`) or with `client_id` / `client_secret` form fields (RFC 6749 2.3.1; not
both). Grants:

- `client_credentials`: a token for the binding itself.

A request may name the zone (tenant) it wants a token for in `x-zid`, as xssec does with a
user's token at hand: a binding's tokens are of its subaccount, so another zone is 401
`invalid_client`, as XSUAA answers a client that has no tenant there.
- `password`: `username` and `password` of a user configured for the binding's subaccount
  (`UserAccount`, password kept as a scrypt hash); the token carries the user (`user_name`,
  `user_id`, `email`, `origin`, `sub`). A wrong password or an unknown user is 400
  `invalid_grant` (the same answer and work for both), counted by the failure throttle.
- `urn:ietf:params:oauth:grant-type:jwt-bearer` (RFC 7523): `assertion` is a *user* token of a
  trusted issuer, still valid: this service (tokens of the password grant or of an earlier
  exchange, of the binding's subaccount), or an identity provider the binding's subaccount
  trusts (`TrustedIssuer`: its issuer and keys configured). The answer is a token for the
  requesting binding that carries the user's claims (an identity provider's `email` or `sub`
  stands in for a missing `user_name`). A client token as assertion, or a token of an issuer
  not trusted, is 400 `invalid_grant`.

A token is a JWT signed with the key ring's current key (`connector.cloud.jwks`), with `kid`
and `jku` in its header and the claims XSUAA writes that applications read: `iss`
(`{url}/oauth/token`), `zid` and `ext_attr.subaccountid` (the subaccount), `client_id` /
`cid` / `azp`, `scope`, `aud`, `iat`, `exp`, `jti`, `grant_type`. The answer is
`{access_token, token_type: "bearer", expires_in, scope, jti}`; errors are RFC 6749's
`{error, error_description}` (401 `invalid_client` with `WWW-Authenticate: Basic`).
`GET /token_keys` serves the JWKS (current and overlapping keys); `GET
/.well-known/openid-configuration` names the endpoints.

Served over TLS only (the cloud CA's certificate). Bounds: at most `max_connections` at once
(one more is closed before its TLS handshake); the handshake, and each request until its answer
is decided, within `request_timeout` (408 if it had not arrived whole, 503 if it had but still
waits, e.g. for a secret check); an answer is sent within `request_timeout` again, so a deadline
never cuts one short, and an unexpected failure is answered 500. A keep-alive connection idles at
most `idle_timeout`; bodies over `max_body_bytes` get 413 unread; secrets are checked by scrypt
in worker threads, at most `HASH_THREADS` at once, with a dummy check for unknown client ids so
timing does not tell which exist. Failed client authentications count in the proxies'
`AuthThrottle` per client address and are answered after its delay (a refusal decided, so the
request deadline does not cut the wait); every refusal is written to the cloud's audit log
(`proxy = "oauth"`).

The ring is the `KeyKeeper`'s: this replica's file (`jwks.LocalKeys`), or with several replicas
the cloud's etcd (`connector.cloud.oauth_shared`), where the bindings live too; until a shared ring
was read the service answers 503 and signs nothing. The client side (fetching tokens for
destinations, cached) is `connector.cloud.token_client`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import h11
import jwt
import trio

from connector import metrics
from connector.cloud.audit import CloudAudit
from connector.cloud.bindings import (
    AUDIENCES,
    SCOPES,
    Binding,
    BindingReader,
    UserAccount,
    check_secret,
    hash_secret,
)
from connector.cloud.clients import AuthThrottle, address_key
from connector.cloud.jwks import (
    ALGORITHM,
    KeyKeeper,
    KeyRing,
    KeyStore,
    LocalKeys,
    due_change,
    rotation,
)
from connector.cloud.jwtauth import JwtError, JwtValidator, TrustedIssuer, unverified_issuer
from connector.http1 import next_event
from connector.httperrors import error_parts
from connector.listen import serve_tcp
from ha.store import StoreUnavailable

log = logging.getLogger(__name__)

WallClock = Callable[[], float]  # Unix seconds: token claims are compared with other parties' clocks
wall_clock: WallClock = time.time

DEFAULT_OAUTH_PORT = 20007
TOKEN_PATH = "/oauth/token"
KEYS_PATH = "/token_keys"
DISCOVERY_PATH = "/.well-known/openid-configuration"
ZONE_HEADER = b"x-zid"  # xssec names the tenant (a user's zone) it wants a token for
GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRANT_PASSWORD = "password"
USER_CLAIMS = ("sub", "user_name", "user_id", "origin", "email")  # copied from a user into its tokens
KEYS_RETRY = 0.5  # seconds between attempts to make the first ring while its store is unreachable
HASH_THREADS = 2  # scrypt checks at once: each holds 16 MiB and a core for about 50 ms
_CHUNK = 16384
REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found", 405: b"Method Not Allowed",
           408: b"Request Timeout", 413: b"Content Too Large", 431: b"Request Header Fields Too Large",
           500: b"Internal Server Error", 503: b"Service Unavailable"}


@attrs.frozen
class OAuthSettings:
    """The token service's public URL, token lifetime, key rotation and bounds ([oauth])."""

    url: str  # public base URL: tokens at {url}/oauth/token, `iss` = {url}/oauth/token
    token_lifetime: float = 3600.0
    rotate_after: float = 30 * 86400.0  # a signing key signs this long, then a new one takes over
    key_overlap: float = 7200.0  # a replaced key is trusted this much longer (>= token_lifetime)
    max_body_bytes: int = 8192
    max_header_bytes: int = 16384
    max_connections: int = 256
    request_timeout: float = 10.0
    idle_timeout: float = 60.0

    def __attrs_post_init__(self) -> None:
        if not self.url.startswith("https://"):
            raise ValueError("url must start with https:// (the token service is served over TLS only)")
        if min(self.token_lifetime, self.rotate_after, self.key_overlap, self.request_timeout, self.idle_timeout) <= 0:
            raise ValueError("token_lifetime, rotate_after, key_overlap and the timeouts must be positive")
        if self.key_overlap < self.token_lifetime:
            raise ValueError("key_overlap must be at least token_lifetime, or a token could outlive the key "
                             "that signed it")
        if min(self.max_body_bytes, self.max_header_bytes, self.max_connections) < 1:
            raise ValueError("max_body_bytes, max_header_bytes and max_connections must be at least 1")

    @property
    def issuer(self) -> str:
        return self.url.rstrip("/") + TOKEN_PATH


@attrs.frozen
class _Answer:
    """A response decided for one request, sent by `TokenService._answer`."""

    status: int
    headers: list[tuple[bytes, bytes]]
    payload: bytes
    close: bool = False  # and close the connection after it
    head_only: bool = False  # a HEAD request: no body
    delay: float = 0.0  # seconds to wait before sending it (the failure throttle's)


class OAuthError(Exception):
    """A refused token request: status, RFC 6749 error code, description, the audit reason, and
    how long the answer waits (a failed authentication's throttle delay)."""

    def __init__(self, status: int, error: str, description: str, *, subaccount: str | None = None,
                 delay: float = 0.0) -> None:
        super().__init__(description)
        self.status, self.error, self.description, self.subaccount = status, error, description, subaccount
        self.delay = delay


def issue_token(ring: KeyRing, settings: OAuthSettings, binding: Binding, grant: str, now: float,
                user: dict[str, Any] | None = None) -> dict[str, Any]:
    """The token response for `binding` (pure but for the random `jti`): signed with the ring's
    current key, claims as the module docstring lists them; `user` adds a user's claims."""
    jti = secrets.token_hex(16)
    lifetime = int(settings.token_lifetime)
    claims: dict[str, Any] = {
        "jti": jti, "iss": settings.issuer, "zid": binding.subaccount, "aud": list(AUDIENCES),
        "client_id": binding.client_id, "cid": binding.client_id, "azp": binding.client_id,
        "sub": binding.client_id, "scope": list(SCOPES), "grant_type": grant,
        "iat": int(now), "exp": int(now) + lifetime,
        "ext_attr": {"enhancer": "XSUAA", "subaccountid": binding.subaccount, "zdn": binding.subaccount},
    }
    if user is not None:
        claims.update({key: user[key] for key in USER_CLAIMS if key in user})
    key = ring.current
    token = jwt.encode(claims, key.private_key, algorithm=ALGORITHM,
                       headers={"kid": key.kid, "jku": settings.url.rstrip("/") + KEYS_PATH})
    return {"access_token": token, "token_type": "bearer", "expires_in": lifetime - 1,
            "scope": " ".join(SCOPES), "jti": jti}


def _form(body: bytes) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body),
                                       max_num_fields=32)
    except (UnicodeDecodeError, ValueError) as exc:
        raise OAuthError(400, "invalid_request", f"the body is not form-encoded: {exc}") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:  # RFC 6749 3.1: parameters must not repeat
            raise OAuthError(400, "invalid_request", f"parameter {name!r} appears twice")
        form[name] = value
    return form


def client_credentials_of(authorization: bytes | None, form: dict[str, str]) -> tuple[str, str]:
    """(client id, secret) from HTTP Basic (form-urlencoded parts, RFC 6749 2.3.1) or the form."""
    in_form = "client_id" in form or "client_secret" in form
    if authorization is not None:
        if in_form and "client_secret" in form:
            raise OAuthError(400, "invalid_request", "authenticate with Basic or with form fields, not both")
        scheme, _, value = authorization.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise OAuthError(401, "invalid_client", "the Basic credentials are not base64 UTF-8") from None
            if sep:
                return urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)
        raise OAuthError(401, "invalid_client", "send Authorization: Basic base64(clientid:clientsecret)")
    if form.get("client_id") and form.get("client_secret"):
        return form["client_id"], form["client_secret"]
    raise OAuthError(401, "invalid_client", "client authentication is required (Basic, or client_id and "
                     "client_secret form fields)")


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ server context with the cloud CA's certificate; no client certificate asked."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class TokenService:
    """`POST /oauth/token`, `GET /token_keys` over TLS (see the module docstring)."""

    def __init__(
        self,
        settings: OAuthSettings,
        *,
        bindings: BindingReader,
        ssl_context: ssl.SSLContext,
        keys: KeyStore | None = None,
        keyring: KeyKeeper | None = None,
        audit: CloudAudit | None = None,
        throttle: AuthThrottle | None = None,
        users: Mapping[tuple[str, str], UserAccount] | None = None,
        trusted_issuers: Mapping[tuple[str, str], TrustedIssuer] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`keys`: this replica's own ring store (read, or created, now); `keyring`: a ring kept
        elsewhere (the cloud's etcd, `connector.cloud.oauth_shared`). Exactly one of them."""
        if keyring is None:
            if keys is None:
                raise ValueError("give the token service keys (its own ring) or keyring (a shared one)")
            keyring = LocalKeys(keys, clock())
        elif keys is not None:
            raise ValueError("give the token service keys (its own ring) or keyring (a shared one), not both")
        self.settings = settings
        self.bindings = bindings
        self.users = dict(users or {})  # (subaccount, user_name) -> the user
        self.trusted_issuers = dict(trusted_issuers or {})  # (subaccount, issuer) -> its keys
        self.ssl_context = ssl_context
        self.audit = audit if audit is not None else CloudAudit()
        self.throttle = throttle if throttle is not None else AuthThrottle()
        self.clock = clock
        self.keyring: KeyKeeper = keyring
        self.validator = JwtValidator(lambda: self.keyring.ring, issuer=settings.issuer, audiences=AUDIENCES,
                                      bindings=bindings, clock=lambda: self.clock())
        self._hashing = trio.CapacityLimiter(HASH_THREADS)
        self._connections = 0
        self._connections_changed = trio.Event()

    # --- keys ----------------------------------------------------------------------------------
    @property
    def ring(self) -> KeyRing | None:
        """The ring in use (None: the shared ring was not read yet)."""
        return self.keyring.ring

    def _signing_ring(self) -> KeyRing:
        ring = self.keyring.ring
        if ring is None:
            raise OAuthError(503, "temporarily_unavailable", "the signing keys were not read yet; try again")
        return ring

    async def maintain_keys(self) -> str | None:
        """Prune and rotate the signing keys as due now; the sentence of what changed, or None.
        The ring is stored before it is used, so a restart never loses a key that signed; with
        several replicas exactly one of them makes a change that falls due (compare-and-set)."""
        said = await self.keyring.update(due_change(self.clock(), rotate_after=self.settings.rotate_after,
                                                    overlap=self.settings.key_overlap))
        if said is not None:
            log.info("token signing keys: %s", said)
        return said

    async def rotate_keys(self, overlap: float | None = None) -> str | None:
        """Rotate now: an operator's request, or a suspected key leak (then with a short `overlap`,
        or 0 to refuse the old key's tokens at once). Default overlap: `key_overlap`."""
        said = await self.keyring.update(rotation(self.clock(), self.settings.key_overlap if overlap is None
                                                  else overlap))
        log.info("token signing keys: %s", said)
        return said

    async def _maintain_keys_forever(self) -> None:
        interval = min(60.0, self.settings.key_overlap / 10)
        failing = False
        while True:
            try:
                await self.maintain_keys()
                failing = False
            except (OSError, StoreUnavailable) as exc:  # the old ring stays in use; retried next turn
                if not failing:
                    log.error("token signing keys could not be saved: %s", exc)
                failing = True
            # no ring yet (the cloud's etcd unreachable at start): try again soon, nothing is signed meanwhile
            await trio.sleep(interval if self.keyring.ring is not None else min(interval, KEYS_RETRY))

    # --- serving -------------------------------------------------------------------------------
    async def run(self, host: str = "127.0.0.1", port: int = DEFAULT_OAUTH_PORT, *,
                  task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._maintain_keys_forever)
            bound = await nursery.start(self._listen, host, port)
            task_status.started(bound)

    async def _listen(self, host: str, port: int, *, task_status: trio.TaskStatus[int]) -> None:
        await serve_tcp(self.serve_connection, host, port, name="token service", task_status=task_status)

    async def wait_connections(self, count: int) -> None:
        """Until exactly `count` connections are being served."""
        while self._connections != count:
            await self._connections_changed.wait()

    def _count_connection(self, delta: int) -> None:
        self._connections += delta
        self._connections_changed.set()
        self._connections_changed = trio.Event()

    async def serve_connection(self, sock: trio.SocketStream) -> None:
        client = _peer(sock)
        if self._connections >= self.settings.max_connections:  # before TLS: a handshake costs memory too
            log.debug("token service: %d connections at once, closing one from %s", self._connections, client)
            await trio.aclose_forcefully(sock)
            return
        stream = trio.SSLStream(sock, self.ssl_context, server_side=True, https_compatible=True)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes)
        self._count_connection(+1)
        try:
            with trio.move_on_after(self.settings.request_timeout) as handshake:
                await stream.do_handshake()
            if handshake.cancelled_caught:
                return
            while True:
                if not conn.trailing_data[0]:
                    with trio.move_on_after(self.settings.idle_timeout):
                        conn.receive_data(bytes(await stream.receive_some(_CHUNK)))
                    if not conn.trailing_data[0]:
                        return
                # The deadline covers reading and deciding; the answer is sent after it with a
                # deadline of its own, so a deadline never cuts an answer h11 counts as sent.
                with trio.move_on_after(self.settings.request_timeout) as deadline:
                    answer = await self._serve_request(stream, conn, client)
                if deadline.cancelled_caught:
                    answer = self._late_answer(conn, client)
                if answer is None:
                    return
                await trio.sleep(answer.delay)  # decided already: the request deadline does not cut it
                await self._answer(stream, conn, answer)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self._answer_if_possible(stream, conn, _Answer(
                *_error(exc.error_status_hint, "invalid_request", str(exc)), close=True))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # one connection's failure must not end the service
            log.exception("token service connection failed")
            await self._answer_if_possible(stream, conn, _Answer(
                *_error(500, "server_error", "the token service failed; its log says why"), close=True))
        finally:
            self._count_connection(-1)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await trio.aclose_forcefully(stream)

    async def _serve_request(self, stream: trio.SSLStream[trio.SocketStream], conn: h11.Connection,
                             client: str) -> _Answer | None:
        """Read one request and decide its answer; None if the client closed instead."""
        request = await next_event(conn, stream, _CHUNK)
        if not isinstance(request, h11.Request):
            return None
        path = request.target.decode("ascii", "replace").partition("?")[0]
        head_only = request.method == b"HEAD"
        started = trio.current_time()
        try:
            if path == TOKEN_PATH:
                if request.method != b"POST":
                    raise OAuthError(405, "invalid_request", "use POST")
                body = await self._read_body(stream, conn, request)
                authorization = next((v for n, v in request.headers if n == b"authorization"), None)
                zone = next((v.decode("latin-1") for n, v in request.headers if n == ZONE_HEADER), None)
                document = await self._token(authorization, _form(body), client, zone)
            elif path in (KEYS_PATH, DISCOVERY_PATH) and request.method in (b"GET", b"HEAD"):
                await self._read_body(stream, conn, request)
                document = self._signing_ring().jwks(self.clock()) if path == KEYS_PATH else self._discovery()
            else:
                raise OAuthError(404, "not_found", f"no such endpoint: {path}")
        except OAuthError as exc:
            self.audit.refusal(proxy="oauth", client=client, reason=exc.error, status=exc.status,
                               subaccount=exc.subaccount, method=request.method.decode("ascii", "replace"),
                               path=path, duration_seconds=trio.current_time() - started)
            return _Answer(*_error(exc.status, exc.error, exc.description), close=exc.status in (413, 405),
                           head_only=head_only, delay=exc.delay)
        payload = json.dumps(document).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
        return _Answer(200, headers, payload, head_only=head_only)

    def _late_answer(self, conn: h11.Connection, client: str) -> _Answer:
        """The answer when `request_timeout` passed: 408 while the request was still arriving,
        503 once it had arrived (the service was too busy: secret checks queue for their threads)."""
        if conn.their_state is h11.DONE:
            log.warning("token service: a request from %s was not answered within %.1f s (busy)", client,
                        self.settings.request_timeout)
            return _Answer(*_error(503, "temporarily_unavailable", "the token service is busy, try again"),
                           close=True)
        return _Answer(*_error(408, "invalid_request", "the request took too long"), close=True)

    async def _read_body(self, stream: trio.SSLStream[trio.SocketStream], conn: h11.Connection,
                         request: h11.Request) -> bytes:
        limit = self.settings.max_body_bytes
        length = next((int(v) for n, v in request.headers if n == b"content-length"), 0)
        if length > limit:
            raise OAuthError(413, "invalid_request", f"request bodies are limited to {limit} bytes")
        body = bytearray()
        while True:
            event = await next_event(conn, stream, _CHUNK)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise OAuthError(413, "invalid_request", f"request bodies are limited to {limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise h11.RemoteProtocolError("the connection closed inside a request body", error_status_hint=400)

    async def _answer(self, stream: trio.SSLStream[trio.SocketStream], conn: h11.Connection,
                      answer: _Answer) -> None:
        """Send `answer` within `request_timeout`, unless a response was already begun."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [*answer.headers, (b"connection", b"close")] if answer.close else answer.headers
        out = conn.send(h11.Response(status_code=answer.status, headers=headers,
                                     reason=REASONS.get(answer.status, b"")))
        if not answer.head_only:
            out += conn.send(h11.Data(data=answer.payload))
        out += conn.send(h11.EndOfMessage())
        with trio.move_on_after(self.settings.request_timeout):
            await stream.send_all(out)

    async def _answer_if_possible(self, stream: trio.SSLStream[trio.SocketStream], conn: h11.Connection,
                                  answer: _Answer) -> None:
        """`_answer` on a connection that is failing: a stream already broken is let go quietly."""
        try:
            await self._answer(stream, conn, answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass

    # --- one token request ---------------------------------------------------------------------
    async def _token(self, authorization: bytes | None, form: dict[str, str], client: str,
                     zone: str | None = None) -> dict[str, Any]:
        grant = form.get("grant_type", "")
        client_id, secret = client_credentials_of(authorization, form)
        binding = await self._authenticate_client(client_id, secret, client)
        if zone is not None and zone != binding.subaccount:  # XSUAA: this client has no tenant in that zone
            raise OAuthError(401, "invalid_client", f"the binding belongs to subaccount {binding.subaccount!r}, "
                             f"not to the zone {zone!r} the request names (x-zid)", subaccount=binding.subaccount)
        now = self.clock()
        if grant == GRANT_CLIENT_CREDENTIALS:
            document = issue_token(self._signing_ring(), self.settings, binding, grant, now)
        elif grant == GRANT_PASSWORD:
            account = await self._authenticate_user(binding, form, client)
            document = issue_token(self._signing_ring(), self.settings, binding, grant, now, user=account.claims())
        elif grant == GRANT_JWT_BEARER:
            document = issue_token(self._signing_ring(), self.settings, binding, grant, now,
                                   user=await self._assertion_user(binding, form.get("assertion", ""), now))
        else:
            raise OAuthError(400, "unsupported_grant_type", f"grant_type {grant!r} is not supported",
                             subaccount=binding.subaccount)
        log.info("token issued: %s for %s (subaccount %s)", grant, binding.client_id, binding.subaccount)
        return document

    async def _assertion_user(self, binding: Binding, assertion: str, now: float) -> dict[str, Any]:
        """The user claims of a jwt-bearer assertion: a user token of ours (same subaccount) or of
        an issuer the binding's subaccount trusts; OAuthError invalid_grant otherwise."""
        issuer = unverified_issuer(assertion)
        trusted = self.trusted_issuers.get((binding.subaccount, issuer or "")) if issuer != self.settings.issuer else None
        try:
            if trusted is not None:
                claims = await trusted.validate(assertion, now)
            elif issuer is None or issuer == self.settings.issuer:
                claims = self.validator.validate(assertion)
            else:
                raise JwtError("untrusted_issuer", f"subaccount {binding.subaccount!r} does not trust {issuer!r}")
        except JwtError as exc:
            raise OAuthError(400, "invalid_grant", f"the assertion was refused ({exc.reason}): {exc}",
                             subaccount=binding.subaccount) from None
        if trusted is not None:  # an identity provider's names for the user, as XSUAA maps them
            subject = claims.get("sub")
            user = {"sub": subject, "user_name": claims.get("user_name") or claims.get("email") or subject,
                    "user_id": claims.get("user_id") or claims.get("user_uuid") or subject,
                    "origin": claims.get("origin") or trusted.issuer, "email": claims.get("email")}
            if not isinstance(user["user_name"], str) or not user["user_name"]:
                raise OAuthError(400, "invalid_grant", "the assertion names no user (user_name, email or sub)",
                                 subaccount=binding.subaccount)
            return {key: value for key, value in user.items() if isinstance(value, str) and value}
        if claims["zid"] != binding.subaccount:
            raise OAuthError(400, "invalid_grant", "the assertion belongs to another subaccount",
                             subaccount=binding.subaccount)
        if not isinstance(claims.get("user_name"), str):
            raise OAuthError(400, "invalid_grant", "the assertion is not a user's token (no user_name)",
                             subaccount=binding.subaccount)
        return claims

    async def _authenticate_user(self, binding: Binding, form: dict[str, str], client: str) -> UserAccount:
        """The user named by `username` / `password` in the binding's subaccount, or invalid_grant."""
        user = self.users.get((binding.subaccount, form.get("username", "")))
        stored = user.password_hash if user is not None else _unknown_client_hash()
        ok = await trio.to_thread.run_sync(check_secret, form.get("password", ""), stored, limiter=self._hashing)
        if user is not None and ok:
            return user
        raise OAuthError(400, "invalid_grant", "bad user credentials", subaccount=binding.subaccount,
                         delay=self._failed(client))

    def _failed(self, client: str) -> float:
        """Count a failed authentication of `client`; the seconds its answer waits (the throttle's)."""
        metrics.PROXY_AUTH_FAILURES.inc()
        delay = self.throttle.failed(client)
        if delay > 0:
            metrics.PROXY_AUTH_DELAYED.inc()
        return delay

    async def _authenticate_client(self, client_id: str, secret: str, client: str) -> Binding:
        try:
            binding = self.bindings.get(client_id)
        except OSError as exc:
            log.error("binding store unreadable: %s", exc)
            raise OAuthError(500, "server_error", "the binding store cannot be read") from None
        stored = binding.secret_hash if binding is not None else _unknown_client_hash()
        ok = await trio.to_thread.run_sync(check_secret, secret, stored, limiter=self._hashing)
        if binding is not None and ok and binding.active:
            return binding
        revoked = binding is not None and ok and not binding.active
        raise OAuthError(401, "invalid_client", "this binding is revoked" if revoked else "bad client credentials",
                         subaccount=binding.subaccount if revoked and binding is not None else None,
                         delay=self._failed(client))

    def _discovery(self) -> dict[str, Any]:
        base = self.settings.url.rstrip("/")
        return {"issuer": self.settings.issuer, "token_endpoint": base + TOKEN_PATH, "jwks_uri": base + KEYS_PATH,
                "grant_types_supported": [GRANT_CLIENT_CREDENTIALS, GRANT_PASSWORD, GRANT_JWT_BEARER],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                "id_token_signing_alg_values_supported": [ALGORITHM]}


@functools.cache
def _unknown_client_hash() -> str:
    """What a secret is checked against when the client id is unknown: the same work as a real check."""
    return hash_secret("no such client")


def _error(status: int, error: str, description: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    _, headers, _ = error_parts(status, error)
    payload = json.dumps({"error": error, "error_description": description}).encode("utf-8")
    headers = [(n, str(len(payload)).encode() if n == b"content-length" else v) for n, v in headers]
    if error == "invalid_client":
        headers.append((b"www-authenticate", b'Basic realm="oauth"'))
    return status, headers, payload


def _peer(sock: trio.SocketStream) -> str:
    """The client's address key (as the proxies count and audit clients), or "?"."""
    try:
        return address_key(str(sock.socket.getpeername()[0]))
    except OSError:
        return "?"


