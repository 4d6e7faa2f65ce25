"""Destination service over real loopback sockets: CRUD, find, rights, auth scoping, storage at rest."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from connector.cloud.destinations import MASK, StoreError
from tests.support.destinations import (
    ADMIN_1,
    ADMIN_2,
    BASE,
    COLLECTION,
    USER_1,
    USER_2,
    call,
    new_service,
    running,
)

SECRET = "s3cr3t-Pa55word"
CLIENT_SECRET = "cl1ent-s3cret"
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
ERP_SHOWN = {**ERP, "Password": MASK}  # how management answers show it


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[int]:
    async with running(tmp_path, max_body_bytes=4096, max_destination_bytes=4096) as port:
        with trio.fail_after(TEST_TIMEOUT):
            yield port


async def test_crud_cycle(service: int) -> None:
    port = service
    status, listed, _ = await call(port, "GET", COLLECTION)
    assert (status, listed) == (200, [])
    status, created, _ = await call(port, "POST", COLLECTION, ERP)
    assert status == 201 and created == ERP_SHOWN
    tcp = {"Name": "db", "Type": "TCP", "Address": "db.virtual:5432", "ProxyType": "OnPremise"}
    status, created, _ = await call(port, "POST", COLLECTION, [tcp])
    assert status == 201 and created == [{**tcp, "Authentication": "NoAuthentication"}]
    status, listed, _ = await call(port, "GET", COLLECTION)
    assert status == 200 and [d["Name"] for d in listed] == ["ERP", "db"]
    status, one, _ = await call(port, "GET", f"{COLLECTION}/ERP")
    assert (status, one) == (200, ERP_SHOWN)
    updated = {**ERP, "URL": "http://erp.virtual:8001/sap"}
    status, body, _ = await call(port, "PUT", COLLECTION, updated)
    assert (status, body) == (200, {**updated, "Password": MASK})
    status, one, _ = await call(port, "GET", f"{COLLECTION}/ERP")
    assert one["URL"] == "http://erp.virtual:8001/sap"
    status, body, _ = await call(port, "DELETE", f"{COLLECTION}/ERP")
    assert (status, body) == (200, {"Count": 1})
    status, body, _ = await call(port, "GET", f"{COLLECTION}/ERP")
    assert status == 404 and body["error"] == "destination_not_found"
    status, body, _ = await call(port, "DELETE", f"{COLLECTION}/ERP")
    assert status == 404


async def test_duplicate_create_is_409_and_changes_nothing(service: int) -> None:
    port = service
    assert (await call(port, "POST", COLLECTION, ERP))[0] == 201
    status, body, _ = await call(port, "POST", COLLECTION, ERP)
    assert status == 409 and body["error"] == "destination_exists"
    other = {"Name": "CRM", "Type": "HTTP", "URL": "https://crm.example.com"}
    status, _, _ = await call(port, "POST", COLLECTION, [other, ERP])
    assert status == 409
    status, listed, _ = await call(port, "GET", COLLECTION)
    assert [d["Name"] for d in listed] == ["ERP"]  # CRM was not half-created


async def test_update_missing_is_404(service: int) -> None:
    status, body, _ = await call(service, "PUT", COLLECTION, ERP)
    assert status == 404


async def test_find_destination_with_basic_and_no_authentication(service: int) -> None:
    port = service
    await call(port, "POST", COLLECTION, ERP)
    status, found, _ = await call(port, "GET", f"{BASE}/destinations/ERP", token=USER_1)
    assert status == 200
    assert found["owner"] == {"SubaccountId": "sub1", "InstanceId": None}
    assert found["destinationConfiguration"] == ERP  # the consumer gets the secret it needs
    value = base64.b64encode(f"ALICE:{SECRET}".encode()).decode()
    assert found["authTokens"] == [
        {"type": "Basic", "value": value, "http_header": {"key": "Authorization", "value": f"Basic {value}"}}
    ]
    await call(port, "POST", COLLECTION, {"Name": "open", "Type": "HTTP", "URL": "http://x.virtual"})
    status, found, _ = await call(port, "GET", f"{BASE}/destinations/open", token=USER_1)
    assert status == 200 and "authTokens" not in found
    assert found["destinationConfiguration"]["ProxyType"] == "Internet"
    status, body, _ = await call(port, "GET", f"{BASE}/destinations/missing", token=USER_1)
    assert status == 404


async def test_proxy_token_finds_but_cannot_manage_or_list(service: int) -> None:
    port = service
    assert (await call(port, "POST", COLLECTION, ERP))[0] == 201
    changed = {**ERP, "URL": "http://evil.example:80/"}
    for method, path, body in [
        ("GET", COLLECTION, None),
        ("GET", f"{COLLECTION}/ERP", None),
        ("POST", COLLECTION, {**ERP, "Name": "ERP2"}),
        ("PUT", COLLECTION, changed),
        ("DELETE", f"{COLLECTION}/ERP", None),
    ]:
        status, answer, _ = await call(port, method, path, body, token=USER_1)
        assert (status, answer["error"]) == (403, "forbidden"), (method, path)
        assert SECRET not in str(answer)
    status, listed, _ = await call(port, "GET", COLLECTION)
    assert listed == [ERP_SHOWN]  # nothing was created, changed or deleted


async def test_admin_token_manages_but_cannot_find(service: int) -> None:
    port = service
    assert (await call(port, "POST", COLLECTION, ERP, token=ADMIN_1))[0] == 201
    status, answer, _ = await call(port, "GET", f"{BASE}/destinations/ERP", token=ADMIN_1)
    assert (status, answer["error"]) == (403, "forbidden")


async def test_management_answers_never_carry_secrets(service: int) -> None:
    port = service
    oauth = {"Name": "oauth", "Type": "HTTP", "URL": "https://api.example.com", "clientId": "app",
             "clientSecret": CLIENT_SECRET, "tokenServicePassword": CLIENT_SECRET}
    answers = [await call(port, "POST", COLLECTION, [ERP, oauth])]
    answers.append(await call(port, "GET", COLLECTION))
    answers.append(await call(port, "GET", f"{COLLECTION}/ERP"))
    answers.append(await call(port, "GET", f"{COLLECTION}/oauth"))
    answers.append(await call(port, "PUT", COLLECTION, {**oauth, "URL": "https://api2.example.com"}))
    for status, answer, _ in answers:
        assert status in (200, 201)
        assert SECRET not in str(answer) and CLIENT_SECRET not in str(answer)
    assert answers[3][1]["clientSecret"] == MASK and answers[3][1]["clientId"] == "app"
    found = (await call(port, "GET", f"{BASE}/destinations/oauth", token=USER_1))[1]
    assert found["destinationConfiguration"]["clientSecret"] == CLIENT_SECRET


async def test_put_of_a_masked_answer_keeps_the_stored_secret(service: int) -> None:
    port = service
    await call(port, "POST", COLLECTION, ERP)
    shown = (await call(port, "GET", f"{COLLECTION}/ERP"))[1]
    assert (await call(port, "PUT", COLLECTION, {**shown, "sap-client": "200"}))[0] == 200
    found = (await call(port, "GET", f"{BASE}/destinations/ERP", token=USER_1))[1]
    assert found["destinationConfiguration"]["Password"] == SECRET
    assert found["destinationConfiguration"]["sap-client"] == "200"
    # a new secret replaces it; the mask is no secret to create with
    assert (await call(port, "PUT", COLLECTION, {**ERP, "Password": "new"}))[0] == 200
    found = (await call(port, "GET", f"{BASE}/destinations/ERP", token=USER_1))[1]
    assert found["destinationConfiguration"]["Password"] == "new"
    status, answer, _ = await call(port, "POST", COLLECTION, {**ERP_SHOWN, "Name": "ERP2"})
    assert status == 400 and "stands for a stored secret" in answer["message"]
    status, answer, _ = await call(port, "PUT", COLLECTION, {**ERP, "Authentication": "NoAuthentication",
                                                             "Password": "", "clientSecret": MASK})
    assert status == 400 and "none is stored" in answer["message"]


@pytest.mark.parametrize(
    "moved",
    [{"URL": "https://attacker.example/"}, {"ProxyType": "Internet"}, {"User": "MALLORY"},
     {"CloudConnectorLocationId": "elsewhere"}],
)
async def test_a_kept_secret_cannot_be_sent_somewhere_else(service: int, moved: dict[str, str]) -> None:
    # Before: an admin token could point a destination at its own host and keep the password with
    # the mask, and applications would deliver the password there.
    port = service
    await call(port, "POST", COLLECTION, ERP)
    status, answer, _ = await call(port, "PUT", COLLECTION, {**ERP_SHOWN, **moved})
    assert (status, answer["error"]) == (400, "secret_must_be_resent")
    assert next(iter(moved)) in answer["message"]
    found = (await call(port, "GET", f"{BASE}/destinations/ERP", token=USER_1))[1]
    assert found["destinationConfiguration"] == ERP  # unchanged
    assert (await call(port, "PUT", COLLECTION, {**ERP, **moved, "Password": "resent"}))[0] == 200


async def test_authentication_and_subaccount_scoping(service: int) -> None:
    port = service
    status, body, headers = await call(port, "GET", COLLECTION, token=None)
    assert status == 401 and headers[b"www-authenticate"] == b'Bearer realm="destination-service"'
    status, _, _ = await call(port, "GET", COLLECTION, token="wrong")
    assert status == 401
    await call(port, "POST", COLLECTION, ERP)
    status, listed, _ = await call(port, "GET", COLLECTION, token=ADMIN_2)
    assert (status, listed) == (200, [])
    for method, path in [("GET", "subaccountDestinations/ERP"), ("DELETE", "subaccountDestinations/ERP")]:
        status, _, _ = await call(port, method, f"{BASE}/{path}", token=ADMIN_2)
        assert status == 404
    assert (await call(port, "GET", f"{BASE}/destinations/ERP", token=USER_2))[0] == 404
    # sub2 may create its own ERP: names are per subaccount
    assert (await call(port, "POST", COLLECTION, ERP, token=ADMIN_2))[0] == 201
    assert (await call(port, "GET", f"{COLLECTION}/ERP"))[0] == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"Type": "HTTP", "URL": "http://a"}, "Name is required"),
        ({**ERP, "Name": "bad name"}, "Name is required"),
        ({**ERP, "Type": "MAIL"}, "Type must be"),
        ({**ERP, "ProxyType": "Somewhere"}, "ProxyType must be"),
        ({**ERP, "Authentication": "OAuth2SAMLBearerAssertion"}, "Authentication must be"),
        ({**ERP, "URL": "ftp://erp"}, "URL of the form"),
        ({**ERP, "URL": "http://erp:99999"}, "port"),
        ({**ERP, "Password": ""}, "needs User and Password"),
        ({**ERP, "User": 5}, "must be a string"),
        ({**ERP, "clientSecret": 12345}, "must be a string"),  # a secret that is no string would be stored in clear
        ({**ERP, "Extra": {"nested": 1}}, "string, number or boolean"),
        ({**ERP, "Authentication": "OAuth2ClientCredentials", "tokenServiceURL": 5, "clientId": "c",
          "clientSecret": "s"}, "must be a string"),
        ({**ERP, "Authentication": "OAuth2ClientCredentials", "tokenServiceURL": "https://uaa/oauth/token",
          "clientId": 7, "clientSecret": "s"}, "must be a string"),
        ({**ERP, "Authentication": "OAuth2ClientCredentials", "tokenServiceURL": "https://uaa/oauth/token"},
         "needs clientId, clientSecret"),
        ({"Name": "db", "Type": "TCP"}, "Address"),
        ([ERP, ERP], "twice"),
        ("just a string", "JSON object"),
    ],
)
async def test_invalid_destinations_get_400(service: int, body: Any, fragment: str) -> None:
    status, answer, _ = await call(service, "POST", COLLECTION, body)
    assert status == 400 and answer["error"] == "invalid_destination"
    assert fragment in answer["message"]
    assert (await call(service, "GET", COLLECTION))[1] == []


async def test_bad_json_is_400(service: int) -> None:
    status, body, _ = await call(service, "POST", COLLECTION, raw=b"{not json")
    assert status == 400 and body["error"] == "bad_json"
    status, body, _ = await call(service, "POST", COLLECTION, raw='{"Name": "é"}'.encode("utf-16"))
    assert status == 400 and body["error"] == "bad_json" and "UTF-8" in body["message"]


async def test_unknown_paths_and_methods(service: int) -> None:
    assert (await call(service, "GET", "/elsewhere"))[0] == 404
    status, _, headers = await call(service, "DELETE", COLLECTION)
    assert status == 405 and headers[b"allow"] == b"GET, HEAD, POST, PUT"
    status, _, headers = await call(service, "POST", f"{BASE}/destinations/ERP", token=USER_1)
    assert status == 405 and headers[b"allow"] == b"GET, HEAD"
    status, _, headers = await call(service, "PATCH", f"{COLLECTION}/ERP")
    assert status == 405 and headers[b"allow"] == b"GET, HEAD, DELETE"


def check_files_private(tmp_path: Path) -> None:
    files = [p for p in (tmp_path / "destinations.d").rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["ERP.json"]
    raw = files[0].read_bytes()
    assert SECRET.encode() not in raw
    assert b"ALICE" in raw and b"fernet" in raw
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    for folder in (tmp_path / "destinations.d", files[0].parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "destinations.key").stat().st_mode) == 0o600


async def test_secrets_encrypted_at_rest_and_files_private(tmp_path: Path) -> None:
    async with running(tmp_path) as port:
        assert (await call(port, "POST", COLLECTION, ERP))[0] == 201
    check_files_private(tmp_path)
    # a restarted service reads and decrypts the same destinations
    async with running(tmp_path) as port:
        status, found, _ = await call(port, "GET", f"{BASE}/destinations/ERP", token=USER_1)
        assert (status, found["destinationConfiguration"]) == (200, ERP)


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "destinations.key"
    new_service(tmp_path)  # creates the key
    os.chmod(key, 0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        new_service(tmp_path)


def test_corrupt_store_is_refused_not_overwritten(tmp_path: Path) -> None:
    data_file = tmp_path / "destinations.json"
    data_file.write_text("{ half a file")
    with pytest.raises(StoreError, match="not a valid destination store"):
        new_service(tmp_path)
    assert data_file.read_text() == "{ half a file"


async def test_corrupt_destination_file_is_refused_not_overwritten(tmp_path: Path) -> None:
    async with running(tmp_path) as port:
        await call(port, "POST", COLLECTION, ERP)
    (file,) = (tmp_path / "destinations.d").rglob("ERP.json")
    file.write_text("{ half a file")
    with pytest.raises(StoreError, match="not a valid destination file"):
        new_service(tmp_path)
    assert file.read_text() == "{ half a file"


async def test_wrong_key_is_refused(tmp_path: Path) -> None:
    async with running(tmp_path) as port:
        await call(port, "POST", COLLECTION, ERP)
    (tmp_path / "destinations.key").unlink()
    with pytest.raises(StoreError, match="cannot be decrypted"):
        new_service(tmp_path)


async def test_a_change_that_cannot_be_written_changes_nothing(tmp_path: Path) -> None:
    async with running(tmp_path) as port:
        await call(port, "POST", COLLECTION, {"Name": "a", "Type": "HTTP", "URL": "http://a.virtual"})
        blocker = tmp_path / "destinations.d" / "sub1" / "c.json"
        blocker.mkdir()  # the file of "c" cannot be renamed into place
        batch = [{"Name": "b", "Type": "HTTP", "URL": "http://b.virtual"},
                 {"Name": "c", "Type": "HTTP", "URL": "http://c.virtual"}]
        status, answer, _ = await call(port, "POST", COLLECTION, batch)
        assert (status, answer["error"]) == (500, "store_write_failed")
        assert [d["Name"] for d in (await call(port, "GET", COLLECTION))[1]] == ["a"]
        blocker.rmdir()
    assert sorted(p.name for p in (tmp_path / "destinations.d" / "sub1").iterdir()) == ["a.json"]  # b was undone
    async with running(tmp_path) as port:
        assert [d["Name"] for d in (await call(port, "GET", COLLECTION))[1]] == ["a"]
