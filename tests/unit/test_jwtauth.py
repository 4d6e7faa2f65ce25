"""JWT validation of our tokens: each way a token can be wrong is refused by name; key rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from connector.cloud.auth import Authenticator, Credentials, hash_token
from connector.cloud.bindings import AUDIENCES, Binding, hash_secret
from connector.cloud.jwks import KeyRing, SigningKey
from connector.cloud.jwtauth import JwtError, JwtValidator, looks_like_jwt
from connector.cloud.oauth import OAuthSettings, issue_token

T0 = 1_800_000_000.0
SETTINGS = OAuthSettings(url="https://tokens.example", token_lifetime=600, key_overlap=900, rotate_after=3600)
BINDING = Binding("sb-connector-app", "acme", hash_secret("s", n=2), T0)
KEY = SigningKey.generate(T0)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Bindings:
    def __init__(self, *active: str) -> None:
        self.active = set(active)

    def is_active(self, client_id: str) -> bool:
        return client_id in self.active


def validator(ring: KeyRing, clock: Clock, **overrides: object) -> JwtValidator:
    kwargs: dict[str, object] = {"issuer": SETTINGS.issuer, "audiences": AUDIENCES,
                                 "bindings": Bindings(BINDING.client_id), "clock": clock}
    kwargs.update(overrides)
    return JwtValidator(lambda: ring, **kwargs)  # type: ignore[arg-type]


def token(ring: KeyRing, now: float = T0) -> str:
    return str(issue_token(ring, SETTINGS, BINDING, "client_credentials", now)["access_token"])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, object], claims: dict[str, object], signature: bytes) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


def refusal(v: JwtValidator, tok: str) -> str:
    with pytest.raises(JwtError) as caught:
        v.validate(tok)
    return caught.value.reason


def test_a_token_we_issued_is_accepted_and_names_its_subaccount() -> None:
    ring = KeyRing((KEY,))
    claims = validator(ring, Clock(T0 + 1)).validate(token(ring))
    assert (claims["zid"], claims["client_id"], claims["iss"]) == ("acme", BINDING.client_id, SETTINGS.issuer)
    assert claims["exp"] == T0 + 600 and claims["ext_attr"]["subaccountid"] == "acme"
    principal = validator(ring, Clock(T0 + 1)).identify(token(ring))
    assert principal is not None and principal.subaccount == "acme"


def test_expired_at_exp_exactly() -> None:
    ring = KeyRing((KEY,))
    tok = token(ring)
    assert validator(ring, Clock(T0 + 599.9)).validate(tok)
    assert refusal(validator(ring, Clock(T0 + 600)), tok) == "expired"


def test_wrong_issuer_and_wrong_audience() -> None:
    ring = KeyRing((KEY,))
    assert refusal(validator(ring, Clock(T0), issuer="https://other.example/oauth/token"), token(ring)) == "wrong_issuer"
    assert refusal(validator(ring, Clock(T0), audiences=["someone-else"]), token(ring)) == "wrong_audience"


def test_unknown_key_id() -> None:
    other = KeyRing((SigningKey.generate(T0),))
    assert refusal(validator(KeyRing((KEY,)), Clock(T0)), token(other)) == "unknown_key"


def test_alg_none_is_refused() -> None:
    ring = KeyRing((KEY,))
    claims = jwt.decode(token(ring), options={"verify_signature": False})
    unsigned = forged({"alg": "none", "kid": KEY.kid, "typ": "JWT"}, claims, b"")
    assert looks_like_jwt(unsigned)
    assert refusal(validator(ring, Clock(T0)), unsigned) == "wrong_algorithm"


def test_hs256_keyed_with_our_public_key_is_refused() -> None:
    """The RS/HS confusion: the public key (published at /token_keys) used as an HMAC secret."""
    ring = KeyRing((KEY,))
    claims = jwt.decode(token(ring), options={"verify_signature": False})
    public_pem = KEY.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for alg in ("HS256", "RS256"):  # HS256 named, or an HMAC signature under an RS256 header
        header = {"alg": alg, "kid": KEY.kid, "typ": "JWT"}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}".encode()
        tok = f"{signing_input.decode()}.{b64(hmac.new(public_pem, signing_input, hashlib.sha256).digest())}"
        assert refusal(validator(ring, Clock(T0)), tok) == ("wrong_algorithm" if alg == "HS256" else "bad_signature")


def test_changed_claims_break_the_signature() -> None:
    ring = KeyRing((KEY,))
    header, _, signature = token(ring).split(".")
    claims = jwt.decode(token(ring), options={"verify_signature": False})
    claims["zid"] = "victim"
    tampered = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    assert refusal(validator(ring, Clock(T0)), tampered) == "bad_signature"


def test_a_revoked_binding_loses_its_tokens() -> None:
    ring = KeyRing((KEY,))
    assert refusal(validator(ring, Clock(T0), bindings=Bindings()), token(ring)) == "binding_revoked"


def test_rotation_keeps_the_old_key_for_the_overlap_only() -> None:
    ring = KeyRing((KEY,))
    old_token = token(ring, T0 + 3599)  # signed just before the rotation: lives until T0 + 4199
    ring, said = ring.maintain(T0 + 3599, rotate_after=3600, overlap=900)
    assert said is None and ring.current is KEY
    ring, said = ring.maintain(T0 + 3600, rotate_after=3600, overlap=900)
    assert said is not None and said.startswith("rotated:") and ring.current is not KEY
    assert [k["kid"] for k in ring.jwks(T0 + 3600)["keys"]] == [ring.current.kid, KEY.kid]
    assert validator(ring, Clock(T0 + 4198)).validate(old_token)["zid"] == "acme"  # within the overlap
    new_token = token(ring, T0 + 3600)
    assert jwt.get_unverified_header(new_token)["kid"] == ring.current.kid
    ring, said = ring.maintain(T0 + 4500, rotate_after=3600, overlap=900)
    assert said == f"dropped {KEY.kid} (overlap over)"
    assert [k["kid"] for k in ring.jwks(T0 + 4500)["keys"]] == [ring.current.kid]
    assert refusal(validator(ring, Clock(T0 + 4500)), old_token) == "unknown_key"  # its key is gone
    assert validator(ring, Clock(T0 + 4199)).validate(new_token)["zid"] == "acme"
    assert validator(ring, Clock(T0 + 4500)).validate(token(ring, T0 + 4500))["zid"] == "acme"


def test_a_retired_key_is_refused_at_its_retirement_even_before_pruning() -> None:
    ring = KeyRing((KEY,)).rotate(T0, overlap=900)
    tok = forged_with(KEY, T0)
    assert validator(ring, Clock(T0 + 599)).validate(tok)
    assert refusal(validator(ring, Clock(T0 + 900)), tok) == "unknown_key"


def forged_with(key: SigningKey, now: float) -> str:
    return token(KeyRing((key,)), now)


def test_settings_refuse_an_overlap_shorter_than_a_token_lives() -> None:
    with pytest.raises(ValueError, match="key_overlap"):
        OAuthSettings(url="https://t.example", token_lifetime=3600, key_overlap=600)
    with pytest.raises(ValueError, match="https"):
        OAuthSettings(url="http://t.example")


# --- the hook in Authenticator ------------------------------------------------------------------

def test_authenticator_takes_static_tokens_and_our_jwts() -> None:
    ring = KeyRing((KEY,))
    static = "static.token.with-dots-0123456789"  # shaped like a JWT, and still a static token
    auth = Authenticator({"acme": [hash_token(static)], "other": []},
                         jwt=validator(ring, Clock(T0 + 1)))
    tok = token(ring)
    principal = auth.identify(Credentials(tok))
    assert principal is not None and principal.subaccount == "acme"
    assert auth.identify(Credentials(tok, "acme")) == principal
    assert auth.identify(Credentials(tok, "other")) is None  # Basic naming another subaccount
    static_principal = auth.identify(Credentials(static))
    assert static_principal is not None and static_principal.subaccount == "acme"
    # a fresh token of the same binding is the same principal (per-token limits count bindings)
    assert auth.identify(Credentials(token(ring, T0 + 0.5))) == principal
    assert auth.identify(Credentials(tok[:-4] + "AAAA")) is None
    assert Authenticator({"acme": [hash_token(static)]}).identify(Credentials(tok)) is None  # no validator
