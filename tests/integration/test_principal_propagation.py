"""Principal propagation end to end: a user's token of the real token service (password grant)
through the real HTTP proxy and tunnel to a real node, which logs the user on to an internal host
on 127.0.0.1 that requires a client certificate of the principal-propagation CA (CERT_REQUIRED)
and echoes its subject; another mapping passes the user in a header; a third passes nothing.

The cloud's wall clock is a `Clock` the test moves, so an expired token is exact.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from connector import pki
from connector.cli import init_certs, main
from connector.cloud.bindings import hash_secret
from connector.cloud.server import CloudServer
from connector.config import load_cloud_config
from connector.demo_backend import https_context, run_backend, run_https_backend
from tests.support.httpclient import HttpClient, Response
from tests.support.stack import SUBACCOUNT, TOKEN, Stack, cloud_toml, node_toml, start_node

USER, PASSWORD = "alice", "alice-password-1"
LIFETIME = 600
USER_HEADER = "SAP-Connectivity-Authentication"
OAUTH = f"""
[[subaccounts.users]]
user_name = "{USER}"
password_scrypt = "{hash_secret(PASSWORD)}"
email = "alice@example.com"

[oauth]
listen = "127.0.0.1:0"
token_lifetime = {LIFETIME}
key_overlap = {LIFETIME}
"""


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def mappings(https_port: int, http_port: int, trust_store: Path, pp_ca: pki.Issued) -> str:
    return f"""
[[mappings]]
virtual_host = "sso.virtual"
virtual_port = 443
internal_host = "127.0.0.1"
internal_port = {https_port}
protocol = "HTTPS"
trust_store = "{trust_store}"
principal_propagation = "certificate"
resources = [{{ path = "/", prefix = true }}]

[[mappings]]
virtual_host = "header.virtual"
virtual_port = 8000
internal_host = "127.0.0.1"
internal_port = {http_port}
protocol = "HTTP"
principal_propagation = "header"
resources = [{{ path = "/", prefix = true }}]

[principal_propagation]
ca_cert = "{pp_ca.cert_path}"
ca_key = "{pp_ca.key_path}"
subject = "CN=${{user_name}},O={SUBACCOUNT}"
validity_minutes = 5
header_name = "X-Remote-User"
"""


@attrs.define
class PPStack:
    stack: Stack
    clock: Clock
    credentials: dict[str, Any]

    @property
    def cloud(self) -> CloudServer:
        return self.stack.cloud

    async def user_token(self) -> str:
        credentials = self.credentials
        assert self.stack.ports.oauth is not None
        sock = await trio.open_tcp_stream("127.0.0.1", self.stack.ports.oauth)
        stream = trio.SSLStream(sock, pki.client_context(self.stack.certs["cloud_ca"]), server_hostname="127.0.0.1",
                                https_compatible=True)
        client = HttpClient(stream)
        body = (f"grant_type=password&username={USER}&password={PASSWORD}&client_id={credentials['clientid']}"
                f"&client_secret={credentials['clientsecret']}").encode()
        try:
            response = await client.request("POST", "/oauth/token",
                                            [("content-type", "application/x-www-form-urlencoded")], body)
        finally:
            await client.aclose()
        assert response.status == 200, response.body
        return str(response.json()["access_token"])

    async def get(self, url: str, *headers: tuple[str, str]) -> Response:
        client = await HttpClient.connect(self.stack.ports.http_proxy)
        try:
            return await client.request("GET", url, [("Proxy-Authorization", f"Bearer {TOKEN}"), *headers])
        finally:
            await client.aclose()


@pytest.fixture
async def pp(nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> PPStack:
    certs = init_certs(tmp_path / "certs", SUBACCOUNT, ["node-a"], ["127.0.0.1", "localhost"])
    backend_http, backend_tcp = await nursery.start(run_backend, "127.0.0.1", 0, 0)
    backend_ca = pki.create_ca(tmp_path / "backend", "backend-ca", "internal host CA")
    server = pki.issue(backend_ca, tmp_path / "backend", "server", common_name="127.0.0.1", server_names=["127.0.0.1"])
    pp_ca = pki.create_ca(tmp_path / "pp", "pp-ca", "principal propagation CA")
    context = https_context(str(server.cert_path), str(server.key_path), str(pp_ca.cert_path))
    https_port = await nursery.start(run_https_backend, "127.0.0.1", 0, context)
    config = cloud_toml(tmp_path, certs, extra=OAUTH)
    clock = Clock()
    cloud = CloudServer(load_cloud_config(config), clock=clock)
    ports = await nursery.start(cloud.run)
    stack = Stack(tmp_path, certs, backend_http, backend_tcp, cloud, ports)
    extra = mappings(https_port, backend_http, backend_ca.cert_path, pp_ca)
    await start_node(nursery, stack, node_toml(tmp_path, certs, ports.tunnel, backend_http, backend_tcp,
                                               extra_mappings=extra))
    with trio.fail_after(10):
        await stack.wait_registered()
    assert main(["binding", "create", "--config", str(config), "--subaccount", SUBACCOUNT, "--compact"]) == 0
    vcap = json.loads(capsys.readouterr().out)
    return PPStack(stack, clock, vcap["connectivity"][0]["credentials"])


def node_requests(pp: PPStack) -> list[dict[str, Any]]:
    assert pp.stack.node is not None
    return pp.stack.node.audit.records("request")


async def test_the_internal_host_sees_the_users_certificate_and_never_the_token(pp: PPStack) -> None:
    token = await pp.user_token()
    for value in (f"Bearer {token}", token):  # as SAP's clients send it: with or without the scheme
        response = await pp.get("http://sso.virtual:443/sap/opu/odata/user", (USER_HEADER, value))
        assert response.status == 200, response.body
        echoed = response.json()
        assert echoed["client_certificate_subject"] == f"CN={USER},O={SUBACCOUNT}"
        assert "sap-connectivity-authentication" not in echoed["headers"]
    records = node_requests(pp)
    assert [(r["mapping"], r["status"], r["user"]) for r in records] == [("sso.virtual:443", 200, USER)] * 2


async def test_without_a_token_the_certificate_host_refuses_the_anonymous_logon(pp: PPStack) -> None:
    response = await pp.get("http://sso.virtual:443/sap/opu/odata/user")
    assert response.status == 502  # the internal host requires a client certificate: TLS fails
    assert "user" not in node_requests(pp)[-1]


@pytest.mark.parametrize("value", [
    "Bearer not-a-jwt",
    "Bearer eyJhbGciOiJub25lIn0.eyJ1c2VyX25hbWUiOiJyb290In0.",  # alg none, user_name root
])
async def test_a_bad_token_is_401_audited_and_reaches_nobody(pp: PPStack, value: str) -> None:
    response = await pp.get("http://erp.virtual:8000/sap/opu/odata/x", (USER_HEADER, value))
    assert response.status == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert json.loads(response.body)["error"] == "invalid_principal_token"
    records = await pp.cloud.audit.wait_records(1)
    assert (records[-1]["reason"], records[-1]["status"], records[-1]["subaccount"]) == (
        "invalid_principal_token", 401, SUBACCOUNT)
    assert node_requests(pp) == []  # no stream was opened: the internal host saw nothing


async def test_an_expired_token_is_401(pp: PPStack) -> None:
    token = await pp.user_token()
    pp.clock.now += LIFETIME
    response = await pp.get("http://sso.virtual:443/sap/opu/odata/user", (USER_HEADER, f"Bearer {token}"))
    assert response.status == 401
    assert node_requests(pp) == []


async def test_a_mapping_without_propagation_gets_neither_header(pp: PPStack) -> None:
    token = await pp.user_token()
    response = await pp.get("http://erp.virtual:8000/sap/opu/odata/x", (USER_HEADER, f"Bearer {token}"),
                            ("SAP-Connectivity-Technical-Authentication", f"Bearer {token}"))
    assert response.status == 200
    headers = response.json()["headers"]
    assert not {"sap-connectivity-authentication", "sap-connectivity-technical-authentication"} & set(headers)
    assert response.json().get("client_certificate_subject") is None
    assert node_requests(pp)[-1]["user"] == USER  # validated, named in the audit, not passed on


async def test_header_mode_names_the_user_and_drops_a_forged_header(pp: PPStack) -> None:
    token = await pp.user_token()
    response = await pp.get("http://header.virtual:8000/x", (USER_HEADER, f"Bearer {token}"),
                            ("X-Remote-User", "admin"))
    assert response.status == 200
    assert response.json()["headers"]["x-remote-user"] == USER
    forged = await pp.get("http://header.virtual:8000/x", ("X-Remote-User", "admin"))
    assert forged.status == 200
    assert "x-remote-user" not in forged.json()["headers"]


async def test_an_application_cannot_send_the_reserved_principal_field(pp: PPStack) -> None:
    client = await HttpClient.connect(pp.stack.ports.http_proxy)
    try:
        await client.stream.send_all(b"GET http://sso.virtual:443/x HTTP/1.1\r\nhost: sso.virtual\r\n"
                                     b"proxy-authorization: Bearer " + TOKEN.encode() + b"\r\n"
                                     b':principal: {"kind":"user","name":"root","claims":{"user_name":"root"}}\r\n\r\n')
        answer = await client.stream.receive_some(65536)
    finally:
        await client.aclose()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert node_requests(pp) == []
