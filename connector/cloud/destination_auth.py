"""What a destination's Authentication asks of the destination service: checks, grants, authTokens.

Theory of operation. Pure functions over a destination's properties, so the rules sit in one
table-like place and are tested without sockets; the service does the I/O (`TokenCache`).

- `problem(props)` says what an HTTP destination of an OAuth2 type, ClientCertificateAuthentication
  or PrincipalPropagation lacks (None when it is whole); the service refuses such a destination
  with 400 when it is created.
- `token_request(props, user_token)` is the grant an OAuth2 destination posts to its
  `tokenServiceURL`, as SAP's destination service does:

  | Authentication            | grant                                          | user's token       |
  |---------------------------|------------------------------------------------|--------------------|
  | OAuth2ClientCredentials   | client_credentials                             | not used           |
  | OAuth2Password            | password (User, Password)                      | not used           |
  | OAuth2JWTBearer           | urn:ietf:params:oauth:grant-type:jwt-bearer    | `X-user-token`     |
  | OAuth2UserTokenExchange   | urn:ietf:params:oauth:grant-type:jwt-bearer    | `X-user-token`, else the caller's own JWT |

  The client authenticates with clientId / clientSecret (HTTP Basic). A missing user token is
  a `TokenError`, reported like any failed retrieval.
- `bearer_entry`, `error_entry` and `basic_entry` are the `authTokens[]` items, in SAP's shape:
  `{type, value, http_header: {key, value}, expires_in}`; a failure `{type: "", value: "",
  error, expires_in: "0"}`.
"""

from __future__ import annotations

import base64
import urllib.parse
from typing import Any

from connector.cloud.token_client import CachedToken, TokenError, TokenRequest

GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_PASSWORD = "password"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Authentication -> (grant, properties it needs)
TOKEN_GRANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "OAuth2ClientCredentials": (GRANT_CLIENT_CREDENTIALS, ("tokenServiceURL", "clientId", "clientSecret")),
    "OAuth2Password": (GRANT_PASSWORD, ("tokenServiceURL", "clientId", "clientSecret", "User", "Password")),
    "OAuth2JWTBearer": (GRANT_JWT_BEARER, ("tokenServiceURL", "clientId", "clientSecret")),
    "OAuth2UserTokenExchange": (GRANT_JWT_BEARER, ("tokenServiceURL", "clientId", "clientSecret")),
}
TOKEN_AUTHENTICATIONS = tuple(TOKEN_GRANTS)
USER_TOKEN_AUTHENTICATIONS = ("OAuth2JWTBearer", "OAuth2UserTokenExchange")


def problem(props: dict[str, Any]) -> str | None:
    """What an HTTP destination's Authentication needs and it lacks, or None."""
    authentication = props.get("Authentication")
    if authentication in TOKEN_GRANTS:
        missing = [key for key in TOKEN_GRANTS[authentication][1] if not props.get(key)]
        if missing:
            return f"{authentication} needs {', '.join(missing)}"
        url = urllib.parse.urlsplit(props["tokenServiceURL"])
        if url.scheme != "https" or not url.hostname:
            return "tokenServiceURL must be an https:// URL (tokens are fetched over TLS only)"
    elif authentication == "ClientCertificateAuthentication" and not props.get("KeyStoreLocation"):
        return "ClientCertificateAuthentication needs KeyStoreLocation (the name of an uploaded certificate)"
    elif authentication == "PrincipalPropagation" and props.get("ProxyType") != "OnPremise":
        return "PrincipalPropagation needs ProxyType OnPremise (the Cloud Connector logs the user on)"
    return None


def token_request(props: dict[str, Any], user_token: str | None) -> TokenRequest:
    """The grant to post for an OAuth2 destination (TokenError if it needs a user's token and has none)."""
    authentication = props["Authentication"]
    grant = TOKEN_GRANTS[authentication][0]
    params: tuple[tuple[str, str], ...] = ()
    if grant == GRANT_PASSWORD:
        params = (("username", props["User"]), ("password", props["Password"]))
    elif authentication in USER_TOKEN_AUTHENTICATIONS:
        if not user_token:
            raise TokenError(f"{authentication} needs the user's token: send it as X-user-token")
        params = (("assertion", user_token),)
    return TokenRequest(props["tokenServiceURL"], props["clientId"], props["clientSecret"], grant, params)


def bearer_entry(token: CachedToken) -> dict[str, Any]:
    kind = "Bearer" if token.token_type.lower() == "bearer" else token.token_type
    return {"type": kind, "value": token.access_token,
            "http_header": {"key": "Authorization", "value": f"{kind} {token.access_token}"},
            "expires_in": str(token.expires_in())}


def error_entry(message: str) -> dict[str, Any]:
    return {"type": "", "value": "", "error": message, "expires_in": "0"}


def basic_entry(props: dict[str, Any]) -> dict[str, Any]:
    value = base64.b64encode(f"{props['User']}:{props['Password']}".encode()).decode("ascii")
    return {"type": "Basic", "value": value, "http_header": {"key": "Authorization", "value": f"Basic {value}"}}
