"""Destinations at rest: one file per destination, secrets encrypted, each change written alone.

Theory of operation. The configured store path (``destinations.json``) names three things: the
Fernet key ``<store>.key``, the directory ``<stem>.d/`` that holds the destinations, and the file
itself, which is where stores of format 1 kept everything. Inside the directory each subaccount
has a folder (its id percent-encoded, dots too, so no id can name ``..``) with one file per
destination, ``<Name>.json``: ``{"format": 2, "destination": {...}}``, secret properties
(Password and the like) as ``{"fernet": "..."}``. Folders are 0700, files 0600.

A change touches only the files of the destinations it names: each is written to a temporary
file, fsynced, renamed over the old one, and the folder fsynced; a delete unlinks and fsyncs the
folder. The in-memory state changes only after the disk did; if one file of a multi-destination
change cannot be written, the files already written by that change are put back as they were.
Leftover temporary files of a crash are removed at load.

Migration: when the store path is a format-1 file and the directory does not exist, the file is
read, written out per destination into a staging directory that is then renamed into place (so a
crash leaves either no directory or a whole one), and the old file is renamed to
``<store>.migrated`` (encrypted, 0600; delete it once the service runs well).

Owners. Destinations belong to a subaccount, or to one service instance of it (SAP's
instance-level destinations; an instance is a binding's client id), and certificates likewise:
an `Owner` names which set, and its `folder` is both the directory name and the etcd key segment:
``<subaccount>`` (subaccount destinations, as before owners existed),
``<subaccount>!instance!<instance>``, and either with ``!certificates`` appended. The parts are
percent-encoded, which never leaves a ``!``, so no subaccount's folder can be another owner's.

This module checks no request rules (names, counts, sizes): the destination service does, under
its write lock, before it calls `put` or `remove`.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import stat
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import trio
from cryptography.fernet import Fernet, InvalidToken

from ha.store import RevisionCompacted, Store, StoreUnavailable

log = logging.getLogger(__name__)

SECRET_PROPERTIES = frozenset({"Password", "clientSecret", "tokenServicePassword", "KeyStorePassword"})
ENCRYPTED_PROPERTIES = SECRET_PROPERTIES | {"Content"}  # and a certificate's content (a key store, often)
LEGACY_FORMAT = 1
FILE_FORMAT = 2
_SUFFIX = ".json"
_TEMPORARY = ".tmp"

_INSTANCE, _CERTIFICATES = "!instance!", "!certificates"


@attrs.frozen
class Owner:
    """Whose destinations (or certificates): a subaccount's, or one of its service instances'."""

    subaccount: str
    instance: str | None = None
    certificates: bool = False  # the owner's certificates rather than its destinations

    @property
    def folder(self) -> str:
        """The directory name and etcd key segment (see the module docstring)."""
        folder = _folder_name(self.subaccount)
        if self.instance is not None:
            folder += _INSTANCE + _folder_name(self.instance)
        return folder + (_CERTIFICATES if self.certificates else "")

    @classmethod
    def from_folder(cls, folder: str) -> Owner | None:
        """The owner whose `folder` this is, or None if it is nobody's."""
        certificates = folder.endswith(_CERTIFICATES)
        if certificates:
            folder = folder[: -len(_CERTIFICATES)]
        subaccount, sep, instance = folder.partition(_INSTANCE)
        if not subaccount or "!" in subaccount or "!" in instance or (sep and not instance):
            return None
        return cls(urllib.parse.unquote(subaccount), urllib.parse.unquote(instance) if sep else None, certificates)


OwnerLike = Owner | str  # a plain string: that subaccount's own destinations


def as_owner(owner: OwnerLike) -> Owner:
    return owner if isinstance(owner, Owner) else Owner(owner)


Destinations = dict[Owner, dict[str, dict[str, Any]]]  # owner -> Name -> properties


class StoreError(Exception):
    """The store or its key cannot be used (unreadable, corrupt, wrong key, unsafe permissions)."""


def store_directory(store: Path) -> Path:
    """The directory holding the destinations of the store configured as `store`."""
    return store.with_name(store.stem + ".d")


def load_or_create_key(path: Path) -> Fernet:
    """Open the Fernet key file, creating it 0600 when missing; refuse one others can read."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StoreError(f"key file {path} is accessible by group or others; chmod 600 it") from None
        try:
            return Fernet(path.read_bytes().strip())
        except (ValueError, OSError) as exc:
            raise StoreError(f"key file {path} does not hold a valid Fernet key: {exc}") from exc
    key = Fernet.generate_key()
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created destination store key %s", path)
    return Fernet(key)


def _folder_name(subaccount: str) -> str:
    return urllib.parse.quote(subaccount, safe="").replace(".", "%2E")


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` atomically: temporary file (0600), fsync, rename, fsync folder."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}{_TEMPORARY}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def serialise(fernet: Fernet, props: dict[str, Any]) -> bytes:
    """One destination as stored (a file, or an etcd value): secret properties encrypted."""
    encrypted = {
        key: {"fernet": fernet.encrypt(value.encode("utf-8")).decode("ascii")}
        if key in ENCRYPTED_PROPERTIES and isinstance(value, str) else value
        for key, value in props.items()
    }
    return json.dumps({"format": FILE_FORMAT, "destination": encrypted}, indent=1, sort_keys=True).encode()


def decrypt_all(fernet: Fernet, props: dict[str, Any]) -> dict[str, Any]:
    try:
        return {
            key: fernet.decrypt(value["fernet"].encode("ascii")).decode("utf-8")
            if isinstance(value, dict) else value
            for key, value in props.items()
        }
    except InvalidToken as exc:
        raise StoreError("secrets cannot be decrypted with this key") from exc


class MalformedDestination(StoreError):
    """A stored destination that is not one (not JSON, fields missing)."""


def parse_stored(fernet: Fernet, payload: bytes) -> dict[str, Any]:
    """A stored destination back (StoreError if the key is wrong, MalformedDestination if it is
    not a destination at all)."""
    try:
        document = json.loads(payload)
        if document.get("format") != FILE_FORMAT:
            raise StoreError(f"unknown format {document.get('format')!r}")
        props = decrypt_all(fernet, document["destination"])
    except StoreError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedDestination(str(exc)) from exc
    if not isinstance(props.get("Name"), str):
        raise MalformedDestination("no Name")
    return props


class DestinationStore:
    """Destinations per subaccount in memory, one encrypted file each on disk."""

    def __init__(self, store: Path, fernet: Fernet) -> None:
        self.legacy_file = store
        self.directory = store_directory(store)
        self._fernet = fernet
        self._data: Destinations = {}

    # --- reading ---------------------------------------------------------------------------
    def list(self, owner: OwnerLike) -> list[dict[str, Any]]:
        return [dict(props) for _, props in sorted(self._data.get(as_owner(owner), {}).items())]

    def get(self, owner: OwnerLike, name: str) -> dict[str, Any] | None:
        props = self._data.get(as_owner(owner), {}).get(name)
        return None if props is None else dict(props)

    def count(self, owner: OwnerLike) -> int:
        return len(self._data.get(as_owner(owner), {}))

    def file_of(self, owner: OwnerLike, name: str) -> Path:
        """Where the destination `name` of `owner` is (or would be) stored."""
        return self.directory / as_owner(owner).folder / f"{name}{_SUFFIX}"

    # --- load and migration ----------------------------------------------------------------
    def load(self) -> None:
        """Migrate a format-1 file if there is one, then read the directory (missing = empty).

        Raises StoreError if a file is corrupt or the key is wrong; nothing is overwritten then.
        """
        if self.legacy_file.is_file() and self.legacy_file != self.directory:
            self._migrate()
        data: Destinations = {}
        if self.directory.is_dir():
            for folder in sorted(self.directory.iterdir()):
                owner = Owner.from_folder(folder.name)
                if not folder.is_dir() or owner is None:
                    continue
                own: dict[str, dict[str, Any]] = {}
                for path in sorted(folder.iterdir()):
                    if path.name.endswith(_TEMPORARY):
                        path.unlink()  # a write that a crash interrupted; the old file is intact
                    elif path.name.endswith(_SUFFIX):
                        own[path.name[: -len(_SUFFIX)]] = self._read_destination(path)
                if own:
                    data[owner] = own
        self._data = data

    def _read_destination(self, path: Path) -> dict[str, Any]:
        try:
            props = parse_stored(self._fernet, path.read_bytes())
        except MalformedDestination as exc:
            raise StoreError(f"{path} is not a valid destination file: {exc}") from exc
        except StoreError as exc:
            raise StoreError(f"{path}: {exc}") from exc
        if props.get("Name") != path.name[: -len(_SUFFIX)]:
            raise StoreError(f"{path} holds the destination {props.get('Name')!r}, not the one its name says")
        return props

    def _migrate(self) -> None:
        legacy = self.legacy_file
        if self.directory.exists():
            log.warning("destination store: %s exists, so the older store %s is not read again", self.directory, legacy)
        else:
            try:
                document = json.loads(legacy.read_bytes())
                if document.get("format") != LEGACY_FORMAT:
                    raise StoreError(f"{legacy}: unknown format {document.get('format')!r}")
                data = {
                    Owner(subaccount): {name: self._decrypt_all(props) for name, props in destinations.items()}
                    for subaccount, destinations in document["subaccounts"].items()
                }
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StoreError(f"{legacy} is not a valid destination store: {exc}") from exc
            staging = self.directory.with_name(self.directory.name + ".migrating")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=0o700)
            for owner, destinations in data.items():
                folder = staging / owner.folder
                folder.mkdir(mode=0o700)
                for name, props in destinations.items():
                    _write_file(folder / f"{name}{_SUFFIX}", self._serialise(props))
            _fsync_directory(staging)
            os.rename(staging, self.directory)
            _fsync_directory(self.directory.parent)
            log.info("destination store: migrated %s to one file per destination in %s", legacy, self.directory)
        os.replace(legacy, legacy.with_name(legacy.name + ".migrated"))
        _fsync_directory(legacy.parent)

    # --- encryption ------------------------------------------------------------------------
    def _serialise(self, props: dict[str, Any]) -> bytes:
        return serialise(self._fernet, props)

    def _decrypt_all(self, props: dict[str, Any]) -> dict[str, Any]:
        return decrypt_all(self._fernet, props)

    # --- changes (the caller serialises them) ----------------------------------------------
    async def put(self, owner: OwnerLike, destinations: Iterable[dict[str, Any]]) -> None:
        """Create or replace these destinations: their own files only, all or none."""
        owner = as_owner(owner)
        items = builtins.list(destinations)  # `list` is the method above
        await trio.to_thread.run_sync(self._put_files, owner, items)
        own = self._data.setdefault(owner, {})
        for props in items:
            own[props["Name"]] = dict(props)

    async def remove(self, owner: OwnerLike, name: str) -> None:
        """Delete one destination's file, then forget it."""
        owner = as_owner(owner)
        await trio.to_thread.run_sync(self._remove_file, self.file_of(owner, name))
        own = self._data.get(owner, {})
        own.pop(name, None)
        if not own:
            self._data.pop(owner, None)

    def _put_files(self, owner: Owner, items: builtins.list[dict[str, Any]]) -> None:
        folder = self.directory / owner.folder
        self.directory.mkdir(mode=0o700, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        written: builtins.list[str] = []
        try:
            for props in items:
                _write_file(self.file_of(owner, props["Name"]), self._serialise(props))
                written.append(props["Name"])
        except OSError:
            for name in written:  # put back what this change already wrote; best effort
                previous = self.get(owner, name)
                try:
                    if previous is None:
                        self._remove_file(self.file_of(owner, name))
                    else:
                        _write_file(self.file_of(owner, name), self._serialise(previous))
                except OSError as exc:
                    log.error("destination store: could not undo the write of %r: %s", name, exc)
            raise

    @staticmethod
    def _remove_file(path: Path) -> None:
        path.unlink()
        _fsync_directory(path.parent)


# --- several replicas: the destinations in the cloud's etcd -----------------------------------

DESTINATIONS_PREFIX = "destinations/"  # destinations/<owner folder>/<Name>, both percent-encoded
KEY_CHECK = "destinations-key"  # a constant encrypted with the shared key: every replica must hold the same
_KEY_CHECK_TEXT = b"connector-cloud destinations key"
SHARED_RETRY = 0.5  # seconds between attempts to read the destinations while etcd is unreachable


class SharedStoreUnavailable(OSError):
    """The destinations cannot be read or written: the cloud's etcd is unreachable (or was not
    read yet). Nothing changed; the service answers 503."""


def shared_key(owner: OwnerLike, name: str) -> str:
    """The etcd key (relative to the shared prefix) of one destination."""
    return f"{DESTINATIONS_PREFIX}{as_owner(owner).folder}/{_folder_name(name)}"


def _parse_shared_key(key: str) -> tuple[Owner, str] | None:
    folder, sep, name = key[len(DESTINATIONS_PREFIX):].partition("/")
    if not key.startswith(DESTINATIONS_PREFIX) or not sep or not folder or not name or "/" in name:
        return None
    owner = Owner.from_folder(folder)
    return None if owner is None else (owner, urllib.parse.unquote(name))


class EtcdDestinationStore:
    """The `DestinationStore` interface over the cloud's etcd, for several replicas ([shared]).

    One key per destination (`shared_key`), the value exactly what the file store writes (secret
    properties encrypted with the Fernet key in ``[shared] secrets_key``, the same file on every
    replica). Reads are answered from memory: `run` reads every destination, then follows the
    keys through a watch, so what one replica writes every replica answers within moments. A
    write goes to etcd first and changes the memory only once etcd took it; a multi-destination
    write that fails half-way puts back what it had written (best effort, like the file store).
    Concurrent writes of one destination on two replicas: the last one wins.

    Until the first read succeeded every call raises `SharedStoreUnavailable` (the service
    answers 503): an empty list would be a wrong answer. At that read the key is checked against
    the one the first replica recorded (`KEY_CHECK`): a replica with another key stops with
    StoreError instead of writing secrets the others cannot read.
    """

    def __init__(self, store: Store, fernet: Fernet) -> None:
        self._store = store
        self._fernet = fernet
        self._data: Destinations = {}
        self._revisions: dict[tuple[Owner, str], int] = {}  # the etcd revision each destination is at
        self.loaded = False
        self.revision = 0  # the etcd revision the memory reflects (at least)
        self._revision_changed = trio.Event()

    # --- reading ---------------------------------------------------------------------------
    def _loaded(self) -> Destinations:
        if not self.loaded:
            raise SharedStoreUnavailable("the destinations were not read from the cloud's etcd yet (unreachable)")
        return self._data

    def list(self, owner: OwnerLike) -> list[dict[str, Any]]:
        return [dict(props) for _, props in sorted(self._loaded().get(as_owner(owner), {}).items())]

    def get(self, owner: OwnerLike, name: str) -> dict[str, Any] | None:
        props = self._loaded().get(as_owner(owner), {}).get(name)
        return None if props is None else dict(props)

    def count(self, owner: OwnerLike) -> int:
        return len(self._loaded().get(as_owner(owner), {}))

    def load(self) -> None:
        """Nothing to do at construction: `run` reads etcd (the service calls this for files)."""

    # --- following etcd --------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read every destination (retrying while etcd is unreachable), then follow the changes."""
        task_status.started()
        failing = False
        while True:
            try:
                await self._check_key()
                snapshot = await self._store.get_prefix(DESTINATIONS_PREFIX)
            except StoreUnavailable as exc:
                if not failing:
                    log.warning("destinations: cannot read the cloud's etcd (%s); retrying", exc)
                failing = True
                await trio.sleep(SHARED_RETRY)
                continue
            failing = False
            self._data, self._revisions = {}, {}
            for kv in snapshot.kvs.values():
                self._apply_put(kv.key, kv.value, kv.mod_revision)
            self.loaded = True
            self._advance(snapshot.revision)
            try:
                async with self._store.watch(DESTINATIONS_PREFIX, snapshot.revision + 1) as events:
                    async for event in events:
                        if event.kind == "put":
                            self._apply_put(event.key, event.value, event.revision)
                        else:
                            self._apply_delete(event.key, event.revision)
                        self._advance(event.revision)
            except RevisionCompacted:
                log.info("destinations: watch compacted away; reading them again")
            except StoreUnavailable as exc:  # gone between the read and the watch's start
                log.warning("destinations: cannot watch the cloud's etcd (%s); reading again", exc)
                failing = True
                await trio.sleep(SHARED_RETRY)

    async def _check_key(self) -> None:
        found = await self._store.get(KEY_CHECK)
        if found is None:
            await self._store.put(KEY_CHECK, self._fernet.encrypt(_KEY_CHECK_TEXT), prev_revision=0)
            return
        try:
            self._fernet.decrypt(found.value)
        except InvalidToken:
            raise StoreError("[shared] secrets_key is not the key the other replicas use (the destinations in "
                             "the cloud's etcd cannot be decrypted with it): copy their key file here") from None

    def _apply_put(self, key: str, value: bytes, revision: int) -> None:
        names = _parse_shared_key(key)
        if names is None or self._revisions.get(names, 0) >= revision:
            return
        try:
            props = parse_stored(self._fernet, value)
        except StoreError as exc:
            log.error("destinations: %s in the cloud's etcd is unusable (%s); ignored", key, exc)
            return
        if props["Name"] != names[1]:
            log.error("destinations: %s holds the destination %r; ignored", key, props["Name"])
            return
        self._revisions[names] = revision
        self._data.setdefault(names[0], {})[names[1]] = props

    def _apply_delete(self, key: str, revision: int) -> None:
        names = _parse_shared_key(key)
        if names is None or self._revisions.get(names, 0) >= revision:
            return
        self._revisions.pop(names, None)
        self._forget(*names)

    def _forget(self, owner: Owner, name: str) -> None:
        own = self._data.get(owner, {})
        own.pop(name, None)
        if not own:
            self._data.pop(owner, None)

    def _advance(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            self._revision_changed.set()
            self._revision_changed = trio.Event()

    async def wait_revision(self, revision: int) -> None:
        """Return once the memory reflects etcd at `revision` (for tests and the CLI: no polling)."""
        while self.revision < revision:
            await self._revision_changed.wait()

    # --- changes (the caller serialises them on this replica) ------------------------------
    async def put(self, owner: OwnerLike, destinations: Iterable[dict[str, Any]]) -> None:
        """Create or replace these destinations in etcd, all or (best effort) none."""
        self._loaded()
        owner = as_owner(owner)
        items = builtins.list(destinations)
        written: builtins.list[tuple[dict[str, Any], int]] = []
        try:
            for props in items:
                revision = await self._store.put(shared_key(owner, props["Name"]), serialise(self._fernet, props))
                assert revision is not None  # an unconditional put
                written.append((props, revision))
        except StoreUnavailable as exc:
            for props, _ in written:
                await self._undo(owner, props["Name"])
            raise SharedStoreUnavailable(f"the cloud's etcd did not take the change: {exc}") from exc
        for props, revision in written:
            names = (owner, props["Name"])
            if self._revisions.get(names, 0) < revision:
                self._revisions[names] = revision
                self._data.setdefault(owner, {})[props["Name"]] = dict(props)
            self._advance(revision)

    async def _undo(self, owner: Owner, name: str) -> None:
        previous = self.get(owner, name)
        try:
            if previous is None:
                await self._store.delete(shared_key(owner, name))
            else:
                await self._store.put(shared_key(owner, name), serialise(self._fernet, previous))
        except StoreUnavailable as exc:
            log.error("destination store: could not undo the write of %r: %s", name, exc)

    async def remove(self, owner: OwnerLike, name: str) -> None:
        """Delete one destination in etcd, then forget it."""
        self._loaded()
        owner = as_owner(owner)
        try:
            await self._store.delete(shared_key(owner, name))
        except StoreUnavailable as exc:
            raise SharedStoreUnavailable(f"the cloud's etcd did not take the change: {exc}") from exc
        self._revisions.pop((owner, name), None)
        self._forget(owner, name)
