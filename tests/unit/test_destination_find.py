"""Find precedence, owners' folders and the Authentication rules: pure logic, no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from connector.cloud import destination_auth
from connector.cloud.destination_store import Owner
from connector.cloud.destinations import find_in
from connector.cloud.token_client import TokenError


class Memory:
    """The read side of a destination store (`get(owner, name)`), in a dict."""

    def __init__(self, data: dict[Owner, dict[str, dict[str, Any]]]) -> None:
        self.data = data

    def get(self, owner: Owner, name: str) -> dict[str, Any] | None:
        return self.data.get(owner, {}).get(name)


STORE = Memory({
    Owner("sub1"): {"erp": {"Name": "erp", "URL": "subaccount"}, "crm": {"Name": "crm", "URL": "subaccount"}},
    Owner("sub1", "inst-a"): {"erp": {"Name": "erp", "URL": "instance a"}},
    Owner("sub1", "inst-b"): {"hr": {"Name": "hr", "URL": "instance b"}},
    Owner("sub1", None, certificates=True): {"k.p12": {"Name": "k.p12", "Content": "c"}},
    Owner("sub2"): {"hr": {"Name": "hr", "URL": "sub2"}},
})


@pytest.mark.parametrize(("instance", "name", "expected"), [
    ("inst-a", "erp", ("instance a", "inst-a")),  # the instance's own first
    ("inst-a", "crm", ("subaccount", None)),  # then the subaccount's
    (None, "erp", ("subaccount", None)),  # no instance: the subaccount's only
    ("inst-a", "hr", None),  # another instance's destination is not found
    ("inst-b", "hr", ("instance b", "inst-b")),
    (None, "k.p12", None),  # certificates are not destinations
])
def test_find_looks_at_the_instance_then_the_subaccount(instance: str | None, name: str,
                                                        expected: tuple[str, str | None] | None) -> None:
    found = find_in(STORE, "sub1", instance, name)
    assert (None if found is None else (found[0]["URL"], found[1])) == expected


def test_certificates_are_found_by_the_same_precedence() -> None:
    assert find_in(STORE, "sub1", "inst-a", "k.p12", certificates=True) == ({"Name": "k.p12", "Content": "c"}, None)
    assert find_in(STORE, "sub2", None, "k.p12", certificates=True) is None


@pytest.mark.parametrize("owner", [
    Owner("sub1"), Owner("a.b/c!d"), Owner("sub1", "sb-x!b1"), Owner("sub1", None, True), Owner("s", "i", True),
    Owner("%21instance%21"),
])
def test_an_owners_folder_names_it_and_no_one_else(owner: Owner) -> None:
    assert Owner.from_folder(owner.folder) == owner
    assert "!" not in owner.folder.replace("!instance!", "").replace("!certificates", "")


def test_a_subaccount_folder_is_what_it_was_before_owners() -> None:
    assert Owner("acme").folder == "acme" and Owner("a.b").folder == "a%2Eb"
    assert Owner.from_folder("x!y") is None and Owner.from_folder("!instance!i") is None


OAUTH = {"Type": "HTTP", "URL": "https://api", "tokenServiceURL": "https://uaa/oauth/token", "clientId": "c",
         "clientSecret": "s"}


@pytest.mark.parametrize(("props", "problem"), [
    ({**OAUTH, "Authentication": "OAuth2ClientCredentials"}, None),
    ({**OAUTH, "Authentication": "OAuth2ClientCredentials", "clientSecret": ""}, "needs clientSecret"),
    ({**OAUTH, "Authentication": "OAuth2Password"}, "needs User, Password"),
    ({**OAUTH, "Authentication": "OAuth2JWTBearer", "tokenServiceURL": "http://uaa/t"}, "https://"),
    ({"Authentication": "ClientCertificateAuthentication"}, "KeyStoreLocation"),
    ({"Authentication": "PrincipalPropagation", "ProxyType": "Internet"}, "OnPremise"),
    ({"Authentication": "PrincipalPropagation", "ProxyType": "OnPremise"}, None),
])
def test_what_an_authentication_needs(props: dict[str, str], problem: str | None) -> None:
    said = destination_auth.problem(props)
    assert said is None if problem is None else (said is not None and problem in said)


@pytest.mark.parametrize(("authentication", "user_token", "grant", "params"), [
    ("OAuth2ClientCredentials", "ignored", "client_credentials", ()),
    ("OAuth2Password", None, "password", (("username", "u"), ("password", "p"))),
    ("OAuth2JWTBearer", "eyJ.user", "urn:ietf:params:oauth:grant-type:jwt-bearer", (("assertion", "eyJ.user"),)),
    ("OAuth2UserTokenExchange", "eyJ.user", "urn:ietf:params:oauth:grant-type:jwt-bearer",
     (("assertion", "eyJ.user"),)),
])
def test_the_grant_each_authentication_posts(authentication: str, user_token: str | None, grant: str,
                                              params: tuple[tuple[str, str], ...]) -> None:
    request = destination_auth.token_request({**OAUTH, "Authentication": authentication, "User": "u",
                                              "Password": "p"}, user_token)
    assert (request.grant, request.params, request.client_id) == (grant, params, "c")


def test_a_user_token_authentication_without_one_is_a_token_error() -> None:
    with pytest.raises(TokenError, match="X-user-token"):
        destination_auth.token_request({**OAUTH, "Authentication": "OAuth2JWTBearer"}, None)
