"""Bearer tokens of cloud applications, mapped to the subaccount they act for.

Theory of operation: configuration names, per subaccount, the SHA-256 hex digests of the tokens
that subaccount's applications may present; plaintext tokens are never stored. To authenticate,
the presented token is hashed and compared against every configured digest with
`hmac.compare_digest` and no early exit, so the time taken does not depend on which digest (if
any) matched. Tokens are minted with `new_token()` and configured with `hash_token(token)`.

Applications present a token as `Proxy-Authorization: Bearer <token>` (SAP's connectivity proxy
style), `Authorization: Bearer <token>` (destination service), or HTTP Basic with user =
subaccount and password = token; with Basic the token must belong to the named subaccount.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Protocol

import attrs

from connector.cloud.clients import AuthThrottle, Principal

_DIGEST = re.compile(r"[0-9a-f]{64}")


def hash_token(token: str) -> str:
    """The SHA-256 hex digest of a token, as it appears in configuration."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@attrs.frozen
class Credentials:
    """What an Authorization-style header carried: a token, and the subaccount named by Basic."""

    token: str
    subaccount: str | None = None


def parse_authorization(value: bytes | str | None) -> Credentials | None:
    """Parse `Bearer <token>` or `Basic base64(subaccount:token)`; None if absent or malformed."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    scheme, _, rest = value.strip().partition(" ")
    rest = rest.strip()
    if not rest:
        return None
    if scheme.lower() == "bearer":
        return Credentials(token=rest)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep or not user or not password:
            return None
        return Credentials(token=password, subaccount=user)
    return None


class TokenValidator(Protocol):
    """Identifies a JWT (`connector.cloud.jwtauth.JwtValidator`): its principal, or None."""

    def identify(self, token: str) -> Principal | None: ...


class Authenticator:
    """Maps bearer tokens to subaccounts. The proxies and the destination service share one
    instance; `replace` swaps its digests as a whole (tokens added and revoked live, from the
    cloud's etcd: `connector.cloud.shared`), and its `throttle` remembers the failures of client
    addresses for the proxies (see `connector.cloud.clients.AuthThrottle`)."""

    def __init__(
        self, digests_by_subaccount: Mapping[str, Iterable[str]], *, throttle: AuthThrottle | None = None,
        jwt: TokenValidator | None = None,
    ) -> None:
        self.throttle = throttle if throttle is not None else AuthThrottle()
        self.jwt = jwt
        self._entries = self._build(digests_by_subaccount)

    def replace(self, digests_by_subaccount: Mapping[str, Iterable[str]]) -> None:
        """Authenticate with these digests from now on (ValueError, and nothing changes, if one
        is malformed or names two subaccounts). A request already authenticated is not undone."""
        self._entries = self._build(digests_by_subaccount)

    @staticmethod
    def _build(digests_by_subaccount: Mapping[str, Iterable[str]]) -> tuple[tuple[bytes, str], ...]:
        entries: list[tuple[bytes, str]] = []
        seen: dict[str, str] = {}
        for subaccount, digests in digests_by_subaccount.items():
            if not subaccount:
                raise ValueError("subaccount names must not be empty")
            if isinstance(digests, str):
                raise ValueError(f"subaccount {subaccount!r}: expected a list of token digests")
            for digest in digests:
                digest = digest.strip().lower()
                if not _DIGEST.fullmatch(digest):
                    raise ValueError(
                        f"subaccount {subaccount!r}: {digest[:8]!r}... is not a SHA-256 hex digest "
                        "(configure hash_token(token), never the token itself)"
                    )
                if digest in seen and seen[digest] != subaccount:
                    raise ValueError(
                        f"one token digest is configured for both {seen[digest]!r} and {subaccount!r}"
                    )
                if digest not in seen:
                    seen[digest] = subaccount
                    entries.append((bytes.fromhex(digest), subaccount))
        return tuple(entries)

    @property
    def subaccounts(self) -> frozenset[str]:
        return frozenset(subaccount for _, subaccount in self._entries)

    def authenticate(self, token: str) -> str | None:
        """The subaccount this token belongs to, or None. Constant time in which digest matched."""
        presented = hashlib.sha256(token.encode("utf-8")).digest()
        found: str | None = None
        for digest, subaccount in self._entries:
            if hmac.compare_digest(presented, digest):
                found = subaccount
        return found

    def authenticate_credentials(self, credentials: Credentials | None) -> str | None:
        """Authenticate parsed credentials; a Basic user must name the token's own subaccount."""
        principal = self.identify(credentials)
        return principal.subaccount if principal is not None else None

    def identify(self, credentials: Credentials | None) -> Principal | None:
        """Like `authenticate_credentials`, and also the token's digest (what per-token limits count)."""
        if credentials is None:
            return None
        if self.jwt is not None and credentials.token.count(".") == 2:  # shaped as a JWT: subaccount = its zid
            principal = self.jwt.identify(credentials.token)
            if principal is not None:
                return principal if credentials.subaccount in (None, principal.subaccount) else None
        subaccount = self.authenticate(credentials.token)
        if subaccount is None:
            return None
        if credentials.subaccount is not None and not hmac.compare_digest(
            credentials.subaccount.encode("utf-8"), subaccount.encode("utf-8")
        ):
            return None
        return Principal(subaccount, hash_token(credentials.token))

    def authenticate_header(self, value: bytes | str | None) -> str | None:
        """Authenticate an Authorization / Proxy-Authorization header value."""
        return self.authenticate_credentials(parse_authorization(value))
