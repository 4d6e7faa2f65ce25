"""A trusted identity provider's keys fetched from its jwks_uri (issue 12): a real HTTPS JWKS
endpoint on 127.0.0.1 with its own CA, the cloud's principal check (`PrincipalValidator`, as the
HTTP proxy calls it for `SAP-Connectivity-Authentication`) with the issuer loaded from cloud.toml.
The provider adds a key later (accepted after the one unknown-kid fetch), a flood of forged kids
makes at most one fetch a minute, and the provider going down keeps the keys fetched before.
Minutes pass on trio's mock clock (jumped by the test); the network is real."""

from __future__ import annotations

import json
from pathlib import Path

import h11
import jwt
import pytest
import trio
import trio.testing

from connector import pki
from connector.cloud.idp_keys import MIN_FETCH_INTERVAL, RemoteJwks
from connector.cloud.jwks import SigningKey
from connector.cloud.jwtauth import JwtError
from connector.cloud.oauth import server_ssl_context
from connector.cloud.principal import USER_HEADER, PrincipalValidator
from connector.config import load_cloud_config

IDP = "https://idp.example"
T0 = 1_800_000_000.0


class JwksEndpoint:
    """The identity provider's /keys over TLS: serves `keys`, counts requests, can go down."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self.keys = keys
        self.requests = 0
        self.port = 0
        self._scope: trio.CancelScope | None = None

    async def run(self, certs: dict[str, Path], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_ssl_over_tcp_listeners(
                self.port, server_ssl_context(certs["cert"], certs["key"]), host="127.0.0.1")
            self.port = int(listeners[0].transport_listener.socket.getsockname()[1])
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._answer, listeners)
                task_status.started()

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _answer(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await self._serve(stream)
        except trio.BrokenResourceError:  # a client that refused our certificate hung up in the handshake
            pass

    async def _serve(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
        self.requests += 1
        body = json.dumps({"keys": [key.jwk() for key in self.keys]}).encode()
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
            ("content-type", "application/json"), ("content-length", str(len(body))),
            ("cache-control", "max-age=3600")])) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await stream.aclose()


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    ca = pki.create_ca(tmp_path, "idp-ca", "identity provider CA")
    server = pki.issue(ca, tmp_path, "idp", common_name="127.0.0.1", server_names=["127.0.0.1"])
    return {"ca": ca.cert_path, "cert": server.cert_path, "key": server.key_path}


def cloud_config(tmp_path: Path, certs: dict[str, Path], port: int) -> Path:
    (tmp_path / "cloud.toml").write_text(f"""
[tunnel]
cert = "{certs['cert']}"
key = "{certs['key']}"
[[subaccounts]]
id = "acme"
ca = "{certs['ca']}"
token_sha256 = []
[[subaccounts.trusted_issuers]]
issuer = "{IDP}"
audience = "my-app"
jwks_uri = "https://127.0.0.1:{port}/keys"
ca = "{certs['ca']}"
timeout = 5
""")
    return tmp_path / "cloud.toml"


def user_token(key: SigningKey, kid: str | None = None) -> bytes:
    body = {"iss": IDP, "aud": "my-app", "exp": T0 + 300, "sub": "u-9", "email": "bob@example.com"}
    return jwt.encode(body, key.private_key, algorithm="RS256", headers={"kid": kid or key.kid}).encode()


async def refused(validator: PrincipalValidator, token: bytes) -> str:
    with pytest.raises(JwtError) as caught:
        await validator.principal("acme", [(USER_HEADER, token)])
    return caught.value.reason


async def test_jwks_uri_follows_the_providers_keys(
        nursery: trio.Nursery, mock_clock: trio.testing.MockClock, tmp_path: Path, certs: dict[str, Path]) -> None:
    old, new = SigningKey.generate(T0), SigningKey.generate(T0)
    idp = JwksEndpoint([old])
    await nursery.start(idp.run, certs)
    config = load_cloud_config(cloud_config(tmp_path, certs, idp.port))
    issuer = config.subaccounts[0].trusted_issuers[0]
    keys = issuer.keys
    assert isinstance(keys, RemoteJwks)
    validator = PrincipalValidator(None, {("acme", IDP): issuer}, clock=lambda: T0 + 1)
    await nursery.start(keys.run)
    await keys.wait_fetched(1)
    assert idp.requests == 1
    principal = await validator.principal("acme", [(USER_HEADER, user_token(old))])
    assert principal is not None and principal.name == "bob@example.com"

    # the provider adds a key; a token signed with it is accepted after one fetch for its kid
    idp.keys = [old, new]
    mock_clock.jump(MIN_FETCH_INTERVAL)
    principal = await validator.principal("acme", [(USER_HEADER, user_token(new))])
    assert principal is not None and idp.requests == 2

    # a flood of forged kids: refused, and one fetch a minute at most (the periodic one is 10 minutes away)
    for minute in range(3):
        for i in range(50):
            assert await refused(validator, user_token(new, kid=f"forged-{minute}-{i}")) == "unknown_key"
        assert idp.requests == 2 + minute
        mock_clock.jump(MIN_FETCH_INTERVAL)
    assert await refused(validator, user_token(new, kid="forged-last")) == "unknown_key"
    assert idp.requests == 5

    # the provider goes down: the keys fetched before stay trusted, the failed fetch is counted
    idp.down()
    mock_clock.jump(MIN_FETCH_INTERVAL)
    assert await refused(validator, user_token(SigningKey.generate(T0))) == "unknown_key"
    assert keys.failures == 1 and idp.requests == 5
    for key in (old, new):
        assert await validator.principal("acme", [(USER_HEADER, user_token(key))]) is not None


async def test_a_provider_with_another_ca_is_not_trusted(
        nursery: trio.Nursery, mock_clock: trio.testing.MockClock, tmp_path: Path,
        certs: dict[str, Path]) -> None:
    key = SigningKey.generate(T0)
    idp = JwksEndpoint([key])
    await nursery.start(idp.run, certs)
    other = pki.create_ca(tmp_path / "other", "other-ca", "another CA")
    config = load_cloud_config(cloud_config(tmp_path, {**certs, "ca": other.cert_path}, idp.port))
    issuer = config.subaccounts[0].trusted_issuers[0]
    assert isinstance(issuer.keys, RemoteJwks)
    await nursery.start(issuer.keys.run)
    await issuer.keys.wait_fetched(1)
    assert issuer.keys.failures == 1 and idp.requests == 0
    assert "CERTIFICATE_VERIFY_FAILED" in str(issuer.keys.last_error)
    validator = PrincipalValidator(None, {("acme", IDP): issuer}, clock=lambda: T0 + 1)
    assert await refused(validator, user_token(key)) == "unknown_key"

