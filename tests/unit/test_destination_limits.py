"""Pure pieces of the destination service's bounds: the JSON nesting scan, the limits, their configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector import pki
from connector.cloud.bindings import hash_secret
from connector.cloud.destinations import DestinationError, DestinationLimits, json_depth, parse_json
from connector.config import ConfigError, load_cloud_config

SHA = "a" * 64
ADMIN_SHA = "b" * 64


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b"", 0),
        (b"1", 0),
        (b"[]", 1),
        (b'[{"a": 1}, {"b": [2]}]', 3),
        (b'{"x": "[[[[{{{{"}', 1),  # brackets in strings do not count
        (b'{"x": "\\"[[[["}', 1),  # nor after an escaped quote
        (b'["\\\\", [[]]]', 3),  # an escaped backslash ends before the quote
        (b'"[[[[', 0),  # an unterminated string runs to the end
        (b"[" * 100_000, 100_000),
        (b"]]]][", 0),  # malformed: json.loads stops at the first "]"
        ('["é[", ["ü"]]'.encode(), 2),
    ],
)
def test_json_depth(body: bytes, depth: int) -> None:
    assert json_depth(body) == depth


def _nesting(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_nesting(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_nesting(v) for v in value.values()), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@given(json_values)
def test_json_depth_matches_the_parsed_nesting(value: object) -> None:
    assert json_depth(json.dumps(value, ensure_ascii=False).encode()) == _nesting(value)


def test_parse_json_refuses_before_parsing() -> None:
    with pytest.raises(DestinationError) as caught:
        parse_json(b"[" * 100_000, 8)
    assert (caught.value.status, caught.value.reason) == (400, "json_too_deep")
    assert parse_json(b'[{"a": [1]}]', 3) == [{"a": [1]}]
    with pytest.raises(DestinationError, match="not UTF-8"):
        parse_json("[]".encode("utf-16"), 8)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_json_depth": 1}, "max_json_depth"),
        ({"max_json_depth": 101}, "max_json_depth"),
        ({"max_destinations": 0}, "max_destinations"),
        ({"max_body_bytes": 1000, "max_destination_bytes": 2000}, "must not exceed max_body_bytes"),
        ({"request_timeout": 0}, "positive"),
    ],
)
def test_unsafe_limits_are_refused(limits: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DestinationLimits(**limits)


def _cloud(tmp_path: Path, extra: str, subaccount_extra: str = "") -> Path:
    for name in ("ca.pem", "server.pem", "server.key"):
        (tmp_path / name).write_text("placeholder")
    path = tmp_path / "cloud.toml"
    path.write_text(f"""
[tunnel]
cert = "server.pem"
key = "server.key"
[destinations]
{extra}
[[subaccounts]]
id = "acme"
ca = "ca.pem"
token_sha256 = ["{SHA}"]
{subaccount_extra}
""")
    return path


HASH = hash_secret("alice-password", n=2)  # a cheap hash: only its shape is checked at load


def test_destination_settings_load(tmp_path: Path) -> None:
    config = load_cloud_config(_cloud(tmp_path, "max_destinations = 50\nrequest_timeout = 5\nmax_connections = 7",
                                      f'destination_admin_sha256 = ["{ADMIN_SHA}"]'))
    assert config.destination_limits == DestinationLimits(max_destinations=50, request_timeout=5.0, max_connections=7)
    assert config.subaccounts[0].destination_admin_sha256 == (ADMIN_SHA,)
    assert load_cloud_config(_cloud(tmp_path, "")).destination_limits == DestinationLimits()


def test_token_retrieval_and_user_settings_load(tmp_path: Path) -> None:
    config = load_cloud_config(_cloud(tmp_path, "request_timeout = 5"))
    assert (config.destination_tokens.ca, config.destination_tokens.timeout) == (None, 2.5)  # half the request's
    user = f'[[subaccounts.users]]\nuser_name = "alice"\npassword_scrypt = "{HASH}"\nemail = "a@example.com"'
    ca = pki.create_ca(tmp_path / "pki", "token-ca", "token services' CA").cert_path
    config = load_cloud_config(_cloud(tmp_path, f'token_service_ca = "{ca}"\ntoken_timeout = 3', user))
    assert (config.destination_tokens.ca, config.destination_tokens.timeout) == (ca, 3.0)
    [alice] = config.subaccounts[0].users
    assert (alice.subaccount, alice.user_name, alice.email, alice.origin) == ("acme", "alice", "a@example.com",
                                                                             "connector")
    assert alice.user_id and alice.claims()["user_id"] == alice.user_id


@pytest.mark.parametrize(
    ("extra", "subaccount_extra", "message"),
    [
        ("max_json_depth = 1", "", "destinations.max_json_depth: must be at least 2"),
        ("max_body_bytes = 100", "", "destinations: max_destination_bytes must not exceed"),
        ("max_destinations = true", "", "destinations.max_destinations: must be an integer"),
        ("", 'destination_admin_sha256 = ["secret"]', "destination_admin_sha256[0]: must be a lowercase SHA-256"),
        ("", f'destination_admin_sha256 = ["{SHA}"]', "also a token_sha256 digest"),
        ("token_timeout = 30", "", "destinations.token_timeout: must be shorter than request_timeout"),
        ('token_service_ca = "missing.pem"', "", "destinations.token_service_ca"),
        ('token_service_ca = "ca.pem"', "", "destinations.token_service_ca: holds no usable CA certificate"),
        ("", '[[subaccounts.users]]\nuser_name = "a"\npassword_scrypt = "plain"', "never the password"),
        ("", f'[[subaccounts.users]]\nuser_name = "a"\npassword_scrypt = "{HASH}"\n'
             f'[[subaccounts.users]]\nuser_name = "a"\npassword_scrypt = "{HASH}"', "user_name appears twice"),
        ("", '[[subaccounts.users]]\nuser_name = "a"', "users[0].password_scrypt"),
        ("", '[[subaccounts.trusted_issuers]]\nissuer = "https://idp"\njwks = "ca.pem"\naudience = "app"',
         "trusted_issuers[0].jwks"),
        ("", '[[subaccounts.trusted_issuers]]\nissuer = "https://idp"\njwks = "ca.pem"', "trusted_issuers[0].audience"),
    ],
)
def test_bad_destination_settings_are_refused(tmp_path: Path, extra: str, subaccount_extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_cloud_config(_cloud(tmp_path, extra, subaccount_extra))
