"""The client certificate the node presents to an internal host (SAP's "system certificate").

Theory of operation. An HTTPS or TCP-TLS mapping may name a client identity, in one of two ways:

- `client_cert` + `client_key`: PEM files on every node; the key must be private to its owner
  (mode 0600), checked each time it is read, not only at start;
- `client_identity = "secret:<name>"`: an entry of the cluster's encrypted secrets in etcd
  (`connector secret set <name> < bundle.pem`: the certificate, its chain and the unencrypted
  private key, PEM, in one value). `ClusterSecrets` reads the `secrets/` prefix and follows it
  with a watch; a secret is decrypted with the cluster key (`[cluster] secrets_key`) when a
  mapping first asks for it. A rotated secret is presented by every connection opened after the
  node saw the change (open ones keep theirs).

`backend_context(mapping, secrets)` is the verifying client context of one mapping. Contexts are
cached by what they were built from: the trust store and its mtime, the identity's files and their
mtimes or the secret's name and revision. A changed file or secret builds a new context; an
unchanged one costs a stat. Whatever cannot be used raises `IdentityError`, whose message is for
the node's log only (the caller answers the application with a generic TLS failure).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import ssl
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from cryptography.fernet import Fernet, InvalidToken

from connector.backoff import Backoff
from ha.store import SECRETS_PREFIX, RevisionCompacted, Store, StoreUnavailable

if TYPE_CHECKING:
    from connector.agent.acl import Mapping

log = logging.getLogger(__name__)

SECRET_SCHEME = "secret:"
SECRET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_CONTEXTS = 64  # cached client contexts (one per mapping and identity version in use)


class IdentityError(Exception):
    """The trust store or the client identity of a mapping cannot be used; the message names why."""


def secret_name(client_identity: str) -> str:
    """The secret's name in "secret:<name>"; ValueError if it is not of that form."""
    name = client_identity.removeprefix(SECRET_SCHEME)
    if not client_identity.startswith(SECRET_SCHEME) or not SECRET_NAME.fullmatch(name):
        raise ValueError(f"{client_identity!r} is not \"secret:<name>\" (letters, digits, '.', '_', '-')")
    return name


def read_private_key(path: str | Path) -> bytes:
    """The bytes of a private key file, refused unless it is private to its owner (mode 0600);
    the mode checked is the mode of the file read (one open)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise IdentityError(f"client key {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise IdentityError(f"client key {path} is readable by others (mode {mode & 0o777:o}): chmod 600 it")
        return f.read()


def _load_pem_identity(context: ssl.SSLContext, pem: bytes) -> None:
    """Load certificate chain and key from memory: ssl reads only files, so through an anonymous
    in-memory file (Linux memfd, read through /proc), else a 0600 temporary file removed at once."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("client-identity", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    fd, name = tempfile.mkstemp(prefix="client-identity-")  # mode 0600
    try:
        os.write(fd, pem)
        os.close(fd)
        context.load_cert_chain(name)
    finally:
        os.unlink(name)


class ClusterSecrets:
    """The cluster's secrets, kept current from etcd (see the module docstring). Values are held
    encrypted and decrypted when first asked for (secrets no mapping names stay ciphertext)."""

    def __init__(self, store: Store, fernet: Fernet) -> None:
        self.store = store
        self._fernet = fernet
        self._tokens: dict[str, tuple[int, bytes]] = {}  # name -> (mod revision, ciphertext)
        self._plain: dict[str, tuple[int, bytes | None]] = {}  # decrypted (None: does not decrypt)
        self.revision = 0  # of the last snapshot applied
        self._changed = trio.Event()

    def get(self, name: str) -> tuple[int, bytes] | None:
        """(revision, value) of secret `name`, or None if there is none (or it does not decrypt)."""
        token = self._tokens.get(name)
        if token is None:
            return None
        revision, ciphertext = token
        known = self._plain.get(name)
        if known is None or known[0] != revision:
            try:
                known = (revision, self._fernet.decrypt(ciphertext))
            except InvalidToken:
                log.error("secret %s (revision %d) does not decrypt with this node's cluster key; not used",
                          name, revision)
                known = (revision, None)
            self._plain[name] = known
        value = known[1]
        return None if value is None else (revision, value)

    async def wait_revision(self, revision: int) -> None:
        """Return once a snapshot at `revision` or later is applied."""
        while self.revision < revision:
            await self._changed.wait()

    async def load(self) -> int:
        """Read the secrets once (`run` does it on every change); the snapshot's revision."""
        snapshot = await self.store.get_prefix(SECRETS_PREFIX)
        self._tokens = {key.removeprefix(SECRETS_PREFIX): (kv.mod_revision, kv.value)
                        for key, kv in snapshot.kvs.items()}
        self._plain = {name: plain for name, plain in self._plain.items()
                       if name in self._tokens and self._tokens[name][0] == plain[0]}
        self.revision = snapshot.revision
        self._changed.set()
        self._changed = trio.Event()
        return snapshot.revision

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the secrets, report started, then follow changes (for ever; an etcd outage keeps
        the last values and retries with backoff)."""
        backoff = Backoff(base=0.2, cap=5.0)
        started = False
        while True:
            try:
                revision = await self.load()
                if not started:
                    started = True
                    task_status.started()
                backoff.reset()
                async with self.store.watch(SECRETS_PREFIX, revision + 1) as events:
                    async for _event in events:
                        await self.load()
            except (StoreUnavailable, RevisionCompacted) as exc:
                delay = backoff.next_delay()
                log.warning("cluster secrets: %s; keeping revision %d, retrying in %.1f s", exc, self.revision, delay)
                if not started:  # serve what needs no secret rather than nothing
                    started = True
                    task_status.started()
                await trio.sleep(delay)


_contexts: collections.OrderedDict[tuple[Any, ...], ssl.SSLContext] = collections.OrderedDict()


def _mtime(path: str, what: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError as exc:
        raise IdentityError(f"{what} {path} unusable: {exc.strerror}") from None


def backend_context(mapping: Mapping, secrets: ClusterSecrets | None = None) -> ssl.SSLContext:
    """The verifying client context for `mapping`: its trust store (None: the
    system's CAs) and its client identity, if it names one; cached (see the module docstring)."""
    trust_store: str | None = mapping.trust_store
    key: tuple[Any, ...] = (trust_store, _mtime(trust_store, "trust store") if trust_store else 0)
    pem: bytes | None = None
    if mapping.client_cert is not None and mapping.client_key is not None:
        cert_file, key_file = mapping.client_cert, mapping.client_key
        key += ("files", cert_file, key_file, _mtime(cert_file, "client certificate"), _mtime(key_file, "client key"))
    elif mapping.client_identity is not None:
        name = secret_name(mapping.client_identity)
        entry = secrets.get(name) if secrets is not None else None
        if entry is None:
            why = "no cluster secrets on this node ([cluster] secrets_key)" if secrets is None else "no such secret"
            raise IdentityError(f"client identity {mapping.client_identity}: {why}")
        revision, pem = entry
        key += ("secret", name, revision)
    context = _contexts.get(key)
    if context is not None:
        _contexts.move_to_end(key)
        return context
    context = _build(mapping, pem)
    _contexts[key] = context
    if len(_contexts) > MAX_CONTEXTS:
        _contexts.popitem(last=False)
    return context


def _build(mapping: Mapping, secret_pem: bytes | None) -> ssl.SSLContext:
    try:
        # verification on: CERT_REQUIRED and hostname checking are create_default_context defaults
        context = ssl.create_default_context(cafile=mapping.trust_store)
    except (OSError, ssl.SSLError) as exc:
        raise IdentityError(f"trust store {mapping.trust_store} unusable: {exc}") from None
    if mapping.client_cert is not None and mapping.client_key is not None:
        try:
            cert = Path(mapping.client_cert).read_bytes()
        except OSError as exc:
            raise IdentityError(f"client certificate {mapping.client_cert}: {exc.strerror}") from None
        pem, what = cert + b"\n" + read_private_key(mapping.client_key), f"{mapping.client_cert} with {mapping.client_key}"
    elif secret_pem is not None:
        pem, what = secret_pem, str(mapping.client_identity)
    else:
        return context
    try:
        _load_pem_identity(context, pem)
    except (OSError, ssl.SSLError) as exc:
        raise IdentityError(f"client identity {what} unusable (certificate chain and matching key?): {exc}") from None
    return context
