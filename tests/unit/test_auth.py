"""Authenticator: digests in configuration, token to subaccount, header parsing."""

from __future__ import annotations

import base64

import pytest

from connector.cloud.auth import (
    Authenticator,
    Credentials,
    hash_token,
    new_token,
    parse_authorization,
)

TOKEN_A = "token-of-subaccount-a"
TOKEN_B = "token-of-subaccount-b"


@pytest.fixture
def authenticator() -> Authenticator:
    return Authenticator({"sub-a": [hash_token(TOKEN_A)], "sub-b": [hash_token(TOKEN_B).upper()]})


def test_hash_token_is_sha256_hex() -> None:
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_new_tokens_are_random_and_urlsafe() -> None:
    tokens = {new_token() for _ in range(20)}
    assert len(tokens) == 20
    assert all(len(t) >= 40 and set(t) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") for t in tokens)


def test_authenticate_maps_token_to_subaccount(authenticator: Authenticator) -> None:
    assert authenticator.authenticate(TOKEN_A) == "sub-a"
    assert authenticator.authenticate(TOKEN_B) == "sub-b"
    assert authenticator.authenticate("unknown") is None
    assert authenticator.authenticate("") is None
    assert authenticator.subaccounts == {"sub-a", "sub-b"}


def test_plaintext_token_in_config_is_refused() -> None:
    with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
        Authenticator({"sub-a": ["my-plain-token"]})


def test_string_instead_of_list_is_refused() -> None:
    with pytest.raises(ValueError, match="list of token digests"):
        Authenticator({"sub-a": hash_token(TOKEN_A)})  # type: ignore[dict-item]


def test_same_digest_for_two_subaccounts_is_refused() -> None:
    with pytest.raises(ValueError, match="both"):
        Authenticator({"sub-a": [hash_token(TOKEN_A)], "sub-b": [hash_token(TOKEN_A)]})


def test_empty_subaccount_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        Authenticator({"": [hash_token(TOKEN_A)]})


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_parse_bearer_and_basic() -> None:
    assert parse_authorization(b"Bearer abc") == Credentials(token="abc")
    assert parse_authorization("bearer   abc ") == Credentials(token="abc")
    assert parse_authorization(basic("sub-a", "t:k")) == Credentials(token="t:k", subaccount="sub-a")


@pytest.mark.parametrize(
    "value",
    [None, b"", b"Bearer", b"Bearer ", b"Digest abc", b"Basic !!!", b"Basic " + base64.b64encode(b"nocolon"),
     b"Basic " + base64.b64encode(b":token"), b"Basic " + base64.b64encode(b"user:"), b"Bearer \xff"],
)
def test_parse_malformed_is_none(value: bytes | None) -> None:
    assert parse_authorization(value) is None


def test_authenticate_header(authenticator: Authenticator) -> None:
    assert authenticator.authenticate_header(b"Bearer " + TOKEN_A.encode()) == "sub-a"
    assert authenticator.authenticate_header(basic("sub-b", TOKEN_B)) == "sub-b"
    # Basic with the right token but another subaccount's name is refused
    assert authenticator.authenticate_header(basic("sub-b", TOKEN_A)) is None
    assert authenticator.authenticate_header(b"Bearer wrong") is None
    assert authenticator.authenticate_header(None) is None
