"""The etcd store over mutual TLS, as configured from a node's [cluster] etcd_ca/etcd_cert/etcd_key:
verification on, a client certificate required, and a clear StoreUnavailable when either is wrong."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import trio

from connector import pki
from ha.etcd import EtcdSettings, EtcdStore
from ha.store import StoreUnavailable
from tests.support.etcdserver import etcd_binary, free_port


@pytest.fixture
def tls_etcd(tmp_path: Path):
    ca = pki.create_ca(tmp_path, "etcd-ca", "etcd test CA")
    server = pki.issue(ca, tmp_path, "etcd-server", common_name="127.0.0.1", server_names=["127.0.0.1"])
    client = pki.issue(ca, tmp_path, "etcd-client", common_name="node-a", client=True)
    other_ca = pki.create_ca(tmp_path, "other-ca", "not etcd's CA")
    rogue = pki.issue(other_ca, tmp_path, "rogue-client", common_name="node-x", client=True)
    port, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    log = open(tmp_path / "etcd.log", "ab")  # noqa: SIM115 - closed below
    process = subprocess.Popen([
        etcd_binary(), "--name", "tls", "--data-dir", str(tmp_path / "data"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
        "--cert-file", str(server.cert_path), "--key-file", str(server.key_path),
        "--client-cert-auth", "--trusted-ca-file", str(ca.cert_path),
        "--heartbeat-interval", "10", "--election-timeout", "100",
    ], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield {"url": url, "ca": ca, "client": client, "rogue": rogue, "other_ca": other_ca}
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        log.close()


def store(url: str, ca: pki.Issued, client: pki.Issued | None) -> EtcdStore:
    return EtcdStore("tls", EtcdSettings(
        endpoints=(url,), ca_file=str(ca.cert_path),
        cert_file=str(client.cert_path) if client else None, key_file=str(client.key_path) if client else None,
        timeout=1.0,
    ))


async def test_mutual_tls_works_and_wrong_credentials_are_refused(tls_etcd):
    good = store(tls_etcd["url"], tls_etcd["ca"], tls_etcd["client"])
    with trio.fail_after(15):
        while True:  # etcd starting: bounded wait for the first successful write
            try:
                revision = await good.put("config/probe", b"ok")
                break
            except StoreUnavailable:
                await trio.sleep(0.1)
    assert revision and (await good.get("config/probe")).value == b"ok"
    await good.aclose()

    for name, candidate in {
        "no client certificate": store(tls_etcd["url"], tls_etcd["ca"], None),
        "client certificate from another CA": store(tls_etcd["url"], tls_etcd["ca"], tls_etcd["rogue"]),
        "server not verifiable with the configured CA": store(tls_etcd["url"], tls_etcd["other_ca"], tls_etcd["client"]),
    }.items():
        with trio.fail_after(10), pytest.raises(StoreUnavailable):
            await candidate.get("config/probe")
            pytest.fail(f"etcd answered with {name}")
        await candidate.aclose()
