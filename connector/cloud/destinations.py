"""The destination service: named connection descriptions for cloud applications, SAP's API shapes.

Theory of operation. A destination is a flat set of string properties (Name, Type, URL,
ProxyType, Authentication, User, Password, CloudConnectorLocationId, and any extra properties,
kept as given). Each subaccount owns its own set; the bearer token of a request (`Authenticator`,
header `Authorization: Bearer <token>`) names the subaccount, and a subaccount never sees another's
destinations (another subaccount's destination is simply "not found").

Endpoints (as SAP's Destination Service REST API):

    GET    /destination-configuration/v1/subaccountDestinations          list
    POST   /destination-configuration/v1/subaccountDestinations          create (object or list; 409 if a name exists)
    PUT    /destination-configuration/v1/subaccountDestinations          update (404 if missing)
    GET    /destination-configuration/v1/subaccountDestinations/{name}   read
    DELETE /destination-configuration/v1/subaccountDestinations/{name}   delete
    GET    /destination-configuration/v1/destinations/{name}             "find destination":
           {owner: {SubaccountId, InstanceId}, destinationConfiguration: {...}, authTokens: [...]}

Storage is one JSON file. Secret properties (Password and the like) are encrypted at rest with
Fernet under a key kept in its own file, created 0600 when missing and refused when group or
others can read it. Every change is validated first, then the whole new state is written to a
temporary file (0600, fsync) and renamed over the old one, and only then becomes visible: a
failed write or a bad request changes nothing.
"""

from __future__ import annotations

import base64
import builtins
import copy
import json
import logging
import os
import re
import stat
import urllib.parse
from pathlib import Path
from typing import Any

import attrs
import h11
import trio
from cryptography.fernet import Fernet, InvalidToken

from connector.cloud.auth import Authenticator
from connector.httperrors import error_parts
from connector.listen import serve_tcp

log = logging.getLogger(__name__)

DEFAULT_DESTINATION_PORT = 20005
API_PREFIX = "/destination-configuration/v1"
SECRET_PROPERTIES = frozenset({"Password", "clientSecret", "tokenServicePassword", "KeyStorePassword"})
STRING_PROPERTIES = ("Name", "Type", "URL", "Address", "ProxyType", "Authentication", "User",
                     "Password", "CloudConnectorLocationId", "Description")
TYPES = ("HTTP", "TCP")
PROXY_TYPES = ("Internet", "OnPremise")
AUTHENTICATIONS = ("NoAuthentication", "BasicAuthentication")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}")
_ADDRESS = re.compile(r"[A-Za-z0-9._-]+:[0-9]{1,5}")
FILE_FORMAT = 1

REASONS = {200: b"OK", 201: b"Created", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
           405: b"Method Not Allowed", 409: b"Conflict", 413: b"Content Too Large",
           500: b"Internal Server Error"}


class StoreError(Exception):
    """The store or its key cannot be used (unreadable, corrupt, wrong key, unsafe permissions)."""


class DestinationError(Exception):
    """A request the service refuses: an HTTP status, a stable reason token and a sentence."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


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
    if props["Type"] == "HTTP":
        url = props.get("URL")
        parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise bad("an HTTP destination needs a URL of the form http(s)://host[:port][/path]")
        try:
            parsed.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise bad(f"URL port is invalid: {exc}") from exc
    else:
        address = props.get("Address")
        if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
            raise bad("a TCP destination needs an Address of the form host:port")
        if props["Authentication"] != "NoAuthentication":
            raise bad("a TCP destination supports only NoAuthentication")
    if props["Authentication"] == "BasicAuthentication":
        if not props.get("User") or not props.get("Password"):
            raise bad("BasicAuthentication needs User and Password")
        if ":" in props["User"]:
            raise bad("User must not contain ':' (it separates user and password in Basic)")
    return props


def load_or_create_key(path: Path) -> Fernet:
    """Open the Fernet key file, creating it 0600 when missing; refuse one others can read."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StoreError(f"key file {path} is accessible by group or others; chmod 600 it") from None
        try:
            return Fernet(path.read_bytes().strip())
        except (ValueError, OSError) as exc:
            raise StoreError(f"key file {path} does not hold a valid Fernet key: {exc}") from exc
    key = Fernet.generate_key()
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created destination store key %s", path)
    return Fernet(key)


class DestinationStore:
    """Destinations per subaccount in memory, persisted to one JSON file with encrypted secrets."""

    def __init__(self, path: Path, fernet: Fernet) -> None:
        self.path = path
        self._fernet = fernet
        self._data: dict[str, dict[str, dict[str, Any]]] = {}
        self._lock = trio.Lock()

    def load(self) -> None:
        """Read the file (missing = empty); raise StoreError if it is corrupt or the key is wrong."""
        try:
            raw = self.path.read_text("utf-8")
        except FileNotFoundError:
            self._data = {}
            return
        try:
            document = json.loads(raw)
            if document.get("format") != FILE_FORMAT:
                raise StoreError(f"{self.path}: unknown format {document.get('format')!r}")
            data: dict[str, dict[str, dict[str, Any]]] = {}
            for subaccount, destinations in document["subaccounts"].items():
                data[subaccount] = {
                    name: {key: self._decrypt(value) for key, value in props.items()}
                    for name, props in destinations.items()
                }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"{self.path} is not a valid destination store: {exc}") from exc
        except InvalidToken as exc:
            raise StoreError(f"{self.path}: secrets cannot be decrypted with this key") from exc
        self._data = data

    def _encrypt(self, key: str, value: Any) -> Any:
        if key in SECRET_PROPERTIES and isinstance(value, str):
            return {"fernet": self._fernet.encrypt(value.encode("utf-8")).decode("ascii")}
        return value

    def _decrypt(self, value: Any) -> Any:
        if isinstance(value, dict):
            return self._fernet.decrypt(value["fernet"].encode("ascii")).decode("utf-8")
        return value

    def _serialise(self, data: dict[str, dict[str, dict[str, Any]]]) -> bytes:
        document = {
            "format": FILE_FORMAT,
            "subaccounts": {
                subaccount: {
                    name: {key: self._encrypt(key, value) for key, value in props.items()}
                    for name, props in destinations.items()
                }
                for subaccount, destinations in data.items()
            },
        }
        return json.dumps(document, indent=1, sort_keys=True).encode("utf-8")

    def _write(self, payload: bytes) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    async def _commit(self, data: dict[str, dict[str, dict[str, Any]]]) -> None:
        payload = self._serialise(data)
        await trio.to_thread.run_sync(self._write, payload)
        self._data = data

    # --- operations for one subaccount ------------------------------------------------------
    def list(self, subaccount: str) -> list[dict[str, Any]]:
        return [dict(props) for _, props in sorted(self._data.get(subaccount, {}).items())]

    def get(self, subaccount: str, name: str) -> dict[str, Any]:
        props = self._data.get(subaccount, {}).get(name)
        if props is None:
            raise DestinationError(404, "destination_not_found", f"no destination named {name!r}")
        return dict(props)

    async def create(self, subaccount: str, destinations: builtins.list[dict[str, Any]]) -> None:  # `list` is the method above
        async with self._lock:
            data = copy.deepcopy(self._data)
            own = data.setdefault(subaccount, {})
            for props in destinations:
                if props["Name"] in own:
                    raise DestinationError(409, "destination_exists", f"a destination named {props['Name']!r} exists")
                own[props["Name"]] = props
            await self._commit(data)

    async def update(self, subaccount: str, props: dict[str, Any]) -> None:
        async with self._lock:
            self.get(subaccount, props["Name"])
            data = copy.deepcopy(self._data)
            data[subaccount][props["Name"]] = props
            await self._commit(data)

    async def delete(self, subaccount: str, name: str) -> None:
        async with self._lock:
            self.get(subaccount, name)
            data = copy.deepcopy(self._data)
            del data[subaccount][name]
            if not data[subaccount]:
                del data[subaccount]
            await self._commit(data)


def find_destination(subaccount: str, props: dict[str, Any]) -> dict[str, Any]:
    """The "find destination" document: owner, configuration and ready-to-use auth tokens."""
    result: dict[str, Any] = {
        # subaccount-level destinations: no service instance owns them (SAP sends null here too)
        "owner": {"SubaccountId": subaccount, "InstanceId": None},
        "destinationConfiguration": props,
    }
    if props.get("Authentication") == "BasicAuthentication":
        value = base64.b64encode(f"{props['User']}:{props['Password']}".encode()).decode("ascii")
        result["authTokens"] = [
            {"type": "Basic", "value": value, "http_header": {"key": "Authorization", "value": f"Basic {value}"}}
        ]
    return result


@attrs.frozen
class DestinationSettings:
    """Where destinations live and the limits of the HTTP front."""

    path: Path
    key_path: Path
    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 65536
    idle_timeout: float = 120.0


class DestinationService:
    """Serves the destination REST API over h11; `load()` runs at construction (fails early)."""

    def __init__(self, authenticator: Authenticator, *, settings: DestinationSettings) -> None:
        self.authenticator = authenticator
        self.settings = settings
        directory = Path(settings.path).parent
        if not directory.is_dir():  # else the key file's creation fails with a bare FileNotFoundError
            raise StoreError(f"destination store directory {directory} does not exist: create it, writable "
                             "by the user the cloud side runs as")
        self.store = DestinationStore(Path(settings.path), load_or_create_key(Path(settings.key_path)))
        self.store.load()

    async def run(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_DESTINATION_PORT,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await serve_tcp(self._handle, host, port, name="destination service", task_status=task_status)

    async def _handle(self, sock: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes)
        try:
            while True:
                with trio.move_on_after(self.settings.idle_timeout) as idle:
                    request, body = await self._read_request(sock, conn)
                if idle.cancelled_caught or request is None:
                    return
                if body is None:
                    status, headers, payload = error_parts(
                        413, "body_too_large", f"request bodies are limited to {self.settings.max_body_bytes} bytes"
                    )
                    headers.append((b"connection", b"close"))
                else:
                    status, headers, payload = await self._respond(request, body)
                await self._send(sock, conn, h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b"")))
                await self._send(sock, conn, h11.Data(data=payload))
                await self._send(sock, conn, h11.EndOfMessage())
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    await self._linger(sock)
                    return
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status, headers, payload = error_parts(exc.error_status_hint, "malformed_request", str(exc))
                headers.append((b"connection", b"close"))
                try:
                    await self._send(sock, conn, h11.Response(status_code=status, headers=headers))
                    await self._send(sock, conn, h11.Data(data=payload))
                    await self._send(sock, conn, h11.EndOfMessage())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("destination service connection failed")
        finally:
            with trio.CancelScope(shield=True):
                await sock.aclose()

    @staticmethod
    async def _linger(sock: trio.SocketStream) -> None:
        """Half-close and read what the client still sends, so the close does not reset our answer."""
        try:
            await sock.send_eof()
            with trio.move_on_after(1.0):
                for _ in range(64):
                    if not await sock.receive_some(65536):
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    @staticmethod
    async def _send(sock: trio.SocketStream, conn: h11.Connection, event: h11.Event) -> None:
        data = conn.send(event)
        if data:
            await sock.send_all(data)

    async def _read_request(
        self, sock: trio.SocketStream, conn: h11.Connection
    ) -> tuple[h11.Request | None, bytes | None]:
        """Next request and its body; body None if it exceeded the limit; (None, None) at close."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await sock.receive_some(65536))
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                if len(body) + len(event.data) > self.settings.max_body_bytes:
                    return request, None  # stop reading: the response closes the connection
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            else:
                return None, None

    async def _respond(self, request: h11.Request, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        authorization = next((v for n, v in request.headers if n == b"authorization"), None)
        subaccount = self.authenticator.authenticate_header(authorization)
        if subaccount is None:
            return error_parts(
                401, "unauthorized", "send Authorization: Bearer <token>",
                [(b"www-authenticate", b'Bearer realm="destination-service"')],
            )
        try:
            status, document = await self._route(subaccount, request.method, request.target, body)
        except DestinationError as exc:
            return error_parts(exc.status, exc.reason, exc.message)
        except OSError as exc:
            log.error("destination store write failed: %s", exc)
            return error_parts(500, "store_write_failed", "the destination store could not be written; nothing changed")
        payload = json.dumps(document).encode("utf-8")
        return status, [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())], payload

    async def _route(self, subaccount: str, method: bytes, target: bytes, body: bytes) -> tuple[int, Any]:
        path = urllib.parse.unquote(target.decode("ascii", "replace").partition("?")[0])
        collection = f"{API_PREFIX}/subaccountDestinations"
        if path == collection:
            if method == b"GET":
                return 200, self.store.list(subaccount)
            if method == b"POST":
                parsed = self._parse_json(body)
                items = parsed if isinstance(parsed, list) else [parsed]
                destinations = [validate_destination(item) for item in items]
                names = [d["Name"] for d in destinations]
                if len(set(names)) != len(names):
                    raise DestinationError(400, "invalid_destination", "the same Name appears twice in the request")
                await self.store.create(subaccount, destinations)
                return 201, destinations if isinstance(parsed, list) else destinations[0]
            if method == b"PUT":
                props = validate_destination(self._parse_json(body))
                await self.store.update(subaccount, props)
                return 200, props
            raise DestinationError(405, "method_not_allowed", "use GET, POST or PUT on this collection")
        if path.startswith(collection + "/"):
            name = path[len(collection) + 1:]
            if method == b"GET":
                return 200, self.store.get(subaccount, name)
            if method == b"DELETE":
                await self.store.delete(subaccount, name)
                return 200, {"Count": 1}
            raise DestinationError(405, "method_not_allowed", "use GET or DELETE on a destination")
        if path.startswith(f"{API_PREFIX}/destinations/"):
            if method != b"GET":
                raise DestinationError(405, "method_not_allowed", "find destination is GET only")
            name = path[len(f"{API_PREFIX}/destinations/"):]
            return 200, find_destination(subaccount, self.store.get(subaccount, name))
        raise DestinationError(404, "not_found", f"no such endpoint: {path}")

    @staticmethod
    def _parse_json(body: bytes) -> Any:
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DestinationError(400, "bad_json", f"the request body is not valid JSON: {exc}") from exc
