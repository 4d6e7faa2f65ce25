"""Application credentials ("service bindings"): client ids and secrets, and their VCAP_SERVICES.

Theory of operation. An application written for SAP BTP finds its credentials in the
`VCAP_SERVICES` environment variable: a `connectivity`, a `destination` and an `xsuaa` binding,
each with `clientid`, `clientsecret` and the `url` of the token service, plus the proxy's host
and ports (connectivity) and the destination service's `uri`. `connector binding create` issues
one client id and secret for a subaccount and prints that JSON (`vcap_services`); all three
bindings carry the same credentials, so the token the application fetches for one service is
good for the others.

The secret is shown once and stored only as a scrypt hash (`hash_secret`, salted, parameters
kept with the hash); `Binding.check_secret` compares in constant time. A revoked binding stays
in the store (so its id is never reissued and `list` shows it) and gets no new tokens; the
validator refuses its tokens too (`is_active`).

Storage sits behind `BindingStore`; `FileBindingStore` keeps every binding in one JSON file
(mode 0600, replaced atomically). The running cloud reads it, `connector binding` writes it:
a reader notices a replaced file by its inode, size and modification time and reloads it, so a
revocation takes effect at the next request without a restart. With several replicas
([shared]) the bindings live in the cloud's etcd instead, one key each, followed by every
replica (`connector.cloud.oauth_shared`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Protocol

import attrs

from connector.cloud.jwks import write_private_atomically

# scrypt at 16 MiB and about 50 ms: costly to brute-force offline, cheap enough for a token request
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
_LOCATION = re.compile(r"[A-Za-z0-9._-]{0,64}")
SCOPES = ("connectivity.proxy", "destination.find")  # what a binding's tokens may do (audiences below)
AUDIENCES = ("connectivity", "destination")


def hash_secret(secret: str, *, salt: bytes | None = None, n: int = SCRYPT_N) -> str:
    """`scrypt$N$r$p$salt$hash`, base64url; the parameters travel with the hash."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, maxmem=SCRYPT_MAXMEM,
                            dklen=32)
    encode = base64.urlsafe_b64encode
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${encode(salt).decode()}${encode(digest).decode()}"


def check_secret(secret: str, stored: str) -> bool:
    """Whether `secret` hashes to `stored` (constant-time comparison of the digests)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt" or int(r) != SCRYPT_R or int(p) != SCRYPT_P:
            return False
        presented = hashlib.scrypt(secret.encode("utf-8"), salt=base64.urlsafe_b64decode(salt), n=int(n),
                                   r=SCRYPT_R, p=SCRYPT_P, maxmem=SCRYPT_MAXMEM, dklen=32)
        return hmac.compare_digest(presented, base64.urlsafe_b64decode(digest))
    except ValueError:
        return False


@attrs.frozen
class Binding:
    """One application's credentials (the secret only as its hash)."""

    client_id: str
    subaccount: str
    secret_hash: str = attrs.field(repr=False)
    created: float
    location: str = ""  # the Cloud Connector location the application is meant to use ("" = default)
    revoked: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def check_secret(self, secret: str) -> bool:
        return check_secret(secret, self.secret_hash)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Binding:
        return cls(**{field.name: data[field.name] for field in attrs.fields(cls) if field.name in data})


def new_binding(subaccount: str, now: float, *, location: str = "") -> tuple[Binding, str]:
    """A fresh binding and its secret (256 random bits, shown once)."""
    if not subaccount:
        raise ValueError("a binding needs a subaccount")
    if not _LOCATION.fullmatch(location):
        raise ValueError(f"location id {location!r}: at most 64 letters, digits, '.', '_' or '-'")
    secret = secrets.token_urlsafe(32)
    client_id = f"sb-connector-{secrets.token_hex(12)}"  # no ':' (Basic) or '!' (URL-encoding trouble)
    return Binding(client_id, subaccount, hash_secret(secret), now, location), secret


@attrs.frozen
class UserAccount:
    """A user of a subaccount's zone, for the `password` grant ([[subaccounts.users]] in cloud.toml).

    The password is configured only as its `hash_secret` hash, like a binding's secret. Tokens
    for the user carry `user_name`, `user_id`, `email` and `origin` as XSUAA writes them.
    """

    subaccount: str
    user_name: str
    password_hash: str = attrs.field(repr=False)
    email: str = ""
    origin: str = "connector"  # XSUAA: the identity provider's origin key ("ldap", "sap.default", ...)
    user_id: str = ""  # "": a stable UUID derived from the subaccount and the user name

    def __attrs_post_init__(self) -> None:
        if not self.user_name or not self.subaccount:
            raise ValueError("a user needs a user_name and a subaccount")
        if not self.password_hash.startswith("scrypt$") or len(self.password_hash.split("$")) != 6:
            raise ValueError(f"user {self.user_name!r}: password_scrypt must be a hash of "
                             "connector.cloud.bindings.hash_secret (scrypt$N$r$p$salt$hash), never the password")
        if not self.user_id:
            derived = uuid.uuid5(uuid.NAMESPACE_URL, f"connector:{self.subaccount}/{self.user_name}")
            object.__setattr__(self, "user_id", str(derived))

    def claims(self) -> dict[str, str]:
        """The user's claims in a token, as XSUAA names them."""
        claims = {"user_name": self.user_name, "user_id": self.user_id, "sub": self.user_id, "origin": self.origin}
        return {**claims, "email": self.email} if self.email else claims


class BindingError(Exception):
    """A binding cannot be created, found or revoked as asked."""


class BindingReader(Protocol):
    """What the token service and the validator read: `get` and `is_active` answer the latest
    state known; OSError when it cannot be read."""

    def get(self, client_id: str) -> Binding | None: ...

    def is_active(self, client_id: str) -> bool: ...


class BindingStore(Protocol):
    """The bindings of every subaccount. `get` and `is_active` read the latest saved state;
    `add` and `revoke` are atomic replacements of the whole set. Storage failures are OSError."""

    def get(self, client_id: str) -> Binding | None: ...

    def is_active(self, client_id: str) -> bool: ...

    def all(self) -> list[Binding]: ...

    def add(self, binding: Binding) -> None: ...

    def revoke(self, client_id: str, now: float) -> Binding: ...


class BindingLookup:
    """The reading side every binding store shares: its subclass says what `_current` holds."""

    def _current(self) -> dict[str, Binding]:
        raise NotImplementedError

    def get(self, client_id: str) -> Binding | None:
        return self._current().get(client_id)

    def is_active(self, client_id: str) -> bool:
        binding = self.get(client_id)
        return binding is not None and binding.active

    def all(self) -> list[Binding]:
        return sorted(self._current().values(), key=lambda b: (b.subaccount, b.created, b.client_id))


class FileBindingStore(BindingLookup):
    """A `BindingStore` in one JSON file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._bindings: dict[str, Binding] = {}

    def _current(self) -> dict[str, Binding]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._bindings = None, {}
            return self._bindings
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._seen:
            if st.st_mode & 0o077:
                raise OSError(f"{self.path} holds credential hashes but is readable by others: chmod 600 it")
            try:
                data = json.loads(self.path.read_bytes())
                bindings = [Binding.from_json(item) for item in data["bindings"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise OSError(f"{self.path} is not a bindings file: {exc}") from exc
            self._bindings = {b.client_id: b for b in bindings}
            self._seen = stamp
        return self._bindings


    def _save(self, bindings: dict[str, Binding]) -> None:
        data = {"bindings": [b.to_json() for b in bindings.values()]}
        write_private_atomically(self.path, json.dumps(data, indent=1).encode("utf-8"))

    def add(self, binding: Binding) -> None:
        bindings = dict(self._current())
        if binding.client_id in bindings:
            raise BindingError(f"binding {binding.client_id!r} exists")
        bindings[binding.client_id] = binding
        self._save(bindings)

    def revoke(self, client_id: str, now: float) -> Binding:
        bindings = dict(self._current())
        binding = bindings.get(client_id)
        if binding is None:
            raise BindingError(f"no binding {client_id!r}")
        if binding.active:
            binding = bindings[client_id] = attrs.evolve(binding, revoked=now)
            self._save(bindings)
        return binding


@attrs.frozen
class Endpoints:
    """Where an application reaches us, as the bindings name it."""

    token_url: str  # the token service's base URL (https://host:port); tokens at {url}/oauth/token
    proxy_host: str
    http_proxy_port: int
    socks5_proxy_port: int
    destination_url: str | None  # the destination service (None: not configured)


def vcap_services(binding: Binding, secret: str, endpoints: Endpoints) -> dict[str, Any]:
    """VCAP_SERVICES with the connectivity, destination and xsuaa bindings, SAP's field names."""
    # XSUAA's uaadomain is a host name; the SDK's xssec fetches tokens and keys of a tenant (a user's
    # token names its zone) from https://{uaadomain}, so a token service off port 443 needs its port here
    domain = urllib.parse.urlsplit(endpoints.token_url).netloc.rpartition("@")[2]
    common = {
        "clientid": binding.client_id,
        "clientsecret": secret,
        "url": endpoints.token_url,
        "uaadomain": domain,
        "identityzone": binding.subaccount,
        "identityzoneid": binding.subaccount,
        "zoneid": binding.subaccount,
        "tenantid": binding.subaccount,
        "subaccountid": binding.subaccount,
        "tenantmode": "dedicated",
        "verificationkey": "",  # applications fetch the keys from {url}/token_keys
    }

    def service(label: str, plan: str, credentials: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"label": label, "plan": plan, "name": f"{label}-{binding.subaccount}", "tags": [label],
                 "instance_name": f"{label}-{binding.subaccount}", "binding_name": None,
                 "credentials": {**common, **credentials}}]

    connectivity = {
        "xsappname": f"connectivity!{binding.subaccount}",
        "token_service_url": endpoints.token_url,
        "token_service_domain": domain,
        "onpremise_proxy_host": endpoints.proxy_host,
        "onpremise_proxy_port": str(endpoints.http_proxy_port),
        "onpremise_proxy_http_port": str(endpoints.http_proxy_port),
        "onpremise_socks5_proxy_port": str(endpoints.socks5_proxy_port),
    }
    if binding.location:
        connectivity["cloud_connector_location_id"] = binding.location  # ours: SAP has no such field
    result = {
        "connectivity": service("connectivity", "lite", connectivity),
        "xsuaa": service("xsuaa", "application", {"xsappname": f"app!{binding.subaccount}"}),
    }
    if endpoints.destination_url is not None:
        result["destination"] = service("destination", "lite", {
            "xsappname": f"destination!{binding.subaccount}", "uri": endpoints.destination_url,
            "instanceid": binding.client_id,
        })
    return result
