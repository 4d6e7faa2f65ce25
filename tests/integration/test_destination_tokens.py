"""Find with every Authentication, against our real token service over TLS on loopback.

The destination service fetches OAuth2 tokens from the token service (connector.cloud.oauth) the
way SAP's destination service fetches them from XSUAA: real sockets, real certificates made by
`init_certs`, the token service's CA as the destination service's trust store.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
import trio

from connector.cli import init_certs
from connector.cloud.auth import Authenticator, hash_token
from connector.cloud.bindings import FileBindingStore, UserAccount, hash_secret, new_binding
from connector.cloud.destination_auth import token_request
from connector.cloud.destinations import MASK, DestinationService
from connector.cloud.jwks import FileKeyStore
from connector.cloud.oauth import OAuthSettings, TokenService, server_ssl_context
from connector.cloud.token_client import TokenClientSettings, fetch_token
from tests.support.destinations import BASE, COLLECTION, USER_1, admins, call, settings

SUBACCOUNT = "sub1"
USER, PASSWORD = "alice", "alice-password-1"
TEST_TIMEOUT = 30.0
FIND = f"{BASE}/destinations"
PEM = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n").decode()


@attrs.define
class Rig:
    destinations: int  # the destination service's port
    oauth: int  # the token service's port
    service: DestinationService
    tokens: TokenService
    client_id: str
    client_secret: str
    certs: dict[str, Path]

    @property
    def token_url(self) -> str:
        return f"https://127.0.0.1:{self.oauth}/oauth/token"

    def oauth_destination(self, name: str, authentication: str, **extra: str) -> dict[str, str]:
        return {"Name": name, "Type": "HTTP", "URL": "https://api.example/odata", "Authentication": authentication,
                "tokenServiceURL": self.token_url, "clientId": self.client_id, "clientSecret": self.client_secret,
                **extra}

    async def user_token(self) -> str:
        """A user's token, as the application got it when the user logged on (password grant)."""
        request = self.oauth_destination("tmp", "OAuth2Password", User=USER, Password=PASSWORD)
        answer = await fetch_token(token_request(request, None), TokenClientSettings(ca=self.certs["cloud_ca"]))
        return str(answer["access_token"])

    async def client_token(self) -> str:
        request = self.oauth_destination("tmp", "OAuth2ClientCredentials")
        answer = await fetch_token(token_request(request, None), TokenClientSettings(ca=self.certs["cloud_ca"]))
        return str(answer["access_token"])


@pytest.fixture
async def rig(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Rig]:
    certs = init_certs(tmp_path / "certs", SUBACCOUNT, ["node-a"], ["127.0.0.1", "localhost"])
    bindings = FileBindingStore(tmp_path / "bindings.json")
    binding, secret = new_binding(SUBACCOUNT, time.time())
    bindings.add(binding)
    user = UserAccount(SUBACCOUNT, USER, hash_secret(PASSWORD), email="alice@example.com")
    tokens = TokenService(OAuthSettings(url="https://127.0.0.1"), bindings=bindings,
                          keys=FileKeyStore(tmp_path / "keys.json"),
                          ssl_context=server_ssl_context(certs["server_cert"], certs["server_key"]),
                          users={(SUBACCOUNT, USER): user})
    oauth_port = await nursery.start(tokens.run, "127.0.0.1", 0)
    users = Authenticator({SUBACCOUNT: [hash_token(USER_1)]}, jwt=tokens.validator)
    service = DestinationService(users, admins(), jwt=tokens.validator, settings=attrs.evolve(
        settings(tmp_path), tokens=TokenClientSettings(ca=certs["cloud_ca"], timeout=5.0)))
    port = await nursery.start(service.run, "127.0.0.1", 0)
    with trio.fail_after(TEST_TIMEOUT):
        yield Rig(port, oauth_port, service, tokens, binding.client_id, secret, certs)


def claims_of(entry: dict[str, Any]) -> dict[str, Any]:
    assert entry["type"] == "Bearer" and entry["http_header"] == {
        "key": "Authorization", "value": f"Bearer {entry['value']}"}, entry
    result: dict[str, Any] = jwt.decode(entry["value"], options={"verify_signature": False})
    return result


async def find(rig: Rig, name: str, *, token: str = USER_1, query: str = "",
               headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, document, _ = await call(rig.destinations, "GET", f"{FIND}/{name}{query}", token=token, headers=headers)
    assert status == 200, document
    return document  # type: ignore[no-any-return]


async def test_client_credentials_token_is_fetched_once_and_reused(rig: Rig) -> None:
    assert (await call(rig.destinations, "POST", COLLECTION, rig.oauth_destination("cc", "OAuth2ClientCredentials")))[0] == 201
    first = await find(rig, "cc")
    assert first["owner"] == {"SubaccountId": SUBACCOUNT, "InstanceId": None}
    assert first["destinationConfiguration"]["clientSecret"] == rig.client_secret
    [entry] = first["authTokens"]
    claims = claims_of(entry)
    assert (claims["client_id"], claims["grant_type"], claims["zid"]) == (rig.client_id, "client_credentials", SUBACCOUNT)
    assert 0 < int(entry["expires_in"]) <= 3600
    second = await find(rig, "cc")
    assert second["authTokens"][0]["value"] == entry["value"] and rig.service.tokens.fetches == 1


async def test_password_destination_gets_a_token_for_its_user(rig: Rig) -> None:
    destination = rig.oauth_destination("pw", "OAuth2Password", User=USER, Password=PASSWORD)
    assert (await call(rig.destinations, "POST", COLLECTION, destination))[0] == 201
    claims = claims_of((await find(rig, "pw"))["authTokens"][0])
    assert (claims["grant_type"], claims["user_name"], claims["email"]) == ("password", USER, "alice@example.com")


async def test_jwt_bearer_exchanges_the_x_user_token_and_says_when_it_is_missing(rig: Rig) -> None:
    assert (await call(rig.destinations, "POST", COLLECTION, rig.oauth_destination("jb", "OAuth2JWTBearer")))[0] == 201
    user_token = await rig.user_token()
    claims = claims_of((await find(rig, "jb", headers={"X-user-token": user_token}))["authTokens"][0])
    assert (claims["grant_type"], claims["user_name"]) == ("urn:ietf:params:oauth:grant-type:jwt-bearer", USER)
    missing = await find(rig, "jb")
    assert missing["destinationConfiguration"]["Name"] == "jb"
    assert missing["authTokens"] == [{"type": "", "value": "", "expires_in": "0",
                                      "error": "OAuth2JWTBearer needs the user's token: send it as X-user-token"}]


async def test_an_error_of_the_token_service_is_reported_in_auth_tokens(rig: Rig) -> None:
    """User token exchange without X-user-token sends the caller's own token: a client token,
    which the token service refuses (invalid_grant); a wrong secret is refused invalid_client."""
    assert (await call(rig.destinations, "POST", COLLECTION, rig.oauth_destination("ute", "OAuth2UserTokenExchange")))[0] == 201
    client_token = await rig.client_token()
    refused = await find(rig, "ute", token=client_token)
    [entry] = refused["authTokens"]
    assert entry["value"] == "" and entry["error"].startswith("the token service answered 400 invalid_grant")
    exchanged = await find(rig, "ute", token=client_token, headers={"X-user-token": await rig.user_token()})
    assert claims_of(exchanged["authTokens"][0])["user_name"] == USER
    wrong = rig.oauth_destination("wrong", "OAuth2ClientCredentials", clientSecret="not-the-secret")
    assert (await call(rig.destinations, "POST", COLLECTION, wrong))[0] == 201
    answer = await find(rig, "wrong")
    assert answer["destinationConfiguration"]["Name"] == "wrong"
    assert answer["authTokens"][0]["error"].startswith("the token service answered 401 invalid_client")


async def test_skip_token_retrieval_fetches_nothing(rig: Rig) -> None:
    assert (await call(rig.destinations, "POST", COLLECTION, rig.oauth_destination("cc", "OAuth2ClientCredentials")))[0] == 201
    document = await find(rig, "cc", query="?$skipTokenRetrieval=true")
    assert "authTokens" not in document and rig.service.tokens.fetches == 0
    status, answer, _ = await call(rig.destinations, "GET", f"{FIND}/cc?" + "&".join(["a=1"] * 17), token=USER_1)
    assert (status, answer["error"]) == (400, "bad_query")
    assert (await find(rig, "cc"))["authTokens"][0]["value"]  # and the service carries on


async def test_the_token_services_certificate_is_verified(rig: Rig, tmp_path: Path) -> None:
    """A destination service trusting the system store only refuses our private CA's certificate."""
    assert (await call(rig.destinations, "POST", COLLECTION, rig.oauth_destination("cc", "OAuth2ClientCredentials")))[0] == 201
    strict = DestinationService(Authenticator({SUBACCOUNT: [hash_token(USER_1)]}), admins(), settings=settings(tmp_path))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(strict.run, "127.0.0.1", 0)
        status, document, _ = await call(port, "GET", f"{FIND}/cc", token=USER_1)
        nursery.cancel_scope.cancel()
    assert status == 200 and "CERTIFICATE_VERIFY_FAILED" in document["authTokens"][0]["error"]


async def test_basic_no_authentication_and_principal_propagation(rig: Rig) -> None:
    destinations = [
        {"Name": "basic", "Type": "HTTP", "URL": "http://erp:8000", "Authentication": "BasicAuthentication",
         "User": "ALICE", "Password": "pw"},
        {"Name": "none", "Type": "HTTP", "URL": "http://erp:8000"},
        {"Name": "pp", "Type": "HTTP", "URL": "http://erp.virtual:8000", "ProxyType": "OnPremise",
         "Authentication": "PrincipalPropagation"},
        {"Name": "ldap", "Type": "LDAP", "URL": "ldaps://dir.virtual:636", "ProxyType": "OnPremise"},
        {"Name": "rfc", "Type": "RFC", "ProxyType": "OnPremise", "jco.client.ashost": "erp.virtual"},
    ]
    assert (await call(rig.destinations, "POST", COLLECTION, destinations))[0] == 201
    basic = (await find(rig, "basic"))["authTokens"]
    assert basic == [{"type": "Basic", "value": base64.b64encode(b"ALICE:pw").decode(),
                      "http_header": {"key": "Authorization", "value": "Basic " + base64.b64encode(b"ALICE:pw").decode()}}]
    assert "authTokens" not in await find(rig, "none")
    assert (await find(rig, "pp"))["authTokens"] == []
    assert (await find(rig, "rfc"))["destinationConfiguration"]["jco.client.ashost"] == "erp.virtual"
    assert rig.service.tokens.fetches == 0


async def test_client_certificate_destination_returns_its_key_store(rig: Rig) -> None:
    certificate = {"Name": "client.pem", "Type": "CERTIFICATE", "Content": PEM}
    status, shown, _ = await call(rig.destinations, "POST", f"{BASE}/subaccountCertificates", certificate)
    assert status == 201 and shown["Content"] == MASK  # management answers mask it, as secrets
    destination = {"Name": "mtls", "Type": "HTTP", "URL": "https://api.example", "KeyStorePassword": "kp",
                   "Authentication": "ClientCertificateAuthentication", "KeyStoreLocation": "client.pem"}
    assert (await call(rig.destinations, "POST", COLLECTION, destination))[0] == 201
    document = await find(rig, "mtls")
    assert document["certificates"] == [certificate]
    listed = (await call(rig.destinations, "GET", f"{BASE}/subaccountCertificates"))[1]
    assert listed == [{**certificate, "Content": MASK}]
    assert (await call(rig.destinations, "DELETE", f"{BASE}/subaccountCertificates/client.pem"))[0] == 200
    assert "certificates" not in await find(rig, "mtls")
    missing = {k: v for k, v in destination.items() if k != "KeyStoreLocation"}
    status, answer, _ = await call(rig.destinations, "POST", COLLECTION, {**missing, "Name": "m2"})
    assert status == 400 and "KeyStoreLocation" in answer["message"]


async def test_find_looks_at_the_callers_instance_first(rig: Rig) -> None:
    subaccount_level = {"Name": "erp", "Type": "HTTP", "URL": "http://subaccount.example"}
    instance_level = {"Name": "erp", "Type": "HTTP", "URL": "http://instance.example"}
    assert (await call(rig.destinations, "POST", COLLECTION, subaccount_level))[0] == 201
    status, answer, _ = await call(rig.destinations, "POST", f"{BASE}/instanceDestinations", instance_level)
    assert status == 400 and answer["error"] == "instance_required"
    instance = {"X-Instance-Id": rig.client_id}
    assert (await call(rig.destinations, "POST", f"{BASE}/instanceDestinations", instance_level,
                       headers=instance))[0] == 201
    listed = (await call(rig.destinations, "GET", f"{BASE}/instanceDestinations", headers=instance))[1]
    assert [d["URL"] for d in listed] == ["http://instance.example"]
    binding_token = await rig.client_token()
    by_binding = await find(rig, "erp", token=binding_token)
    assert by_binding["owner"] == {"SubaccountId": SUBACCOUNT, "InstanceId": rig.client_id}
    assert by_binding["destinationConfiguration"]["URL"] == "http://instance.example"
    by_static_token = await find(rig, "erp")  # no instance: the subaccount's
    assert by_static_token["owner"]["InstanceId"] is None
    assert by_static_token["destinationConfiguration"]["URL"] == "http://subaccount.example"
    assert (await call(rig.destinations, "DELETE", f"{BASE}/instanceDestinations/erp", headers=instance))[0] == 200
    assert (await find(rig, "erp", token=binding_token))["owner"]["InstanceId"] is None
