"""Destination service over real loopback sockets: CRUD, find, auth scoping, storage at rest."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from connector.cloud.auth import Authenticator, hash_token
from connector.cloud.destinations import DestinationService, DestinationSettings, StoreError

TOKEN_1 = "dest-token-sub1"
TOKEN_2 = "dest-token-sub2"
BASE = "/destination-configuration/v1"
SECRET = "s3cr3t-Pa55word"
TEST_TIMEOUT = 20.0

ERP = {
    "Name": "ERP",
    "Type": "HTTP",
    "URL": "http://erp.virtual:8000/sap",
    "ProxyType": "OnPremise",
    "Authentication": "BasicAuthentication",
    "User": "ALICE",
    "Password": SECRET,
    "CloudConnectorLocationId": "loc2",
    "sap-client": "100",
    "WebIDEEnabled": True,
}


def authenticator() -> Authenticator:
    return Authenticator({"sub1": [hash_token(TOKEN_1)], "sub2": [hash_token(TOKEN_2)]})


def settings(tmp_path: Path, **kwargs: Any) -> DestinationSettings:
    return DestinationSettings(path=tmp_path / "destinations.json", key_path=tmp_path / "destinations.key", **kwargs)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        svc = DestinationService(authenticator(), settings=settings(tmp_path, max_body_bytes=4096))
        port = await nursery.start(svc.run, "127.0.0.1", 0)
        with trio.fail_after(TEST_TIMEOUT):
            yield port
        nursery.cancel_scope.cancel()


async def call(
    port: int, method: str, path: str, body: Any = None, *, token: str | None = TOKEN_1, raw: bytes | None = None
) -> tuple[int, Any, dict[bytes, bytes]]:
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    headers = [(b"host", b"destinations"), (b"content-length", str(len(payload)).encode())]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    await sock.send_all(conn.send(h11.Request(method=method, target=path, headers=headers)) or b"")
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
    return response.status_code, json.loads(data), dict(response.headers)


async def test_crud_cycle(service: int) -> None:
    port = service
    status, listed, _ = await call(port, "GET", f"{BASE}/subaccountDestinations")
    assert (status, listed) == (200, [])
    status, created, _ = await call(port, "POST", f"{BASE}/subaccountDestinations", ERP)
    assert status == 201 and created == ERP
    tcp = {"Name": "db", "Type": "TCP", "Address": "db.virtual:5432", "ProxyType": "OnPremise"}
    status, created, _ = await call(port, "POST", f"{BASE}/subaccountDestinations", [tcp])
    assert status == 201 and created == [{**tcp, "Authentication": "NoAuthentication"}]
    status, listed, _ = await call(port, "GET", f"{BASE}/subaccountDestinations")
    assert status == 200 and [d["Name"] for d in listed] == ["ERP", "db"]
    status, one, _ = await call(port, "GET", f"{BASE}/subaccountDestinations/ERP")
    assert (status, one) == (200, ERP)
    updated = {**ERP, "URL": "http://erp.virtual:8001/sap"}
    status, body, _ = await call(port, "PUT", f"{BASE}/subaccountDestinations", updated)
    assert (status, body) == (200, updated)
    status, one, _ = await call(port, "GET", f"{BASE}/subaccountDestinations/ERP")
    assert one["URL"] == "http://erp.virtual:8001/sap"
    status, body, _ = await call(port, "DELETE", f"{BASE}/subaccountDestinations/ERP")
    assert (status, body) == (200, {"Count": 1})
    status, body, _ = await call(port, "GET", f"{BASE}/subaccountDestinations/ERP")
    assert status == 404 and body["error"] == "destination_not_found"
    status, body, _ = await call(port, "DELETE", f"{BASE}/subaccountDestinations/ERP")
    assert status == 404


async def test_duplicate_create_is_409_and_changes_nothing(service: int) -> None:
    port = service
    assert (await call(port, "POST", f"{BASE}/subaccountDestinations", ERP))[0] == 201
    status, body, _ = await call(port, "POST", f"{BASE}/subaccountDestinations", ERP)
    assert status == 409 and body["error"] == "destination_exists"
    other = {"Name": "CRM", "Type": "HTTP", "URL": "https://crm.example.com"}
    status, _, _ = await call(port, "POST", f"{BASE}/subaccountDestinations", [other, ERP])
    assert status == 409
    status, listed, _ = await call(port, "GET", f"{BASE}/subaccountDestinations")
    assert [d["Name"] for d in listed] == ["ERP"]  # CRM was not half-created


async def test_update_missing_is_404(service: int) -> None:
    status, body, _ = await call(service, "PUT", f"{BASE}/subaccountDestinations", ERP)
    assert status == 404


async def test_find_destination_with_basic_and_no_authentication(service: int) -> None:
    port = service
    await call(port, "POST", f"{BASE}/subaccountDestinations", ERP)
    status, found, _ = await call(port, "GET", f"{BASE}/destinations/ERP")
    assert status == 200
    assert found["owner"] == {"SubaccountId": "sub1", "InstanceId": None}
    assert found["destinationConfiguration"] == ERP
    value = base64.b64encode(f"ALICE:{SECRET}".encode()).decode()
    assert found["authTokens"] == [
        {"type": "Basic", "value": value, "http_header": {"key": "Authorization", "value": f"Basic {value}"}}
    ]
    await call(port, "POST", f"{BASE}/subaccountDestinations", {"Name": "open", "Type": "HTTP", "URL": "http://x.virtual"})
    status, found, _ = await call(port, "GET", f"{BASE}/destinations/open")
    assert status == 200 and "authTokens" not in found
    assert found["destinationConfiguration"]["ProxyType"] == "Internet"
    status, body, _ = await call(port, "GET", f"{BASE}/destinations/missing")
    assert status == 404


async def test_authentication_and_subaccount_scoping(service: int) -> None:
    port = service
    status, body, headers = await call(port, "GET", f"{BASE}/subaccountDestinations", token=None)
    assert status == 401 and headers[b"www-authenticate"] == b'Bearer realm="destination-service"'
    status, _, _ = await call(port, "GET", f"{BASE}/subaccountDestinations", token="wrong")
    assert status == 401
    await call(port, "POST", f"{BASE}/subaccountDestinations", ERP)
    status, listed, _ = await call(port, "GET", f"{BASE}/subaccountDestinations", token=TOKEN_2)
    assert (status, listed) == (200, [])
    for method, path in [("GET", "subaccountDestinations/ERP"), ("DELETE", "subaccountDestinations/ERP")]:
        status, _, _ = await call(port, method, f"{BASE}/{path}", token=TOKEN_2)
        assert status == 404
    assert (await call(port, "GET", f"{BASE}/destinations/ERP", token=TOKEN_2))[0] == 404
    # sub2 may create its own ERP: names are per subaccount
    assert (await call(port, "POST", f"{BASE}/subaccountDestinations", ERP, token=TOKEN_2))[0] == 201
    assert (await call(port, "GET", f"{BASE}/subaccountDestinations/ERP"))[0] == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"Type": "HTTP", "URL": "http://a"}, "Name is required"),
        ({**ERP, "Name": "bad name"}, "Name is required"),
        ({**ERP, "Type": "RFC"}, "Type must be"),
        ({**ERP, "ProxyType": "Somewhere"}, "ProxyType must be"),
        ({**ERP, "Authentication": "OAuth2SAMLBearerAssertion"}, "Authentication must be"),
        ({**ERP, "URL": "ftp://erp"}, "URL of the form"),
        ({**ERP, "URL": "http://erp:99999"}, "port"),
        ({**ERP, "Password": ""}, "needs User and Password"),
        ({**ERP, "User": 5}, "must be a string"),
        ({**ERP, "Extra": {"nested": 1}}, "string, number or boolean"),
        ({"Name": "db", "Type": "TCP"}, "Address"),
        ([ERP, ERP], "twice"),
        ("just a string", "JSON object"),
    ],
)
async def test_invalid_destinations_get_400(service: int, body: Any, fragment: str) -> None:
    status, answer, _ = await call(service, "POST", f"{BASE}/subaccountDestinations", body)
    assert status == 400 and answer["error"] == "invalid_destination"
    assert fragment in answer["message"]
    assert (await call(service, "GET", f"{BASE}/subaccountDestinations"))[1] == []


async def test_bad_json_is_400(service: int) -> None:
    status, body, _ = await call(service, "POST", f"{BASE}/subaccountDestinations", raw=b"{not json")
    assert status == 400 and body["error"] == "bad_json"


async def test_unknown_paths_and_methods(service: int) -> None:
    assert (await call(service, "GET", "/elsewhere"))[0] == 404
    assert (await call(service, "DELETE", f"{BASE}/subaccountDestinations"))[0] == 405
    assert (await call(service, "POST", f"{BASE}/destinations/ERP"))[0] == 405


async def test_body_too_large_is_413(service: int) -> None:
    status, body, _ = await call(service, "POST", f"{BASE}/subaccountDestinations", raw=b"x" * 10000)
    assert status == 413 and body["error"] == "body_too_large"


def check_files_private(tmp_path: Path) -> None:
    data_file = tmp_path / "destinations.json"
    raw = data_file.read_bytes()
    assert SECRET.encode() not in raw
    assert b"ALICE" in raw and b"fernet" in raw
    assert stat.S_IMODE(data_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "destinations.key").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


async def test_secrets_encrypted_at_rest_and_files_private(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        svc = DestinationService(authenticator(), settings=settings(tmp_path))
        port = await nursery.start(svc.run, "127.0.0.1", 0)
        assert (await call(port, "POST", f"{BASE}/subaccountDestinations", ERP))[0] == 201
        nursery.cancel_scope.cancel()
    check_files_private(tmp_path)
    # a restarted service reads and decrypts the same destinations
    async with trio.open_nursery() as nursery:
        svc = DestinationService(authenticator(), settings=settings(tmp_path))
        port = await nursery.start(svc.run, "127.0.0.1", 0)
        status, one, _ = await call(port, "GET", f"{BASE}/subaccountDestinations/ERP")
        assert (status, one) == (200, ERP)
        nursery.cancel_scope.cancel()


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "destinations.key"
    DestinationService(authenticator(), settings=settings(tmp_path))  # creates the key
    os.chmod(key, 0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        DestinationService(authenticator(), settings=settings(tmp_path))


def test_corrupt_store_is_refused_not_overwritten(tmp_path: Path) -> None:
    data_file = tmp_path / "destinations.json"
    data_file.write_text("{ half a file")
    with pytest.raises(StoreError, match="not a valid destination store"):
        DestinationService(authenticator(), settings=settings(tmp_path))
    assert data_file.read_text() == "{ half a file"


async def test_wrong_key_is_refused(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        svc = DestinationService(authenticator(), settings=settings(tmp_path))
        port = await nursery.start(svc.run, "127.0.0.1", 0)
        await call(port, "POST", f"{BASE}/subaccountDestinations", ERP)
        nursery.cancel_scope.cancel()
    (tmp_path / "destinations.key").unlink()
    with pytest.raises(StoreError, match="cannot be decrypted"):
        DestinationService(authenticator(), settings=settings(tmp_path))
