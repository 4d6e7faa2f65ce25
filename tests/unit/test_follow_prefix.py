"""Following a prefix of the cloud's etcd survives the store going away between the read and the
start of the watch (the race that took a whole cloud replica down in CI)."""

from __future__ import annotations

import trio

from connector.cloud.shared import Reachability, follow_prefix
from ha.memory import MemoryBackend, MemoryStore
from ha.store import Watch


class _WatchFailsOnce(MemoryStore):
    """A store whose first watch cannot start: etcd went away right after the read."""

    def __init__(self, backend: MemoryBackend) -> None:
        super().__init__(backend=backend)
        self.watch_attempts = 0

    def watch(self, prefix: str, start_revision: int | None = None) -> Watch:
        self.watch_attempts += 1
        if self.watch_attempts == 1:
            self.set_fault("error")  # the read succeeded; the store is gone for the watch
        return super().watch(prefix, start_revision)


async def test_follow_prefix_reads_again_when_the_watch_cannot_start(
        nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    backend = MemoryBackend()
    store = _WatchFailsOnce(backend)
    seen: list[dict[str, bytes]] = []

    def install(kvs, revision) -> None:  # type: ignore[no-untyped-def]
        seen.append({key: kv.value for key, kv in kvs.items()})

    nursery.start_soon(follow_prefix, store, "tokens/", Reachability(), "tokens", install)
    await trio.testing.wait_all_tasks_blocked()
    assert store.watch_attempts == 1 and seen == [{}]
    store.set_fault(None)  # etcd is back
    await trio.sleep(1.0)  # the retry's pause
    writer = MemoryStore(backend=backend)
    await writer.put("tokens/a", b"1")
    await trio.testing.wait_all_tasks_blocked()
    assert store.watch_attempts == 2 and seen[-1] == {"tokens/a": b"1"}
