"""`connector certs csr|sign|install`: a node certificate renewed by an operator whose
subaccount CA is kept offline (real files, the real command-line entry point)."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest

from connector import pki
from connector.cli import init_certs, main


def test_csr_sign_install_replaces_the_pair_with_the_names_the_operator_gives(tmp_path: Path) -> None:
    certs = init_certs(tmp_path / "certs", "acme", ["node-a"], ["127.0.0.1"], cluster="plant")
    cert, key = certs["node_node-a_cert"], certs["node_node-a_key"]
    old = pki.load_certificate(cert)
    node_host, ca_host = tmp_path / "node-host", tmp_path / "ca-host"
    node_host.mkdir()
    ca_host.mkdir()

    assert main(["certs", "csr", "--cert", str(cert), "--out", str(node_host)]) == 0
    new_key, csr = node_host / "node-node-a.new.key", node_host / "node-node-a.csr"
    assert stat.S_IMODE(new_key.stat().st_mode) == 0o600
    assert main(["certs", "csr", "--cert", str(cert), "--out", str(node_host)]) == 2  # never overwrites a key

    signed = ca_host / "node-node-a.pem"
    assert main(["certs", "sign", "--dir", str(tmp_path / "certs"), "--subaccount", "acme", "--node", "node-a",
                 "--cluster", "plant", "--csr", str(csr), "--out", str(signed), "--days", "90"]) == 0
    new = pki.load_certificate(signed)
    assert new.subject == old.subject
    assert new.not_valid_after_utc - new.not_valid_before_utc == datetime.timedelta(days=90) + pki.BACKDATE

    assert main(["certs", "install", "--cert", str(signed), "--key", str(key), "--to-cert", str(cert),
                 "--to-key", str(key)]) == 2  # not a pair: nothing replaced
    assert pki.load_certificate(cert).serial_number == old.serial_number
    assert main(["certs", "install", "--cert", str(signed), "--key", str(new_key), "--to-cert", str(cert),
                 "--to-key", str(key)]) == 0
    assert pki.load_certificate(cert).serial_number == new.serial_number
    pki.check_key_pair(cert, key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_sign_refuses_what_is_not_a_csr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    init_certs(tmp_path / "certs", "acme", ["node-a"], ["127.0.0.1"])
    bogus = tmp_path / "x.csr"
    bogus.write_text("hello")
    assert main(["certs", "sign", "--dir", str(tmp_path / "certs"), "--subaccount", "acme", "--node", "node-a",
                 "--csr", str(bogus), "--out", str(tmp_path / "out.pem")]) == 2
    assert "not a PEM certificate signing request" in capsys.readouterr().err
