"""Backup and restore of the shared state in etcd: one encrypted archive per cluster (or cloud).

Theory of operation
-------------------
What is backed up is every key under the store's prefix that is *not bound to a lease*: for an
on-premise cluster its mappings (``config/``), their history and its secrets; for the cloud
(``[shared]``) its fences, tokens, subaccount settings and destinations. Keys bound to a lease
(the leader key, ``members/``, the cloud's ``replicas/``) are live state that the running
processes write again by themselves; a backup of them would only restore a dead lease.
Secret values are copied as stored, still encrypted under the cluster key (or the cloud's
``secrets_key``), so a backup's secrets are encrypted twice and the key files are not in it.

The archive is a small versioned JSON document (`FORMAT`, `VERSION`) whose ``ciphertext`` is
AES-256-GCM over the payload, with the header as associated data (so nobody can swap the KDF
parameters or the version unnoticed). The key comes from a 32-byte key file (mode 0600) or from a
passphrase through scrypt. A wrong key or passphrase, and an altered file, fail the GCM tag:
`BackupError` with one line, nothing written.

**Epochs and the fence.** An epoch is the ``create_revision`` of the leader key, and the cloud
refuses any master whose epoch is not above the highest it accepted (its fence). A fresh etcd
starts again at revision 1, so after a restore its next leader would be refused ``stale_epoch``
for a long time. `restore` therefore first moves the fresh etcd's revision to the backup's
revision (or to ``min_revision``, when elections happened after the backup: the fence the cloud
reports), by writes to one scratch key, and only then writes the keys back: every epoch from then
on is above every epoch issued before the backup, and watchers that resume from the revision they
knew before the loss see the restored keys as new events. etcd 3.5's ``etcdutl snapshot restore
--bump-revision`` does the same to a snapshot file; etcd 3.4 has no such option and this works on
both. The bump costs one write per revision (about ``BUMP_WORKERS`` in flight at a time).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ha.store import Store, StoreError, check_key

FORMAT = "connector-backup"
VERSION = 1
CIPHER = "AES-256-GCM"
KEY_BYTES = 32
NONCE_BYTES = 12
SCRYPT = {"n": 2**15, "r": 8, "p": 1}  # about 32 MiB and 0.1 s per derivation
SCRYPT_MAX = {"n": 2**20, "r": 16, "p": 4}  # what an archive may ask of us (memory and time)
MIN_PASSPHRASE = 12
MAX_ARCHIVE_BYTES = 256 * 1024 * 1024  # etcd's default backend quota is 2 GiB; ours is small
BUMP_KEY = "restore-bump/"  # scratch keys moving the revision (deleted at the end)
BUMP_WORKERS = 8
KINDS = ("cluster", "cloud")


class BackupError(Exception):
    """An operator's mistake or a bad archive, said in one line."""


# --- the key --------------------------------------------------------------------------------------


@attrs.frozen(repr=False)
class Secret:
    """What encrypts an archive: a key file's 32 bytes, or a passphrase."""

    key: bytes | None = None
    passphrase: bytes | None = None

    def __attrs_post_init__(self) -> None:
        if (self.key is None) == (self.passphrase is None):
            raise BackupError("give either a key file or a passphrase")

    def kdf(self) -> dict[str, Any]:
        """The header's KDF entry for a new archive (a fresh salt each time)."""
        if self.key is not None:
            return {"name": "key-file"}
        return {"name": "scrypt", "salt": _b64(os.urandom(16)), **SCRYPT}

    def derive(self, kdf: Mapping[str, Any]) -> bytes:
        if kdf.get("name") == "key-file":
            if self.key is None:
                raise BackupError("this archive was written with a key file: give --key-file")
            return self.key
        if kdf.get("name") != "scrypt":
            raise BackupError(f"unknown key derivation {kdf.get('name')!r}")
        if self.passphrase is None:
            raise BackupError("this archive was written with a passphrase: give --passphrase-file")
        params = {name: kdf.get(name) for name in SCRYPT}
        n, r, p = params["n"], params["r"], params["p"]
        if not all(isinstance(v, int) and 0 < v <= SCRYPT_MAX[k] for k, v in params.items()):
            raise BackupError(f"the archive's scrypt parameters {params} are out of bounds {SCRYPT_MAX}")
        assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
        salt = _unb64(kdf.get("salt"), "salt")
        try:
            return Scrypt(salt=salt, length=KEY_BYTES, n=n, r=r, p=p).derive(self.passphrase)
        except ValueError as exc:  # n not a power of two
            raise BackupError(f"the archive's scrypt parameters {params}: {exc}") from None


def read_key_file(path: Path) -> Secret:
    """A key file: 32 random bytes, raw or base64 (what `write_key_file` writes); mode 0600."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise BackupError(f"key file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise BackupError(f"key file {path} is readable by group or others; chmod 600 it")
    if len(data) != KEY_BYTES:
        try:
            data = base64.urlsafe_b64decode(data.strip())
        except (binascii.Error, ValueError):
            data = b""
    if len(data) != KEY_BYTES:
        raise BackupError(f"key file {path} must hold {KEY_BYTES} bytes (raw or base64), "
                          "e.g. from `connector backup-key`")
    return Secret(key=data)


def write_key_file(path: Path) -> None:
    """A new random key file, mode 0600 from the first byte; never overwrites one."""
    from connector import pki

    try:
        pki.write_private(path, base64.urlsafe_b64encode(os.urandom(KEY_BYTES)) + b"\n", overwrite=False)
    except pki.CertificateError:
        raise BackupError(f"{path} exists; refusing to overwrite a key (archives made with it need it)") from None


def read_passphrase_file(path: Path, *, new: bool) -> Secret:
    """The first line of a file (``-``: standard input); a new archive needs MIN_PASSPHRASE characters."""
    try:
        text = sys.stdin.buffer.readline() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise BackupError(f"passphrase file {path}: {exc.strerror or exc}") from None
    passphrase = text.splitlines()[0] if text.strip() else b""
    if new and len(passphrase) < MIN_PASSPHRASE:
        raise BackupError(f"the passphrase must have at least {MIN_PASSPHRASE} characters")
    if not passphrase:
        raise BackupError(f"passphrase file {path} is empty")
    return Secret(passphrase=passphrase)


# --- the archive ----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise BackupError(f"the archive's {what} is not base64") from None


def _header_bytes(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def seal(payload: Mapping[str, Any], secret: Secret) -> bytes:
    """The archive's bytes: the header and the encrypted payload, as JSON."""
    kdf = secret.kdf()
    header = {"format": FORMAT, "version": VERSION, "cipher": CIPHER, "kdf": kdf}
    nonce = os.urandom(NONCE_BYTES)
    plain = json.dumps(payload, sort_keys=True).encode()
    ciphertext = AESGCM(secret.derive(kdf)).encrypt(nonce, plain, _header_bytes(header))
    return (json.dumps({**header, "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}, indent=1) + "\n").encode()


def open_archive(data: bytes, secret: Secret) -> dict[str, Any]:
    """The payload of an archive (BackupError: not an archive, a newer version, wrong key, altered)."""
    try:
        document = json.loads(data)
    except ValueError:
        raise BackupError("not a connector backup (not JSON)") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BackupError("not a connector backup (no format marker)")
    if document.get("version") != VERSION or document.get("cipher") != CIPHER:
        raise BackupError(f"backup format version {document.get('version')!r} ({document.get('cipher')!r}) is not "
                          f"one this connector reads ({VERSION}, {CIPHER}): restore with the version that wrote it")
    kdf = document.get("kdf")
    if not isinstance(kdf, dict):
        raise BackupError("the archive names no key derivation")
    header = {"format": FORMAT, "version": VERSION, "cipher": CIPHER, "kdf": kdf}
    nonce, ciphertext = _unb64(document.get("nonce"), "nonce"), _unb64(document.get("ciphertext"), "ciphertext")
    try:
        plain = AESGCM(secret.derive(kdf)).decrypt(nonce, ciphertext, _header_bytes(header))
    except (InvalidTag, ValueError):
        raise BackupError("cannot decrypt the backup: wrong passphrase or key file, or the file was altered") from None
    payload = json.loads(plain)
    check_payload(payload)
    return dict(payload)


def check_payload(payload: Any) -> None:
    if not isinstance(payload, dict) or payload.get("kind") not in KINDS:
        raise BackupError("the archive's payload names no kind (cluster or cloud)")
    if not isinstance(payload.get("revision"), int) or not isinstance(payload.get("keys"), list):
        raise BackupError("the archive's payload has no revision or keys")
    for entry in payload["keys"]:
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) \
                    or not isinstance(entry.get("value"), str):
                raise ValueError("an entry is not {key, value}")
            check_key(entry["key"])
        except (ValueError, TypeError) as exc:
            raise BackupError(f"the archive's payload holds a bad key: {exc}") from None


def read_archive(path: Path, secret: Secret) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ARCHIVE_BYTES + 1)
    except OSError as exc:
        raise BackupError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > MAX_ARCHIVE_BYTES:
        raise BackupError(f"{path} is larger than {MAX_ARCHIVE_BYTES} bytes: not a connector backup")
    return open_archive(data, secret)


def write_archive(path: Path, data: bytes) -> None:
    """Atomically, mode 0600 (a temporary file beside it, then renamed over)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise BackupError(f"{path}: {exc.strerror or exc}") from None


# --- etcd ------------------------------------------------------------------------------------------


async def collect(store: Store, *, kind: str, name: str) -> dict[str, Any]:
    """The payload of a backup: every key not bound to a lease, read at one revision."""
    snapshot = await store.get_prefix("")
    keys = [{"key": kv.key, "value": _b64(kv.value)}
            for key, kv in sorted(snapshot.kvs.items()) if kv.lease == 0 and not key.startswith(BUMP_KEY)]
    return {"kind": kind, "name": name, "revision": snapshot.revision, "created": time.time(), "keys": keys}


@attrs.frozen
class Restored:
    keys: int
    revision_before: int
    revision_after: int  # after the bump and the writes: the next leader's epoch is above this


async def restore(store: Store, payload: Mapping[str, Any], *, kind: str, name: str, force: bool = False,
                  min_revision: int = 0) -> Restored:
    """Put a backup back: refuse a store that holds state (unless `force`), move the revision
    past the backup's (and `min_revision`), then write every key (see the module docstring)."""
    if payload["kind"] != kind or payload.get("name") != name:
        raise BackupError(f"this is a backup of {payload['kind']} {payload.get('name')!r}, not of {kind} {name!r}")
    keys = [(str(entry["key"]), _unb64(entry["value"], "value")) for entry in payload["keys"]]
    snapshot = await store.get_prefix("")
    present = sorted(key for key, kv in snapshot.kvs.items() if kv.lease == 0)
    if present and not force:
        raise BackupError(f"etcd already holds {len(present)} keys of this {kind} (e.g. {present[0]}): restore "
                          "into an empty etcd, or give --force to overwrite the backup's keys")
    revision = await bump_revision(store, max(int(payload["revision"]), min_revision), snapshot.revision)
    for key, value in keys:
        written = await store.put(key, value, prev_revision=None if force else 0)
        if written is None:
            raise BackupError(f"{key} was written by someone else during the restore; run it again with --force")
        revision = max(revision, written)
    return Restored(len(keys), snapshot.revision, revision)


async def bump_revision(store: Store, target: int, current: int) -> int:
    """Writes to scratch keys until the store's revision is at least `target`; returns it."""
    if current >= target:
        return current
    reached = current
    failures: list[StoreError] = []  # the first ends every worker; it is raised as it is

    async def worker(index: int) -> None:
        nonlocal reached
        try:
            while reached < target and not failures:
                written = await store.put(f"{BUMP_KEY}{index}", b"")
                assert written is not None  # an unconditional put always succeeds
                reached = max(reached, written)
        except StoreError as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for index in range(min(BUMP_WORKERS, target - current)):
            nursery.start_soon(worker, index)
    if failures:
        raise failures[0]
    for index in range(BUMP_WORKERS):
        await store.delete(f"{BUMP_KEY}{index}")
    return reached
