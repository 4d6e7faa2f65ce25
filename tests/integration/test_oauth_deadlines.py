"""The token service's deadlines and failures on a real TLS socket, under trio's autojump clock.

A scrypt check runs in a worker thread that trio cannot interrupt; while it runs the event loop
is idle, so the autojump clock moves to the next deadline: every secret check here outlasts the
request deadline, as one may on a loaded machine. The service must answer, never just close.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

import pytest
import trio

from connector import pki
from connector.cli import init_certs
from connector.cloud.bindings import (
    Binding,
    FileBindingStore,
    UserAccount,
    hash_secret,
    new_binding,
)
from connector.cloud.clients import AuthThrottle, AuthThrottleSettings
from connector.cloud.jwks import FileKeyStore
from connector.cloud.oauth import OAuthSettings, TokenService, server_ssl_context
from connector.listen import serve_tcp
from tests.support.httpclient import HttpClient, Response

T0 = 1_800_000_000.0
REQUEST_TIMEOUT = 3.0
USER, PASSWORD = "alice", "alice-password-1"


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    return init_certs(tmp_path / "certs", "acme", ["node-a"], ["127.0.0.1", "localhost"])


class BrokenStore(FileBindingStore):
    """A binding store with a bug: it fails with something other than the OSError of its contract."""

    def get(self, client_id: str) -> Binding | None:
        raise RuntimeError("a bug in the binding store")


async def start_service(nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path],
                        bindings: FileBindingStore, throttle: AuthThrottle | None = None) -> int:
    user = UserAccount("acme", USER, hash_secret(PASSWORD))
    service = TokenService(OAuthSettings(url="https://127.0.0.1", request_timeout=REQUEST_TIMEOUT),
                           bindings=bindings, keys=FileKeyStore(tmp_path / "keys.json"),
                           ssl_context=server_ssl_context(certs["server_cert"], certs["server_key"]),
                           users={("acme", USER): user}, clock=lambda: T0 + trio.current_time(),
                           throttle=throttle)
    # its connections alone (not `run`): no key maintenance ticks move the clock while a check runs
    port: int = await nursery.start(functools.partial(serve_tcp, service.serve_connection, "127.0.0.1", 0,
                                                      name="token service"))
    return port


async def token_request(port: int, ca: Path, client_id: str, secret: str, form: bytes) -> Response:
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(sock, pki.client_context(ca), server_hostname="127.0.0.1", https_compatible=True)
    client = HttpClient(stream)
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    try:
        return await client.request("POST", "/oauth/token", [
            ("content-type", "application/x-www-form-urlencoded"), ("authorization", f"Basic {basic}")], form)
    finally:
        await client.aclose()


def stored_binding(tmp_path: Path) -> tuple[FileBindingStore, Binding, str]:
    store = FileBindingStore(tmp_path / "bindings.json")
    binding, secret = new_binding("acme", T0)
    store.add(binding)
    return store, binding, secret


async def test_a_token_whose_secret_check_outlasts_the_deadline_is_still_sent(
        nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], autojump_clock: trio.abc.Clock) -> None:
    store, binding, secret = stored_binding(tmp_path)
    port = await start_service(nursery, tmp_path, certs, store)
    start = trio.current_time()
    response = await token_request(port, certs["cloud_ca"], binding.client_id, secret,
                                   b"grant_type=client_credentials")
    assert response.status == 200 and response.json()["access_token"]  # the work was done: it is delivered
    assert trio.current_time() - start == REQUEST_TIMEOUT  # the check ended past the deadline


async def test_a_request_still_waiting_for_a_check_at_the_deadline_gets_503(
        nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], autojump_clock: trio.abc.Clock) -> None:
    store, binding, secret = stored_binding(tmp_path)
    port = await start_service(nursery, tmp_path, certs, store)
    start = trio.current_time()
    response = await token_request(port, certs["cloud_ca"], binding.client_id, secret,
                                   f"grant_type=password&username={USER}&password={PASSWORD}".encode())
    # the client's check ended at the deadline; the user's check was due next: the service is busy
    assert (response.status, response.json()["error"]) == (503, "temporarily_unavailable")
    assert response.headers["connection"] == "close"
    assert trio.current_time() - start == REQUEST_TIMEOUT


async def test_a_throttled_refusal_waits_its_delay_past_the_deadline_and_is_still_401(
        nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], autojump_clock: trio.abc.Clock) -> None:
    delay = REQUEST_TIMEOUT + 2  # an operator's throttle may delay answers longer than request_timeout
    throttle = AuthThrottle(AuthThrottleSettings(failures=0, delay=delay, max_delay=delay))
    store, binding, _ = stored_binding(tmp_path)
    port = await start_service(nursery, tmp_path, certs, store, throttle)
    start = trio.current_time()
    response = await token_request(port, certs["cloud_ca"], binding.client_id, "wrong", b"grant_type=client_credentials")
    assert (response.status, response.json()["error"]) == (401, "invalid_client")
    assert trio.current_time() - start == REQUEST_TIMEOUT + delay  # the check ended at the deadline, then the delay


async def test_an_unexpected_failure_is_answered_500_and_the_service_carries_on(
        nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path]) -> None:
    port = await start_service(nursery, tmp_path, certs, BrokenStore(tmp_path / "bindings.json"))
    for _ in range(2):
        response = await token_request(port, certs["cloud_ca"], "sb-x", "secret", b"grant_type=client_credentials")
        assert (response.status, response.json()["error"]) == (500, "server_error")
        assert response.headers["connection"] == "close"


async def test_a_request_still_arriving_at_the_deadline_gets_408(
        nursery: trio.Nursery, tmp_path: Path, certs: dict[str, Path], autojump_clock: trio.abc.Clock) -> None:
    store, _, _ = stored_binding(tmp_path)
    port = await start_service(nursery, tmp_path, certs, store)
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(sock, pki.client_context(certs["cloud_ca"]), server_hostname="127.0.0.1",
                            https_compatible=True)
    start = trio.current_time()
    await stream.send_all(b"POST /oauth/token HTTP/1.1\r\nhost: x\r\ncontent-length: 40\r\n\r\ngrant_type=")
    answer = b""
    while chunk := await stream.receive_some(4096):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer
    assert trio.current_time() - start == REQUEST_TIMEOUT
