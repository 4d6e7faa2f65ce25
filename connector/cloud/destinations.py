"""The destination service: named connection descriptions for cloud applications, SAP's API shapes.

Theory of operation. A destination is a flat set of string properties (Name, Type, URL,
ProxyType, Authentication, User, Password, CloudConnectorLocationId, and any extra properties,
kept as given). Each subaccount owns its own set; the bearer token of a request (header
`Authorization: Bearer <token>`) names the subaccount, and a subaccount never sees another's
destinations (another subaccount's destination is simply "not found").

Two rights, as SAP's "Destination Viewer" and "Destination Administrator" roles, held by two
kinds of token per subaccount (`Right`):

- USE: the subaccount's proxy tokens (`token_sha256`). They may only *find* a destination, which
  answers what a consumer needs to call it, secrets and ready-made auth tokens included.
- MANAGE: the subaccount's destination admin tokens (`destination_admin_sha256`). They create,
  read, update and delete, but every answer masks secret properties (Password, clientSecret...)
  as `MASK`: a leaked admin token changes destinations but reads no secret. A PUT may send
  MASK back to keep a stored secret, but only while the destination still points where it did
  (`SECRET_BINDING`): a stored password is never redirected to a new URL without being resent.

A valid token without the right gets 403; no valid token, 401.

Endpoints (as SAP's Destination Service REST API):

    GET    /destination-configuration/v1/subaccountDestinations          list           MANAGE
    POST   /destination-configuration/v1/subaccountDestinations          create         MANAGE
           (object or list; 409 if a name exists)
    PUT    /destination-configuration/v1/subaccountDestinations          update         MANAGE
           (404 if missing; a secret sent as MASK keeps its stored value if the target is unchanged)
    GET    /destination-configuration/v1/subaccountDestinations/{name}   read           MANAGE
    DELETE /destination-configuration/v1/subaccountDestinations/{name}   delete         MANAGE
    GET    /destination-configuration/v1/destinations/{name}             find           USE
           {owner: {SubaccountId, InstanceId}, destinationConfiguration: {...}, authTokens: [...],
            certificates: [...]}

`instanceDestinations` (instance level) take the same methods as `subaccountDestinations`;
`subaccountCertificates` and `instanceCertificates` take GET, POST and DELETE ({Name, Type,
Content}, Content base64). An instance is a binding's client id (the `instanceid` of the
destination binding). Find looks at the caller's instance first (a JWT's `client_id`; static
tokens have no instance), then at the subaccount. Instance-level management needs an admin
token and names the instance in `X-Instance-Id` (SAP takes it from the token: our admin tokens
belong to the subaccount, not to one instance).

Find, by Authentication (`connector.cloud.destination_auth` builds the token requests):
BasicAuthentication answers a Basic token; the OAuth2 types (ClientCredentials, Password,
JWTBearer and UserTokenExchange with the user's token from `X-user-token`) fetch a token from
the destination's `tokenServiceURL` through a `TokenCache`, unless `$skipTokenRetrieval=true`; a
failed retrieval is reported in `authTokens[].error` and the destination is still returned.
ClientCertificateAuthentication answers the certificate named by `KeyStoreLocation` (instance,
then subaccount) in `certificates`; PrincipalPropagation answers `authTokens: []` (the proxy
forwards the user's token to the Cloud Connector).

HEAD is GET without the body; other methods get 405 with an Allow header.

Bounds (`DestinationLimits`): a connection waits at most `idle_timeout` for a request to start,
which then has `request_timeout` to arrive whole, body included, and be answered (408 otherwise,
431 for a head over `max_header_bytes`); a body over
`max_body_bytes` is refused with 413 from its Content-Length, before it is read; JSON nested
deeper than `max_json_depth` is refused with 400 after a linear scan, before it is parsed (the
parser recurses); a destination over `max_destination_bytes` gets 413, and a subaccount holding
`max_destinations` gets 409 for more. Beyond `max_connections` at once, a connection gets 503 and
is closed, so memory stays under about max_connections x (max_body_bytes + max_header_bytes).

Storage (`connector.cloud.destination_store`): one encrypted file per destination, so a change
writes only what it changes. Changes are validated first and serialised by one lock; the memory
follows the disk, so a failed write or a bad request changes nothing.
"""

from __future__ import annotations

import base64
import enum
import itertools
import json
import logging
import re
import urllib.parse
from pathlib import Path
from typing import Any

import attrs
import h11
import trio

from connector.cloud import destination_auth
from connector.cloud.auth import Authenticator, parse_authorization
from connector.cloud.clients import ConnectionCounter, ConnectionLimits, address_key
from connector.cloud.destination_store import (
    SECRET_PROPERTIES,
    DestinationStore,
    EtcdDestinationStore,
    Owner,
    SharedStoreUnavailable,
    StoreError,
    load_or_create_key,
)
from connector.cloud.drain import Drain
from connector.cloud.jwtauth import JwtError, JwtValidator, looks_like_jwt
from connector.cloud.token_client import (
    TokenCache,
    TokenClientSettings,
    TokenError,
    TokenRequest,
    fetch_token,
)
from connector.http1 import next_event
from connector.httperrors import error_parts

__all__ = ["DestinationError", "DestinationLimits", "DestinationService", "DestinationSettings", "Right",
           "StoreError", "find_in", "json_depth", "validate_certificate", "validate_destination"]

log = logging.getLogger(__name__)

DEFAULT_DESTINATION_PORT = 20005
API_PREFIX = "/destination-configuration/v1"
COLLECTION = f"{API_PREFIX}/subaccountDestinations"
INSTANCE_COLLECTION = f"{API_PREFIX}/instanceDestinations"
CERTIFICATES = f"{API_PREFIX}/subaccountCertificates"
INSTANCE_CERTIFICATES = f"{API_PREFIX}/instanceCertificates"
FIND = f"{API_PREFIX}/destinations"
SKIP_TOKEN_RETRIEVAL = "$skipTokenRetrieval"
MASK = "********"  # stands for a stored secret in management answers (and in a PUT: "keep it")
# Where a secret goes: a PUT keeping a stored secret (MASK) must leave these as they are, or an
# admin could send the secret to a host of their choosing and have applications deliver it there.
SECRET_BINDING = ("Type", "URL", "Address", "ProxyType", "CloudConnectorLocationId", "User", "Authentication",
                  "tokenServiceURL", "tokenServiceUser", "clientId", "KeyStoreLocation")
STRING_PROPERTIES = ("Name", "Type", "URL", "Address", "ProxyType", "Authentication", "User",
                     "Password", "CloudConnectorLocationId", "Description", "tokenServiceURL", "tokenServiceUser",
                     "clientId", "KeyStoreLocation", "TrustStoreLocation", *sorted(SECRET_PROPERTIES))
TYPES = ("HTTP", "TCP", "LDAP", "RFC")  # LDAP and RFC are stored and found; the proxies do not read destinations
PROXY_TYPES = ("Internet", "OnPremise")
AUTHENTICATIONS = ("NoAuthentication", "BasicAuthentication", *destination_auth.TOKEN_AUTHENTICATIONS,
                   "ClientCertificateAuthentication", "PrincipalPropagation")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}")
_CERTIFICATE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
_INSTANCE = re.compile(r"[A-Za-z0-9._!-]{1,200}")
_ADDRESS = re.compile(r"[A-Za-z0-9._-]+:[0-9]{1,5}")
LINGER_SECONDS = 1.0  # reading what a client still sends after our last answer, so the close does not reset it
_CHUNK = 65536
# JSON nesting is counted on bytes: strings removed (an unterminated one runs to the end, so the
# scan stays linear), every other byte but brackets deleted, brackets turned into +1 / -1 steps.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_BRACKET_STEPS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")

REASONS = {200: b"OK", 201: b"Created", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
           404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict",
           413: b"Content Too Large", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
           503: b"Service Unavailable"}


# SAP's sentences where clients match them: the SAP Cloud SDK takes a 404 with this ErrorMessage
# for "not here" (and looks at the provider next); any other 404 fails the lookup
SAP_ERROR_MESSAGES = {"destination_not_found": "Configuration with the specified name was not found"}


def sap_error_parts(status: int, reason: str, message: str,
                    headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """`error_parts` with SAP's `ErrorMessage` beside our `error` and `message`."""
    status, parts, body = error_parts(status, reason, message, headers)
    document = {**json.loads(body), "ErrorMessage": SAP_ERROR_MESSAGES.get(reason, message)}
    payload = json.dumps(document).encode()
    return status, [(n, str(len(payload)).encode() if n == b"content-length" else v) for n, v in parts], payload


class Right(enum.Enum):
    """What a token may do with its subaccount's destinations."""

    USE = "use"  # find a destination, secrets included (the subaccount's proxy tokens)
    MANAGE = "manage"  # create, read, update, delete; secrets masked (destination admin tokens)


class DestinationError(Exception):
    """A request the service refuses: an HTTP status, a stable reason token and a sentence."""

    def __init__(self, status: int, reason: str, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers or []


@attrs.frozen
class DestinationLimits:
    """What one client may make the service hold; checked here, so configuration fails at load."""

    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 65536
    max_json_depth: int = 8
    max_destination_bytes: int = 16384
    max_destinations: int = 1000  # per subaccount
    max_connections: int = 256  # served at once; more are answered 503 and closed
    max_connections_per_client_address: int = 32  # the same per client address (IPv4, or IPv6 /64)
    request_timeout: float = 30.0  # from a request's first byte until its answer is sent
    idle_timeout: float = 120.0  # keep-alive connection waiting for its next request

    def __attrs_post_init__(self) -> None:
        for name in ("max_body_bytes", "max_header_bytes", "max_destination_bytes", "max_destinations",
                     "max_connections", "max_connections_per_client_address"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        # 2 = a list of destination objects; the ceiling keeps json.loads far from Python's recursion limit
        if not 2 <= self.max_json_depth <= 100:
            raise ValueError("max_json_depth must be between 2 and 100")
        if self.max_destination_bytes > self.max_body_bytes:
            raise ValueError("max_destination_bytes must not exceed max_body_bytes (such a destination could not be sent)")
        if self.request_timeout <= 0 or self.idle_timeout <= 0:
            raise ValueError("request_timeout and idle_timeout must be positive")


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in UTF-8 `body`, without parsing: linear, no recursion.

    Brackets inside strings do not count. For malformed JSON the answer may be too high, never
    lower than the nesting json.loads would reach before it stops.
    """
    steps = _JSON_STRING.sub(b"", body).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    return max(itertools.accumulate(memoryview(steps).cast("b"), initial=0))


def parse_json(body: bytes, max_depth: int) -> Any:
    """Parse a request body, refusing non-UTF-8 and nesting deeper than `max_depth` before parsing."""
    try:
        text = body.decode("utf-8")  # RFC 8259; also keeps json.loads from guessing UTF-16 under the byte scan
    except UnicodeDecodeError as exc:
        raise DestinationError(400, "bad_json", f"the request body is not UTF-8: {exc}") from exc
    depth = json_depth(body)
    if depth > max_depth:
        raise DestinationError(400, "json_too_deep", f"the JSON is nested {depth} levels deep; at most {max_depth} are accepted")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DestinationError(400, "bad_json", f"the request body is not valid JSON: {exc}") from exc


def masked(props: dict[str, Any]) -> dict[str, Any]:
    """A destination as management answers show it: every secret property replaced by MASK."""
    return {key: MASK if key in SECRET_PROPERTIES else value for key, value in props.items()}


def _masked_certificate(props: dict[str, Any]) -> dict[str, Any]:
    """A certificate as management answers show it: its Content (often a key store) masked."""
    return {**props, "Content": MASK}


def validate_destination(value: object) -> dict[str, Any]:
    """Check one destination; return a normalised copy (defaults filled in) or raise DestinationError."""

    def bad(message: str) -> DestinationError:
        return DestinationError(400, "invalid_destination", message)

    if not isinstance(value, dict):
        raise bad("a destination is a JSON object of properties")
    for key, item in value.items():
        if not key:
            raise bad("property names must not be empty")
        if not isinstance(item, (str, int, float, bool)) or item is None:
            raise bad(f"property {key!r} must be a string, number or boolean")
        if key in STRING_PROPERTIES and not isinstance(item, str):
            raise bad(f"property {key!r} must be a string")
    props: dict[str, Any] = dict(value)
    name = props.get("Name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad("Name is required: 1 to 200 letters, digits, '_' or '-'")
    props.setdefault("ProxyType", "Internet")
    props.setdefault("Authentication", "NoAuthentication")
    if props.get("Type") not in TYPES:
        raise bad(f"Type must be one of {', '.join(TYPES)}")
    if props["ProxyType"] not in PROXY_TYPES:
        raise bad(f"ProxyType must be one of {', '.join(PROXY_TYPES)}")
    if props["Authentication"] not in AUTHENTICATIONS:
        raise bad(f"Authentication must be one of {', '.join(AUTHENTICATIONS)}")
    authentication = props["Authentication"]
    if props["Type"] in ("HTTP", "LDAP"):
        schemes = ("http", "https") if props["Type"] == "HTTP" else ("ldap", "ldaps")
        url = props.get("URL")
        parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in schemes or not parsed.hostname:
            raise bad(f"an {props['Type']} destination needs a URL of the form {schemes[0]}(s)://host[:port][/path]")
        try:
            parsed.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise bad(f"URL port is invalid: {exc}") from exc
    elif props["Type"] == "TCP":
        address = props.get("Address")
        if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
            raise bad("a TCP destination needs an Address of the form host:port")
    if props["Type"] == "TCP" and authentication != "NoAuthentication":
        raise bad("a TCP destination supports only NoAuthentication")
    if props["Type"] in ("LDAP", "RFC") and authentication not in ("NoAuthentication", "BasicAuthentication"):
        raise bad(f"an {props['Type']} destination supports NoAuthentication and BasicAuthentication")
    if authentication == "BasicAuthentication":
        if not props.get("User") or not props.get("Password"):
            raise bad("BasicAuthentication needs User and Password")
        if ":" in props["User"]:
            raise bad("User must not contain ':' (it separates user and password in Basic)")
    lacking = destination_auth.problem(props)
    if lacking is not None:
        raise bad(lacking)
    return props


def validate_certificate(value: object) -> dict[str, Any]:
    """Check one certificate ({Name, Type, Content}, Content base64); a normalised copy or DestinationError."""

    def bad(message: str) -> DestinationError:
        return DestinationError(400, "invalid_certificate", message)

    if not isinstance(value, dict):
        raise bad("a certificate is a JSON object: {Name, Type, Content}")
    unknown = sorted(set(value) - {"Name", "Type", "Content"})
    if unknown:
        raise bad(f"unknown certificate properties: {', '.join(unknown)}")
    props = {"Type": "CERTIFICATE", **value}
    if not isinstance(props.get("Name"), str) or not _CERTIFICATE_NAME.fullmatch(props["Name"]):
        raise bad("Name is required: 1 to 200 letters, digits, '.', '_' or '-', not starting with '.'")
    if not isinstance(props["Type"], str) or not props["Type"]:
        raise bad("Type must be a non-empty string (CERTIFICATE)")
    content = props.get("Content")
    try:
        if not isinstance(content, str) or not content or not base64.b64decode(content, validate=True):
            raise ValueError("empty")
    except ValueError:
        raise bad("Content is required: the certificate or key store file, base64-encoded") from None
    return props


def find_in(store: Any, subaccount: str, instance: str | None, name: str,
            *, certificates: bool = False) -> tuple[dict[str, Any], str | None] | None:
    """The destination (or certificate) `name` as find sees it, and the instance that owns it
    (None: the subaccount): the caller's instance first, then the subaccount. None if neither has it."""
    if instance is not None:
        props = store.get(Owner(subaccount, instance, certificates), name)
        if props is not None:
            return props, instance
    props = store.get(Owner(subaccount, None, certificates), name)
    return None if props is None else (props, None)


@attrs.frozen
class DestinationSettings:
    """Where destinations live (`destination_store` derives the directory from `path`) and the bounds."""

    path: Path
    key_path: Path
    limits: DestinationLimits = DestinationLimits()
    tokens: TokenClientSettings = TokenClientSettings()  # how OAuth2 destinations' tokens are fetched


@attrs.frozen
class _Endpoint:
    right: Right
    methods: tuple[bytes, ...]
    name: str | None = None  # the destination (or certificate) the path names, if any
    instance: bool = False  # instance level: the instance is named by X-Instance-Id
    certificates: bool = False


# management collections: path -> (instance level, certificates, methods of the collection, of one item)
_COLLECTIONS = {
    COLLECTION: (False, False, (b"GET", b"HEAD", b"POST", b"PUT"), (b"GET", b"HEAD", b"DELETE")),
    INSTANCE_COLLECTION: (True, False, (b"GET", b"HEAD", b"POST", b"PUT"), (b"GET", b"HEAD", b"DELETE")),
    CERTIFICATES: (False, True, (b"GET", b"HEAD", b"POST"), (b"GET", b"HEAD", b"DELETE")),
    INSTANCE_CERTIFICATES: (True, True, (b"GET", b"HEAD", b"POST"), (b"GET", b"HEAD", b"DELETE")),
}


def resolve(path: str) -> _Endpoint:
    """Which endpoint a (percent-decoded) path names; DestinationError 404 if none."""
    for collection, (instance, certificates, methods, item_methods) in _COLLECTIONS.items():
        if path == collection:
            return _Endpoint(Right.MANAGE, methods, None, instance, certificates)
        if path.startswith(collection + "/"):
            return _Endpoint(Right.MANAGE, item_methods, path[len(collection) + 1:], instance, certificates)
    if path.startswith(FIND + "/"):
        return _Endpoint(Right.USE, (b"GET", b"HEAD"), path[len(FIND) + 1:])
    raise DestinationError(404, "not_found", f"no such endpoint: {path}")


@attrs.frozen
class _Call:
    """What one request says besides its path and body."""

    subaccount: str
    method: bytes
    endpoint: _Endpoint
    body: bytes
    caller_token: str | None = None  # the bearer token, for OAuth2UserTokenExchange
    instance: str | None = None  # the caller's instance (find) or the managed one (X-Instance-Id)
    user_token: str | None = None  # X-user-token
    skip_token_retrieval: bool = False


def _client_address(stream: trio.abc.Stream) -> str:
    """The peer's address key (as the proxies count failed authentications), or "?"."""
    sock = getattr(stream, "socket", None)
    try:
        return address_key(str(sock.getpeername()[0])) if sock is not None else "?"
    except OSError:
        return "?"


class DestinationService:
    """Serves the destination REST API over h11; the store loads at construction (fails early).

    `users` authenticates the tokens with Right.USE (the proxy tokens), `admins` those with
    Right.MANAGE; a subaccount without admin tokens has its destinations managed by nobody.
    """

    def __init__(self, users: Authenticator, admins: Authenticator, *, settings: DestinationSettings,
                 store: EtcdDestinationStore | None = None, drain: Drain | None = None,
                 jwt: JwtValidator | None = None) -> None:
        self.users = users
        self.jwt = jwt  # tells a binding's JWT's instance (its client_id); None: no instance-level find
        self.drain = drain if drain is not None else Drain()  # a replica's graceful shutdown
        self.admins = admins
        self.settings = settings
        self.limits = settings.limits
        self.store: DestinationStore | EtcdDestinationStore
        if store is not None:  # several replicas: the destinations live in the cloud's etcd
            self.store = store
        else:
            directory = Path(settings.path).parent
            if not directory.is_dir():  # else the key file's creation fails with a bare FileNotFoundError
                raise StoreError(f"destination store directory {directory} does not exist: create it, writable "
                                 "by the user the cloud side runs as")
            self.store = DestinationStore(Path(settings.path), load_or_create_key(Path(settings.key_path)))
            self.store.load()
        self._writes = trio.Lock()
        token_settings, token_context = settings.tokens, settings.tokens.ssl_context()  # the trust store, read once

        async def fetch(request: TokenRequest) -> dict[str, Any]:
            return await fetch_token(request, token_settings, token_context)

        self.tokens = TokenCache(fetch)
        self.connections = ConnectionCounter(ConnectionLimits(
            total=self.limits.max_connections, per_client_address=self.limits.max_connections_per_client_address))

    async def run(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_DESTINATION_PORT,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self.drain.serve(self._serve_drained, host, port, name="destination service", task_status=task_status)

    async def _serve_drained(self, stream: trio.SocketStream) -> None:
        with self.drain.connection():  # a draining replica waits for it
            await self.serve_connection(stream)

    # --- one connection ----------------------------------------------------------------------
    async def wait_connections(self, count: int) -> None:
        """Until exactly `count` connections are being served."""
        await self.connections.wait_total(count)

    async def serve_connection(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Answer the requests of one connection until it closes, idles or breaks a bound."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        address = _client_address(stream)
        refused = self.connections.admit(address)
        if refused is not None:
            try:  # bounded by LINGER_SECONDS, twice
                await self._send_final_error(stream, conn, 503, refused,
                                             f"the destination service serves {self.limits.max_connections} "
                                             f"connections at most, {self.limits.max_connections_per_client_address}"
                                             " of one client address; retry later")
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
            return
        first = True
        try:
            while True:
                if not conn.trailing_data[0]:  # nothing pipelined: wait for the next request to start
                    # a draining replica closes a kept-alive connection here (not a new one: its
                    # first request is on the way)
                    idle = trio.CancelScope() if first else self.drain.while_idle()
                    with idle, trio.move_on_after(self.limits.idle_timeout):
                        data = await stream.receive_some(_CHUNK)
                        conn.receive_data(bytes(data))
                    if not conn.trailing_data[0]:
                        return  # idle, or closed between requests
                first = False
                with trio.move_on_after(self.limits.request_timeout) as deadline:
                    await self._serve_request(stream, conn, address)
                if deadline.cancelled_caught:
                    await self._send_final_error(
                        stream, conn, 408, "request_timeout",
                        f"a request must arrive and be answered within {self.limits.request_timeout:g} s",
                    )
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    await self._linger(stream)
                    return
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            reason = "request_header_too_large" if status == 431 else "malformed_request"
            await self._send_final_error(stream, conn, status, reason, str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("destination service connection failed")
        finally:
            self.connections.release(address)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_request(self, stream: trio.abc.HalfCloseableStream, conn: h11.Connection, address: str) -> None:
        request = await next_event(conn, stream, _CHUNK)
        if isinstance(request, h11.ConnectionClosed):
            return
        assert isinstance(request, h11.Request), request  # h11 starts every cycle with a Request
        body = await self._read_body(stream, conn, request)
        if body is None:
            status, headers, payload = error_parts(
                413, "body_too_large", f"request bodies are limited to {self.limits.max_body_bytes} bytes"
            )
            headers.append((b"connection", b"close"))
        else:
            status, headers, payload = await self._respond(request, body, address)
            if self.drain.draining:  # the next request opens a connection to another replica
                headers.append((b"connection", b"close"))
        await self._send(stream, conn, h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b"")))
        if request.method != b"HEAD":  # HEAD: the same head, no body (h11 refuses one)
            await self._send(stream, conn, h11.Data(data=payload))
        await self._send(stream, conn, h11.EndOfMessage())

    async def _read_body(self, stream: trio.abc.HalfCloseableStream, conn: h11.Connection, request: h11.Request) -> bytes | None:
        """The whole body of `request`, or None if it is over the limit (then it is not read)."""
        limit = self.limits.max_body_bytes
        length = next((int(v) for n, v in request.headers if n == b"content-length"), 0)  # h11 checked it is a number
        if length > limit:
            return None
        body = bytearray()
        while True:
            event = await next_event(conn, stream, _CHUNK)
            if isinstance(event, h11.Data):
                if len(body) + len(event.data) > limit:  # chunked: no length announced
                    return None
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise h11.RemoteProtocolError("the connection closed inside a request body", error_status_hint=400)

    @staticmethod
    async def _send(stream: trio.abc.HalfCloseableStream, conn: h11.Connection, event: Any) -> None:
        data = conn.send(event)
        if data:
            await stream.send_all(data)

    async def _send_final_error(
        self, stream: trio.abc.HalfCloseableStream, conn: h11.Connection, status: int, reason: str, message: str
    ) -> None:
        """Answer an error and close, if no answer has started; bounded by LINGER_SECONDS."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status, headers, payload = error_parts(status, reason, message, [(b"connection", b"close")])
        with trio.move_on_after(LINGER_SECONDS):
            try:
                await self._send(stream, conn, h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b"")))
                await self._send(stream, conn, h11.Data(data=payload))
                await self._send(stream, conn, h11.EndOfMessage())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        await self._linger(stream)

    @staticmethod
    async def _linger(stream: trio.abc.HalfCloseableStream) -> None:
        """Half-close and read what the client still sends, so the close does not reset our answer."""
        try:
            with trio.move_on_after(LINGER_SECONDS):
                await stream.send_eof()
                for _ in range(64):
                    if not await stream.receive_some(_CHUNK):
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    # --- one request ---------------------------------------------------------------------------
    async def _respond(
        self, request: h11.Request, body: bytes, client_address: str
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        authorization = next((v for n, v in request.headers if n == b"authorization"), None)
        # Guessing tokens here is slowed as at the proxies, and counted with them: the cloud hands
        # this service the proxies' throttle.
        subaccounts = await self.users.throttle.check(client_address, lambda: {
            right: subaccount for right, subaccount in (
                (Right.USE, self.users.authenticate_header(authorization)),
                (Right.MANAGE, self.admins.authenticate_header(authorization)),
            ) if subaccount is not None
        } or None) or {}
        if not subaccounts:
            return error_parts(
                401, "unauthorized", "send Authorization: Bearer <token>",
                [(b"www-authenticate", b'Bearer realm="destination-service"')],
            )
        try:
            target, _, query = request.target.decode("ascii", "replace").partition("?")
            endpoint = resolve(urllib.parse.unquote(target))
            if request.method not in endpoint.methods:
                raise DestinationError(
                    405, "method_not_allowed", f"use {', '.join(m.decode() for m in endpoint.methods)} here",
                    [(b"allow", b", ".join(endpoint.methods))],
                )
            subaccount = subaccounts.get(endpoint.right)
            if subaccount is None:
                raise DestinationError(403, "forbidden", (
                    "finding a destination needs a proxy token of the subaccount" if endpoint.right is Right.USE
                    else "managing destinations needs a destination admin token of the subaccount"
                ))
            status, document = await self._route(self._call(subaccount, request, endpoint, body, query))
        except DestinationError as exc:
            return sap_error_parts(exc.status, exc.reason, exc.message, exc.headers)
        except SharedStoreUnavailable as exc:
            log.error("destination store unavailable: %s", exc)
            return error_parts(503, "store_unavailable", f"{exc}; nothing changed, try again")
        except OSError as exc:
            log.error("destination store write failed: %s", exc)
            return error_parts(500, "store_write_failed", "the destination store could not be written; nothing changed")
        payload = json.dumps(document).encode("utf-8")
        return status, [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())], payload

    def _call(self, subaccount: str, request: h11.Request, endpoint: _Endpoint, body: bytes, query: str) -> _Call:
        headers = {name: value.decode("latin-1") for name, value in request.headers
                   if name in (b"authorization", b"x-user-token", b"x-instance-id")}
        credentials = parse_authorization(headers.get(b"authorization"))
        caller_token = credentials.token if credentials is not None else None
        instance: str | None = None
        if endpoint.right is Right.USE:
            instance = self._instance_of(caller_token)
        elif endpoint.instance:
            instance = headers.get(b"x-instance-id", "").strip()
            if not _INSTANCE.fullmatch(instance):
                raise DestinationError(400, "instance_required", "instance-level management names the service "
                                       "instance (the binding's client id) in X-Instance-Id")
        try:
            params = urllib.parse.parse_qs(query, max_num_fields=16)
        except ValueError as exc:
            raise DestinationError(400, "bad_query", f"the query string is refused: {exc}") from None
        skip = params.get(SKIP_TOKEN_RETRIEVAL, ["false"])[-1].lower() == "true"
        return _Call(subaccount, request.method, endpoint, body, caller_token, instance,
                     headers.get(b"x-user-token", "").strip() or None, skip)

    def _instance_of(self, token: str | None) -> str | None:
        """The service instance a JWT of a binding names (its client_id); None for other tokens."""
        if self.jwt is None or token is None or not looks_like_jwt(token):
            return None
        try:
            return str(self.jwt.validate(token)["client_id"])
        except JwtError:
            return None  # authenticated otherwise (a static token that looks like a JWT)

    async def _route(self, call: _Call) -> tuple[int, Any]:
        endpoint, name, method = call.endpoint, call.endpoint.name, call.method
        if endpoint.right is Right.USE:
            assert name is not None
            return 200, await self._find(call, name)
        owner = Owner(call.subaccount, call.instance if endpoint.instance else None, endpoint.certificates)
        shown = _masked_certificate if endpoint.certificates else masked
        if name is not None:
            if method == b"DELETE":
                async with self._writes:
                    self._get(owner, name)
                    await self.store.remove(owner, name)
                return 200, {"Count": 1}
            return 200, shown(self._get(owner, name))
        if method == b"POST":
            parsed = parse_json(call.body, self.limits.max_json_depth)
            items = parsed if isinstance(parsed, list) else [parsed]
            check = validate_certificate if endpoint.certificates else validate_destination
            destinations = [self._check_size(check(item)) for item in items]
            names = [d["Name"] for d in destinations]
            if len(set(names)) != len(names):
                raise DestinationError(400, "invalid_destination", "the same Name appears twice in the request")
            if any(d.get(key) == MASK for d in destinations for key in (*SECRET_PROPERTIES, "Content")):
                raise DestinationError(400, "invalid_destination", f"{MASK!r} stands for a stored secret; send the secret")
            async with self._writes:
                for props in destinations:
                    if self.store.get(owner, props["Name"]) is not None:
                        raise DestinationError(409, "destination_exists", f"a destination named {props['Name']!r} exists")
                if self.store.count(owner) + len(destinations) > self.limits.max_destinations:
                    raise DestinationError(
                        409, "too_many_destinations",
                        f"a subaccount holds at most {self.limits.max_destinations} destinations; delete some first",
                    )
                await self.store.put(owner, destinations)
            answers = [shown(d) for d in destinations]
            return 201, answers if isinstance(parsed, list) else answers[0]
        if method == b"PUT":
            props = validate_destination(parse_json(call.body, self.limits.max_json_depth))
            async with self._writes:
                stored = self._get(owner, props["Name"])
                kept = [key for key in SECRET_PROPERTIES if props.get(key) == MASK]
                for key in kept:  # "keep the secret": a masked answer sent back edited
                    if key not in stored:
                        raise DestinationError(400, "invalid_destination", f"{key} is {MASK!r} but none is stored")
                    props[key] = stored[key]
                moved = [key for key in SECRET_BINDING if props.get(key) != stored.get(key)]
                if kept and moved:
                    raise DestinationError(
                        400, "secret_must_be_resent",
                        f"{', '.join(moved)} changed: send {', '.join(sorted(kept))} again rather than {MASK!r}",
                    )
                await self.store.put(owner, [self._check_size(props)])
            return 200, masked(props)
        return 200, [shown(props) for props in self.store.list(owner)]  # GET, HEAD

    async def _find(self, call: _Call, name: str) -> dict[str, Any]:
        """The find document: owner, configuration, authTokens and certificates as SAP's service answers."""
        found = find_in(self.store, call.subaccount, call.instance, name)
        if found is None:
            raise DestinationError(404, "destination_not_found", f"no destination named {name!r}")
        props, instance = found
        result: dict[str, Any] = {
            "owner": {"SubaccountId": call.subaccount, "InstanceId": instance},
            "destinationConfiguration": props,
        }
        certificates = []
        for location in ("KeyStoreLocation", "TrustStoreLocation"):
            certificate = props.get(location)
            held = find_in(self.store, call.subaccount, call.instance, certificate, certificates=True) \
                if isinstance(certificate, str) else None
            if held is not None:
                certificates.append(held[0])
        if certificates:
            result["certificates"] = certificates
        authentication = props.get("Authentication")
        if authentication == "BasicAuthentication":
            result["authTokens"] = [destination_auth.basic_entry(props)]
        elif authentication == "PrincipalPropagation":
            result["authTokens"] = []
        elif authentication in destination_auth.TOKEN_AUTHENTICATIONS and not call.skip_token_retrieval:
            user_token = call.user_token
            if user_token is None and authentication == "OAuth2UserTokenExchange":
                user_token = call.caller_token if call.caller_token and looks_like_jwt(call.caller_token) else None
            try:
                token = await self.tokens.get(destination_auth.token_request(props, user_token))
                result["authTokens"] = [destination_auth.bearer_entry(token)]
            except TokenError as exc:
                log.info("destination %r of %s: no token (%s)", name, call.subaccount, exc)
                result["authTokens"] = [destination_auth.error_entry(str(exc))]
        return result

    def _get(self, owner: Owner, name: str) -> dict[str, Any]:
        props = self.store.get(owner, name)
        if props is None:
            raise DestinationError(404, "destination_not_found", f"no destination named {name!r}")
        return props

    def _check_size(self, props: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(props).encode("utf-8"))
        if size > self.limits.max_destination_bytes:
            raise DestinationError(
                413, "destination_too_large",
                f"destination {props['Name']!r} is {size} bytes as JSON; at most {self.limits.max_destination_bytes} are stored",
            )
        return props
