"""Principal propagation, node side: logging the cloud's validated user on to the internal host.

Theory of operation. The cloud validated the user token of a request and put its `Principal`
(user name, token claims) in the request head (`connector.cloud.principal`,
`connector.tunnel.heads`). Each mapping says what the internal host gets of it
(`principal_propagation`):

- ``none`` (default): nothing. The principal headers are removed (the cloud removed them
  already; the node removes them again, a second line of defence).
- ``header``: the header `header_name` of ``[principal_propagation]`` with the user rendered from
  `header_value` (e.g. ``${user_name}``). The same header sent by the application is removed
  first, always, so an application cannot name a user itself.
- ``certificate`` (HTTPS mappings, as SAP's Cloud Connector does): the node logs on with a
  short-lived X.509 client certificate for the user: subject rendered from `subject` (an RFC 4514
  name whose attribute values are templates of the token's claims, ``CN=${user_name}``), signed by
  the principal-propagation CA the internal host trusts, valid `validity_minutes`, extended key
  usage clientAuth. `CertificateMinter` keeps one TLS client context per (subject, trust store)
  until `RENEW_BEFORE` its certificate's end, at most `MAX_CACHED` of them (least recently used
  dropped). Connections presenting a user's certificate are never pooled: each carries one
  request and is closed (`connector.agent.origin.OriginPool.take` with a `context`).

A request without a principal goes on as before (no header, no client certificate): the internal
host decides whether it serves anonymous calls. A template naming a claim the token does not
carry refuses the request (`PrincipalError`, 403): the mapping asks for a user the token cannot
name; a node that cannot log anyone on (no CA configured, trust store unusable) answers 502. `logon` returns a `Logon`: the headers to drop and add, and the TLS context to connect with.
The node's audit line names the user of every request that carried a principal.
"""

from __future__ import annotations

import collections
import datetime
import os
import ssl
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from connector import pki
from connector.agent.acl import Mapping
from connector.tunnel.heads import Principal

PRINCIPAL_HEADERS = frozenset({b"sap-connectivity-authentication", b"sap-connectivity-technical-authentication"})
RENEW_BEFORE = 60.0  # seconds before a user certificate's end a new one is minted
BACKDATE = datetime.timedelta(minutes=1)  # notBefore: an internal host's clock a little behind accepts it
MAX_CACHED = 1024  # user contexts kept (about 50 KiB each with the system CAs)


class PrincipalError(Exception):
    """The request cannot be logged on as its user: `status` (403: the token cannot name the user
    the mapping asks for; 502: the node cannot log anyone on), `reason` for the audit, the message
    for the node's log and audit line."""

    def __init__(self, reason: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


def _template(value: str, what: str) -> string.Template:
    template = string.Template(value)
    if not template.is_valid():
        raise ValueError(f"{what}: {value!r} is not a valid ${{claim}} template")
    return template


def _check_subject(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        name = x509.Name.from_rfc4514_string(value)
    except ValueError as exc:
        raise ValueError(f"subject: {value!r} is not an RFC 4514 name ({exc})") from None
    if not len(name):
        raise ValueError("subject: names no attribute")
    for attribute_value in name:
        _template(str(attribute_value.value), "subject")


@attrs.frozen
class PrincipalSettings:
    """`[principal_propagation]` of the node's configuration (see docs/configuration.md)."""

    ca_cert: Path | None = None  # the principal-propagation CA (certificate mode)
    ca_key: Path | None = None  # its private key, mode 0600
    subject: str = attrs.field(default="CN=${user_name}", validator=_check_subject)
    validity_minutes: float = 10.0
    header_name: str = "x-connector-user"  # header mode
    header_value: str = "${user_name}"

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.validity_minutes <= 24 * 60:
            raise ValueError("validity_minutes: must be between 1 and 1440 (a day)")
        if (self.ca_cert is None) != (self.ca_key is None):
            raise ValueError("ca_cert and ca_key go together")
        try:
            h11.Request(method="GET", target="/", headers=[("host", "x"), (self.header_name, "x")])
        except h11.LocalProtocolError:
            raise ValueError(f"header_name: {self.header_name!r} is not a header name") from None
        _template(self.header_value, "header_value")

    def load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
        """The CA certificate and key (None if not configured); pki.CertificateError if unusable
        (a key readable by others included: it can sign any user)."""
        if self.ca_cert is None or self.ca_key is None:
            return None
        if os.stat(self.ca_key).st_mode & 0o077:
            raise pki.CertificateError(f"{self.ca_key} can sign a certificate for any user but is readable by "
                                       "others: chmod 600 it")
        pki.check_key_pair(self.ca_cert, self.ca_key)
        return pki.load_ca(pki.Issued(self.ca_cert, self.ca_key))


def render(template: str, claims: dict[str, str], what: str) -> str:
    """`template` with the claims substituted; PrincipalError naming a claim the token lacks."""
    try:
        return string.Template(template).substitute(claims)
    except KeyError as exc:
        raise PrincipalError("principal_claim_missing", f"{what} names claim {exc} the user's token does not carry") \
            from None


def subject_of(pattern: str, claims: dict[str, str]) -> x509.Name:
    """The certificate subject for a user: each attribute value of `pattern` rendered."""
    name = x509.Name.from_rfc4514_string(pattern)
    rdns = [x509.RelativeDistinguishedName(
        x509.NameAttribute(attribute.oid, render(str(attribute.value), claims, "subject")) for attribute in rdn)
        for rdn in name.rdns]
    try:
        return x509.Name(rdns)
    except ValueError as exc:  # e.g. a country code that is not two letters
        raise PrincipalError("principal_claim_invalid", f"the subject cannot name this user: {exc}") from None


@attrs.frozen
class Logon:
    """How one request logs on to the internal host."""

    drop: frozenset[bytes] = PRINCIPAL_HEADERS  # header names removed from the request
    add: tuple[tuple[bytes, bytes], ...] = ()
    context: ssl.SSLContext | None = None  # a user's client certificate: connect with it, unpooled

    def apply(self, request: h11.Request) -> h11.Request:
        """`request` without the dropped headers, with the added ones (itself if neither applies)."""
        drop = self.drop
        if not self.add and not any(name in drop for name, _ in request.headers):
            return request
        headers = [(k, v) for k, v in request.headers if k not in drop] + list(self.add)
        return h11.Request(method=request.method, target=request.target, headers=headers)


class CertificateMinter:
    """Short-lived client certificates for users, and the TLS contexts presenting them."""

    def __init__(self, settings: PrincipalSettings, *, clock: Callable[[], float] = time.time) -> None:
        ca = settings.load_ca()
        if ca is None:
            raise ValueError("certificate mode needs ca_cert and ca_key in [principal_propagation]")
        self.ca_cert, self.ca_key = ca
        self.settings = settings
        self.clock = clock  # wall clock: a certificate's validity is read by the internal host's clock
        self._contexts: collections.OrderedDict[tuple[str, str | None, int], tuple[ssl.SSLContext, float]] = \
            collections.OrderedDict()
        self.minted = 0

    def mint(self, subject: x509.Name) -> tuple[bytes, bytes, float]:
        """A certificate (PEM), its new key (PEM) and its end (Unix seconds) for `subject`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)
        end = now + datetime.timedelta(minutes=self.settings.validity_minutes)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        self.minted += 1
        return cert.public_bytes(serialization.Encoding.PEM), key_pem, end.timestamp()

    async def context_for(self, subject: x509.Name, trust_store: str | None) -> ssl.SSLContext:
        """A verifying client context for `trust_store` presenting a certificate for `subject`:
        the cached one while it has more than RENEW_BEFORE to live, else a new one, made in a
        worker thread (a context with the system CAs takes about 30 ms to build)."""
        mtime = os.stat(trust_store).st_mtime_ns if trust_store else 0
        key = (subject.rfc4514_string(), trust_store, mtime)
        cached = self._contexts.get(key)
        if cached is not None and self.clock() < cached[1] - RENEW_BEFORE:
            self._contexts.move_to_end(key)
            await trio.lowlevel.checkpoint()
            return cached[0]
        context, end = await trio.to_thread.run_sync(self._new_context, subject, trust_store)
        self._contexts[key] = (context, end)
        self._contexts.move_to_end(key)
        while len(self._contexts) > MAX_CACHED:
            self._contexts.popitem(last=False)
        return context

    def _new_context(self, subject: x509.Name, trust_store: str | None) -> tuple[ssl.SSLContext, float]:
        cert_pem, key_pem, end = self.mint(subject)
        context = ssl.create_default_context(cafile=trust_store)
        _load_chain(context, cert_pem, key_pem)
        return context, end


def _load_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """ssl loads a key pair from files only: one private (0600) temporary file, removed at once."""
    fd, name = tempfile.mkstemp(prefix="connector-pp-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem + cert_pem)
        context.load_cert_chain(name)
    finally:
        os.unlink(name)


class PrincipalPropagator:
    """Decides each request's `Logon` (see the module docstring); `settings` None: no
    [principal_propagation] section (header and certificate mappings then refuse users)."""

    def __init__(self, settings: PrincipalSettings | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.minter = (CertificateMinter(settings, clock=clock)
                       if settings is not None and settings.ca_cert is not None else None)

    async def logon(self, mapping: Mapping, principal: Principal | None) -> Logon:
        mode = mapping.principal_propagation
        if mode == "none":
            return Logon()
        settings = self.settings
        if settings is None:
            raise PrincipalError("principal_propagation_unconfigured",
                                 f"mapping {mapping.name} asks for {mode} but [principal_propagation] is missing", 502)
        if mode == "header":
            name = settings.header_name.lower().encode("ascii")
            if principal is None:
                return Logon(drop=PRINCIPAL_HEADERS | {name})
            value = render(settings.header_value, principal.claims, "header_value")
            try:
                encoded = value.encode("ascii")
                h11.Request(method="GET", target="/", headers=[(b"host", b"x"), (name, encoded)])
            except (UnicodeEncodeError, h11.LocalProtocolError):
                raise PrincipalError("principal_claim_invalid", "the user cannot be named in a header") from None
            return Logon(PRINCIPAL_HEADERS | {name}, ((name, encoded),))
        if principal is None:
            return Logon()
        if self.minter is None:
            raise PrincipalError("principal_propagation_unconfigured",
                                 f"mapping {mapping.name} logs users on with certificates but "
                                 "[principal_propagation] names no ca_cert and ca_key", 502)
        subject = subject_of(settings.subject, principal.claims)
        try:
            context = await self.minter.context_for(subject, mapping.trust_store)
        except (OSError, ssl.SSLError) as exc:  # the trust store went missing or bad meanwhile
            raise PrincipalError("principal_logon_failed", f"no TLS context for {mapping.name}: {exc}",
                                 502) from None
        return Logon(context=context)
