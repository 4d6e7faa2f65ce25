"""The token service on a real TLS socket, and its JWTs at the real proxies (HTTP and SOCKS5 0x80).

One cloud (with [oauth]), one node and the demo backend on loopback; the binding is made with
the real `connector binding create` while the cloud runs. The cloud's wall clock is a `Clock`
the test moves, so key rotation and expiry are exact.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from connector import pki
from connector.cli import init_certs, main
from connector.cloud.bindings import hash_secret
from connector.cloud.server import CloudPorts, CloudServer
from connector.config import load_cloud_config
from connector.demo_backend import run_backend
from tests.support.httpclient import HttpClient, Response
from tests.support.socks import socks5_connect
from tests.support.stack import SUBACCOUNT, Stack, cloud_toml, node_toml, start_node

ERP = "http://erp.virtual:8000"
LIFETIME = 600  # token_lifetime and key_overlap of the test's [oauth]
REQUEST_TIMEOUT = 1.0
MAX_CONNECTIONS = 3
USER, PASSWORD = "alice", "alice-password-1"
IDP = "https://idp.example/oauth2"  # an identity provider the subaccount trusts
IDP_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OAUTH = f"""
[[subaccounts.users]]
user_name = "{USER}"
password_scrypt = "{hash_secret(PASSWORD)}"
email = "alice@example.com"

[[subaccounts.trusted_issuers]]
issuer = "{IDP}"
jwks = "idp-jwks.json"
audience = "app"

[oauth]
listen = "127.0.0.1:0"
token_lifetime = {LIFETIME}
key_overlap = {LIFETIME}
request_timeout = {REQUEST_TIMEOUT}
max_connections = {MAX_CONNECTIONS}

[destinations]
listen = "127.0.0.1:0"
"""


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@attrs.define
class OAuthStack:
    stack: Stack
    config: Path
    clock: Clock
    credentials: dict[str, Any]

    @property
    def cloud(self) -> CloudServer:
        return self.stack.cloud

    @property
    def ports(self) -> CloudPorts:
        return self.stack.ports

    async def tls_client(self) -> HttpClient:
        assert self.ports.oauth is not None
        sock = await trio.open_tcp_stream("127.0.0.1", self.ports.oauth)
        stream = trio.SSLStream(sock, pki.client_context(self.stack.certs["cloud_ca"]), server_hostname="127.0.0.1",
                                https_compatible=True)
        return HttpClient(stream)

    async def token_request(self, form: dict[str, str], *, basic: tuple[str, str] | None = None,
                            zone: str | None = None) -> Response:
        headers = [("content-type", "application/x-www-form-urlencoded")]
        if zone is not None:
            headers.append(("x-zid", zone))
        if basic is not None:
            headers.append(("authorization", "Basic " + base64.b64encode(":".join(basic).encode()).decode()))
        body = "&".join(f"{k}={v}" for k, v in form.items()).encode()
        client = await self.tls_client()
        try:
            return await client.request("POST", "/oauth/token", headers, body)
        finally:
            await client.aclose()

    async def fetch_token(self) -> str:
        credentials = self.credentials
        response = await self.token_request({"grant_type": "client_credentials"},
                                            basic=(credentials["clientid"], credentials["clientsecret"]))
        assert response.status == 200, response.body
        return str(response.json()["access_token"])

    async def through_proxy(self, token: str) -> int:
        client = await HttpClient.connect(self.ports.http_proxy)
        try:
            response = await client.request("GET", f"{ERP}/sap/opu/odata/x",
                                            [("Proxy-Authorization", f"Bearer {token}")])
        finally:
            await client.aclose()
        return response.status


def binding_cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["binding", *args]) == 0
    return capsys.readouterr().out


@pytest.fixture
async def oauth(nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> OAuthStack:
    certs = init_certs(tmp_path / "certs", SUBACCOUNT, ["node-a"], ["127.0.0.1", "localhost"])
    backend_http, backend_tcp = await nursery.start(run_backend, "127.0.0.1", 0, 0)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(IDP_KEY.public_key()))
    (tmp_path / "idp-jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "idp-1", "alg": "RS256"}]}))
    config = cloud_toml(tmp_path, certs, extra=OAUTH)
    clock = Clock()
    cloud = CloudServer(load_cloud_config(config), clock=clock)
    ports = await nursery.start(cloud.run)
    stack = Stack(tmp_path, certs, backend_http, backend_tcp, cloud, ports)
    await start_node(nursery, stack, node_toml(tmp_path, certs, ports.tunnel, backend_http, backend_tcp))
    with trio.fail_after(10):
        await stack.wait_registered()
    vcap = json.loads(binding_cli(capsys, "create", "--config", str(config), "--subaccount", SUBACCOUNT, "--compact"))
    return OAuthStack(stack, config, clock, vcap["connectivity"][0]["credentials"])


async def test_client_credentials_with_basic_and_with_form_fields(oauth: OAuthStack) -> None:
    credentials = oauth.credentials
    basic = await oauth.token_request({"grant_type": "client_credentials"},
                                      basic=(credentials["clientid"], credentials["clientsecret"]))
    form = await oauth.token_request({"grant_type": "client_credentials", "client_id": credentials["clientid"],
                                      "client_secret": credentials["clientsecret"]})
    for response in (basic, form):
        assert response.status == 200 and response.headers["cache-control"] == "no-store"
        document = response.json()
        assert (document["token_type"], document["expires_in"]) == ("bearer", LIFETIME - 1)
        claims = jwt.decode(document["access_token"], options={"verify_signature": False})
        assert (claims["zid"], claims["client_id"], claims["exp"] - claims["iat"]) == (
            SUBACCOUNT, credentials["clientid"], LIFETIME)
        assert claims["iss"] == oauth.cloud.oauth.settings.issuer  # type: ignore[union-attr]


async def test_a_token_for_the_bindings_zone_only(oauth: OAuthStack) -> None:
    # xssec (the SAP Cloud SDK) names the user's zone in x-zid; a binding has tokens of its own subaccount only
    credentials = oauth.credentials
    form = {"grant_type": "client_credentials", "client_id": credentials["clientid"],
            "client_secret": credentials["clientsecret"]}
    own = await oauth.token_request(form, zone=SUBACCOUNT)
    assert own.status == 200 and jwt.decode(own.json()["access_token"], options={"verify_signature": False})["zid"] \
        == SUBACCOUNT
    other = await oauth.token_request(form, zone="another-subaccount")
    assert other.status == 401 and other.json()["error"] == "invalid_client"
    assert "another-subaccount" in other.json()["error_description"]


async def test_jwks_verifies_the_tokens(oauth: OAuthStack) -> None:
    token = await oauth.fetch_token()
    client = await oauth.tls_client()
    keys = (await client.request("GET", "/token_keys")).json()["keys"]
    header = jwt.get_unverified_header(token)
    assert [k["kid"] for k in keys] == [header["kid"]] and header["alg"] == "RS256"
    assert header["jku"].endswith("/token_keys")
    public_key = jwt.PyJWK.from_dict(keys[0]).key
    claims = jwt.decode(token, public_key, algorithms=["RS256"], audience="connectivity")
    assert claims["zid"] == SUBACCOUNT


async def test_wrong_secret_is_401_and_audited(oauth: OAuthStack) -> None:
    response = await oauth.token_request({"grant_type": "client_credentials"},
                                         basic=(oauth.credentials["clientid"], "wrong-secret"))
    assert response.status == 401 and response.json()["error"] == "invalid_client"
    assert response.headers["www-authenticate"].startswith("Basic")
    unknown = await oauth.token_request({"grant_type": "client_credentials"}, basic=("sb-nobody", "x"))
    assert unknown.status == 401
    records = await oauth.cloud.audit.wait_records(2)
    assert [(r["proxy"], r["reason"], r["status"]) for r in records[-2:]] == [("oauth", "invalid_client", 401)] * 2
    assert "wrong-secret" not in json.dumps(records)


async def test_bodies_are_bounded_and_grants_named(oauth: OAuthStack) -> None:
    basic = (oauth.credentials["clientid"], oauth.credentials["clientsecret"])
    big = await oauth.token_request({"grant_type": "client_credentials", "pad": "x" * 9000}, basic=basic)
    assert big.status == 413
    other = await oauth.token_request({"grant_type": "authorization_code", "code": "c"}, basic=basic)
    assert (other.status, other.json()["error"]) == (400, "unsupported_grant_type")


async def test_password_grant_gives_a_user_token_and_refuses_bad_credentials_alike(oauth: OAuthStack) -> None:
    basic = (oauth.credentials["clientid"], oauth.credentials["clientsecret"])
    response = await oauth.token_request({"grant_type": "password", "username": USER, "password": PASSWORD},
                                         basic=basic)
    assert response.status == 200, response.body
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert (claims["grant_type"], claims["user_name"], claims["email"], claims["origin"], claims["zid"]) == (
        "password", USER, "alice@example.com", "connector", SUBACCOUNT)
    assert claims["sub"] == claims["user_id"] and claims["client_id"] == claims["cid"] == basic[0]
    wrong = await oauth.token_request({"grant_type": "password", "username": USER, "password": "nope"}, basic=basic)
    unknown = await oauth.token_request({"grant_type": "password", "username": "mallory", "password": "x"},
                                        basic=basic)
    for refused in (wrong, unknown):
        assert (refused.status, refused.json()["error"], refused.json()["error_description"]) == (
            400, "invalid_grant", "bad user credentials")
    bad_client = await oauth.token_request({"grant_type": "password", "username": USER, "password": PASSWORD},
                                           basic=(basic[0], "wrong"))
    assert (bad_client.status, bad_client.json()["error"]) == (401, "invalid_client")


async def test_jwt_bearer_carries_the_users_claims_and_refuses_a_client_token(oauth: OAuthStack) -> None:
    basic = (oauth.credentials["clientid"], oauth.credentials["clientsecret"])
    user_token = (await oauth.token_request({"grant_type": "password", "username": USER, "password": PASSWORD},
                                            basic=basic)).json()["access_token"]
    exchanged = await oauth.token_request({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                           "assertion": user_token}, basic=basic)
    assert exchanged.status == 200, exchanged.body
    claims = jwt.decode(exchanged.json()["access_token"], options={"verify_signature": False})
    user = jwt.decode(user_token, options={"verify_signature": False})
    assert claims["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert [claims[k] for k in ("user_name", "user_id", "email", "origin")] == [
        user[k] for k in ("user_name", "user_id", "email", "origin")]
    client_token = await oauth.fetch_token()
    refused = await oauth.token_request({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                         "assertion": client_token}, basic=basic)
    assert (refused.status, refused.json()["error"]) == (400, "invalid_grant")
    assert "user_name" in refused.json()["error_description"]


async def test_jwt_bearer_grant_exchanges_a_valid_assertion_only(oauth: OAuthStack) -> None:
    basic = (oauth.credentials["clientid"], oauth.credentials["clientsecret"])
    assertion = (await oauth.token_request({"grant_type": "password", "username": USER, "password": PASSWORD},
                                           basic=basic)).json()["access_token"]
    exchanged = await oauth.token_request({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                           "assertion": assertion}, basic=basic)
    assert exchanged.status == 200
    claims = jwt.decode(exchanged.json()["access_token"], options={"verify_signature": False})
    assert claims["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    refused = await oauth.token_request({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                         "assertion": assertion[:-4] + "AAAA"}, basic=basic)
    assert (refused.status, refused.json()["error"]) == (400, "invalid_grant")


async def test_the_http_proxy_and_socks5_accept_our_jwt(oauth: OAuthStack) -> None:
    token = await oauth.fetch_token()
    assert await oauth.through_proxy(token) == 200
    assert await oauth.through_proxy(token[:-4] + "AAAA") == 407
    sock, code = await socks5_connect(oauth.ports.socks5_proxy, "echo.virtual", 7000, token=token, method=0x80)
    assert code == 0
    await sock.send_all(b"ping")
    assert await sock.receive_some(4) == b"ping"
    await sock.aclose()
    _, refused = await socks5_connect(oauth.ports.socks5_proxy, "echo.virtual", 7000, token=token[:-4] + "AAAA",
                                      method=0x80)
    assert refused == -1


async def test_a_revoked_binding_gets_no_token_and_its_tokens_are_refused(
    oauth: OAuthStack, capsys: pytest.CaptureFixture[str]
) -> None:
    token = await oauth.fetch_token()
    listed = [json.loads(line) for line in binding_cli(capsys, "list", "--config", str(oauth.config)).splitlines()]
    assert [(b["client_id"], b["revoked"]) for b in listed] == [(oauth.credentials["clientid"], None)]
    binding_cli(capsys, "revoke", oauth.credentials["clientid"], "--config", str(oauth.config))
    response = await oauth.token_request({"grant_type": "client_credentials"},
                                         basic=(oauth.credentials["clientid"], oauth.credentials["clientsecret"]))
    assert (response.status, response.json()["error_description"]) == (401, "this binding is revoked")
    assert await oauth.through_proxy(token) == 407


async def test_rotation_old_key_valid_during_the_overlap_refused_after(oauth: OAuthStack) -> None:
    service = oauth.cloud.oauth
    assert service is not None
    old = await oauth.fetch_token()
    oauth.clock.now += LIFETIME / 2
    await service.rotate_keys()
    new = await oauth.fetch_token()
    assert jwt.get_unverified_header(new)["kid"] != jwt.get_unverified_header(old)["kid"]
    client = await oauth.tls_client()
    assert len((await client.request("GET", "/token_keys")).json()["keys"]) == 2  # both keys published
    assert await oauth.through_proxy(old) == 200  # signed by the old key, within the overlap
    assert await oauth.through_proxy(new) == 200
    oauth.clock.now += LIFETIME  # the overlap is over
    assert await service.maintain_keys() is not None and len(service.ring.keys) == 1
    assert await oauth.through_proxy(old) == 407
    assert len((await client.request("GET", "/token_keys")).json()["keys"]) == 1
    assert await oauth.through_proxy(await oauth.fetch_token()) == 200


async def test_silent_and_surplus_connections_are_closed(oauth: OAuthStack) -> None:
    service = oauth.cloud.oauth
    assert service is not None and oauth.ports.oauth is not None
    start = trio.current_time()
    silent = [await trio.open_tcp_stream("127.0.0.1", oauth.ports.oauth) for _ in range(MAX_CONNECTIONS)]
    with trio.fail_after(5):
        await service.wait_connections(MAX_CONNECTIONS)
    surplus = await trio.open_tcp_stream("127.0.0.1", oauth.ports.oauth)
    with trio.fail_after(REQUEST_TIMEOUT / 2):  # closed at once, before any TLS
        assert await surplus.receive_some(1) == b""
    with trio.fail_after(REQUEST_TIMEOUT * 3):
        for stream in silent:  # a TLS handshake that never starts ends at request_timeout
            assert await stream.receive_some(1) == b""
        await service.wait_connections(0)
    assert trio.current_time() - start >= REQUEST_TIMEOUT
    assert await oauth.fetch_token()  # and the service serves again


async def test_the_destination_service_takes_our_jwt_from_the_destination_binding(
    oauth: OAuthStack, capsys: pytest.CaptureFixture[str]
) -> None:
    vcap = json.loads(binding_cli(capsys, "create", "--config", str(oauth.config), "--subaccount", SUBACCOUNT))
    assert vcap["destination"][0]["credentials"]["uri"].startswith("http://127.0.0.1:")
    token = await oauth.fetch_token()
    assert oauth.ports.destinations is not None
    client = await HttpClient.connect(oauth.ports.destinations)
    find = "/destination-configuration/v1/destinations/missing"
    found = await client.request("GET", find, [("authorization", f"Bearer {token}")])
    assert (found.status, found.json()["error"]) == (404, "destination_not_found")  # authenticated as acme
    refused = await client.request("GET", find, [("authorization", f"Bearer {token[:-4]}AAAA")])
    assert refused.status == 401


async def test_an_emergency_rotation_without_overlap_refuses_old_tokens_at_once(oauth: OAuthStack) -> None:
    service = oauth.cloud.oauth
    assert service is not None
    old = await oauth.fetch_token()
    await service.rotate_keys(overlap=0)  # a leaked key
    assert await oauth.through_proxy(old) == 407
    assert await oauth.through_proxy(await oauth.fetch_token()) == 200


async def test_garbage_gets_400_and_the_service_carries_on(oauth: OAuthStack) -> None:
    client = await oauth.tls_client()
    await client.stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
    answer = b""
    with trio.fail_after(5):
        while chunk := await client.stream.receive_some(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert await oauth.fetch_token()


def idp_token(clock: Clock, *, key: rsa.RSAPrivateKey = IDP_KEY, kid: str = "idp-1", issuer: str = IDP,
              audience: str = "app", lifetime: float = 300) -> str:
    claims = {"iss": issuer, "aud": [audience], "sub": "P123", "email": "bob@example.com",
              "iat": int(clock.now), "exp": int(clock.now + lifetime)}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


async def test_jwt_bearer_takes_a_user_token_of_a_trusted_identity_provider(oauth: OAuthStack) -> None:
    basic = (oauth.credentials["clientid"], oauth.credentials["clientsecret"])

    async def exchange(assertion: str) -> Response:
        return await oauth.token_request({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                          "assertion": assertion}, basic=basic)

    exchanged = await exchange(idp_token(oauth.clock))
    assert exchanged.status == 200, exchanged.body
    claims = jwt.decode(exchanged.json()["access_token"], options={"verify_signature": False})
    assert (claims["user_name"], claims["email"], claims["user_id"], claims["origin"], claims["zid"]) == (
        "bob@example.com", "bob@example.com", "P123", IDP, SUBACCOUNT)
    assert claims["iss"] == oauth.cloud.oauth.settings.issuer  # type: ignore[union-attr]  # ours, not the IdP's
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refusals = {
        "bad_key": idp_token(oauth.clock, key=other_key),
        "unknown_kid": idp_token(oauth.clock, kid="idp-2"),
        "untrusted": idp_token(oauth.clock, issuer="https://evil.example"),
        "audience": idp_token(oauth.clock, audience="other-app"),
        "expired": idp_token(oauth.clock, lifetime=-1),
    }
    for case, assertion in refusals.items():
        refused = await exchange(assertion)
        assert (refused.status, refused.json()["error"]) == (400, "invalid_grant"), case
