"""The node's tunnel through a real HTTP proxy (Debian's tinyproxy) on 127.0.0.1, and every way it fails.

The cloud side and the demo backend run in process (`tests.support.stack`); the node reaches the
cloud's tunnel port only through ``CONNECT`` to tinyproxy (``[tunnel] proxy``), whose log shows
each CONNECT it served. Proxies that misbehave in ways tinyproxy does not (silent, hanging up,
not HTTP) are small trio servers on port 0.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import pytest
import trio

from connector import pki
from connector.agent.node import Node
from connector.config import load_node_config
from connector.listen import serve_tcp
from connector.tunnel.egress import EgressError, EgressProxy, open_connect_tunnel
from tests.support.httpclient import HttpClient
from tests.support.stack import Stack, node_toml, start_node, start_stack
from tests.support.tinyproxy import TinyProxy

ERP = "http://erp.virtual:8000"
TEST_DEADLINE = 20.0
CONNECT_TIMEOUT = 1.0  # tunnel.connect_timeout of stack.node_toml
USER, PASSWORD = "node-a", "s3cret-pw"


@pytest.fixture
async def stack(nursery: trio.Nursery, tmp_path: Path) -> Stack:
    return await start_stack(nursery, tmp_path, with_node=False)


@pytest.fixture
def tinyproxy(tmp_path: Path):  # type: ignore[no-untyped-def]
    proxy = TinyProxy(tmp_path)
    proxy.start()
    yield proxy
    proxy.kill()


@pytest.fixture
def auth_tinyproxy(tmp_path: Path):  # type: ignore[no-untyped-def]
    proxy = TinyProxy(tmp_path, "auth-proxy", basic_auth=(USER, PASSWORD))
    proxy.start()
    yield proxy
    proxy.kill()


def proxied_node_toml(stack: Stack, proxy_url: str, *, ca: Path | None = None) -> Path:
    path = node_toml(stack.workdir, stack.certs, stack.ports.tunnel, stack.backend_http, stack.backend_tcp,
                     tunnel_extra=f'proxy = "{proxy_url}"')
    if ca is not None:
        path.write_text(path.read_text().replace(str(stack.certs["cloud_ca"]), str(ca)))
    return path


async def request_through_tunnel(stack: Stack) -> dict[str, str]:
    client = await HttpClient.connect(stack.ports.http_proxy)
    try:
        response = await client.request("GET", f"{ERP}/sap/opu/odata/egress", [stack.proxy_auth])
    finally:
        await client.aclose()
    assert response.status == 200, response
    body: dict[str, str] = response.json()
    return body


async def first_failure(config_path: Path, caplog: pytest.LogCaptureFixture) -> str:
    """Run a node until its first failed tunnel attempt; return the warning it logged."""
    node = Node(load_node_config(config_path))
    with caplog.at_level(logging.INFO, logger="connector"), trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            reason = await node.wait_tunnel_failure()
            nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tunnel to ")]
    assert lines and reason in lines[0], lines
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)
    return lines[0]


# --- through tinyproxy ---------------------------------------------------------------------------


async def test_tunnel_through_the_proxy_serves_requests(nursery, stack, tinyproxy, caplog):
    with caplog.at_level(logging.INFO, logger="connector"):
        node = await start_node(nursery, stack, proxied_node_toml(stack, tinyproxy.url))
        with trio.fail_after(TEST_DEADLINE):
            await node.wait_tunnels(1, registered=True)
            body = await request_through_tunnel(stack)
    assert body["path"] == "/sap/opu/odata/egress"
    assert f"CONNECT 127.0.0.1:{stack.ports.tunnel}" in tinyproxy.log()  # it went through the proxy
    assert node.status()["proxy"] == tinyproxy.url
    assert f"tunnels connect through proxy {tinyproxy.url} ([tunnel] proxy)" in caplog.text


async def test_a_host_name_is_connected_by_name_for_the_proxy_to_resolve(nursery, stack, tinyproxy):
    """Proxies' rules often name hosts, and the node may have no DNS for the cloud: CONNECT the
    name of the URL, not the addresses the node would resolve it to without a proxy."""
    path = proxied_node_toml(stack, tinyproxy.url)
    path.write_text(path.read_text().replace("wss://127.0.0.1:", "wss://localhost:"))
    node = await start_node(nursery, stack, path)
    with trio.fail_after(TEST_DEADLINE):
        await node.wait_tunnels(1, registered=True)
        await request_through_tunnel(stack)
    assert f"CONNECT localhost:{stack.ports.tunnel} " in tinyproxy.log()
    assert "CONNECT 127.0.0.1:" not in tinyproxy.log()


async def test_basic_credentials_are_accepted_and_never_shown(nursery, stack, auth_tinyproxy, caplog):
    with caplog.at_level(logging.DEBUG):
        node = await start_node(nursery, stack, proxied_node_toml(stack, auth_tinyproxy.url))
        with trio.fail_after(TEST_DEADLINE):
            await node.wait_tunnels(1, registered=True)
            await request_through_tunnel(stack)
    masked = f"http://{USER}:***@127.0.0.1:{auth_tinyproxy.port}"
    assert node.status()["proxy"] == masked
    assert PASSWORD not in str(node.status()) and PASSWORD not in caplog.text
    assert masked in caplog.text


async def test_wrong_credentials_give_the_credentials_message(stack, auth_tinyproxy, caplog):
    """tinyproxy answers wrong credentials with 401 (squid with 407): both point at the credentials."""
    url = auth_tinyproxy.url_with(USER, "wrong-" + PASSWORD)
    line = await first_failure(proxied_node_toml(stack, url), caplog)
    assert (f"proxy http://{USER}:***@127.0.0.1:{auth_tinyproxy.port} refused CONNECT "
            f"127.0.0.1:{stack.ports.tunnel}: 401 Unauthorized (check [tunnel] proxy credentials)") in line, line


async def test_missing_credentials_give_the_407_message_saying_where_to_put_them(stack, auth_tinyproxy, caplog):
    line = await first_failure(proxied_node_toml(stack, f"http://127.0.0.1:{auth_tinyproxy.port}"), caplog)
    assert f"proxy http://127.0.0.1:{auth_tinyproxy.port} refused CONNECT 127.0.0.1:{stack.ports.tunnel}: 407" in line
    assert "the proxy wants credentials: give them in [tunnel] proxy as http://USER:PASSWORD@HOST:PORT" in line


async def test_a_proxy_denying_the_cloud_port_gives_the_403_message(stack, tmp_path, caplog):
    proxy = TinyProxy(tmp_path, "port-443-only", connect_ports=[443])
    proxy.start()
    try:
        line = await first_failure(proxied_node_toml(stack, proxy.url), caplog)
    finally:
        proxy.kill()
    assert f"proxy {proxy.url} refused CONNECT 127.0.0.1:{stack.ports.tunnel}: 403 " in line, line
    assert "the proxy's rules forbid CONNECT to" in line


async def test_an_unreachable_proxy_is_named(stack, caplog):
    with trio.socket.socket() as sock:  # a port nothing listens on: bound, never listening
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        line = await first_failure(proxied_node_toml(stack, f"http://127.0.0.1:{port}"), caplog)
    assert f"cannot reach proxy http://127.0.0.1:{port} ([tunnel] proxy): " in line, line
    assert "Connection refused" in line


async def test_tls_is_still_verified_through_the_proxy(stack, tinyproxy, tmp_path, caplog):
    other = pki.create_ca(tmp_path / "other", "other-ca", "some other CA")
    line = await first_failure(proxied_node_toml(stack, tinyproxy.url, ca=other.cert_path), caplog)
    assert (f"the cloud's certificate at 127.0.0.1:{stack.ports.tunnel} through proxy {tinyproxy.url} "
            "failed verification") in line, line
    # the certificate it names was fetched through the proxy too (the same way the handshake went)
    assert "issued by 'CN=cloud tunnel endpoint CA,O=cloud-ca'" in line
    assert "trusts 'CN=some other CA,O=other-ca'" in line


# --- proxies that misbehave ----------------------------------------------------------------------


async def fake_proxy(nursery: trio.Nursery, answer: bytes | None) -> EgressProxy:
    """A server on port 0 that reads the CONNECT head and answers `answer` then closes, or (None)
    stays silent until the test ends."""

    async def handler(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(4096)
            if not data:
                return
            head += data
        if answer is None:
            await trio.sleep_forever()
        await stream.send_all(answer)
        await stream.aclose()

    port = await nursery.start(partial(serve_tcp, handler, "127.0.0.1", 0, name="fake proxy"))
    return EgressProxy("127.0.0.1", port)


@pytest.mark.parametrize(("answer", "expected"), [
    (b"", "closed the connection without answering CONNECT cloud.example:443"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "answered CONNECT cloud.example:443 with something that is not HTTP"),
    (b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=x\r\n\r\n",
     "refused CONNECT cloud.example:443: 407 Proxy Authentication Required (the proxy wants credentials"),
    (b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM\r\n"
     b"Proxy-Authenticate: Negotiate\r\n\r\n",
     "407 Proxy Authentication Required (the proxy asks for NTLM or Negotiate authentication; the node "
     "speaks Basic only"),
    (b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n",
     "refused CONNECT cloud.example:443: 502 Bad Gateway (the proxy could not reach cloud.example:443"),
])
async def test_misbehaving_proxies_are_described(nursery, answer, expected):
    proxy = await fake_proxy(nursery, answer)
    with pytest.raises(EgressError) as caught:
        await open_connect_tunnel(proxy, "cloud.example", 443, deadline=trio.current_time() + TEST_DEADLINE,
                                  timeout=TEST_DEADLINE)
    assert f"proxy http://127.0.0.1:{proxy.port}" in str(caught.value)
    assert expected in str(caught.value), caught.value


@pytest.mark.filterwarnings("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")
async def test_the_proxy_connection_is_closed_when_the_caller_gives_up(nursery):
    """Cancelled mid-CONNECT (the node stopping): the socket to the proxy is closed, not left to the
    garbage collector (which would warn "unclosed socket")."""
    closed = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)  # the CONNECT; then wait for the node's side to close
        while await stream.receive_some(4096):
            pass
        closed.set()

    port = await nursery.start(partial(serve_tcp, handler, "127.0.0.1", 0, name="silent proxy"))
    with trio.move_on_after(0.2):
        await open_connect_tunnel(EgressProxy("127.0.0.1", port), "cloud.example", 443,
                                  deadline=trio.current_time() + TEST_DEADLINE, timeout=TEST_DEADLINE)
    with trio.fail_after(TEST_DEADLINE):
        await closed.wait()


async def test_a_silent_proxy_times_out_by_the_dial_deadline(nursery):
    proxy = await fake_proxy(nursery, None)
    start = trio.current_time()
    with pytest.raises(EgressError, match=r"did not answer CONNECT cloud\.example:443 within 0\.3 s"):
        await open_connect_tunnel(proxy, "cloud.example", 443, deadline=start + 0.3, timeout=0.3)
    assert trio.current_time() - start < TEST_DEADLINE
