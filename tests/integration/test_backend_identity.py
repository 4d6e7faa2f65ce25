"""Backend identity end to end: the client certificate the node presents to an internal host
(from files or from the cluster's encrypted secrets in a real etcd), and redirects naming the
internal host rewritten to the virtual host.

The internal host is a real TLS server on 127.0.0.1 that requires a client certificate of a test
CA and reports the subject (CN) of the one it got. The application talks to the cloud proxy (HTTP)
or its SOCKS5 port (TCP-TLS), as a cloud application would.
"""

from __future__ import annotations

import datetime
import json
import os
import socketserver
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import h11
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_forward_support import make_pki

from connector.agent.runtime import build_node
from connector.config import load_node_config
from connector.tunnel.types import StreamProtocol, Target
from tests.support.etcdserver import EtcdServer
from tests.support.httpclient import HttpClient
from tests.support.socks import socks5_connect
from tests.support.stack import SUBACCOUNT, TOKEN, Stack, node_toml, start_node, start_stack

PEM = serialization.Encoding.PEM


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@attrs.frozen
class Identities:
    """A trust store for the internal host's certificate, a client CA the internal host requires,
    and client identities of that CA: `<cn>.pem` / `<cn>.key` (0600) and `bundle(cn)`."""

    directory: Path
    trust_store: str

    def cert(self, cn: str) -> Path:
        return self.directory / f"{cn}.pem"

    def key(self, cn: str) -> Path:
        return self.directory / f"{cn}.key"

    def bundle(self, cn: str) -> bytes:
        return self.cert(cn).read_bytes() + self.key(cn).read_bytes()


def make_identities(directory: Path, names: tuple[str, ...] = ("system-a", "system-b")) -> Identities:
    directory.mkdir()
    pki = make_pki(directory)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("client-ca")).issuer_name(_name("client-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (directory / "client-ca.pem").write_bytes(ca.public_bytes(PEM))
    for cn in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (directory / f"{cn}.pem").write_bytes(cert.public_bytes(PEM))
        fd = os.open(directory / f"{cn}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return Identities(directory, pki.ca_file)


def make_server_context(ids: Identities) -> ssl.SSLContext:
    """The internal host's: requires a client certificate of the client CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(ids.directory / "server.pem", ids.directory / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(ids.directory / "client-ca.pem"))
    return context


def peer_cn(tls: ssl.SSLSocket) -> str:
    cert = tls.getpeercert()
    assert cert is not None
    return dict(item[0] for item in cert["subject"])["commonName"]


class InternalHost(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A blocking TLS server in threads, as most internal hosts are: a handshake it refuses sends
    the alert before it closes (a trio server would close without it). Kinds:

    "http": one request per connection (Connection: close, so the node pools nothing); /whoami
            answers the client certificate's CN, /redirect a 302 to itself by its own host:port;
    "tcp":  sends the CN and closes.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, context: ssl.SSLContext, kind: str) -> None:
        super().__init__(("127.0.0.1", 0), _InternalHostHandler)
        self.context, self.kind = context, kind

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _InternalHostHandler(socketserver.BaseRequestHandler):
    server: InternalHost

    def handle(self) -> None:
        self.request.settimeout(10)
        raw = self.request.dup()  # keeps the connection open after a refused handshake
        try:
            with self.server.context.wrap_socket(self.request, server_side=True) as tls:
                if self.server.kind == "tcp":
                    tls.sendall(peer_cn(tls).encode())
                else:
                    self._http(tls)
        except (ssl.SSLError, OSError):
            # a client without a certificate: refused with an alert; then a lingering close (read
            # until the client closes), else unread request bytes turn our close into a reset
            # that can destroy the alert before the client reads it
            try:
                while raw.recv(65536):
                    pass
            except OSError:
                pass
        finally:
            raw.close()

    def _http(self, tls: ssl.SSLSocket) -> None:
        conn = h11.Connection(h11.SERVER)
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(tls.recv(65536))
        assert isinstance(event, h11.Request)
        headers = [(b"connection", b"close")]
        if event.target == b"/redirect":
            own = f"https://127.0.0.1:{self.server.port}"
            headers += [(b"location", f"{own}/next?x=1".encode()), (b"content-location", f"{own}/redirect".encode()),
                        (b"content-length", b"0")]
            tls.sendall(conn.send(h11.Response(status_code=302, headers=headers)) + conn.send(h11.EndOfMessage()))
            return
        body = peer_cn(tls).encode()
        headers.append((b"content-length", str(len(body)).encode()))
        tls.sendall(conn.send(h11.Response(status_code=200, headers=headers)) + conn.send(h11.Data(data=body))
                    + conn.send(h11.EndOfMessage()))


@attrs.frozen
class InternalHosts:
    ids: Identities
    http: InternalHost
    tcp: InternalHost
    http_tls12: InternalHost  # TLS 1.2 at most: a refused client certificate fails our handshake
    tcp_tls12: InternalHost


@pytest.fixture
def internal_hosts(tmp_path: Path) -> Iterator[InternalHosts]:
    """HTTPS and TCP-TLS internal hosts with TLS 1.3 and 1.2 (stopped after the test)."""
    ids = make_identities(tmp_path / "ids")
    tls12 = make_server_context(ids)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    servers = [InternalHost(make_server_context(ids), "http"), InternalHost(make_server_context(ids), "tcp"),
               InternalHost(tls12, "http"), InternalHost(tls12, "tcp")]
    threads = [threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}) for server in servers]
    for thread in threads:
        thread.start()
    try:
        yield InternalHosts(ids, *servers)
    finally:
        for server, thread in zip(servers, threads, strict=True):
            server.shutdown()
            server.server_close()
            thread.join()


def mapping_toml(virtual: str, port: int, internal_port: int, protocol: str, ids: Identities,
                 identity: str = "") -> str:
    resources = 'resources = [{ path = "/", prefix = true }]' if protocol == "HTTPS" else ""
    return f"""
[[mappings]]
virtual_host = "{virtual}"
virtual_port = {port}
internal_host = "127.0.0.1"
internal_port = {internal_port}
protocol = "{protocol}"
trust_store = "{ids.trust_store}"
{identity}
{resources}
"""


def files(ids: Identities, cn: str) -> str:
    return f'client_cert = "{ids.cert(cn)}"\nclient_key = "{ids.key(cn)}"'


async def get(stack: Stack, url: str) -> tuple[int, dict[str, str], bytes]:
    client = await HttpClient.connect(stack.ports.http_proxy)
    try:
        with trio.fail_after(10):
            response = await client.request("GET", url, [stack.proxy_auth])
    finally:
        await client.aclose()
    return response.status, response.headers, response.body


async def socks_read(stack: Stack, host: str, port: int) -> tuple[int, bytes]:
    with trio.fail_after(10):
        sock, code = await socks5_connect(stack.ports.socks5_proxy, host, port, token=TOKEN, subaccount=SUBACCOUNT)
        received = b""
        if code == 0:
            try:
                while chunk := await sock.receive_some(4096):
                    received += chunk
            except trio.BrokenResourceError:
                pass
        await sock.aclose()
    return code, received


async def audit_line(stack: Stack, mapping: str) -> dict[str, object]:
    """The node's latest request audit line of `mapping`, once written (after the answer, maybe)."""
    assert stack.node is not None
    with trio.fail_after(5):
        written = 1
        while True:
            lines = [r for r in await stack.node.audit.wait_records(written, "request") if r["mapping"] == mapping]
            if lines:
                return lines[-1]
            written += 1


async def start_with_mappings(nursery: trio.Nursery, tmp_path: Path, extra: str) -> Stack:
    stack = await start_stack(nursery, tmp_path, with_node=False)
    await start_node(nursery, stack, node_toml(tmp_path, stack.certs, stack.ports.tunnel, stack.backend_http,
                                               stack.backend_tcp, extra_mappings=extra))
    with trio.fail_after(10):
        await stack.wait_registered()
    return stack


async def test_client_certificate_from_files(nursery: trio.Nursery, tmp_path: Path,
                                             internal_hosts: InternalHosts) -> None:
    hosts, ids = internal_hosts, internal_hosts.ids
    stack = await start_with_mappings(nursery, tmp_path, (
        mapping_toml("sys.virtual", 8001, hosts.http.port, "HTTPS", ids, files(ids, "system-a"))
        + mapping_toml("sys.virtual", 7100, hosts.tcp.port, "TCP-TLS", ids, files(ids, "system-a"))
        + mapping_toml("nocert.virtual", 8001, hosts.http.port, "HTTPS", ids)
        + mapping_toml("nocert.virtual", 7100, hosts.tcp.port, "TCP-TLS", ids)))

    status, _, body = await get(stack, "http://sys.virtual:8001/whoami")
    assert (status, body) == (200, b"system-a")
    assert await socks_read(stack, "sys.virtual", 7100) == (0, b"system-a")

    # without a certificate the internal host refuses it: a TLS failure, as for a wrong trust
    # store; the application reads a generic sentence, the node's audit line says why
    status, _, body = await get(stack, "http://nocert.virtual:8001/whoami")
    assert (status, json.loads(body)["error"]) == (502, "backend_tls_error")
    assert "127.0.0.1" not in body.decode()
    line = await audit_line(stack, "nocert.virtual:8001")
    assert line["reason"] == "backend_tls_error" and "certificate required" in str(line["detail"])
    # TCP-TLS: with TLS 1.3 the refusal comes after our side of the handshake, so after the SOCKS5
    # reply; the connection then ends without a byte, and the node knows why
    _, received = await socks_read(stack, "nocert.virtual", 7100)
    assert received == b""
    line = await audit_line(stack, "nocert.virtual:7100")
    assert line["reason"] == "tls_error" and "certificate required" in str(line["detail"])


async def test_refused_client_certificate_with_tls12(nursery: trio.Nursery, tmp_path: Path,
                                                     internal_hosts: InternalHosts) -> None:
    """TLS 1.2 refuses in the handshake: the SOCKS5 client gets a failed connect, not a success."""
    hosts, ids = internal_hosts, internal_hosts.ids
    other = make_identities(tmp_path / "other")  # a client certificate of a CA the host does not trust
    stack = await start_with_mappings(nursery, tmp_path, (
        mapping_toml("sys.virtual", 8001, hosts.http_tls12.port, "HTTPS", ids, files(ids, "system-a"))
        + mapping_toml("sys.virtual", 7100, hosts.tcp_tls12.port, "TCP-TLS", ids, files(ids, "system-a"))
        + mapping_toml("wrong.virtual", 8001, hosts.http_tls12.port, "HTTPS", ids, files(other, "system-a"))
        + mapping_toml("wrong.virtual", 7100, hosts.tcp_tls12.port, "TCP-TLS", ids, files(other, "system-a"))))
    status, _, body = await get(stack, "http://sys.virtual:8001/whoami")
    assert (status, body) == (200, b"system-a")
    assert await socks_read(stack, "sys.virtual", 7100) == (0, b"system-a")

    status, _, body = await get(stack, "http://wrong.virtual:8001/whoami")
    assert (status, json.loads(body)["error"]) == (502, "backend_tls_error")
    code, _ = await socks_read(stack, "wrong.virtual", 7100)
    assert code == 0x01  # general failure: the connect did not succeed
    for mapping in ("wrong.virtual:8001", "wrong.virtual:7100"):
        line = await audit_line(stack, mapping)
        assert "TLS to 127.0.0.1" in str(line["detail"]) and "alert" in str(line["detail"]), line


async def test_redirect_to_the_internal_host_names_the_virtual_host(nursery: trio.Nursery, tmp_path: Path,
                                                                    internal_hosts: InternalHosts) -> None:
    ids = internal_hosts.ids
    stack = await start_with_mappings(nursery, tmp_path, mapping_toml(
        "sys.virtual", 8001, internal_hosts.http.port, "HTTPS", ids, files(ids, "system-a")))
    status, headers, _ = await get(stack, "http://sys.virtual:8001/redirect")
    assert status == 302
    assert headers["location"] == "http://sys.virtual:8001/next?x=1"
    assert headers["content-location"] == "http://sys.virtual:8001/redirect"


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "connector", *args], capture_output=True, input=stdin, timeout=60)


async def test_client_identity_from_a_cluster_secret_follows_rotation(
        nursery: trio.Nursery, tmp_path: Path, etcd: EtcdServer, internal_hosts: InternalHosts) -> None:
    ids, https = internal_hosts.ids, internal_hosts.http.port
    stack = await start_stack(nursery, tmp_path, with_node=False)
    cluster = f"""
[cluster]
name = "it"
etcd = ["{etcd.url}"]
ttl = 2
loop_wait = 0.2
retry_timeout = 0.5
secrets_key = "{tmp_path / 'cluster.key'}"
"""
    extra = mapping_toml("sys.virtual", 8001, https, "HTTPS", ids, 'client_identity = "secret:erp-system"')
    path = node_toml(tmp_path, stack.certs, stack.ports.tunnel, stack.backend_http, stack.backend_tcp,
                     cluster=cluster, extra_mappings=extra)
    stored = await trio.to_thread.run_sync(
        lambda: cli("secret", "--config", str(path), "set", "erp-system", stdin=ids.bundle("system-a")))
    assert stored.returncode == 0, stored.stderr
    node = build_node(load_node_config(path))
    await nursery.start(node.run)
    with trio.fail_after(10):
        await stack.cloud.registry.wait_master(SUBACCOUNT, "")
        await node.wait_tunnels(1, registered=True)
    stack.node = node

    status, _, body = await get(stack, "http://sys.virtual:8001/whoami")
    assert (status, body) == (200, b"system-a")

    rotated = await trio.to_thread.run_sync(
        lambda: cli("secret", "--config", str(path), "set", "erp-system", stdin=ids.bundle("system-b")))
    assert rotated.returncode == 0, rotated.stderr
    revision = int(rotated.stdout.split()[-1])
    assert node.origins.secrets is not None
    with trio.fail_after(10):
        await node.origins.secrets.wait_revision(revision)
    status, _, body = await get(stack, "http://sys.virtual:8001/whoami")
    assert (status, body) == (200, b"system-b")

    # `connector acl add` with the options: --check presents the secret as the nodes will
    def add(virtual: str, *options: str) -> list[str]:
        return ["acl", "--config", str(path), "add", "--virtual", virtual, "--protocol", "HTTPS",
                "--internal", f"127.0.0.1:{internal_hosts.http_tls12.port}", "--trust-store", ids.trust_store,
                "--path", "/", "--check", *options]

    added = await trio.to_thread.run_sync(lambda: cli(*add("cli.virtual:8002", "--client-identity", "secret:erp-system")))
    assert added.returncode == 0, added.stderr
    with trio.fail_after(10):
        await node.wait_mapping(Target("cli.virtual", 8002, StreamProtocol.HTTP))
    status, _, body = await get(stack, "http://cli.virtual:8002/whoami")
    assert (status, body) == (200, b"system-b")
    absent = await trio.to_thread.run_sync(lambda: cli(*add("absent.virtual:8002", "--client-identity", "secret:nope")))
    assert absent.returncode == 2 and b"secret:nope: no such secret" in absent.stderr, absent.stderr
    os.chmod(ids.key("system-a"), 0o644)
    loose = await trio.to_thread.run_sync(lambda: cli(*add(
        "loose.virtual:8002", "--client-cert", str(ids.cert("system-a")), "--client-key", str(ids.key("system-a")))))
    assert loose.returncode == 2 and b"readable by others" in loose.stderr, loose.stderr
