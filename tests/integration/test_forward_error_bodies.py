"""What an application learns when the node cannot reach an internal host: a reason and a generic
sentence, never an on-premise detail (internal host names, resolver and TLS errors, file paths of
trust stores). The detail is in the node's audit line. Through the whole stack on loopback:
application -> proxy -> tunnel -> node."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.support.httpclient import HttpClient
from tests.support.stack import Stack, node_toml, start_node, start_stack

UNRESOLVABLE = "erp-db7.corp-secret.invalid"


def _mappings(backend_http: int, trust_dir: Path, good_ca: Path) -> str:
    garbage = trust_dir / "garbage-ca.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    return f"""
[[mappings]]
virtual_host = "nowhere.virtual"
virtual_port = 80
internal_host = "{UNRESOLVABLE}"
internal_port = 8000
resources = [{{ path = "/", prefix = true }}]

[[mappings]]
virtual_host = "notrust.virtual"
virtual_port = 443
internal_host = "localhost"
internal_port = {backend_http}
protocol = "HTTPS"
trust_store = "{trust_dir / 'missing-ca.pem'}"
resources = [{{ path = "/", prefix = true }}]

[[mappings]]
virtual_host = "badtrust.virtual"
virtual_port = 443
internal_host = "localhost"
internal_port = {backend_http}
protocol = "HTTPS"
trust_store = "{garbage}"
resources = [{{ path = "/", prefix = true }}]

[[mappings]]
virtual_host = "notls.virtual"
virtual_port = 443
internal_host = "localhost"
internal_port = {backend_http}
protocol = "HTTPS"
trust_store = "{good_ca}"
resources = [{{ path = "/", prefix = true }}]
"""


@pytest.fixture
async def stack(nursery: trio.Nursery, tmp_path: Path) -> Stack:
    stack = await start_stack(nursery, tmp_path, with_node=False)
    trust_dir = tmp_path / "secret-trust-store-dir"
    trust_dir.mkdir()
    extra = _mappings(stack.backend_http, trust_dir, stack.certs["cloud_ca"])
    config = node_toml(tmp_path, stack.certs, stack.ports.tunnel, stack.backend_http, stack.backend_tcp,
                       extra_mappings=extra)
    await start_node(nursery, stack, config)
    with trio.fail_after(10):
        await stack.wait_registered()
    return stack


@pytest.mark.parametrize(
    ("url", "status", "reason", "secrets", "detail"),
    [
        ("http://nowhere.virtual/x", 502, "internal_host_unreachable",
         [UNRESOLVABLE, "corp-secret", "8000", "Name or service", "not known", "getaddrinfo"], UNRESOLVABLE),
        ("http://notrust.virtual:443/x", 502, "backend_tls_error",
         ["secret-trust-store-dir", "missing-ca.pem", "No such file", "localhost"], "missing-ca.pem"),
        ("http://badtrust.virtual:443/x", 502, "backend_tls_error",
         ["secret-trust-store-dir", "garbage-ca.pem", "PEM", "localhost"], "garbage-ca.pem"),
        ("http://notls.virtual:443/x", 502, "backend_tls_error",
         ["localhost", "SSL", "WRONG_VERSION", "record"], "localhost"),
    ],
)
async def test_error_bodies_reveal_no_on_premise_detail(
    stack: Stack, url: str, status: int, reason: str, secrets: list[str], detail: str,
) -> None:
    client = await HttpClient.connect(stack.ports.http_proxy)
    with trio.fail_after(10):
        response = await client.request("GET", url, [stack.proxy_auth])
    assert (response.status, response.json()["error"]) == (status, reason)
    answer = response.body.decode() + "".join(f"{k}: {v}" for k, v in response.headers.items())
    for secret in secrets:
        assert secret.lower() not in answer.lower(), (secret, answer)
    # the operator still learns what happened: the node's audit line carries the detail
    assert stack.node is not None
    line = stack.node.audit.records("request")[-1]
    assert line["reason"] == reason
    assert detail in line["detail"]
