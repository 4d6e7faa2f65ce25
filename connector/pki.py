"""Certificates for the tunnel: a CA per subaccount, the endpoint's server certificate, node clients.

Theory of operation: the cloud side has its own CA ("cloud CA") that signs the tunnel endpoint's
server certificate; nodes verify the endpoint against it. Each subaccount has a CA of its own that
signs the client certificates of its connector nodes; the client certificate names the subaccount
in its Organization (O), the node in its Common Name (CN) and, optionally, the node's HA cluster in
its Organizational Unit (OU). The endpoint accepts a client only if the certificate chains to the CA
configured for the subaccount it names (see `subaccount_of`); the node id it uses is the CN, and a
cluster named in the certificate is the only one that node may claim (see `cluster_of`).

Private keys are written 0600 and never overwritten silently.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 365
BACKDATE = datetime.timedelta(minutes=5)  # notBefore this long ago: clocks a little behind still accept


class CertificateError(Exception):
    """A certificate is missing, malformed, or does not name/chain to what it must."""


@attrs.frozen
class Issued:
    cert_path: Path
    key_path: Path


def write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write key material (private keys, the admin token) with mode 0600 from the first byte on (no window with wider permissions)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CertificateError(f"{path} exists; refusing to overwrite a private key (use --force)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(directory: Path, name: str, common_name: str, *, force: bool = False) -> Issued:
    """Create `<name>.pem` and `<name>.key` in `directory`: a self-signed CA valid for 10 years."""
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, name), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    issued = Issued(directory / f"{name}.pem", directory / f"{name}.key")
    write_private(issued.key_path, _key_pem(key), overwrite=force)
    _write_public(issued.cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return issued


def load_ca(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = load_certificate(ca.cert_path)
    key = load_private_key(ca.key_path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{ca.key_path}: expected an EC private key")
    return cert, key


def read_file(path: Path, what: str) -> bytes:
    """The bytes of `path`; CertificateError naming it and the `what` when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def load_certificate(path: Path) -> x509.Certificate:
    data = read_file(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        if b"PRIVATE KEY-----" in data:
            raise CertificateError(f"{path} holds a private key, not a certificate (certificate and key "
                                   "swapped?)") from None
        raise CertificateError(f"{path}: not a PEM certificate ({exc})") from None


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (a CA file may hold several); CertificateError as `load_certificate`."""
    load_certificate(path)  # the first: readable, PEM, not a key, each failure in words
    return x509.load_pem_x509_certificates(read_file(path, "certificate"))


def load_private_key(path: Path) -> PrivateKeyTypes:
    data = read_file(path, "private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        if b"-----BEGIN CERTIFICATE-----" in data:
            raise CertificateError(f"{path} holds a certificate, not a private key (certificate and key "
                                   "swapped?)") from None
        raise CertificateError(f"{path}: not an unencrypted PEM private key ({exc})") from None


def check_key_pair(cert_path: Path, key_path: Path) -> None:
    """Raise CertificateError, naming the file, unless `key_path` is the private key of the
    certificate in `cert_path` and TLS can load the pair (what start-up will do)."""
    cert = load_certificate(cert_path)
    key = load_private_key(key_path)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.PEM, public)
            != cert.public_key().public_bytes(serialization.Encoding.PEM, public)):
        raise CertificateError(f"{key_path} is not the private key of {cert_path} (a key of another certificate?)")
    try:
        ssl.create_default_context().load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise CertificateError(f"{cert_path} with {key_path}: TLS cannot load them: {exc}") from None


def check_trust_store(path: Path) -> None:
    """Raise CertificateError, naming the file, unless it is a readable PEM bundle of CA certificates."""
    load_certificate(path)  # the first certificate: readable, PEM, not a key
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"{path}: not a PEM CA bundle TLS can load: {exc}") from None


def issue(
    ca: Issued,
    directory: Path,
    name: str,
    *,
    common_name: str,
    organization: str | None = None,
    cluster: str | None = None,
    server_names: list[str] | None = None,
    client: bool = False,
    force: bool = False,
) -> Issued:
    """Issue a leaf certificate signed by `ca`: a server certificate when `server_names` is given
    (DNS names or IP addresses as SubjectAltName), a client certificate when `client` is true.
    `organization` (a subaccount) goes into O=, `cluster` (a node's HA cluster) into OU=."""
    ca_cert, ca_key = load_ca(ca)
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if cluster:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster))
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    usages = []
    if server_names:
        alt: list[x509.GeneralName] = []
        for server_name in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(server_name)))
            except ValueError:
                alt.append(x509.DNSName(server_name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    issued = Issued(directory / f"{name}.pem", directory / f"{name}.key")
    write_private(issued.key_path, _key_pem(key), overwrite=force)
    _write_public(issued.cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return issued


MAX_CSR_BYTES = 16384  # a PEM CSR of an EC or RSA-4096 key is a few KiB


def new_key_and_csr(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """A new private key (PEM) and a CSR for it (PEM) naming what `cert` names: what a node sends
    to renew its certificate. The signer takes the names from the certificate it knows, not the CSR."""
    key = _new_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(cert.subject).sign(key, hashes.SHA256())
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A PEM CSR whose signature proves its key; CertificateError saying what is wrong."""
    if len(data) > MAX_CSR_BYTES:
        raise CertificateError(f"the CSR is {len(data)} bytes, more than {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate signing request ({exc})") from None
    if not csr.is_signature_valid:
        raise CertificateError("the CSR's signature does not verify (not made with its key)")
    public = csr.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.key_size < 256:
            raise CertificateError(f"the CSR's EC key is {public.curve.key_size} bits, fewer than 256")
    elif isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise CertificateError(f"the CSR's RSA key is {public.key_size} bits, fewer than 2048")
    else:
        raise CertificateError("the CSR's key must be EC (P-256 or larger) or RSA (2048 bits or more)")
    return csr


def sign_client_csr(ca: Issued, csr: x509.CertificateSigningRequest, subject: x509.Name, *,
                    lifetime: datetime.timedelta, now: datetime.datetime | None = None) -> bytes:
    """A node client certificate (PEM) for the CSR's key, naming `subject` (the names the signer
    vouches for: O= subaccount, OU= cluster, CN= node; never the CSR's own), valid `lifetime` in
    all (notAfter - notBefore, as the certificate it renews: it starts BACKDATE ago, as every
    certificate here; at least a minute from now, at most LEAF_DAYS)."""
    ca_cert, ca_key = load_ca(ca)
    lifetime = min(max(lifetime, BACKDATE + datetime.timedelta(minutes=1)), datetime.timedelta(days=LEAF_DAYS))
    start = (now or _now()) - BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())  # type: ignore[arg-type]  # load_csr admits EC and RSA keys only
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def install_key_pair(cert_path: Path, key_path: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Replace a certificate and its key, each atomically (written aside, then renamed over the
    old one; the key 0600 from its first byte). Between the two renames key and certificate do not
    match: a reader then keeps the pair it has (`connector.tlsreload`) until the certificate follows."""
    for path, data, private in ((key_path, key_pem, True), (cert_path, cert_pem, False)):
        tmp = path.with_name(f".{path.name}.new")
        tmp.unlink(missing_ok=True)
        if private:
            write_private(tmp, data, overwrite=False)
        else:
            _write_public(tmp, data)
        os.replace(tmp, path)


def subaccount_of(cert: x509.Certificate) -> str:
    """The subaccount a client certificate names (its Organization attribute)."""
    names = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(names) != 1 or not str(names[0].value):
        raise CertificateError("client certificate must name exactly one subaccount in O=")
    return str(names[0].value)


def cluster_of(cert: x509.Certificate) -> str | None:
    """The HA cluster a client certificate binds its node to (its OU attribute), or None."""
    names = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(names) > 1 or (names and not str(names[0].value)):
        raise CertificateError("client certificate must name at most one cluster in OU=")
    return str(names[0].value) if names else None


def common_name_of(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def verify_issued_by(cert: x509.Certificate, ca_certs: x509.Certificate | Sequence[x509.Certificate]) -> None:
    """Raise CertificateError unless `cert` was signed by `ca_certs` (or one of them: a subaccount's
    CA file may hold its new and its old CA while nodes are re-issued). Used on top of the TLS
    handshake's own chain check, to bind the subaccount named in the certificate to *its* CA."""
    cas = [ca_certs] if isinstance(ca_certs, x509.Certificate) else list(ca_certs)
    failures = []
    for ca_cert in cas:
        try:
            cert.verify_directly_issued_by(ca_cert)
            return
        except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no common base
            failures.append(str(exc) or type(exc).__name__)
    raise CertificateError(f"certificate is not issued by the subaccount's CA: {'; '.join(failures)}")


def expiry_timestamp(path: Path) -> float:
    return load_certificate(path).not_valid_after_utc.timestamp()


def server_context(cert: Path, key: Path, client_cas: list[Path]) -> ssl.SSLContext:
    """TLS server context requiring a client certificate that chains to one of `client_cas`."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    for ca in client_cas:
        ctx.load_verify_locations(cafile=str(ca))
    return ctx


def client_context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """TLS client context verifying the server against `ca` (system store if None), hostname checked."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx
