"""The `connector` command: help everywhere, certificates with private keys 0600, tokens."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest

from connector import pki
from connector.cli import build_parser, main
from connector.cloud.auth import hash_token

SUBCOMMANDS = [
    [], ["certs"], ["certs", "init"], ["certs", "ca"], ["certs", "server"], ["certs", "client"], ["token"],
    ["cloud"], ["node"], ["demo"], ["status"], ["switch"], ["acl"], ["acl", "list"], ["acl", "add"],
    ["acl", "remove"], ["acl", "history"], ["secret"], ["secret", "set"], ["secret", "get"], ["secret", "list"],
]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w) or "connector")
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*words, "--help"])
    assert info.value.code == 0
    assert "usage: connector" in capsys.readouterr().out


def test_console_script_help_runs():
    result = subprocess.run([sys.executable, "-m", "connector", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "demo" in result.stdout


def test_certs_init_writes_keys_0600_and_chains(tmp_path):
    assert main(["certs", "init", "--dir", str(tmp_path), "--subaccount", "acme", "--node", "n1", "--host", "127.0.0.1"]) == 0
    keys = sorted(p.name for p in tmp_path.glob("*.key"))
    assert keys == ["acme-ca.key", "cloud-ca.key", "node-n1.key", "tunnel-server.key"]
    for key in tmp_path.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    client = pki.load_certificate(tmp_path / "node-n1.pem")
    assert pki.subaccount_of(client) == "acme" and pki.common_name_of(client) == "n1"
    pki.verify_issued_by(client, pki.load_certificate(tmp_path / "acme-ca.pem"))
    with pytest.raises(pki.CertificateError):
        pki.verify_issued_by(client, pki.load_certificate(tmp_path / "cloud-ca.pem"))


def test_certs_refuse_to_overwrite_a_private_key(tmp_path, capsys):
    main(["certs", "ca", "--dir", str(tmp_path)])
    before = (tmp_path / "cloud-ca.key").read_bytes()
    assert main(["certs", "ca", "--dir", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "cloud-ca.key").read_bytes() == before
    assert main(["certs", "ca", "--dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "cloud-ca.key").read_bytes() != before


def test_certs_client_needs_its_subaccount_ca(tmp_path, capsys):
    assert main(["certs", "client", "--dir", str(tmp_path), "--subaccount", "acme", "--node", "n1"]) == 2
    assert "connector certs ca --dir" in capsys.readouterr().err


def test_token_prints_token_and_its_digest(capsys):
    assert main(["token"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["token_sha256"] == hash_token(printed["token"])
    assert len(printed["token"]) >= 32


@pytest.mark.parametrize(
    "argv",
    [
        ["acl", "--config", "n.toml", "list"], ["acl", "list", "--config", "n.toml"],
        ["secret", "--config", "n.toml", "list"], ["secret", "list", "--config", "n.toml"],
    ],
)
def test_config_goes_before_or_after_the_action(argv):
    assert build_parser().parse_args(argv).config == "n.toml"


def test_config_absent_everywhere_means_the_demo():
    assert build_parser().parse_args(["acl", "list"]).config is None


def test_check_validates_and_exits_without_starting(tmp_path, capsys):
    broken = tmp_path / "node.toml"
    broken.write_text("[node]\nid = 'a'\n")
    assert main(["node", "--config", str(broken), "--check"]) == 2
    assert "tunnel" in capsys.readouterr().err
