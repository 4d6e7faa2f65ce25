"""Issue 13's allow-list tools, for real: a TCP mapping over a range of ports carries SOCKS5 sessions
through the cloud and the node to the internal host of each port, and `connector acl add --check`
connects to the internal host (with TLS verified) before anything is stored."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import trio

from connector.cli import init_certs
from connector.cloud.oauth import server_ssl_context
from tests.support.etcdserver import EtcdServer
from tests.support.nodeconfig import cluster_node_toml
from tests.support.socks import socks5_connect
from tests.support.stack import SUBACCOUNT, TOKEN, node_toml, start_node, start_stack


async def consecutive_listeners(count: int) -> list[trio.SocketListener]:
    """Listeners on `count` consecutive free loopback ports (retried if a neighbour is taken)."""
    for _ in range(100):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        first = listeners[0].socket.getsockname()[1]
        try:
            for offset in range(1, count):
                if first + offset > 65535:
                    raise OSError("past the last port")
                listeners += await trio.open_tcp_listeners(first + offset, host="127.0.0.1")
            return listeners
        except OSError:
            for listener in listeners:
                await listener.aclose()
    raise AssertionError(f"no {count} consecutive free ports")


async def tagged_echo(tag: bytes, stream: trio.SocketStream) -> None:
    """Say which internal host this is, then echo."""
    await stream.send_all(tag)
    while data := await stream.receive_some(4096):
        await stream.send_all(data)


async def test_socks5_sessions_to_two_ports_of_a_range_reach_two_internal_hosts(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    listeners = await consecutive_listeners(2)
    for index, listener in enumerate(listeners):
        nursery.start_soon(trio.serve_listeners, functools.partial(tagged_echo, b"backend-%d:" % index), [listener])
    first = listeners[0].socket.getsockname()[1]
    stack = await start_stack(nursery, tmp_path, with_node=False)
    extra = f"""
[[mappings]]
virtual_host = "mq.virtual"
virtual_port = "7100-7101"
internal_host = "127.0.0.1"
internal_port = {first}
protocol = "TCP"
"""
    await start_node(nursery, stack, node_toml(tmp_path, stack.certs, stack.ports.tunnel, stack.backend_http,
                                               stack.backend_tcp, extra_mappings=extra))
    with trio.fail_after(10):
        await stack.wait_registered()
        for index, port in enumerate((7100, 7101)):
            session, code = await socks5_connect(stack.ports.socks5_proxy, "mq.virtual", port, token=TOKEN,
                                                 subaccount=SUBACCOUNT)
            assert code == 0
            await session.send_all(b"ping")
            expected = b"backend-%d:ping" % index
            received = b""
            while len(received) < len(expected):
                received += await session.receive_some(len(expected) - len(received))
            assert received == expected
            await session.aclose()
        outside, code = await socks5_connect(stack.ports.socks5_proxy, "mq.virtual", 7102, token=TOKEN,
                                             subaccount=SUBACCOUNT)
        assert code != 0  # default deny past the range's end
        await outside.aclose()


# --- connector acl add --check -------------------------------------------------------------------

async def acl_cli(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([sys.executable, "-m", "connector", "acl", *args, "--config", str(config)],
                                  capture_stdout=True, capture_stderr=True, check=False)


async def listed(config: Path) -> str:
    result = await acl_cli(config, "list")
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


async def closed_port() -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port: int = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    return port


async def test_check_connects_first_and_a_closed_port_stores_nothing(nursery: trio.Nursery, tmp_path: Path,
                                                                      etcd: EtcdServer) -> None:
    config = cluster_node_toml(tmp_path, "chk", [etcd.url])
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, functools.partial(tagged_echo, b""), listeners)
    open_port = listeners[0].socket.getsockname()[1]
    dead = await closed_port()

    added = await acl_cli(config, "add", "--virtual", "erp.virtual:8000", "--internal", f"127.0.0.1:{open_port}",
                          "--path", "/sap", "--check")
    assert added.returncode == 0, added.stderr
    refused = await acl_cli(config, "add", "--virtual", "hr.virtual:8000", "--internal", f"127.0.0.1:{dead}",
                            "--path", "/api", "--check")
    assert refused.returncode == 2
    message = refused.stderr.decode()
    assert message.startswith(f"connector: --check failed, nothing stored: 127.0.0.1:{dead} unreachable: ")
    assert "refused" in message.lower() and message.count("\n") == 1, message
    assert "erp.virtual:8000" in await listed(config) and "hr.virtual" not in await listed(config)
    # without --check the operator's word is taken (the internal host may be down for maintenance)
    unchecked = await acl_cli(config, "add", "--virtual", "hr.virtual:8000", "--internal", f"127.0.0.1:{dead}",
                              "--path", "/api")
    assert unchecked.returncode == 0, unchecked.stderr


async def test_check_verifies_tls_with_the_mappings_trust_store(nursery: trio.Nursery, tmp_path: Path,
                                                                etcd: EtcdServer) -> None:
    config = cluster_node_toml(tmp_path, "chk", [etcd.url])
    certs = init_certs(tmp_path / "certs", "acme", ["node-a"], ["127.0.0.1", "localhost"])
    tls_listeners = await trio.open_ssl_over_tcp_listeners(
        0, server_ssl_context(certs["server_cert"], certs["server_key"]), host="127.0.0.1")

    async def handshake_then_wait(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
            await stream.receive_some(1)
        except trio.BrokenResourceError:
            pass  # the wrong-CA client gives up mid-handshake

    nursery.start_soon(trio.serve_listeners, handshake_then_wait, tls_listeners)
    transport = tls_listeners[0].transport_listener
    assert isinstance(transport, trio.SocketListener)
    port = transport.socket.getsockname()[1]

    def add(virtual: str, protocol: str, trust_store: Path) -> list[str]:
        paths = ["--path", "/api"] if protocol == "HTTPS" else []
        return ["add", "--virtual", virtual, "--internal", f"127.0.0.1:{port}", "--protocol", protocol,
                "--trust-store", str(trust_store), "--check", *paths]

    for protocol, virtual in (("HTTPS", "hr.virtual:443"), ("TCP-TLS", "db.virtual:5432")):
        wrong = await acl_cli(config, *add(virtual, protocol, certs["subaccount_ca"]))
        assert wrong.returncode == 2
        message = wrong.stderr.decode()
        assert message.startswith(f"connector: --check failed, nothing stored: TLS to 127.0.0.1:{port} failed: ")
        assert "CERTIFICATE_VERIFY_FAILED" in message and message.count("\n") == 1, message
        assert virtual.split(":")[0] not in await listed(config)
        right = await acl_cli(config, *add(virtual, protocol, certs["cloud_ca"]))
        assert right.returncode == 0, right.stderr
        assert virtual.split(":")[0] in await listed(config)


async def test_check_tries_every_port_of_a_range_and_names_the_first_that_fails(
        nursery: trio.Nursery, tmp_path: Path, etcd: EtcdServer) -> None:
    config = cluster_node_toml(tmp_path, "chk", [etcd.url])
    listeners = await consecutive_listeners(3)
    first = listeners[0].socket.getsockname()[1]
    await listeners[1].aclose()  # the middle port does not answer
    nursery.start_soon(trio.serve_listeners, functools.partial(tagged_echo, b""), [listeners[0], listeners[2]])
    refused = await acl_cli(config, "add", "--virtual", "mq.virtual:7100-7102", "--internal", f"127.0.0.1:{first}",
                            "--protocol", "TCP", "--check")
    assert refused.returncode == 2
    assert refused.stderr.decode().startswith(
        f"connector: --check failed, nothing stored: 127.0.0.1:{first + 1} unreachable: "), refused.stderr
    assert "mq.virtual" not in await listed(config)


async def test_a_range_over_a_stored_mappings_port_is_refused(tmp_path: Path, etcd: EtcdServer) -> None:
    config = cluster_node_toml(tmp_path, "chk", [etcd.url])
    assert (await acl_cli(config, "add", "--virtual", "mq.virtual:7105", "--internal", "10.0.0.1:1",
                          "--protocol", "TCP")).returncode == 0
    overlapping = await acl_cli(config, "add", "--virtual", "MQ.virtual:7100-7109", "--internal", "10.0.0.2:9000",
                                "--protocol", "TCP")
    assert overlapping.returncode == 2
    assert overlapping.stderr.decode() == ("connector: invalid mapping: virtual_port: MQ.virtual:7100-7109 overlaps "
                                           "the mapping mq.virtual:7105; remove that first. Nothing stored\n")
    assert "7100-7109" not in await listed(config)
    http_range = await acl_cli(config, "add", "--virtual", "web.virtual:8000-8001", "--internal", "10.0.0.2:80")
    assert http_range.returncode == 2 and "only TCP and TCP-TLS" in http_range.stderr.decode()
    assert (await acl_cli(config, "remove", "--virtual", "mq.virtual:7105")).returncode == 0
    stored = await acl_cli(config, "add", "--virtual", "mq.virtual:7100-7109", "--internal", "10.0.0.2:9000",
                           "--protocol", "TCP")
    assert stored.returncode == 0, stored.stderr
    assert "mq.virtual:7100-7109 -> 10.0.0.2:9000-9009 TCP" in await listed(config)
