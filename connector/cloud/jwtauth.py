"""Validating the JWTs our token service issues, for the proxies and the destination service.

Theory of operation. An application holding a binding presents the access token it fetched
(`Proxy-Authorization: Bearer <JWT>`, SOCKS5 method 0x80, `Authorization` at the destination
service). `JwtValidator.validate` accepts it only if all of these hold, else raises
`JwtError` whose `reason` is a stable token for logs and the audit:

- it is three base64url segments and its header says `alg: RS256` (never `none`, never an HMAC
  algorithm: a validator that let the token pick would verify an HS256 token keyed with our
  public key, which anyone can fetch from /token_keys);
- its `kid` names a key of the ring trusted now (a retired key only within its overlap);
- the signature verifies with that key (PyJWT, with the algorithm fixed to RS256);
- `exp`, `iat`, `iss`, `aud`, `zid` and `client_id` are present; `exp` has not passed (no
  leeway beyond `leeway`), `iss` is ours, `aud` names one of the audiences this service accepts;
- its binding (`client_id`) is known and not revoked: revoking a binding ends its tokens too.

`TrustedIssuer` checks the user tokens of an identity provider a subaccount trusts (its issuer,
audience and public keys configured, `[[subaccounts.trusted_issuers]]`: a JWKS file, or the
provider's `jwks_uri`, fetched and refreshed by `connector.cloud.idp_keys`), for the token
service's jwt-bearer grant and principal propagation: the same rules (RS256 only, a `kid` of the
provider's keys, signature, `exp`, `iss`, `aud` naming the configured audience), without `zid`
or a binding.

The subaccount is the token's `zid` (zone id, as XSUAA names the subaccount's identity zone),
which we wrote when issuing it. `identify` turns a valid token into the `Principal` the
proxies count streams by: one per binding, however often its application fetches new tokens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Collection
from typing import Any, Protocol

import attrs
import jwt

from connector.cloud.clients import Principal
from connector.cloud.idp_keys import DEFAULT_REFRESH, KeySource, RemoteJwks, StaticKeys
from connector.cloud.jwks import ALGORITHM, KeyRing
from connector.cloud.token_client import TokenClientSettings

log = logging.getLogger(__name__)

MAX_JWT_BYTES = 16 * 1024  # larger tokens are refused before any decoding
_SEGMENT = r"[A-Za-z0-9_-]+"
_JWT = re.compile(rf"{_SEGMENT}\.{_SEGMENT}\.[A-Za-z0-9_-]*")  # unsigned (`alg: none`) too, refused by name
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "zid", "client_id")


def looks_like_jwt(token: str) -> bool:
    """Whether `token` is shaped as a JWS compact serialisation with a JSON header (`eyJ...`).
    Static proxy tokens (`connector token`: URL-safe base64, no dots) never are."""
    return token.startswith("eyJ") and len(token) <= MAX_JWT_BYTES and _JWT.fullmatch(token) is not None


class JwtError(Exception):
    """A token was refused; `reason` is a stable token (``expired``, ``unknown_key``...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BindingLookup(Protocol):
    """Whether a binding may still be used (see `connector.cloud.bindings.BindingStore`)."""

    def is_active(self, client_id: str) -> bool: ...


def _header(token: str) -> dict[str, Any]:
    try:
        segment = token.partition(".")[0]
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise JwtError("malformed", f"the token header is not base64url JSON: {exc}") from None
    if not isinstance(header, dict):
        raise JwtError("malformed", "the token header is not a JSON object")
    return header


class JwtValidator:
    """Checks our JWTs against the current key ring (see the module docstring).

    `ring` is called for every validation, so a rotation (or a ring reloaded from the shared
    store) takes effect at once; None (the shared ring not read yet) refuses every token.
    `clock` gives wall-clock seconds (tests pass their own).
    """

    def __init__(
        self,
        ring: Callable[[], KeyRing | None],
        *,
        issuer: str,
        audiences: Collection[str],
        bindings: BindingLookup | None = None,
        clock: Callable[[], float] = time.time,
        leeway: float = 0.0,
    ) -> None:
        if not audiences:
            raise ValueError("a validator needs at least one audience it accepts")
        self.ring = ring
        self.issuer = issuer
        self.audiences = list(audiences)
        self.bindings = bindings
        self.clock = clock
        self.leeway = leeway

    def validate(self, token: str) -> dict[str, Any]:
        """The claims of a valid token; JwtError otherwise."""
        if not looks_like_jwt(token):
            raise JwtError("malformed", "not a JWT (three base64url segments with a JSON header)")
        header = _header(token)
        if header.get("alg") != ALGORITHM:
            raise JwtError("wrong_algorithm", f"tokens are signed with {ALGORITHM}, not {header.get('alg')!r}")
        kid = header.get("kid")
        now = self.clock()
        ring = self.ring()
        if ring is None:  # several replicas: the shared ring was not read yet
            raise JwtError("keys_unavailable", "the signing keys were not read yet")
        key = ring.trusted(kid, now) if isinstance(kid, str) else None
        if key is None:
            raise JwtError("unknown_key", f"no trusted signing key {kid!r}")
        try:
            claims = self._decode(token, key.public_key)
        except jwt.InvalidAudienceError as exc:
            raise JwtError("wrong_audience", str(exc)) from None
        except jwt.InvalidIssuerError as exc:
            raise JwtError("wrong_issuer", str(exc)) from None
        except jwt.MissingRequiredClaimError as exc:
            raise JwtError("missing_claim", str(exc)) from None
        except jwt.InvalidSignatureError as exc:
            raise JwtError("bad_signature", str(exc)) from None
        except jwt.PyJWTError as exc:
            raise JwtError("invalid", str(exc)) from None
        exp = claims["exp"]
        if not isinstance(exp, (int, float)) or now >= exp + self.leeway:
            raise JwtError("expired", "the token has expired")
        if not isinstance(claims["zid"], str) or not claims["zid"] or not isinstance(claims["client_id"], str):
            raise JwtError("missing_claim", "zid and client_id must be non-empty strings")
        try:
            active = self.bindings is None or self.bindings.is_active(claims["client_id"])
        except OSError as exc:  # fail closed: a revocation we cannot read must not let a token through
            log.error("binding store unreadable: %s", exc)
            raise JwtError("binding_store_unreadable", "the binding store cannot be read") from None
        if not active:
            raise JwtError("binding_revoked", f"binding {claims['client_id']!r} is revoked or unknown")
        return claims

    def _decode(self, token: str, public_key: Any) -> dict[str, Any]:
        # `exp` is checked by `validate` against `clock`, not by PyJWT against the system clock
        claims: dict[str, Any] = jwt.decode(
            token, public_key, algorithms=[ALGORITHM], audience=self.audiences, issuer=self.issuer,
            options={"require": list(REQUIRED_CLAIMS), "verify_exp": False, "verify_iat": False,
                     "verify_nbf": False},
        )
        return claims

    def identify(self, token: str) -> Principal | None:
        """The principal of a valid token (subaccount = `zid`), or None; refusals are logged."""
        try:
            claims = self.validate(token)
        except JwtError as exc:
            log.info("JWT refused (%s): %s", exc.reason, exc)
            return None
        # per-token limits count per binding: a fresh token of the same application is the same client
        digest = hashlib.sha256(f"binding:{claims['client_id']}".encode()).hexdigest()
        return Principal(claims["zid"], digest)


def unverified_issuer(token: str) -> str | None:
    """The `iss` a JWT claims, read without any check (to choose who checks it), or None."""
    if not looks_like_jwt(token):
        return None
    try:
        issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError:
        return None
    return issuer if isinstance(issuer, str) else None


def rsa_keys(jwks: Any) -> dict[str, Any]:
    """{kid: RSA public key} of a JWKS document (`{"keys": [...]}`, as /token_keys serves it);
    ValueError if it holds no RSA key with a `kid`."""
    try:
        keyset = jwt.PyJWKSet.from_dict(jwks)
    except (jwt.PyJWTError, TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"not a JWKS document: {exc}") from None
    keys = {key.key_id: key.key for key in keyset.keys if key.key_type == "RSA" and key.key_id}
    if not keys:
        raise ValueError("the JWKS holds no RSA key with a kid")
    return keys


@attrs.frozen
class TrustedIssuer:
    """An identity provider whose user tokens a subaccount's applications may exchange (see the
    module docstring). `keys` gives the RSA public key of each `kid`: read from a JWKS file
    (`StaticKeys`) or fetched from the provider's `jwks_uri` and refreshed (`RemoteJwks`, whose
    `run` the cloud starts)."""

    subaccount: str
    issuer: str
    keys: KeySource = attrs.field(eq=False)
    audience: str  # `aud` must name it: a token the provider issued for another application is refused

    def __attrs_post_init__(self) -> None:
        if not self.audience:
            raise ValueError("an audience is required (the application's client id at the provider)")

    @classmethod
    def from_jwks(cls, subaccount: str, issuer: str, jwks: Any, audience: str) -> TrustedIssuer:
        """With the keys of a JWKS document; ValueError if it holds no RSA key with a `kid`."""
        return cls(subaccount, issuer, StaticKeys(rsa_keys(jwks)), audience)

    @classmethod
    def from_uri(cls, subaccount: str, issuer: str, uri: str, audience: str, settings: TokenClientSettings,
                 refresh_seconds: float = DEFAULT_REFRESH) -> TrustedIssuer:
        """With the keys fetched from `uri` (nothing is fetched before `keys.run`)."""
        if not uri.startswith("https://"):
            raise ValueError(f"jwks_uri {uri!r} is not an https:// URL")
        return cls(subaccount, issuer, RemoteJwks(uri, settings, rsa_keys, refresh_seconds=refresh_seconds), audience)

    async def validate(self, token: str, now: float) -> dict[str, Any]:
        """The claims of a valid user token of this issuer at wall-clock `now`; JwtError otherwise."""
        if not looks_like_jwt(token):
            raise JwtError("malformed", "not a JWT (three base64url segments with a JSON header)")
        header = _header(token)
        if header.get("alg") != ALGORITHM:
            raise JwtError("wrong_algorithm", f"tokens are checked with {ALGORITHM}, not {header.get('alg')!r}")
        kid = header.get("kid")
        key = await self.keys.key(kid) if isinstance(kid, str) else None
        if key is None:
            raise JwtError("unknown_key", f"{self.issuer} has no key {str(kid)[:64]!r}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[ALGORITHM], issuer=self.issuer, audience=self.audience,
                options={"require": ["exp", "iss", "aud"], "verify_exp": False, "verify_iat": False,
                         "verify_nbf": False},
            )
        except jwt.PyJWTError as exc:
            raise JwtError("invalid", str(exc)) from None
        if not isinstance(claims["exp"], (int, float)) or now >= claims["exp"]:
            raise JwtError("expired", "the token has expired")
        return claims
