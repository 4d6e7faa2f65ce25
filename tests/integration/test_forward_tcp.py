"""The node's TCP / TCP-TLS forwarding against real loopback backends, through a real tunnel
session pair in memory (the node's end runs `serve_stream`)."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest
import trio
from test_forward_support import (
    CHUNK,
    ForwardNode,
    echo_backend,
    free_port,
    make_pki,
    serve,
    start_node,
)

from connector.agent.acl import AccessControl, BackendProtocol, Mapping
from connector.agent.audit import AuditLog
from connector.agent.forward import ForwardSettings, StreamContext
from connector.tunnel.session import SessionStream
from connector.tunnel.types import ErrorCode, StreamProtocol, StreamResetError, Target
from tests.support.exchangeclient import read_until_closed

TARGET = Target("db.virtual", 5432, StreamProtocol.TCP)


def acl_for(port: int, protocol: BackendProtocol = BackendProtocol.TCP, trust_store: str | None = None) -> AccessControl:
    return AccessControl([Mapping("db.virtual", 5432, "127.0.0.1", port, protocol=protocol, trust_store=trust_store)])


async def open_stream(nursery: trio.Nursery, acl: AccessControl,
                      **settings: float) -> tuple[SessionStream, ForwardNode]:
    ctx = StreamContext("sub1", "loc1", AuditLog(None), ForwardSettings(**settings))  # type: ignore[arg-type]
    cloud, node = await start_node(nursery, acl, ctx)
    return await cloud.open_stream(TARGET), node


async def test_tcp_echo_with_half_close(nursery: trio.Nursery) -> None:
    port = await serve(nursery, echo_backend)
    opener, node = await open_stream(nursery, acl_for(port))
    await opener.wait_accepted()
    payload = bytes(range(256)) * 1024  # 256 KiB, several chunks each way
    async with trio.open_nursery() as inner:
        async def send() -> None:
            await opener.send_all(payload)
            await opener.send_eof()  # half-close: the echo server still answers, then closes

        inner.start_soon(send)
        received = await read_until_closed(opener, limit=len(payload) + 1)
    assert received == payload
    (line,) = await node.audit_lines(1)
    assert (line["decision"], line["reason"]) == ("allowed", "allowed")
    assert (line["bytes_in"], line["bytes_out"]) == (len(payload), len(payload))


async def test_tcp_connect_refused(nursery: trio.Nursery) -> None:
    opener, node = await open_stream(nursery, acl_for(await free_port()))
    with pytest.raises(StreamResetError) as caught:
        await opener.wait_accepted()
    assert caught.value.code == ErrorCode.CONNECT_FAILED
    (line,) = await node.audit_lines(1)
    assert line["reason"] == "connect_failed"


async def test_tcp_connect_timeout(nursery: trio.Nursery) -> None:
    # A listener that never accepts, with its backlog filled: further SYNs go unanswered.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        await trio.sleep(0.05)
        opener, node = await open_stream(nursery, acl_for(port), connect_timeout=0.3)
        began = trio.current_time()
        with pytest.raises(StreamResetError) as caught:
            await opener.wait_accepted()
        assert caught.value.code == ErrorCode.CONNECT_TIMEOUT
        assert 0.3 <= trio.current_time() - began < 3.0
        (line,) = await node.audit_lines(1)
        assert line["reason"] == "connect_timeout"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_tcp_backend_reset_resets_stream(nursery: trio.Nursery) -> None:
    async def reset_after_hello(stream: trio.abc.Stream) -> None:
        assert isinstance(stream, trio.SocketStream)
        await stream.receive_some(CHUNK)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await stream.aclose()  # linger 0: RST

    port = await serve(nursery, reset_after_hello)
    opener, node = await open_stream(nursery, acl_for(port))
    await opener.wait_accepted()
    await opener.send_all(b"hello")
    with pytest.raises(StreamResetError) as caught:
        with trio.fail_after(2):
            while True:
                await opener.receive_some(CHUNK)
    assert caught.value.code == ErrorCode.BACKEND_RESET
    (line,) = await node.audit_lines(1)
    assert (line["reason"], line["bytes_in"]) == ("backend_reset", 5)


async def test_tcp_tls_with_right_and_wrong_ca(nursery: trio.Nursery, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    port = await serve(nursery, echo_backend, pki.server_context)
    opener, node = await open_stream(nursery, acl_for(port, BackendProtocol.TCP_TLS, pki.ca_file))
    await opener.wait_accepted()
    await opener.send_all(b"secret")
    received = b""
    while len(received) < 6:
        received += await opener.receive_some(CHUNK)
    assert received == b"secret"
    await opener.aclose()

    wrong, node = await open_stream(nursery, acl_for(port, BackendProtocol.TCP_TLS, pki.other_ca_file))
    with pytest.raises(StreamResetError) as caught:
        await wrong.wait_accepted()
    assert caught.value.code == ErrorCode.BACKEND_TLS_ERROR
    # the cloud learns a generic reason; why (and which host) is the node's to know
    assert caught.value.reason == "TLS to the internal host failed"
    (line,) = await node.audit_lines(1)
    assert line["reason"] == "tls_error" and "certificate verify failed" in line["detail"]
    assert "127.0.0.1" in line["detail"]


async def test_tcp_cloud_reset_closes_the_backend_and_is_audited(nursery: trio.Nursery) -> None:
    backend_closed = trio.Event()

    async def holds(stream: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(CHUNK):
                pass
        backend_closed.set()

    port = await serve(nursery, holds)
    opener, node = await open_stream(nursery, acl_for(port))
    await opener.wait_accepted()
    await opener.send_all(b"partial")
    await opener.reset(ErrorCode.CANCEL, "application gone")
    with trio.fail_after(2):
        await backend_closed.wait()
    (line,) = await node.audit_lines(1)
    assert line["reason"] == "client_gone"
