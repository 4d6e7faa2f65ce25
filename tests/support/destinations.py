"""The destination service under test: tokens of both rights, a service on port 0, one-shot calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import trio

from connector.cloud.auth import Authenticator, hash_token
from connector.cloud.destinations import DestinationLimits, DestinationService, DestinationSettings

USER_1 = "dest-token-sub1"  # proxy token of sub1: finds destinations
USER_2 = "dest-token-sub2"
ADMIN_1 = "dest-admin-sub1"  # destination admin token of sub1: manages them
ADMIN_2 = "dest-admin-sub2"
BASE = "/destination-configuration/v1"
COLLECTION = f"{BASE}/subaccountDestinations"


def users() -> Authenticator:
    return Authenticator({"sub1": [hash_token(USER_1)], "sub2": [hash_token(USER_2)]})


def admins() -> Authenticator:
    return Authenticator({"sub1": [hash_token(ADMIN_1)], "sub2": [hash_token(ADMIN_2)]})


def settings(tmp_path: Path, **limits: Any) -> DestinationSettings:
    return DestinationSettings(
        path=tmp_path / "destinations.json", key_path=tmp_path / "destinations.key", limits=DestinationLimits(**limits)
    )


def new_service(tmp_path: Path, **limits: Any) -> DestinationService:
    return DestinationService(users(), admins(), settings=settings(tmp_path, **limits))


@asynccontextmanager
async def running(tmp_path: Path, **limits: Any) -> AsyncIterator[int]:
    """A destination service on 127.0.0.1:0 for the body of the block; yields its port."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(new_service(tmp_path, **limits).run, "127.0.0.1", 0)
        yield port
        nursery.cancel_scope.cancel()


async def call(
    port: int, method: str, path: str, body: Any = None, *, token: str | None = ADMIN_1, raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[bytes, bytes]]:
    """One request on its own connection: (status, JSON body or None if empty, headers)."""
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    head = [(b"host", b"destinations"), (b"content-length", str(len(payload)).encode())]
    if token is not None:
        head.append((b"authorization", f"Bearer {token}".encode()))
    head += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await sock.send_all(conn.send(h11.Request(method=method, target=path, headers=head)) or b"")
    await sock.send_all(conn.send(h11.Data(data=payload)) or b"")
    await sock.send_all(conn.send(h11.EndOfMessage()) or b"")
    response: h11.Response | None = None
    data = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await sock.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            data += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    await sock.aclose()
    assert response is not None
    return response.status_code, json.loads(data) if data else None, dict(response.headers)
