"""Principal propagation: the cloud's check of the user token (each way it can be wrong refused by
name), and the node's logon decision and short-lived user certificates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h11
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from connector import pki
from connector.agent.acl import BackendProtocol, Mapping
from connector.agent.principal import (
    RENEW_BEFORE,
    CertificateMinter,
    Logon,
    PrincipalError,
    PrincipalPropagator,
    PrincipalSettings,
    subject_of,
)
from connector.cloud.bindings import AUDIENCES, Binding, hash_secret
from connector.cloud.jwks import KeyRing, SigningKey
from connector.cloud.jwtauth import JwtError, JwtValidator, TrustedIssuer
from connector.cloud.oauth import OAuthSettings, issue_token
from connector.cloud.principal import TECHNICAL_HEADER, USER_HEADER, PrincipalValidator
from connector.tunnel.heads import Principal

T0 = 1_800_000_000.0
SETTINGS = OAuthSettings(url="https://tokens.example", token_lifetime=600, key_overlap=900, rotate_after=3600)
BINDING = Binding("sb-connector-app", "acme", hash_secret("s", n=2), T0)
OTHER = Binding("sb-other-app", "globex", hash_secret("s", n=2), T0)
KEY = SigningKey.generate(T0)
RING = KeyRing((KEY,))
ALICE = {"user_name": "alice", "sub": "u-1", "email": "alice@example.com", "origin": "ldap"}
IDP = "https://idp.example"
IDP_KEY = SigningKey.generate(T0)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ours(clock: Clock) -> JwtValidator:
    class Active:
        def is_active(self, client_id: str) -> bool:
            return True

    return JwtValidator(lambda: RING, issuer=SETTINGS.issuer, audiences=AUDIENCES, bindings=Active(), clock=clock)


def checker(clock: Clock) -> PrincipalValidator:
    idp = TrustedIssuer.from_jwks("acme", IDP, {"keys": [IDP_KEY.jwk()]}, "my-app")
    return PrincipalValidator(ours(clock), {("acme", IDP): idp}, clock=clock)


def user_token(binding: Binding = BINDING, user: dict[str, str] | None = ALICE, grant: str = "password") -> str:
    return str(issue_token(RING, SETTINGS, binding, grant, T0, user=user)["access_token"])


def idp_token(key: SigningKey = IDP_KEY, **claims: object) -> str:
    body = {"iss": IDP, "aud": "my-app", "exp": T0 + 300, "sub": "u-9", "email": "bob@example.com", **claims}
    return jwt.encode(body, key.private_key, algorithm="RS256", headers={"kid": key.kid})


async def refusal(value: bytes, header: bytes = USER_HEADER, now: float = T0 + 1) -> str:
    with pytest.raises(JwtError) as caught:
        await checker(Clock(now)).principal("acme", [(header, value)])
    return caught.value.reason


async def test_a_user_token_of_our_token_service_names_the_user_with_or_without_bearer() -> None:
    tok = user_token()
    for value in (f"Bearer {tok}".encode(), tok.encode(), f"bearer  {tok}".encode()):
        principal = await checker(Clock(T0 + 1)).principal("acme", [(USER_HEADER, value)])
        assert principal is not None
        assert (principal.kind, principal.name) == ("user", "alice")
        assert principal.claims["email"] == "alice@example.com" and principal.claims["zid"] == "acme"


async def test_no_header_no_principal() -> None:
    assert await checker(Clock(T0 + 1)).principal("acme", [(b"host", b"erp")]) is None


async def test_a_trusted_identity_providers_token_names_its_user() -> None:
    principal = await checker(Clock(T0 + 1)).principal("acme", [(USER_HEADER, idp_token().encode())])
    assert principal is not None and principal.name == "bob@example.com"


async def test_a_technical_users_token_names_its_client() -> None:
    tok = user_token(user=None, grant="client_credentials")
    principal = await checker(Clock(T0 + 1)).principal("acme", [(TECHNICAL_HEADER, tok.encode())])
    assert principal is not None and (principal.kind, principal.name) == ("technical", BINDING.client_id)
    # a client token is no user's: in the user header it names nobody
    assert await refusal(tok.encode()) == "no_principal"


def unsigned(claims: dict[str, object]) -> str:
    return jwt.encode(claims, None, algorithm="none", headers={"kid": KEY.kid})  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "now", "reason"), [
    (user_token().encode(), T0 + 600, "expired"),
    (idp_token(exp=T0).encode(), T0 + 1, "expired"),
    (idp_token(aud="another-app").encode(), T0 + 1, "invalid"),
    (user_token(binding=OTHER).encode(), T0 + 1, "wrong_subaccount"),
    (idp_token(iss="https://evil.example").encode(), T0 + 1, "untrusted_issuer"),
    (idp_token(key=SigningKey.generate(T0)).encode(), T0 + 1, "unknown_key"),
    (unsigned({"iss": SETTINGS.issuer, "zid": "acme", "user_name": "root", "exp": T0 + 60}).encode(), T0 + 1,
     "wrong_algorithm"),
    (unsigned({"iss": IDP, "aud": "my-app", "sub": "root", "exp": T0 + 60}).encode(), T0 + 1, "wrong_algorithm"),
    (b"Bearer not-a-jwt", T0 + 1, "malformed"),
    ("Bearer caf\u00e9".encode(), T0 + 1, "malformed"),
])
async def test_a_token_that_is_not_valid_for_the_subaccount_is_refused_by_name(value: bytes, now: float,
                                                                          reason: str) -> None:
    assert await refusal(value, now=now) == reason


async def test_our_token_with_a_wrong_audience_is_refused() -> None:
    claims = jwt.decode(user_token(), options={"verify_signature": False})
    claims["aud"] = ["someone-else"]
    tok = jwt.encode(claims, KEY.private_key, algorithm="RS256", headers={"kid": KEY.kid})
    assert await refusal(tok.encode()) == "wrong_audience"


async def test_two_user_headers_are_refused() -> None:
    tok = user_token().encode()
    with pytest.raises(JwtError) as caught:
        await checker(Clock(T0 + 1)).principal("acme", [(USER_HEADER, tok), (USER_HEADER, tok)])
    assert caught.value.reason == "duplicate_header"


async def test_without_a_token_service_or_trusted_issuer_every_token_is_refused() -> None:
    with pytest.raises(JwtError) as caught:
        await PrincipalValidator().principal("acme", [(USER_HEADER, user_token().encode())])
    assert caught.value.reason == "untrusted_issuer"


# --- the node ----------------------------------------------------------------------------------

USER = Principal("user", "alice", ALICE)


@pytest.fixture
def pp_ca(tmp_path: Path) -> pki.Issued:
    return pki.create_ca(tmp_path, "pp-ca", "principal propagation CA")


def mapping(mode: str, protocol: BackendProtocol = BackendProtocol.HTTPS) -> Mapping:
    return Mapping("erp.virtual", 443, "erp.internal", 8443, protocol=protocol, principal_propagation=mode)


def request(*headers: tuple[bytes, bytes]) -> h11.Request:
    return h11.Request(method="GET", target="/", headers=[(b"host", b"erp"), *headers])


async def test_a_minted_certificate_names_the_user_is_short_lived_and_for_client_auth(pp_ca: pki.Issued) -> None:
    settings = PrincipalSettings(pp_ca.cert_path, pp_ca.key_path, subject="CN=${user_name},O=${origin}",
                                 validity_minutes=5)
    minter = CertificateMinter(settings, clock=Clock(T0))
    cert_pem, key_pem, end = minter.mint(subject_of(settings.subject, ALICE))
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.rfc4514_string() == "CN=alice,O=ldap"
    assert cert.issuer == pki.load_certificate(pp_ca.cert_path).subject
    assert cert.not_valid_after_utc.timestamp() == end == T0 + 300
    assert cert.not_valid_before_utc.timestamp() == T0 - 60
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    pki.verify_issued_by(cert, pki.load_certificate(pp_ca.cert_path))
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == cert.public_key()


async def test_claim_values_cannot_inject_names_into_the_subject(pp_ca: pki.Issued) -> None:
    subject = subject_of("CN=${user_name}", {"user_name": "eve,CN=admin+O=root"})
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "eve,CN=admin+O=root"
    assert len(subject.rdns) == 1


async def test_a_users_context_is_cached_until_shortly_before_its_end(pp_ca: pki.Issued) -> None:
    clock = Clock(T0)
    minter = CertificateMinter(PrincipalSettings(pp_ca.cert_path, pp_ca.key_path, validity_minutes=10), clock=clock)
    alice, bob = subject_of("CN=${user_name}", ALICE), subject_of("CN=${user_name}", {"user_name": "bob"})
    first = await minter.context_for(alice, None)
    clock.now = T0 + 600 - RENEW_BEFORE - 1
    assert await minter.context_for(alice, None) is first and minter.minted == 1
    assert await minter.context_for(bob, None) is not first and minter.minted == 2
    clock.now = T0 + 600 - RENEW_BEFORE
    assert await minter.context_for(alice, None) is not first and minter.minted == 3


async def test_a_ca_key_readable_by_others_is_refused(pp_ca: pki.Issued) -> None:
    os.chmod(pp_ca.key_path, 0o640)
    with pytest.raises(pki.CertificateError, match="chmod 600"):
        PrincipalSettings(pp_ca.cert_path, pp_ca.key_path).load_ca()


async def test_none_drops_the_principal_headers(pp_ca: pki.Issued) -> None:
    logon = await PrincipalPropagator().logon(mapping("none"), USER)
    assert logon == Logon()
    sent = logon.apply(request((USER_HEADER, b"Bearer x"), (TECHNICAL_HEADER, b"y"), (b"accept", b"*/*")))
    assert list(sent.headers) == [(b"host", b"erp"), (b"accept", b"*/*")]


async def test_header_mode_names_the_user_and_drops_the_applications_own(pp_ca: pki.Issued) -> None:
    propagator = PrincipalPropagator(PrincipalSettings(header_name="X-Remote-User"))
    logon = await propagator.logon(mapping("header", BackendProtocol.HTTP), USER)
    sent = logon.apply(request((b"x-remote-user", b"admin")))
    assert list(sent.headers) == [(b"host", b"erp"), (b"x-remote-user", b"alice")]
    # without a principal the application's forged header is removed all the same
    anonymous = await propagator.logon(mapping("header", BackendProtocol.HTTP), None)
    assert list(anonymous.apply(request((b"x-remote-user", b"admin"))).headers) == [(b"host", b"erp")]


async def test_certificate_mode_presents_a_context_and_names_the_user(pp_ca: pki.Issued) -> None:
    propagator = PrincipalPropagator(PrincipalSettings(pp_ca.cert_path, pp_ca.key_path))
    logon = await propagator.logon(mapping("certificate"), USER)
    assert logon.context is not None
    assert (await propagator.logon(mapping("certificate"), None)).context is None  # anonymous: the pooled way


async def test_a_claim_the_token_lacks_refuses_the_request(pp_ca: pki.Issued) -> None:
    propagator = PrincipalPropagator(PrincipalSettings(pp_ca.cert_path, pp_ca.key_path))
    technical = Principal("technical", "sb-app", {"client_id": "sb-app"})
    with pytest.raises(PrincipalError) as caught:
        await propagator.logon(mapping("certificate"), technical)
    assert (caught.value.reason, caught.value.status) == ("principal_claim_missing", 403)


async def test_a_mapping_asking_for_users_without_the_section_refuses_them() -> None:
    with pytest.raises(PrincipalError) as caught:
        await PrincipalPropagator().logon(mapping("certificate"), USER)
    assert (caught.value.reason, caught.value.status) == ("principal_propagation_unconfigured", 502)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"subject": "not a name"}, "subject"),
    ({"subject": "CN=${user"}, "subject"),
    ({"validity_minutes": 0.5}, "validity_minutes"),
    ({"header_name": "bad name"}, "header_name"),
    ({"header_value": "${"}, "header_value"),
    ({"ca_cert": Path("/x.pem")}, "go together"),
])
async def test_settings_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrincipalSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("mode", "protocol", "message"), [
    ("certificate", BackendProtocol.HTTP, "must be HTTPS"),
    ("header", BackendProtocol.TCP, "HTTP or HTTPS"),
    ("sso", BackendProtocol.HTTPS, "is not one of"),
])
async def test_a_mapping_checks_its_mode(mode: str, protocol: BackendProtocol, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mapping(mode, protocol)


async def test_a_mapping_round_trips_its_mode() -> None:
    assert Mapping.from_dict(mapping("certificate").to_dict()).principal_propagation == "certificate"
    assert "principal_propagation" not in mapping("none").to_dict()


# --- [principal_propagation] at load --------------------------------------------------------------

SSO_MAPPING = """
[[mappings]]
virtual_host = "sso.virtual"
virtual_port = 443
internal_host = "10.0.0.1"
internal_port = 8443
protocol = "HTTPS"
principal_propagation = "certificate"
resources = [{ path = "/" }]
"""


@pytest.fixture
def node_files(tmp_path: Path) -> Path:
    from connector.cli import init_certs

    certs = init_certs(tmp_path / "certs", "acme", ["node-a"], ["127.0.0.1"])
    (tmp_path / "node.pem").symlink_to(certs["node_node-a_cert"])
    (tmp_path / "node.key").symlink_to(certs["node_node-a_key"])
    pki.create_ca(tmp_path, "pp-ca", "principal propagation CA")
    return tmp_path


def load(files: Path, extra: str) -> Any:
    from test_config import GOOD_NODE, node

    from connector.config import load_node_config

    return load_node_config(node(files, GOOD_NODE + SSO_MAPPING + extra))


async def test_the_section_loads_with_its_defaults(node_files: Path) -> None:
    config = load(node_files, '[principal_propagation]\nca_cert = "pp-ca.pem"\nca_key = "pp-ca.key"\n')
    settings = config.principal_propagation
    assert (settings.ca_cert, settings.subject, settings.validity_minutes, settings.header_name) == (
        node_files / "pp-ca.pem", "CN=${user_name}", 10.0, "x-connector-user")
    assert config.mappings[-1].principal_propagation == "certificate"


@pytest.mark.parametrize(("extra", "key", "message"), [
    ("", "principal_propagation", "section is required"),
    ("[principal_propagation]\n", "principal_propagation.ca_cert", "is required"),
    ('[principal_propagation]\nca_cert = "pp-ca.pem"\nca_key = "pp-ca.key"\nsubject = "CN"\n',
     "principal_propagation.subject", "RFC 4514"),
    ('[principal_propagation]\nca_cert = "pp-ca.pem"\nca_key = "pp-ca.key"\nvalidity_minutes = 2000\n',
     "principal_propagation.validity_minutes", "between 1 and 1440"),
    ('[principal_propagation]\nca_cert = "pp-ca.pem"\nca_key = "pp-ca.key"\nheader = "x"\n',
     "principal_propagation.header", "unknown key"),
])
async def test_the_section_is_checked_at_load(node_files: Path, extra: str, key: str, message: str) -> None:
    from connector.config import ConfigError

    with pytest.raises(ConfigError, match=message) as caught:
        load(node_files, extra)
    assert caught.value.key == key


async def test_a_readable_ca_key_stops_the_node_at_load(node_files: Path) -> None:
    from connector.config import ConfigError

    os.chmod(node_files / "pp-ca.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load(node_files, '[principal_propagation]\nca_cert = "pp-ca.pem"\nca_key = "pp-ca.key"\n')


async def test_acl_add_sets_the_mode() -> None:
    from connector.cli import build_parser
    from connector.clusterctl import mapping_from_args

    args = build_parser().parse_args(["acl", "add", "--virtual", "sso.virtual:443", "--internal", "10.0.0.1:8443",
                                      "--protocol", "HTTPS", "--path", "/", "--principal-propagation", "certificate"])
    assert mapping_from_args(args).principal_propagation == "certificate"
    plain = build_parser().parse_args(["acl", "add", "--virtual", "erp.virtual:80", "--internal", "10.0.0.1:80"])
    assert mapping_from_args(plain).principal_propagation == "none"
