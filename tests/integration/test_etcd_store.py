"""EtcdStore against a REAL etcd (single member, own ports, SIGKILLed after each test)."""

from __future__ import annotations

import time

import pytest
import trio

from ha.etcd import EtcdSettings, EtcdStore
from ha.store import LeaseExpired, StoreUnavailable, WatchEvent
from tests.support.etcdserver import EtcdServer, free_port

TIMEOUT = 0.5


def make_store(etcd: EtcdServer, cluster: str = "c1", **kwargs: object) -> EtcdStore:
    settings = EtcdSettings(endpoints=(etcd.url,), timeout=TIMEOUT, time_retry=0.2, **kwargs)  # type: ignore[arg-type]
    return EtcdStore(cluster, settings)


async def test_leader_epoch_is_create_revision(etcd: EtcdServer) -> None:
    store = make_store(etcd)
    lease = await store.grant_lease(5)
    epoch = await store.try_acquire_leader("a", lease, {"address": "10.0.0.1:8443"})
    assert epoch is not None
    raw = await store.get("leader")
    assert raw is not None and raw.create_revision == epoch and raw.lease == lease
    assert await store.try_acquire_leader("b", lease, {}) is None
    snapshot = await store.get_cluster()
    assert snapshot.leader is not None
    assert (snapshot.leader.node, snapshot.leader.epoch) == ("a", epoch)
    assert snapshot.leader.data["address"] == "10.0.0.1:8443"
    assert snapshot.revision >= epoch
    await store.aclose()


async def test_epochs_strictly_increase_and_resign_depose_compare(etcd: EtcdServer) -> None:
    store = make_store(etcd)
    lease_a = await store.grant_lease(5)
    lease_b = await store.grant_lease(5)
    await store.put_member("a", {"priority": 1}, lease_a)
    first = await store.try_acquire_leader("a", lease_a, {})
    assert first is not None
    assert await store.resign("a", first + 1) is False  # not ours
    assert await store.depose(first - 1) is False  # an older epoch: never touches the current
    assert await store.resign("a", first) is True
    second = await store.try_acquire_leader("b", lease_b, {})
    assert second is not None and second > first
    assert await store.resign("a", first) is False  # our old epoch cannot delete b's key
    assert await store.depose(second) is True
    snapshot = await store.get_cluster()
    assert snapshot.leader is None
    with pytest.raises(LeaseExpired):
        await store.refresh_lease(lease_b)  # depose revoked it
    third = await store.try_acquire_leader("a", lease_a, {})
    assert third is not None and third > second
    assert "a" in snapshot.members
    await store.aclose()


async def test_lease_expiry_removes_leader_key(etcd: EtcdServer) -> None:
    store = make_store(etcd)
    lease = await store.grant_lease(2)
    assert await store.refresh_lease(lease) == 2.0
    epoch = await store.try_acquire_leader("a", lease, {})
    assert epoch is not None
    await store.put_member("a", {}, lease)
    await trio.sleep(3.2)  # real time: etcd's clock
    snapshot = await store.get_cluster()
    assert snapshot.leader is None and snapshot.members == {}
    with pytest.raises(LeaseExpired):
        await store.refresh_lease(lease)  # etcd answers TTL 0: that is LeaseExpired
    with pytest.raises(LeaseExpired):
        await store.try_acquire_leader("a", lease, {})
    await store.revoke_lease(lease)  # gone already: fine
    await store.aclose()


async def test_config_compare_and_set_and_cluster_isolation(etcd: EtcdServer) -> None:
    store = make_store(etcd)
    other = make_store(etcd, cluster="c2")
    first = await store.put("config/mapping/a", b"1", prev_revision=0)
    assert first is not None
    assert await store.put("config/mapping/a", b"x", prev_revision=0) is None
    second = await store.put("config/mapping/a", "2", prev_revision=first)
    assert second is not None
    assert await store.put("config/mapping/a", b"3", prev_revision=first) is None
    await store.put("config/mapping/b", b"b")
    snapshot = await store.get_prefix("config/mapping/")
    assert {k: kv.value for k, kv in snapshot.kvs.items()} == {
        "config/mapping/a": b"2", "config/mapping/b": b"b"}
    assert (await other.get_prefix("config/")).kvs == {}
    assert await store.delete("config/mapping/a", prev_revision=first) is False
    assert await store.delete("config/mapping/a", prev_revision=second) is True
    assert await store.delete("config/mapping/a") is False
    with pytest.raises(ValueError, match="invalid store key"):
        await store.get("/etc/passwd")
    await store.aclose()
    await other.aclose()


async def test_watch_delivers_and_resumes_after_restart(etcd: EtcdServer) -> None:
    store = make_store(etcd)
    writer = make_store(etcd)
    start = (await store.get_prefix("config/")).revision + 1
    seen: list[WatchEvent] = []
    with trio.fail_after(20):
        async with store.watch("config/", start) as events:
            await writer.put("config/a", b"1")
            seen.append(await events.__anext__())
            await trio.to_thread.run_sync(etcd.kill)
            await trio.sleep(0.3)  # the watch notices the stream died
            await trio.to_thread.run_sync(etcd.start)
            # written while the watch was still reconnecting: must be replayed, in order
            await writer.put("config/b", b"2")
            await writer.delete("config/a")
            await writer.put("other/x", b"not watched")
            seen.append(await events.__anext__())
            seen.append(await events.__anext__())
            assert events.restarts >= 1  # type: ignore[attr-defined]
    assert [(e.kind, e.key, e.value) for e in seen] == [
        ("put", "config/a", b"1"), ("put", "config/b", b"2"), ("delete", "config/a", b"")]
    assert seen[0].revision < seen[1].revision < seen[2].revision
    await store.aclose()
    await writer.aclose()


async def test_watch_replays_from_start_revision(etcd: EtcdServer) -> None:
    store = make_store(etcd)
    first = await store.put("config/a", b"1")
    await store.put("config/a", b"2")
    assert first is not None
    with trio.fail_after(10):
        async with store.watch("config/a", first) as events:
            values = [(await events.__anext__()).value for _ in range(2)]
    assert values == [b"1", b"2"]
    await store.aclose()


async def test_frozen_etcd_is_unavailable_not_a_hang(etcd: EtcdServer) -> None:
    store = make_store(etcd)
    await store.get_cluster()
    etcd.freeze()
    try:
        begun = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get_cluster()
        assert time.monotonic() - begun < store.call_deadline + 0.5
        begun = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.refresh_lease(1)
        assert time.monotonic() - begun < store.call_deadline + 0.5
    finally:
        etcd.thaw()
    # the endpoint is used again soon after it answers (time_retry 0.2 s, not 300 s)
    with trio.fail_after(5):
        while True:
            try:
                await store.get_cluster()
                break
            except StoreUnavailable:
                await trio.sleep(0.1)  # another process (etcd, thawing): only its answers to poll
    await store.aclose()


async def test_dead_etcd_is_unavailable_and_second_endpoint_is_used(etcd: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    store = EtcdStore("c1", EtcdSettings(endpoints=(dead, etcd.url), timeout=TIMEOUT, time_retry=0.2))
    for _ in range(3):
        await store.put("config/x", b"1")  # always succeeds: the dead endpoint is skipped
    lonely = EtcdStore("c1", EtcdSettings(endpoints=(dead,), timeout=TIMEOUT))
    with pytest.raises(StoreUnavailable):
        await lonely.get("config/x")
    await store.aclose()
    await lonely.aclose()


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="host:port"):
        EtcdSettings(endpoints=("nope",))
    with pytest.raises(ValueError, match="scheme must be http or https"):
        EtcdSettings(endpoints=("ftp://a:1",))
    with pytest.raises(ValueError, match="mix http and https"):
        EtcdSettings(endpoints=("http://a:1", "https://b:2"))
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        EtcdSettings(cert_file="c.pem")
    with pytest.raises(ValueError, match="both user and password"):
        EtcdSettings(user="root")
    with pytest.raises(ValueError, match="unknown etcd setting"):
        EtcdSettings.from_dict({"endpoint": "a:1"})
    assert EtcdSettings.from_dict({"endpoints": "a:1", "ca_file": "ca.pem"}).secure is True
    assert EtcdSettings(endpoints=("a:1",)).secure is False


async def test_watch_overflow_resumes_without_gaps(etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer slower than the watch: the bounded buffer overflows, the watch is re-created
    from the last delivered revision, and every event still arrives once, in order."""
    import ha.etcd

    monkeypatch.setattr(ha.etcd, "WATCH_BUFFER", 2)
    store = make_store(etcd)
    writer = make_store(etcd)
    with trio.fail_after(20):
        async with store.watch("config/") as events:
            for i in range(12):
                await writer.put(f"config/k{i:02d}", str(i))
            await trio.sleep(0.3)  # let the callbacks overflow the 2-slot buffer
            keys = [(await events.__anext__()).key for _ in range(12)]
            assert events.restarts >= 1  # type: ignore[attr-defined]
    assert keys == [f"config/k{i:02d}" for i in range(12)]
    await store.aclose()
    await writer.aclose()
