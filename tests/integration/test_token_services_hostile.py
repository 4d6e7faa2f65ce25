"""The token client against hostile token services: real TLS on loopback, answers we choose."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import h11
import pytest
import trio

from connector.cli import init_certs
from connector.cloud.oauth import server_ssl_context
from connector.cloud.token_client import (
    MAX_ERROR_CHARS,
    TokenClientSettings,
    TokenError,
    TokenRequest,
    fetch_token,
)

SLOW_TIMEOUT = 0.5  # the client's deadline against a service that never answers


async def serve(nursery: trio.Nursery, certs: dict[str, Path], answer: Callable[[trio.SSLStream[trio.SocketStream]],
                                                                                  Awaitable[None]]) -> int:
    listeners = await trio.open_ssl_over_tcp_listeners(0, server_ssl_context(certs["server_cert"],
                                                                              certs["server_key"]), host="127.0.0.1")
    await nursery.start(trio.serve_listeners, answer, listeners)
    return int(listeners[0].transport_listener.socket.getsockname()[1])


def respond(status: int, body: bytes) -> Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]:
    async def answer(stream: trio.SSLStream[trio.SocketStream]) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
            ("content-type", "application/json"), ("content-length", str(len(body)))])) + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage()))
        await stream.aclose()
    return answer


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    return init_certs(tmp_path / "certs", "acme", ["node-a"], ["127.0.0.1", "localhost"])


async def fetch(port: int, certs: dict[str, Path], **settings: float) -> dict[str, object]:
    request = TokenRequest(f"https://127.0.0.1:{port}/oauth/token", "client", "secret", "client_credentials")
    return await fetch_token(request, TokenClientSettings(ca=certs["cloud_ca"], **settings))  # type: ignore[arg-type]


async def test_a_long_error_description_is_cut(nursery: trio.Nursery, certs: dict[str, Path]) -> None:
    body = json.dumps({"error": "invalid_client", "error_description": "x" * 10_000}).encode()
    port = await serve(nursery, certs, respond(401, body))
    with pytest.raises(TokenError) as caught:
        await fetch(port, certs)
    assert str(caught.value) == "the token service answered 401 invalid_client: " + "x" * MAX_ERROR_CHARS


async def test_an_answer_over_the_bound_is_refused(nursery: trio.Nursery, certs: dict[str, Path]) -> None:
    body = json.dumps({"access_token": "t" * 100_000, "expires_in": 60}).encode()
    port = await serve(nursery, certs, respond(200, body))
    with pytest.raises(TokenError, match="over 65536 bytes"):
        await fetch(port, certs)


async def test_a_silent_service_is_given_up_at_the_timeout(nursery: trio.Nursery, certs: dict[str, Path]) -> None:
    async def silent(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await trio.sleep_forever()

    port = await serve(nursery, certs, silent)
    start = trio.current_time()
    with pytest.raises(TokenError, match="did not answer within 0.5 s"):
        await fetch(port, certs, timeout=SLOW_TIMEOUT)
    assert trio.current_time() - start >= SLOW_TIMEOUT
