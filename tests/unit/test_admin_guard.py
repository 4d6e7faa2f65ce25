"""Who may use the admin API: the decision table of `connector.admin.admit` (pure, no sockets).

The real server with a real node is exercised in tests/integration/test_admin_auth.py.
"""

import pytest

from connector.admin import AdminGuard, admit

TOKEN = "0123456789abcdef-admin-token"
GUARD = AdminGuard(TOKEN, frozenset({"localhost", "127.0.0.1", "::1", "10.0.1.21"}))
BEARER = {"authorization": f"Bearer {TOKEN}"}
LOCAL = {"host": "127.0.0.1:8081"}


@pytest.mark.parametrize(
    ("guard", "guarded", "method", "headers", "status", "error"),
    [
        # open routes: anyone, with or without a token
        (GUARD, False, "GET", LOCAL, None, None),
        (GUARD, False, "GET", {"host": "evil.example:8081"}, None, None),
        (None, False, "GET", {}, None, None),
        # guarded routes: the token, from a host name of ours
        (GUARD, True, "POST", {**LOCAL, **BEARER}, None, None),
        (GUARD, True, "GET", {"host": "[::1]:8081", **BEARER}, None, None),
        (GUARD, True, "GET", {"host": "10.0.1.21:8081", **BEARER}, None, None),
        (GUARD, True, "GET", {"host": "LOCALHOST", "authorization": f"bearer {TOKEN}"}, None, None),
        (GUARD, True, "POST", LOCAL, 401, "unauthorized"),
        (GUARD, True, "POST", {**LOCAL, "authorization": "Bearer wrong"}, 401, "unauthorized"),
        (GUARD, True, "POST", {**LOCAL, "authorization": f"Basic {TOKEN}"}, 401, "unauthorized"),
        (GUARD, True, "POST", {**LOCAL, "authorization": f"Bearer {TOKEN}x"}, 401, "unauthorized"),
        # no token configured: nobody may
        (AdminGuard(None), True, "POST", {**LOCAL, **BEARER}, 403, "admin_token_not_configured"),
        (None, True, "GET", {**LOCAL, **BEARER}, 403, "admin_token_not_configured"),
        # DNS rebinding: a page's own name resolving to us
        (GUARD, True, "POST", {"host": "evil.example:8081", **BEARER}, 421, "misdirected"),
        (GUARD, True, "POST", {**BEARER}, 421, "misdirected"),
        # cross-origin, on any route
        (GUARD, True, "POST", {**LOCAL, **BEARER, "origin": "http://evil.example"}, 403, "cross_origin"),
        (GUARD, False, "GET", {**LOCAL, "origin": "http://evil.example"}, 403, "cross_origin"),
        (GUARD, True, "POST", {**LOCAL, **BEARER, "origin": "null"}, 403, "cross_origin"),
        (GUARD, True, "POST", {"host": "evil.example:8081", **BEARER, "origin": "http://evil.example:8081"},
         403, "cross_origin"),
        (GUARD, True, "POST", {**LOCAL, **BEARER, "origin": "http://127.0.0.1:8081"}, None, None),  # our own
        # a form's content types, which a page may POST cross-origin without asking
        (GUARD, True, "POST", {**LOCAL, **BEARER, "content-type": "application/x-www-form-urlencoded"},
         415, "unsupported_media_type"),
        (GUARD, False, "POST", {**LOCAL, "content-type": "text/plain; charset=utf-8"}, 415, "unsupported_media_type"),
        (GUARD, True, "POST", {**LOCAL, **BEARER, "content-type": "Multipart/Form-Data; boundary=x"},
         415, "unsupported_media_type"),
        (GUARD, True, "POST", {**LOCAL, **BEARER, "content-type": "application/json"}, None, None),
    ],
)
def test_admit(guard, guarded, method, headers, status, error):
    refusal = admit(guard, guarded, method, headers)
    if status is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.status == status
        assert f'"error": "{error}"'.encode() in refusal.body


def test_unauthorized_names_the_scheme():
    refusal = admit(GUARD, True, "GET", LOCAL)
    assert refusal is not None and ("www-authenticate", 'Bearer realm="connector admin"') in refusal.headers


def test_the_token_is_not_in_the_guards_repr():
    assert TOKEN not in repr(GUARD)
