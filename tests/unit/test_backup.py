"""The backup archive (sealed, opened, refused) and the restore's decisions over an in-memory store."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from connector import backup
from connector.backup import BackupError, Secret
from ha.memory import MemoryStore
from ha.store import StoreUnavailable

PASSPHRASE = b"correct horse battery staple"
PAYLOAD = {"kind": "cluster", "name": "onprem", "revision": 41, "created": 1.0,
           "keys": [{"key": "config/mappings/erp.virtual:8000", "value": base64.b64encode(b"{}").decode()}]}


def test_an_archive_opens_with_its_passphrase_and_with_its_key() -> None:
    assert backup.open_archive(backup.seal(PAYLOAD, Secret(passphrase=PASSPHRASE)), Secret(passphrase=PASSPHRASE)) == PAYLOAD
    key = Secret(key=os.urandom(32))
    assert backup.open_archive(backup.seal(PAYLOAD, key), key) == PAYLOAD


def test_the_archive_holds_no_plaintext() -> None:
    sealed = backup.seal(PAYLOAD, Secret(passphrase=PASSPHRASE))
    assert b"erp.virtual" not in sealed and b"onprem" not in sealed
    assert json.loads(sealed)["version"] == backup.VERSION


def test_a_wrong_passphrase_is_one_clear_line() -> None:
    sealed = backup.seal(PAYLOAD, Secret(passphrase=PASSPHRASE))
    with pytest.raises(BackupError, match="^cannot decrypt the backup: wrong passphrase or key file") as caught:
        backup.open_archive(sealed, Secret(passphrase=b"incorrect horse battery"))
    assert "\n" not in str(caught.value)


def test_a_wrong_kind_of_secret_is_named() -> None:
    with pytest.raises(BackupError, match="written with a passphrase"):
        backup.open_archive(backup.seal(PAYLOAD, Secret(passphrase=PASSPHRASE)), Secret(key=os.urandom(32)))
    with pytest.raises(BackupError, match="written with a key file"):
        backup.open_archive(backup.seal(PAYLOAD, Secret(key=os.urandom(32))), Secret(passphrase=PASSPHRASE))


@pytest.mark.parametrize("field", ["ciphertext", "salt"])
def test_an_altered_archive_is_refused(field: str) -> None:
    document = json.loads(backup.seal(PAYLOAD, Secret(passphrase=PASSPHRASE)))
    where = document["kdf"] if field == "salt" else document
    raw = bytearray(base64.b64decode(where[field]))
    raw[0] ^= 1
    where[field] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(BackupError, match="cannot decrypt"):
        backup.open_archive(json.dumps(document).encode(), Secret(passphrase=PASSPHRASE))


def test_hostile_scrypt_parameters_are_refused_before_deriving() -> None:
    document = json.loads(backup.seal(PAYLOAD, Secret(passphrase=PASSPHRASE)))
    document["kdf"]["n"] = 2**30  # 1 TiB of memory
    with pytest.raises(BackupError, match="out of bounds"):
        backup.open_archive(json.dumps(document).encode(), Secret(passphrase=PASSPHRASE))


@pytest.mark.parametrize(("data", "message"), [
    (b"not json", "not JSON"),
    (b'{"format": "something-else"}', "no format marker"),
    (b'{"format": "connector-backup", "version": 2, "cipher": "AES-256-GCM"}', "version 2"),
])
def test_what_is_not_an_archive_of_this_version_is_named(data: bytes, message: str) -> None:
    with pytest.raises(BackupError, match=message):
        backup.open_archive(data, Secret(passphrase=PASSPHRASE))


def test_a_key_file_must_be_private_and_32_bytes(tmp_path: Path) -> None:
    path = tmp_path / "backup.key"
    backup.write_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    key = backup.read_key_file(path)
    assert backup.open_archive(backup.seal(PAYLOAD, key), key) == PAYLOAD
    with pytest.raises(BackupError, match="refusing to overwrite"):
        backup.write_key_file(path)
    path.chmod(0o644)
    with pytest.raises(BackupError, match="chmod 600"):
        backup.read_key_file(path)
    raw = tmp_path / "raw.key"
    raw.write_bytes(os.urandom(32))
    raw.chmod(0o600)
    assert backup.read_key_file(raw).key == raw.read_bytes()
    raw.write_bytes(b"short")
    with pytest.raises(BackupError, match="must hold 32 bytes"):
        backup.read_key_file(raw)


def test_a_new_archive_needs_a_long_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "passphrase"
    path.write_bytes(b"short\n")
    with pytest.raises(BackupError, match="at least 12"):
        backup.read_passphrase_file(path, new=True)
    assert backup.read_passphrase_file(path, new=False).passphrase == b"short"  # reading an old one: any
    path.write_bytes(PASSPHRASE + b"\nsecond line ignored\n")
    assert backup.read_passphrase_file(path, new=True).passphrase == PASSPHRASE


def test_the_archive_file_is_private_and_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "cluster.backup"
    path.write_bytes(b"old")
    backup.write_archive(path, b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.backup"]  # no temporary left


# --- the store side ----------------------------------------------------------------------------------


async def filled_store() -> MemoryStore:
    store = MemoryStore("onprem")
    lease = await store.grant_lease(10)
    await store.put("config/mappings/erp.virtual:8000", b'{"m": 1}')
    await store.put("secrets/db", b"gAAAA-fernet-token")
    await store.put("history/00000000000000000001", b'{"action": "add"}')
    await store.try_acquire_leader("node-a", lease, {})
    await store.put_member("node-a", {"priority": 100}, lease)
    return store


async def test_a_backup_keeps_what_no_lease_holds() -> None:
    store = await filled_store()
    payload = await backup.collect(store, kind="cluster", name="onprem")
    assert [k["key"] for k in payload["keys"]] == [
        "config/mappings/erp.virtual:8000", "history/00000000000000000001", "secrets/db"]
    assert base64.b64decode(payload["keys"][2]["value"]) == b"gAAAA-fernet-token"  # still under the cluster key
    assert payload["revision"] == (await store.get_prefix("")).revision


async def test_restore_moves_the_revision_past_the_backup_then_writes_the_keys() -> None:
    payload = await backup.collect(await filled_store(), kind="cluster", name="onprem")
    fresh = MemoryStore("onprem")
    before = (await fresh.get_prefix("")).revision
    restored = await backup.restore(fresh, payload, kind="cluster", name="onprem")
    assert restored.keys == 3 and restored.revision_before == before < payload["revision"]
    mapping = await fresh.get("config/mappings/erp.virtual:8000")
    assert mapping is not None and mapping.value == b'{"m": 1}'
    assert mapping.create_revision > payload["revision"]  # written after the bump: watchers see it
    lease = await fresh.grant_lease(10)
    assert (await fresh.try_acquire_leader("node-b", lease, {}) or 0) > payload["revision"]  # the next epoch
    assert not (await fresh.get_prefix(backup.BUMP_KEY)).kvs  # the scratch keys are gone


async def test_restore_honours_a_minimum_revision() -> None:
    payload = await backup.collect(await filled_store(), kind="cluster", name="onprem")
    fresh = MemoryStore("onprem")
    restored = await backup.restore(fresh, payload, kind="cluster", name="onprem", min_revision=500)
    assert restored.revision_after > 500


async def test_restore_refuses_a_store_with_state_unless_forced() -> None:
    payload = await backup.collect(await filled_store(), kind="cluster", name="onprem")
    busy = MemoryStore("onprem")
    lease = await busy.grant_lease(10)
    await busy.put_member("node-a", {}, lease)  # live keys alone do not count: the nodes write them
    await backup.restore(busy, payload, kind="cluster", name="onprem")
    with pytest.raises(BackupError, match="already holds 3 keys"):
        await backup.restore(busy, payload, kind="cluster", name="onprem")
    await busy.put("config/mappings/erp.virtual:8000", b"edited")
    await backup.restore(busy, payload, kind="cluster", name="onprem", force=True)
    mapping = await busy.get("config/mappings/erp.virtual:8000")
    assert mapping is not None and mapping.value == b'{"m": 1}'


@pytest.mark.parametrize(("kind", "name"), [("cloud", "onprem"), ("cluster", "other")])
async def test_restore_refuses_another_kind_or_cluster(kind: str, name: str) -> None:
    payload = await backup.collect(await filled_store(), kind="cluster", name="onprem")
    fresh = MemoryStore(name)
    before = (await fresh.get_prefix("")).revision
    with pytest.raises(BackupError, match="this is a backup of cluster 'onprem'"):
        await backup.restore(fresh, payload, kind=kind, name=name)
    assert (await fresh.get_prefix("")).revision == before  # nothing written


@pytest.mark.parametrize("entry", [{"key": "/absolute", "value": ""}, {"key": 3, "value": ""}, {"key": "a"}, "a"])
def test_a_payload_with_a_bad_key_is_refused(entry) -> None:
    key = Secret(key=os.urandom(32))
    with pytest.raises(BackupError, match="bad key"):
        backup.open_archive(backup.seal({**PAYLOAD, "keys": [entry]}, key), key)


class FailingMidway(MemoryStore):
    """etcd stops answering once the revision passed `after` (every worker of the bump sees it)."""

    def __init__(self, after: int) -> None:
        super().__init__("onprem")
        self.after = after

    async def put(self, key, value, **kwargs):  # type: ignore[no-untyped-def]
        if self.backend.revision > self.after:
            self.set_fault("error")
        return await super().put(key, value, **kwargs)


async def test_etcd_failing_during_the_bump_is_the_stores_error() -> None:
    payload = await backup.collect(await filled_store(), kind="cluster", name="onprem")
    with pytest.raises(StoreUnavailable):  # not an exception group: the CLI says it in one line
        await backup.restore(FailingMidway(after=3), payload, kind="cluster", name="onprem")
