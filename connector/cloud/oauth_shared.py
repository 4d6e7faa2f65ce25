"""The token service's signing keys and bindings in the cloud's etcd ([shared]): one ring and one set
of bindings for every replica, so a token any replica issued is accepted by all of them.

Theory of operation
-------------------
Keys, relative to the ``[shared] prefix``::

    oauth/keyring               {"format": 1, "keys": [{"kid", "created", "retires",
                                                        "private_pem": {"fernet": ...}}, ...]}
    oauth/bindings/<client id>  {"client_id", "subaccount", "secret_hash", "created", "location",
                                 "revoked"}

(the client id percent-encoded). The private keys are encrypted with the Fernet key of
``[shared] secrets_key`` the way the destinations' secrets are (``{"fernet": ...}``; the same key
file on every replica); a binding holds its secret only as a scrypt hash, as the bindings file does.

* **Ring** (`SharedKeyRing`, a `jwks.KeyKeeper`). Every replica follows ``oauth/keyring`` by watch
  and signs and checks with the ring last read; until a ring was read nothing is signed (503) and
  no JWT is accepted. A change (`update(decide)`) reads the ring with its mod revision, asks the
  pure decision (`jwks.due_change`, `jwks.rotation`) and writes the answer by compare-and-set on
  that revision. When two replicas find a rotation due at once, one write wins; the other's
  comparison fails, it reads the winner's ring and decides again (nothing is due any more). The
  others pick the new ring up by watch. A rotated-out key stays in the ring, in every replica's
  JWKS and valid for checking, until its overlap ends; whichever replica comes first prunes it.
  A ring that this replica cannot decrypt (another secrets_key) is never overwritten: it is
  logged, and this replica signs and accepts nothing.
* **Bindings** (`SharedBindings`, a `bindings.BindingReader`). Followed by watch into memory: a
  binding created by `connector binding create` on any machine gets tokens from every replica, and
  a revoked one is refused by all, within the watch's delay. `add_binding` writes only a client id
  that is new; `revoke_binding` writes by compare-and-set; bindings are never deleted (an id is
  never reissued). Until the first read, lookups raise OSError (refused, fail closed).
* **Import** (`import_files`). A cloud that kept its ring and bindings in files (one replica) and
  now has [shared] imports them when it starts: bindings not in etcd yet are added (one revoked or
  added in etcd meanwhile is left as etcd has it); the file's ring becomes the shared one if etcd
  has none, else its keys join the shared ring as retired keys trusted for ``key_overlap``, so no
  token they signed is refused early. Each file is then renamed ``<name>.imported``. The token
  service changes the ring only once the import is done (`SharedKeyRing.ready`).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs
import trio
from cryptography.fernet import Fernet, InvalidToken

from connector.cloud.bindings import Binding, BindingError, BindingLookup, FileBindingStore
from connector.cloud.jwks import Decision, FileKeyStore, KeyRing, SigningKey
from connector.cloud.shared import RETRY, Reachability, _Revisions, encode, follow_prefix
from ha.store import KeyValue, Store, StoreUnavailable

log = logging.getLogger(__name__)

KEYRING_KEY = "oauth/keyring"
BINDINGS_PREFIX = "oauth/bindings/"
RING_FORMAT = 1


class KeyRingUnreadable(OSError):
    """The shared ring cannot be decrypted or parsed: it is left as it is, nothing is signed."""


# --- the ring ----------------------------------------------------------------------------------

def encode_ring(fernet: Fernet, ring: KeyRing) -> bytes:
    """The ring as stored in etcd: each private key encrypted."""
    keys = [{**key.to_json(), "private_pem": {"fernet": fernet.encrypt(key.private_pem).decode("ascii")}}
            for key in ring.keys]
    return encode({"format": RING_FORMAT, "keys": keys})


def decode_ring(fernet: Fernet, value: bytes) -> KeyRing:
    """The ring back from etcd; KeyRingUnreadable if the key is wrong or the value is not a ring."""
    try:
        document = json.loads(value)
        if document.get("format") != RING_FORMAT:
            raise ValueError(f"unknown format {document.get('format')!r}")
        keys = [SigningKey.from_json({**item, "private_pem": fernet.decrypt(item["private_pem"]["fernet"])
                                      .decode("ascii")}) for item in document["keys"]]
        return KeyRing(tuple(keys))
    except InvalidToken:
        raise KeyRingUnreadable("the shared signing keys cannot be decrypted with [shared] secrets_key: it is "
                                "not the key the other replicas use (copy their key file here)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeyRingUnreadable(f"{KEYRING_KEY} in the cloud's etcd is not a signing key ring: {exc}") from None


class SharedKeyRing(_Revisions):
    """A `jwks.KeyKeeper` over the cloud's etcd (see the module docstring)."""

    def __init__(self, store: Store, fernet: Fernet) -> None:
        self.store = store
        self.fernet = fernet
        self._ring: KeyRing | None = None
        self._ring_revision = 0  # the mod revision of the ring in use (0: none)
        self.ready = trio.Event()  # set: changes may be made (`OAuthSync` clears it until its import is done)
        self.ready.set()
        super().__init__()

    @property
    def ring(self) -> KeyRing | None:
        return self._ring

    @property
    def ring_revision(self) -> int:
        """The etcd mod revision of the ring in use: every change of the ring raises it."""
        return self._ring_revision

    async def update(self, decide: Decision) -> str | None:
        await self.ready.wait()  # a first ring is this replica's imported one, not a fresh one
        return await self.update_now(decide)

    async def update_now(self, decide: Decision) -> str | None:
        """`update` without waiting for `ready` (the import itself)."""
        while True:
            kv = await self.store.get(KEYRING_KEY)
            stored = decode_ring(self.fernet, kv.value) if kv is not None else None
            ring, said = decide(stored)
            if ring is None:
                if kv is not None and stored is not None:
                    self._adopt(stored, kv.mod_revision)
                return said
            revision = await self.store.put(KEYRING_KEY, encode_ring(self.fernet, ring),
                                            prev_revision=kv.mod_revision if kv is not None else 0)
            if revision is not None:
                self._adopt(ring, revision)
                return said
            log.info("token signing keys: another replica changed the ring meanwhile; deciding again on its ring")

    def _adopt(self, ring: KeyRing, revision: int) -> None:
        if revision >= self._ring_revision:  # never an older ring over a newer one (a late watch event)
            self._ring, self._ring_revision = ring, revision

    async def run(self, reach: Reachability) -> None:
        await follow_prefix(self.store, KEYRING_KEY, reach, "token signing keys", self._install)

    def _install(self, kvs: Mapping[str, KeyValue], revision: int) -> None:
        kv = kvs.get(KEYRING_KEY)
        if kv is not None and kv.mod_revision > self._ring_revision:
            try:
                self._adopt(decode_ring(self.fernet, kv.value), kv.mod_revision)
            except KeyRingUnreadable as exc:
                log.error("token signing keys: %s", exc)
        self._applied(revision)


# --- bindings -------------------------------------------------------------------------------------

def binding_key(client_id: str) -> str:
    return BINDINGS_PREFIX + urllib.parse.quote(client_id, safe="")


def bindings_from(kvs: Mapping[str, KeyValue]) -> dict[str, Binding]:
    """client id -> binding of the records in etcd; records that are not bindings left out (logged)."""
    found: dict[str, Binding] = {}
    for key, kv in kvs.items():
        try:
            binding = Binding.from_json(json.loads(kv.value))
            if binding_key(binding.client_id) != key:
                raise ValueError("the client id differs from the key")
        except (ValueError, KeyError, TypeError) as exc:
            log.error("bindings: %s in the cloud's etcd is not a binding (%s); ignored", key, exc)
            continue
        found[binding.client_id] = binding
    return found


class SharedBindings(_Revisions, BindingLookup):
    """The bindings in the cloud's etcd, followed into memory (a `bindings.BindingReader`)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._bindings: dict[str, Binding] | None = None  # None: not read yet
        super().__init__()

    def _current(self) -> dict[str, Binding]:
        if self._bindings is None:
            raise OSError("the bindings were not read from the cloud's etcd yet (unreachable)")
        return self._bindings

    async def run(self, reach: Reachability) -> None:
        await follow_prefix(self.store, BINDINGS_PREFIX, reach, "bindings", self._install)

    def _install(self, kvs: Mapping[str, KeyValue], revision: int) -> None:
        self._bindings = bindings_from(kvs)
        self._applied(revision)


async def add_binding(store: Store, binding: Binding) -> int:
    """Record a new binding (`connector binding create`); BindingError if its id exists. The revision."""
    revision = await store.put(binding_key(binding.client_id), encode(binding.to_json()), prev_revision=0)
    if revision is None:
        raise BindingError(f"binding {binding.client_id!r} exists")
    return revision


async def revoke_binding(store: Store, client_id: str, now: float) -> Binding:
    """Revoke a binding (`connector binding revoke`), by compare-and-set; BindingError if unknown.
    Revoking a revoked binding changes nothing."""
    while True:
        kv = await store.get(binding_key(client_id))
        if kv is None:
            raise BindingError(f"no binding {client_id!r}")
        binding = Binding.from_json(json.loads(kv.value))
        if not binding.active:
            return binding
        revoked = attrs.evolve(binding, revoked=now)
        if await store.put(kv.key, encode(revoked.to_json()), prev_revision=kv.mod_revision) is not None:
            return revoked


async def list_bindings(store: Store) -> list[Binding]:
    found = bindings_from((await store.get_prefix(BINDINGS_PREFIX)).kvs)
    return sorted(found.values(), key=lambda b: (b.subaccount, b.created, b.client_id))


# --- import of one replica's files ---------------------------------------------------------------

def _merge_file_ring(shared: KeyRing, imported: KeyRing, now: float, overlap: float) -> KeyRing | None:
    """`shared` with the keys of `imported` it lacks, as retired keys (the current one trusted
    `overlap` more seconds, the retired ones until they retire); None if nothing is missing."""
    known = {key.kid for key in shared.keys}
    joining = [attrs.evolve(key, retires=now + overlap if key.retires is None else key.retires)
               for key in imported.keys if key.kid not in known and (key.retires is None or key.retires > now)]
    return KeyRing((*shared.keys, *joining)) if joining else None


def _read_files(keys_file: Path, bindings_file: Path) -> tuple[list[Binding] | None, KeyRing | None]:
    """The bindings and the ring in one replica's files (None: no such file); OSError if unusable."""
    bindings = FileBindingStore(bindings_file).all() if bindings_file.exists() else None
    return bindings, FileKeyStore(keys_file).load()


def _mark_imported(path: Path) -> None:
    path.rename(path.with_name(path.name + ".imported"))


async def import_files(store: Store, keyring: SharedKeyRing, *, keys_file: Path, bindings_file: Path, now: float,
                       overlap: float) -> list[str]:
    """Import one replica's ring and bindings files into etcd, then rename them ``*.imported``
    (see the module docstring); sentences of what was imported. StoreUnavailable and OSError
    leave the files in place (retried at the next start)."""
    bindings, imported = _read_files(keys_file, bindings_file)
    said: list[str] = []
    if bindings is not None:
        added = 0
        for binding in bindings:
            if await store.put(binding_key(binding.client_id), encode(binding.to_json()), prev_revision=0) is not None:
                added += 1
        _mark_imported(bindings_file)
        said.append(f"imported {added} new binding(s) of {len(bindings)} from {bindings_file}")
    if imported is not None:
        file_ring = imported

        def merge(shared: KeyRing | None) -> tuple[KeyRing | None, str | None]:
            if shared is None:
                return file_ring, f"imported the signing key ring of {keys_file}"
            merged = _merge_file_ring(shared, file_ring, now, overlap)
            return merged, (f"added the keys of {keys_file} to the shared ring as retired keys" if merged else None)

        said.append(await keyring.update_now(merge) or "")
        _mark_imported(keys_file)
    return [s for s in said if s]


class OAuthSync:
    """The token service's shared parts, run by `SharedState`: the import, then both followers."""

    def __init__(self, store: Store, fernet: Fernet, *, keys_file: Path, bindings_file: Path, overlap: float,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.keys = SharedKeyRing(store, fernet)
        self.keys.ready = trio.Event()  # the token service changes the ring only after the import
        self.bindings = SharedBindings(store)
        self.keys_file, self.bindings_file, self.overlap, self.clock = keys_file, bindings_file, overlap, clock

    async def run(self, reach: Reachability, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                for sentence in await import_files(self.store, self.keys, keys_file=self.keys_file,
                                                   bindings_file=self.bindings_file, now=self.clock(),
                                                   overlap=self.overlap):
                    log.warning("token service: %s into the cloud's etcd", sentence)
                break
            except StoreUnavailable as exc:
                reach.down(exc)
                await trio.sleep(RETRY)
            except OSError as exc:  # an unreadable file: said, and the shared state served without it
                log.error("token service: could not import %s / %s: %s", self.keys_file, self.bindings_file, exc)
                break
        self.keys.ready.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.keys.run, reach)
            nursery.start_soon(self.bindings.run, reach)
