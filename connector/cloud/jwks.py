"""The token service's signing keys: RS256 key pairs that rotate with an overlap, and their JWKS.

Theory of operation. A `KeyRing` holds the current signing key and the keys it replaced that
are still in their overlap. `rotate(now)` makes a fresh key current and retires the previous
one at `now + overlap`; a retired key no longer signs but stays in the JWKS (and valid for
checking signatures) until then, so a token it signed shortly before the rotation is accepted
for as long as it can live (`overlap` must be at least the tokens' lifetime; the configuration
checks it). `maintain(now)` is the one periodic decision: prune what passed its retirement,
rotate when the current key is `rotate_after` old. It returns a sentence saying what it did.

Times are wall-clock seconds (Unix time) passed in by the caller: they are compared with the
`iat`/`exp` of tokens, which the applications' own clocks read too; trio's clock means nothing
to them. The decisions take `now` as an argument, so they are tested without a clock at all.

Storage. The token service holds a `KeyKeeper`: the ring in use, and `update(decide)`, the one
way to change it. `LocalKeys` keeps it behind a `KeyStore` (load / save of the whole ring;
`FileKeyStore`: one JSON file, mode 0600 from its first byte, replaced atomically), for a single
replica. With several replicas the ring lives in the cloud's etcd
(`connector.cloud.oauth_shared.SharedKeyRing`), changed by compare-and-set so that only one
replica's decision wins, and followed by every replica.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ALGORITHM = "RS256"
RSA_BITS = 2048

log = logging.getLogger(__name__)


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@functools.lru_cache(maxsize=16)
def _load_private_key(pem: bytes) -> rsa.RSAPrivateKey:
    """Parsed once per key: loading checks the RSA key, about 50 ms, and every token check needs it."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("a signing key is not an RSA key")
    return key


@attrs.frozen
class SigningKey:
    """One key pair: `kid`, when it was made, and (once replaced) when it stops being trusted."""

    kid: str
    private_pem: bytes = attrs.field(repr=False)
    created: float
    retires: float | None = None  # None: the current key

    @classmethod
    def generate(cls, now: float) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return cls(kid=f"key-{int(now)}-{secrets.token_hex(4)}", private_pem=pem, created=now)

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        return _load_private_key(self.private_pem)

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    def jwk(self) -> dict[str, str]:
        """The public half as a JSON Web Key (RFC 7517), as XSUAA's /token_keys lists them."""
        numbers = self.public_key.public_numbers()
        public_pem = self.public_key.public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        return {"kty": "RSA", "use": "sig", "alg": ALGORITHM, "kid": self.kid,
                "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e),
                "value": public_pem.decode("ascii")}  # XSUAA also sends the PEM as `value`

    def to_json(self) -> dict[str, Any]:
        return {"kid": self.kid, "private_pem": self.private_pem.decode("ascii"), "created": self.created,
                "retires": self.retires}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SigningKey:
        return cls(kid=str(data["kid"]), private_pem=str(data["private_pem"]).encode("ascii"),
                   created=float(data["created"]),
                   retires=None if data.get("retires") is None else float(data["retires"]))


@attrs.frozen
class KeyRing:
    """The current key first, then the retired keys still in their overlap (immutable)."""

    keys: tuple[SigningKey, ...]

    def __attrs_post_init__(self) -> None:
        if not self.keys or self.keys[0].retires is not None:
            raise ValueError("a key ring starts with its current key")
        if any(key.retires is None for key in self.keys[1:]):
            raise ValueError("only the first key of a ring is current")

    @property
    def current(self) -> SigningKey:
        return self.keys[0]

    def trusted(self, kid: str, now: float) -> SigningKey | None:
        """The key named `kid`, if it may still vouch for a token at `now`."""
        for key in self.keys:
            if key.kid == kid and (key.retires is None or now < key.retires):
                return key
        return None

    def jwks(self, now: float) -> dict[str, list[dict[str, str]]]:
        """`{"keys": [...]}`: every key still trusted at `now`, current first."""
        return {"keys": [key.jwk() for key in self.keys if key.retires is None or now < key.retires]}

    def rotate(self, now: float, overlap: float) -> KeyRing:
        """A ring whose current key is new; the old current key is trusted `overlap` more seconds."""
        retired = attrs.evolve(self.current, retires=now + overlap)
        return KeyRing((SigningKey.generate(now), retired, *self.keys[1:]))

    def maintain(self, now: float, *, rotate_after: float, overlap: float) -> tuple[KeyRing, str | None]:
        """Prune keys past their retirement; rotate if the current key is `rotate_after` old.
        Returns the ring (self if nothing changed) and a sentence saying what changed, or None."""
        kept = tuple(key for key in self.keys if key.retires is None or now < key.retires)
        pruned = [key.kid for key in self.keys if key not in kept]
        ring = KeyRing(kept) if pruned else self
        said = [f"dropped {', '.join(pruned)} (overlap over)"] if pruned else []
        if now - ring.current.created >= rotate_after:
            old = ring.current.kid
            ring = ring.rotate(now, overlap)
            said.append(f"rotated: {ring.current.kid} signs, {old} trusted until {now + overlap:.0f}")
        return ring, ("; ".join(said) or None)

    def to_json(self) -> dict[str, Any]:
        return {"keys": [key.to_json() for key in self.keys]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyRing:
        return cls(tuple(SigningKey.from_json(item) for item in data["keys"]))


class KeyStore(Protocol):
    """Where the ring lives. `load` returns None when none was saved yet; `save` replaces the
    whole ring atomically (a reader sees the old ring or the new one, never a mixture). Both
    raise OSError when the storage cannot be read or written."""

    def load(self) -> KeyRing | None: ...

    def save(self, ring: KeyRing) -> None: ...


class FileKeyStore:
    """A `KeyStore` in one JSON file, mode 0600, replaced with rename."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> KeyRing | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if os.stat(self.path).st_mode & 0o077:
            raise OSError(f"{self.path} holds private keys but is readable by others: chmod 600 it")
        try:
            return KeyRing.from_json(json.loads(data))
        except (ValueError, KeyError, TypeError) as exc:
            raise OSError(f"{self.path} is not a signing key file: {exc}") from exc

    def save(self, ring: KeyRing) -> None:
        write_private_atomically(self.path, json.dumps(ring.to_json(), indent=1).encode("utf-8"))

    def stamp(self) -> tuple[int, int, int] | None:
        """The file's identity (inode, size, mtime): `save` always makes a new one."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)


def write_private_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a fresh 0600 file beside `path`, fsync it, rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_or_create(store: KeyStore, now: float) -> KeyRing:
    """The stored ring, or a new one with a fresh key (saved before it is used)."""
    ring = store.load()
    if ring is None:
        ring = KeyRing((SigningKey.generate(now),))
        store.save(ring)
    return ring


Decision = Callable[["KeyRing | None"], "tuple[KeyRing | None, str | None]"]
"""Given the stored ring (None: none yet), the ring to store instead (None: leave it) and the
sentence saying what changed."""


def due_change(now: float, *, rotate_after: float, overlap: float) -> Decision:
    """The periodic decision at `now`: a first ring if there is none, else `KeyRing.maintain`."""
    def decide(ring: KeyRing | None) -> tuple[KeyRing | None, str | None]:
        if ring is None:
            fresh = KeyRing((SigningKey.generate(now),))
            return fresh, f"created: {fresh.current.kid} signs"
        maintained, said = ring.maintain(now, rotate_after=rotate_after, overlap=overlap)
        return (maintained if maintained is not ring else None), said
    return decide


def rotation(now: float, overlap: float) -> Decision:
    """Rotate at once (an operator's request, a suspected leak): the old key trusted `overlap` more."""
    def decide(ring: KeyRing | None) -> tuple[KeyRing | None, str | None]:
        if ring is None:
            fresh = KeyRing((SigningKey.generate(now),))
            return fresh, f"created: {fresh.current.kid} signs"
        rotated = ring.rotate(now, overlap)
        return rotated, f"rotated: {rotated.current.kid} signs, {ring.current.kid} trusted during the overlap"
    return decide


class KeyKeeper(Protocol):
    """The ring the token service signs and checks with, and the one way to change it.

    `ring` is the ring as last read (None: not read yet: nothing is signed, no token accepted).
    `update(decide)` hands the stored ring to `decide` and stores its answer, atomically against
    other writers (when another writer changed the ring meanwhile, `decide` sees the new ring and
    decides again); it returns the sentence of what changed, or None. The ring is stored before
    it is used, so no key that signed is ever lost. Storage failures raise OSError or
    `ha.store.StoreUnavailable`; the ring in use stays then."""

    @property
    def ring(self) -> KeyRing | None: ...

    async def update(self, decide: Decision) -> str | None: ...


class LocalKeys:
    """A `KeyKeeper` over a `KeyStore` of this replica alone. A store that has a `stamp()` (the
    file's identity, `FileKeyStore`) is followed: when the file was replaced by someone else
    (`connector cloud-keys rotate` of a cloud without [shared]), the next use reads it again,
    as the bindings file is; an unreadable replacement is logged and the ring in use kept."""

    def __init__(self, store: KeyStore, now: float) -> None:
        self.store = store
        self._ring: KeyRing = load_or_create(store, now)
        self._stamp = self._store_stamp()

    def _store_stamp(self) -> object:
        stamp = getattr(self.store, "stamp", None)
        return stamp() if stamp is not None else None

    def _follow(self) -> None:
        stamp = self._store_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            ring = self.store.load()
        except OSError as exc:
            log.error("token signing keys: the changed key file is unusable (%s); the keys in use stay", exc)
            return
        if ring is not None and ring != self._ring:
            log.info("token signing keys: read again (changed on disk): %s signs", ring.current.kid)
            self._ring = ring

    @property
    def ring(self) -> KeyRing:
        self._follow()
        return self._ring

    async def update(self, decide: Decision) -> str | None:
        self._follow()
        ring, said = decide(self._ring)
        if ring is not None:
            self.store.save(ring)
            self._ring = ring
            self._stamp = self._store_stamp()
        return said
