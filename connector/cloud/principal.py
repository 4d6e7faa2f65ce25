"""Principal propagation, cloud side: validating the user token an application forwards.

Theory of operation. An application calling an on-premise system on behalf of its user sends the
user's JWT in `SAP-Connectivity-Authentication` (and a technical user's in
`SAP-Connectivity-Technical-Authentication`), as `Bearer <JWT>` or the JWT alone, as SAP's
clients do. The HTTP proxy hands both headers to `PrincipalValidator.principal` before it opens a
stream; they are never forwarded themselves. A token is accepted only if its issuer is trusted
*for the subaccount the proxy authenticated*:

- our token service (`JwtValidator`: RS256, a key of our ring, `aud`, `exp`, the binding still
  active) and its `zid` is that subaccount;
- or an identity provider that subaccount trusts (`[[subaccounts.trusted_issuers]]`,
  `TrustedIssuer`: RS256, a `kid` of its keys (a JWKS file, or fetched from its `jwks_uri`: an
  unknown `kid` may wait for one fetch, see `connector.cloud.idp_keys`), `iss`, `aud`, `exp`).

Anything else (malformed, `alg: none`, an unknown `kid`, expired, another issuer, audience or
subaccount) raises `JwtError`; the proxy answers 401 with a generic sentence and audits the
refusal. A valid token becomes a `connector.tunnel.heads.Principal` (user name, or a technical
user's client id, and the token's string claims) in the request head, where no application
header can pose as it; the node decides per mapping what the internal host gets of it
(`connector.agent.principal`). With no token service and no trusted issuer every such header is
refused: a user token is never passed on unvalidated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from connector.cloud.jwtauth import (
    JwtError,
    JwtValidator,
    TrustedIssuer,
    looks_like_jwt,
    unverified_issuer,
)
from connector.tunnel.heads import Principal

USER_HEADER = b"sap-connectivity-authentication"
TECHNICAL_HEADER = b"sap-connectivity-technical-authentication"
PRINCIPAL_HEADERS = frozenset({USER_HEADER, TECHNICAL_HEADER})  # never forwarded as headers
_NAME_CLAIMS = {"user": ("user_name", "email", "sub"), "technical": ("client_id", "azp", "cid", "sub")}


def bearer_token(value: bytes) -> str:
    """The JWT of a header value: `Bearer <JWT>` or the JWT alone; JwtError if not ASCII."""
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        raise JwtError("malformed", "the header is not ASCII") from None
    scheme, sep, rest = text.partition(" ")
    return rest.strip() if sep and scheme.lower() == "bearer" else text


class PrincipalValidator:
    """Checks the principal headers of a request (see the module docstring). `ours` is the token
    service's validator (None: no [oauth]); `trusted` the identity providers by (subaccount,
    issuer); `clock` wall-clock seconds, compared with the tokens' `exp`."""

    def __init__(self, ours: JwtValidator | None = None,
                 trusted: Mapping[tuple[str, str], TrustedIssuer] | None = None,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.ours = ours
        self.trusted = dict(trusted or {})
        self.clock = clock

    async def principal(self, subaccount: str, headers: Sequence[tuple[bytes, bytes]]) -> Principal | None:
        """The principal of a request of `subaccount` (the user's if both headers are sent), None
        without either header; JwtError if one is present and not valid."""
        found: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            if name in PRINCIPAL_HEADERS:
                found.setdefault(name, []).append(value)
        if any(len(values) > 1 for values in found.values()):
            raise JwtError("duplicate_header", "a principal header appears more than once")
        principals = [await self.validate(subaccount, found[name][0], kind)
                      for name, kind in ((USER_HEADER, "user"), (TECHNICAL_HEADER, "technical")) if name in found]
        return principals[0] if principals else None

    async def validate(self, subaccount: str, value: bytes, kind: str) -> Principal:
        """The principal of one header value; JwtError if the token is not trusted for `subaccount`."""
        token = bearer_token(value)
        if not looks_like_jwt(token):
            raise JwtError("malformed", "not a JWT (three base64url segments with a JSON header)")
        issuer = unverified_issuer(token)
        trusted = self.trusted.get((subaccount, issuer)) if issuer is not None else None
        claims: dict[str, Any]
        if trusted is not None:
            claims = await trusted.validate(token, self.clock())
        elif self.ours is not None and issuer == self.ours.issuer:
            claims = self.ours.validate(token)
            if claims["zid"] != subaccount:
                raise JwtError("wrong_subaccount", "the token belongs to another subaccount")
        else:
            raise JwtError("untrusted_issuer", f"subaccount {subaccount!r} does not trust issuer {issuer!r}")
        strings = {key: value for key, value in claims.items() if isinstance(value, str)}
        name = next((strings[claim] for claim in _NAME_CLAIMS[kind] if strings.get(claim)), None)
        if kind == "user" and trusted is None and not strings.get("user_name"):
            name = None  # our client-credentials token names no user
        if name is None:
            raise JwtError("no_principal", f"the token names no {kind} user")
        return Principal(kind, name, strings)
