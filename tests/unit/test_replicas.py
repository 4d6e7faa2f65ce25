"""The replica set's seam: its wire body and the directory's change notification."""

from __future__ import annotations

import pytest
import trio

from connector.cloud.replicas import Replica, ReplicaDirectory, from_body, to_body

ME = Replica("cloud-1", "wss://10.0.0.1:8443/tunnel", "http://10.0.0.1:20006")
OTHER = Replica("cloud-2", "wss://10.0.0.2:8443/tunnel")


def test_body_round_trips_sorted_by_id() -> None:
    body = to_body([OTHER, ME])
    assert [r["id"] for r in body["replicas"]] == ["cloud-1", "cloud-2"]
    assert from_body(body) == (ME, OTHER)


@pytest.mark.parametrize("body", [
    None, [], {"replicas": {}}, {"replicas": [1]}, {"replicas": [{"id": "", "tunnel_url": "wss://x"}]},
    {"replicas": [{"id": "a", "tunnel_url": "http://x"}]}, {"replicas": [{"id": "a", "tunnel_url": "wss://x", "admin_url": 3}]},
    {"replicas": [{"id": "a", "tunnel_url": "wss://x"}, {"id": "a", "tunnel_url": "wss://y"}]},
])
def test_broken_bodies_are_refused_with_a_reason(body: object) -> None:
    with pytest.raises(ValueError):
        from_body(body)


async def test_directory_announces_itself_and_wakes_waiters_on_change() -> None:
    directory = ReplicaDirectory(ME)
    assert directory.current() == (ME,)
    seen: list[int] = []

    async def follow() -> None:
        seen.append(await directory.wait_changed(0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        assert directory.update([ME, OTHER]) is True  # its own entry from the shared state is ignored
    assert seen == [1]
    assert directory.current() == (ME, OTHER)
    assert directory.update([OTHER]) is False  # no change, no wake-up
    assert await directory.wait_changed(0) == 1
