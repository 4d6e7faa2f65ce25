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

import trio
from cryptography.fernet import Fernet, InvalidToken

log = logging.getLogger(__name__)

SECRET_PROPERTIES = frozenset({"Password", "clientSecret", "tokenServicePassword", "KeyStorePassword"})
LEGACY_FORMAT = 1
FILE_FORMAT = 2
_SUFFIX = ".json"
_TEMPORARY = ".tmp"

Destinations = dict[str, dict[str, dict[str, Any]]]  # subaccount -> Name -> properties


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


class DestinationStore:
    """Destinations per subaccount in memory, one encrypted file each on disk."""

    def __init__(self, store: Path, fernet: Fernet) -> None:
        self.legacy_file = store
        self.directory = store_directory(store)
        self._fernet = fernet
        self._data: Destinations = {}

    # --- reading ---------------------------------------------------------------------------
    def list(self, subaccount: str) -> list[dict[str, Any]]:
        return [dict(props) for _, props in sorted(self._data.get(subaccount, {}).items())]

    def get(self, subaccount: str, name: str) -> dict[str, Any] | None:
        props = self._data.get(subaccount, {}).get(name)
        return None if props is None else dict(props)

    def count(self, subaccount: str) -> int:
        return len(self._data.get(subaccount, {}))

    def file_of(self, subaccount: str, name: str) -> Path:
        """Where the destination `name` of `subaccount` is (or would be) stored."""
        return self.directory / _folder_name(subaccount) / f"{name}{_SUFFIX}"

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
                if not folder.is_dir():
                    continue
                subaccount = urllib.parse.unquote(folder.name)
                own: dict[str, dict[str, Any]] = {}
                for path in sorted(folder.iterdir()):
                    if path.name.endswith(_TEMPORARY):
                        path.unlink()  # a write that a crash interrupted; the old file is intact
                    elif path.name.endswith(_SUFFIX):
                        own[path.name[: -len(_SUFFIX)]] = self._read_destination(path)
                if own:
                    data[subaccount] = own
        self._data = data

    def _read_destination(self, path: Path) -> dict[str, Any]:
        try:
            document = json.loads(path.read_bytes())
            if document.get("format") != FILE_FORMAT:
                raise StoreError(f"unknown format {document.get('format')!r}")
            props = self._decrypt_all(document["destination"])
        except StoreError as exc:
            raise StoreError(f"{path}: {exc}") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"{path} is not a valid destination file: {exc}") from exc
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
                    subaccount: {name: self._decrypt_all(props) for name, props in destinations.items()}
                    for subaccount, destinations in document["subaccounts"].items()
                }
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StoreError(f"{legacy} is not a valid destination store: {exc}") from exc
            staging = self.directory.with_name(self.directory.name + ".migrating")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=0o700)
            for subaccount, destinations in data.items():
                folder = staging / _folder_name(subaccount)
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
        encrypted = {
            key: {"fernet": self._fernet.encrypt(value.encode("utf-8")).decode("ascii")}
            if key in SECRET_PROPERTIES and isinstance(value, str) else value
            for key, value in props.items()
        }
        return json.dumps({"format": FILE_FORMAT, "destination": encrypted}, indent=1, sort_keys=True).encode()

    def _decrypt_all(self, props: dict[str, Any]) -> dict[str, Any]:
        try:
            return {
                key: self._fernet.decrypt(value["fernet"].encode("ascii")).decode("utf-8")
                if isinstance(value, dict) else value
                for key, value in props.items()
            }
        except InvalidToken as exc:
            raise StoreError("secrets cannot be decrypted with this key") from exc

    # --- changes (the caller serialises them) ----------------------------------------------
    async def put(self, subaccount: str, destinations: Iterable[dict[str, Any]]) -> None:
        """Create or replace these destinations: their own files only, all or none."""
        items = builtins.list(destinations)  # `list` is the method above
        await trio.to_thread.run_sync(self._put_files, subaccount, items)
        own = self._data.setdefault(subaccount, {})
        for props in items:
            own[props["Name"]] = dict(props)

    async def remove(self, subaccount: str, name: str) -> None:
        """Delete one destination's file, then forget it."""
        await trio.to_thread.run_sync(self._remove_file, self.file_of(subaccount, name))
        own = self._data.get(subaccount, {})
        own.pop(name, None)
        if not own:
            self._data.pop(subaccount, None)

    def _put_files(self, subaccount: str, items: builtins.list[dict[str, Any]]) -> None:
        folder = self.directory / _folder_name(subaccount)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        written: builtins.list[str] = []
        try:
            for props in items:
                _write_file(self.file_of(subaccount, props["Name"]), self._serialise(props))
                written.append(props["Name"])
        except OSError:
            for name in written:  # put back what this change already wrote; best effort
                previous = self.get(subaccount, name)
                try:
                    if previous is None:
                        self._remove_file(self.file_of(subaccount, name))
                    else:
                        _write_file(self.file_of(subaccount, name), self._serialise(previous))
                except OSError as exc:
                    log.error("destination store: could not undo the write of %r: %s", name, exc)
            raise

    @staticmethod
    def _remove_file(path: Path) -> None:
        path.unlink()
        _fsync_directory(path.parent)
