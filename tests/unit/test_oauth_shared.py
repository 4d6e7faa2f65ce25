"""The token service's ring and bindings over an in-memory store: compare-and-set rotation by one
replica at a time, followers, the import of one replica's files, and a wrong secrets key.

Two replicas are two `MemoryStore` views of one backend (two etcd clients); wall-clock seconds
are ``T0 + trio.current_time()`` under `autojump_clock`, so rotation and overlap times are exact.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography.fernet import Fernet

from connector.cloud.bindings import BindingError, FileBindingStore, new_binding
from connector.cloud.jwks import FileKeyStore, KeyRing, SigningKey, due_change, rotation
from connector.cloud.oauth import OAuthSettings, TokenService
from connector.cloud.oauth_shared import (
    KEYRING_KEY,
    KeyRingUnreadable,
    SharedBindings,
    SharedKeyRing,
    add_binding,
    import_files,
    list_bindings,
    revoke_binding,
)
from connector.cloud.shared import Reachability
from ha.memory import MemoryStore

T0 = 1_800_000_000.0
ROTATE_AFTER, OVERLAP, LIFETIME = 1000.0, 200.0, 100.0
FERNET = Fernet(Fernet.generate_key())


def now() -> float:
    return T0 + trio.current_time()


def service(store: MemoryStore) -> TokenService:
    """A replica's token service over `store` (its ring shared; bindings unused here)."""
    settings = OAuthSettings(url="https://t.example", token_lifetime=LIFETIME, key_overlap=OVERLAP,
                             rotate_after=ROTATE_AFTER)
    return TokenService(settings, bindings=SharedBindings(store), keyring=SharedKeyRing(store, FERNET),
                        ssl_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), clock=now)


async def stored_ring(store: MemoryStore) -> KeyRing:
    kv = await store.get(KEYRING_KEY)
    assert kv is not None
    return _decode(kv.value)


def _decode(value: bytes) -> KeyRing:
    from connector.cloud.oauth_shared import decode_ring

    return decode_ring(FERNET, value)


async def test_two_replicas_deciding_at_once_rotate_once(autojump_clock: trio.testing.MockClock) -> None:
    one = MemoryStore()
    a, b = service(one), service(one.view())
    async with trio.open_nursery() as nursery:  # both find no ring at the same instant
        nursery.start_soon(a.maintain_keys)
        nursery.start_soon(b.maintain_keys)
    first = await stored_ring(one)
    assert len(first.keys) == 1 and a.ring == b.ring == first  # one ring created, the loser adopted it

    await trio.sleep(ROTATE_AFTER)
    said: list[str | None] = []

    async def maintain(replica: TokenService) -> None:
        said.append(await replica.maintain_keys())

    async with trio.open_nursery() as nursery:  # both read the ring before either writes
        nursery.start_soon(maintain, a)
        nursery.start_soon(maintain, b)
    ring = await stored_ring(one)
    assert [k.kid for k in ring.keys][1:] == [first.current.kid]  # exactly one rotation: two keys
    assert ring.keys[1].retires == T0 + ROTATE_AFTER + OVERLAP
    assert sorted(s is None for s in said) == [False, True]  # one replica rotated, the other found nothing due
    assert a.ring == b.ring == ring  # the winner's ring, on both
    assert a.keyring.ring_revision == b.keyring.ring_revision  # type: ignore[attr-defined]


async def test_a_write_whose_comparison_fails_is_decided_again(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    ring = SharedKeyRing(store, FERNET)
    await ring.update(due_change(now(), rotate_after=ROTATE_AFTER, overlap=OVERLAP))
    decisions: list[KeyRing | None] = []
    rotate = rotation(now(), OVERLAP)

    def decide(current: KeyRing | None) -> tuple[KeyRing | None, str | None]:
        decisions.append(current)
        if len(decisions) == 1:  # between this replica's read and its write, another replica rotates
            store.backend.put(KEYRING_KEY, _encode(rotate(current)[0]), 0)
        return rotate(current)

    await ring.update(decide)
    final = await stored_ring(store)
    assert len(decisions) == 2 and decisions[1] != decisions[0]  # the comparison failed: decided again
    assert len(final.keys) == 3  # both rotations kept, none overwritten
    assert final == ring.ring


def _encode(ring: KeyRing | None) -> bytes:
    from connector.cloud.oauth_shared import encode_ring

    assert ring is not None
    return encode_ring(FERNET, ring)


async def test_followers_pick_up_a_rotation_and_the_overlap_ends_everywhere(
        autojump_clock: trio.testing.MockClock) -> None:
    one = MemoryStore()
    a, b = service(one), service(one.view())
    follower = b.keyring
    assert isinstance(follower, SharedKeyRing)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follower.run, Reachability())
        await a.maintain_keys()
        old = a.ring
        assert old is not None
        await a.rotate_keys()
        with trio.fail_after(1):
            await follower.wait_revision(a.keyring.ring_revision)  # type: ignore[attr-defined]
        assert b.ring == a.ring and len(b.ring.keys) == 2  # type: ignore[union-attr]
        assert [k["kid"] for k in b.ring.jwks(now())["keys"]] == [a.ring.current.kid, old.current.kid]  # type: ignore[union-attr]
        await trio.sleep(OVERLAP)
        await b.maintain_keys()  # whichever replica comes first prunes
        with trio.fail_after(1):
            await follower.wait_revision(b.keyring.ring_revision)  # type: ignore[attr-defined]
        assert [k.kid for k in b.ring.keys] == [a.ring.current.kid]  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_a_ring_of_another_secrets_key_is_never_overwritten(autojump_clock: trio.testing.MockClock,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    await SharedKeyRing(store, FERNET).update(due_change(now(), rotate_after=ROTATE_AFTER, overlap=OVERLAP))
    before = await store.get(KEYRING_KEY)
    stranger = SharedKeyRing(store.view(), Fernet(Fernet.generate_key()))
    with pytest.raises(KeyRingUnreadable, match="secrets_key"):
        await stranger.update(due_change(now(), rotate_after=ROTATE_AFTER, overlap=OVERLAP))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stranger.run, Reachability())
        await stranger.wait_revision(before.mod_revision)  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
    assert stranger.ring is None and "cannot be decrypted" in caplog.text
    assert await store.get(KEYRING_KEY) == before


async def test_a_service_without_a_ring_signs_nothing_and_accepts_nothing(
        autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    replica = service(store)
    store.set_fault("error")
    with pytest.raises(Exception, match="simulated outage"):
        await replica.maintain_keys()
    assert replica.ring is None
    from connector.cloud.jwtauth import JwtError

    with pytest.raises(JwtError) as refused:
        replica.validator.validate("eyJhbGciOiJSUzI1NiJ9.eyJ9.x")
    assert refused.value.reason == "keys_unavailable"


async def test_bindings_added_and_revoked_are_followed(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    follower = SharedBindings(store.view())
    with pytest.raises(OSError, match="not read"):  # fail closed before the first read
        follower.is_active("anyone")
    binding, _ = new_binding("acme", T0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follower.run, Reachability())
        added = await add_binding(store, binding)
        with pytest.raises(BindingError, match="exists"):
            await add_binding(store, binding)
        with trio.fail_after(1):
            await follower.wait_revision(added)
        assert follower.get(binding.client_id) == binding and follower.is_active(binding.client_id)
        revoked = await revoke_binding(store, binding.client_id, T0 + 5)
        assert revoked.revoked == T0 + 5
        assert (await revoke_binding(store, binding.client_id, T0 + 9)).revoked == T0 + 5  # the first one stays
        kv = await store.get_prefix("oauth/bindings/")
        with trio.fail_after(1):
            await follower.wait_revision(kv.revision)
        assert not follower.is_active(binding.client_id) and follower.all() == [revoked]
        with pytest.raises(BindingError, match="no binding"):
            await revoke_binding(store, "sb-nobody", T0)
        assert await list_bindings(store) == [revoked]
        nursery.cancel_scope.cancel()


def write_files(tmp_path: Path) -> tuple[Path, Path, KeyRing, list]:
    keys_file, bindings_file = tmp_path / "signing-keys.json", tmp_path / "bindings.json"
    ring = KeyRing((SigningKey.generate(T0 - 10),)).rotate(T0 - 5, OVERLAP)
    FileKeyStore(keys_file).save(ring)
    files = FileBindingStore(bindings_file)
    made = [new_binding("acme", T0)[0], new_binding("acme", T0 + 1)[0]]
    for binding in made:
        files.add(binding)
    return keys_file, bindings_file, ring, made


async def test_import_into_an_empty_store_takes_the_files_as_they_are(tmp_path: Path) -> None:
    store = MemoryStore()
    keys_file, bindings_file, ring, made = write_files(tmp_path)
    said = await import_files(store, SharedKeyRing(store, FERNET), keys_file=keys_file, bindings_file=bindings_file, now=T0,
                              overlap=OVERLAP)
    assert len(said) == 2 and "2 new binding(s) of 2" in said[0]
    assert _decode((await store.get(KEYRING_KEY)).value) == ring  # type: ignore[union-attr]
    assert sorted(b.client_id for b in await list_bindings(store)) == sorted(b.client_id for b in made)
    assert not keys_file.exists() and (tmp_path / "signing-keys.json.imported").exists()
    assert not bindings_file.exists() and (tmp_path / "bindings.json.imported").exists()
    assert await import_files(store, SharedKeyRing(store, FERNET), keys_file=keys_file, bindings_file=bindings_file, now=T0,
                              overlap=OVERLAP) == []  # once: nothing left to import


async def test_import_beside_a_shared_ring_keeps_the_files_keys_trusted_for_the_overlap(tmp_path: Path) -> None:
    store = MemoryStore()
    shared = SharedKeyRing(store, FERNET)
    await shared.update(due_change(T0, rotate_after=ROTATE_AFTER, overlap=OVERLAP))
    already, _ = new_binding("acme", T0)
    await add_binding(store, already)
    await revoke_binding(store, already.client_id, T0 + 1)
    keys_file, bindings_file, ring, made = write_files(tmp_path)
    FileBindingStore(bindings_file).add(already)  # the file still has it active: etcd's revocation stays
    await import_files(store, SharedKeyRing(store, FERNET), keys_file=keys_file, bindings_file=bindings_file, now=T0 + 2,
                       overlap=OVERLAP)
    merged = _decode((await store.get(KEYRING_KEY)).value)  # type: ignore[union-attr]
    assert merged.current == shared.ring.current  # type: ignore[union-attr]  # the shared key still signs
    assert [k.kid for k in merged.keys[1:]] == [k.kid for k in ring.keys]
    assert merged.keys[1].retires == T0 + 2 + OVERLAP and merged.keys[2].retires == ring.keys[1].retires
    assert {b.client_id: b.revoked for b in await list_bindings(store)}[already.client_id] == T0 + 1
    assert {b.client_id for b in made} <= {b.client_id for b in await list_bindings(store)}
