"""Instance-level destinations and certificates at rest: the file store and the etcd store."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from cryptography.fernet import Fernet

from connector.cloud.destination_store import DestinationStore, EtcdDestinationStore, Owner
from ha.memory import MemoryStore

INSTANCE = Owner("acme", "sb-connector-1")
CERTIFICATES = Owner("acme", "sb-connector-1", certificates=True)
CERTIFICATE = {"Name": "client.p12", "Type": "CERTIFICATE", "Content": "c2VjcmV0LWtleS1zdG9yZQ=="}


async def test_owners_are_kept_apart_on_disk_and_survive_a_reload(tmp_path: Path) -> None:
    fernet = Fernet(Fernet.generate_key())
    store = DestinationStore(tmp_path / "destinations.json", fernet)
    store.load()
    await store.put("acme", [{"Name": "erp", "URL": "subaccount"}])
    await store.put(INSTANCE, [{"Name": "erp", "URL": "instance"}])
    await store.put(CERTIFICATES, [CERTIFICATE])
    reloaded = DestinationStore(tmp_path / "destinations.json", fernet)
    reloaded.load()
    assert reloaded.get("acme", "erp") == {"Name": "erp", "URL": "subaccount"}
    assert reloaded.get(INSTANCE, "erp") == {"Name": "erp", "URL": "instance"}
    assert reloaded.get(CERTIFICATES, "client.p12") == CERTIFICATE and reloaded.get(INSTANCE, "client.p12") is None
    folders = sorted(p.name for p in (tmp_path / "destinations.d").iterdir())
    assert folders == ["acme", "acme!instance!sb-connector-1", "acme!instance!sb-connector-1!certificates"]
    raw = reloaded.file_of(CERTIFICATES, "client.p12").read_bytes()
    assert CERTIFICATE["Content"].encode() not in raw  # a certificate's content is encrypted at rest


async def test_a_replica_sees_another_replicas_instance_destinations(autojump_clock: trio.testing.MockClock) -> None:
    fernet = Fernet(Fernet.generate_key())
    etcd = MemoryStore()
    writer, reader = EtcdDestinationStore(etcd, fernet), EtcdDestinationStore(etcd.view(), fernet)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await nursery.start(reader.run)
        await writer.wait_revision(1)  # both have read etcd (it starts at revision 1)
        await reader.wait_revision(1)
        await writer.put(INSTANCE, [{"Name": "erp", "URL": "instance"}])
        await writer.put(CERTIFICATES, [CERTIFICATE])
        await reader.wait_revision(writer.revision)
        assert reader.get(INSTANCE, "erp") == {"Name": "erp", "URL": "instance"} and reader.get("acme", "erp") is None
        assert reader.get(CERTIFICATES, "client.p12") == CERTIFICATE
        await writer.remove(INSTANCE, "erp")
        await reader.wait_revision(etcd.backend.revision)  # a delete's revision is etcd's latest
        assert reader.get(INSTANCE, "erp") is None
        nursery.cancel_scope.cancel()
