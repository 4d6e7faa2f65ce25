"""Operator mistakes at the `connector` command get a message naming the cause and exit 2, never a
traceback; what the command does by default is said in its --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from connector.cli import MIN_TOKEN_BITS, build_parser, main, token_bits
from connector.cloud.auth import hash_token


def _help(words: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*words, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["certs", "server", "--host", "cloud.example.com"], "connector certs ca --dir"),
        (["certs", "client", "--subaccount", "nobody", "--node", "n1"], "--subaccount nobody"),
    ],
)
def test_certs_errors_are_one_line_and_exit_2(tmp_path, argv, message):
    result = subprocess.run([sys.executable, "-m", "connector", argv[0], argv[1], "--dir", str(tmp_path), *argv[2:]],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_existing_key_without_force_is_a_message_not_a_traceback(tmp_path):
    command = [sys.executable, "-m", "connector", "certs", "ca", "--dir", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "refusing to overwrite a private key (use --force)" in result.stderr


@pytest.mark.parametrize("what", ["init", "server"])
def test_certs_host_default_is_stated_in_help(what, capsys):
    text = _help(["certs", what], capsys)
    assert "Default: 127.0.0.1 localhost" in text and "the nodes dial" in text


def test_certs_node_default_is_stated_in_help(capsys):
    assert "default: node-a" in _help(["certs", "init"], capsys)


def test_certs_init_says_when_it_defaults_host_and_node(tmp_path, capsys):
    assert main(["certs", "init", "--dir", str(tmp_path), "--subaccount", "acme"]) == 0
    err = capsys.readouterr().err
    assert "no --host given, using 127.0.0.1 localhost" in err and "no --node given, using node-a" in err


def test_acl_add_help_promises_no_json_input(capsys):
    assert "JSON" not in _help(["acl"], capsys) + _help(["acl", "add"], capsys)


def test_token_bare_prints_the_token_alone_and_sha256_its_digest(capsys):
    assert main(["token", "--bare"]) == 0
    token = capsys.readouterr().out.strip()
    assert " " not in token and "{" not in token and token_bits(token) >= MIN_TOKEN_BITS
    assert main(["token", "--value", token, "--sha256"]) == 0
    assert capsys.readouterr().out.strip() == hash_token(token)


# 31 hex digits: 124 bits; 21 lowercase letters: 109 bits
@pytest.mark.parametrize("weak", ["abc", "changeme", "0123456789abcdef0123456789abcde", "a" * 21])
def test_weak_token_value_is_refused_unless_forced(weak, capsys):
    assert main(["token", "--value", weak]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "bits of entropy" in captured.err
    assert main(["token", "--value", weak, "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["token_sha256"] == hash_token(weak)


def test_strong_token_value_is_accepted(capsys):
    strong = "Zq3xV9kLm2Pw7RtY4nB8cD1f"  # 24 letters and digits: 143 bits at most
    assert main(["token", "--value", strong]) == 0
    assert json.loads(capsys.readouterr().out)["token"] == strong
