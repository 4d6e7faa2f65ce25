"""The node's TCP / TCP-TLS forwarding against real loopback backends."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
from test_forward_support import (
    CHUNK,
    echo_backend,
    free_port,
    make_pki,
    read_raw_until_closed,
    serve,
)

from connector.agent.acl import AccessControl, BackendProtocol, Mapping
from connector.agent.audit import AuditLog
from connector.agent.forward import ForwardSettings, StreamContext, serve_stream
from connector.tunnel.testing import MemoryTunnelStream, memory_stream_pair
from connector.tunnel.types import ErrorCode, StreamProtocol, StreamResetError, Target

TARGET = Target("db.virtual", 5432, StreamProtocol.TCP)


def acl_for(port: int, protocol: BackendProtocol = BackendProtocol.TCP, trust_store: str | None = None) -> AccessControl:
    return AccessControl([Mapping("db.virtual", 5432, "127.0.0.1", port, protocol=protocol, trust_store=trust_store)])


def open_stream(nursery: trio.Nursery, acl: AccessControl, audit: AuditLog, **settings: float) -> MemoryTunnelStream:
    ctx = StreamContext("sub1", "loc1", audit, ForwardSettings(**settings))  # type: ignore[arg-type]
    opener, acceptor = memory_stream_pair(TARGET)
    nursery.start_soon(serve_stream, acceptor, acl, ctx)
    return opener


async def wait_for_audit(audit: AuditLog) -> dict[str, object]:
    with trio.fail_after(2):
        while not audit.records("request"):  # noqa: ASYNC110 (AuditLog is synchronous)
            await trio.sleep(0.01)
    return audit.records("request")[-1]


async def test_tcp_echo_with_half_close(nursery: trio.Nursery) -> None:
    port = await serve(nursery, echo_backend)
    audit = AuditLog(None)
    opener = open_stream(nursery, acl_for(port), audit)
    await opener.wait_accepted()
    payload = bytes(range(256)) * 1024  # 256 KiB, several chunks each way
    async with trio.open_nursery() as inner:
        async def send() -> None:
            await opener.send_all(payload)
            await opener.send_eof()  # half-close: the echo server still answers, then closes

        inner.start_soon(send)
        received = await read_raw_until_closed(opener, limit=len(payload) + 1)
    assert received == payload
    line = await wait_for_audit(audit)
    assert (line["decision"], line["reason"]) == ("allowed", "allowed")
    assert (line["bytes_in"], line["bytes_out"]) == (len(payload), len(payload))


async def test_tcp_connect_refused(nursery: trio.Nursery) -> None:
    audit = AuditLog(None)
    opener = open_stream(nursery, acl_for(await free_port()), audit)
    with pytest.raises(StreamResetError) as caught:
        await opener.wait_accepted()
    assert caught.value.code == ErrorCode.CONNECT_FAILED
    assert (await wait_for_audit(audit))["reason"] == "connect_failed"


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
        opener = open_stream(nursery, acl_for(port), AuditLog(None), connect_timeout=0.3)
        began = trio.current_time()
        with pytest.raises(StreamResetError) as caught:
            await opener.wait_accepted()
        assert caught.value.code == ErrorCode.CONNECT_TIMEOUT
        assert 0.3 <= trio.current_time() - began < 3.0
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
    opener = open_stream(nursery, acl_for(port), AuditLog(None))
    await opener.wait_accepted()
    await opener.send_all(b"hello")
    with pytest.raises(StreamResetError) as caught:
        with trio.fail_after(2):
            while True:
                await opener.receive_some(CHUNK)
    assert caught.value.code == ErrorCode.BACKEND_RESET


async def test_tcp_tls_with_right_and_wrong_ca(nursery: trio.Nursery, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    port = await serve(nursery, echo_backend, pki.server_context)
    audit = AuditLog(None)
    opener = open_stream(nursery, acl_for(port, BackendProtocol.TCP_TLS, pki.ca_file), audit)
    await opener.wait_accepted()
    await opener.send_all(b"secret")
    received = b""
    while len(received) < 6:
        received += await opener.receive_some(CHUNK)
    assert received == b"secret"
    await opener.aclose()

    wrong = open_stream(nursery, acl_for(port, BackendProtocol.TCP_TLS, pki.other_ca_file), audit)
    with pytest.raises(StreamResetError) as caught:
        await wrong.wait_accepted()
    assert caught.value.code == ErrorCode.BACKEND_TLS_ERROR
    # the cloud learns a generic reason; why (and which host) is the node's to know
    assert caught.value.reason == "TLS to the internal host failed"
    line = audit.records("request")[-1]
    assert line["reason"] == "tls_error" and "certificate verify failed" in line["detail"]
    assert "127.0.0.1" in line["detail"]
