"""The cloud's tunnel audit records: their exact JSON lines, and which the registry writes when.

The registry's sessions are tests/unit/test_registry.py's recording fakes: these tests are about
its decisions; tests/integration/test_cloud_tunnel_audit.py runs a real cloud and node.
"""

from __future__ import annotations

import io

import pytest
import trio
import trio.testing

from connector.agent.audit import AuditLog
from connector.cloud.audit import (
    REFUSAL_REASONS,
    REFUSAL_REPEAT_SECONDS,
    REFUSALS_TRACKED,
    TUNNEL_FIELDS,
    CloudAudit,
)
from connector.cloud.registry import Fence, Registry, TunnelHandle
from tests.unit.test_registry import FakeSession

TS = "2026-11-29T23:00:00.000+00:00"


def _audit() -> tuple[CloudAudit, io.StringIO]:
    stream = io.StringIO()
    return CloudAudit(AuditLog(None, stream, clock=lambda: TS), replica="cloud-1"), stream


async def test_each_tunnel_event_is_one_json_line_with_the_tunnel_fields_first() -> None:
    audit, stream = _audit()
    audit.tunnel_registered(subaccount="acme", location="eu", node="node-a", cluster="plant-1", epoch=7)
    audit.tunnel_refused(subaccount="acme", location="eu", node="node-b", cluster="plant-1", reason="stale_epoch",
                         epoch=6, highest_epoch=7, owner="plant-1")
    audit.fence_advanced(subaccount="acme", location="eu", cluster="plant-1", node="node-a", old_epoch=-1,
                         new_epoch=7, source="registration")
    audit.master_switched(subaccount="acme", location="eu", node="node-a", cluster="plant-1", epoch=7,
                          from_node="node-b", from_epoch=3)
    audit.tunnel_refused(subaccount="acme", location="eu", node="node-c", cluster=None, reason="revoked",
                         serial="0a1b")
    head = f'{{"ts":"{TS}","kind":"tunnel",'
    where = '"subaccount":"acme","location":"eu",'
    assert stream.getvalue().splitlines() == [
        head + '"event":"registered",' + where + '"node":"node-a","cluster":"plant-1","epoch":7,"replica":"cloud-1"}',
        head + '"event":"refused",' + where + '"node":"node-b","cluster":"plant-1","epoch":6,"replica":"cloud-1",'
        '"reason":"stale_epoch","highest_epoch":7,"owner":"plant-1"}',
        head + '"event":"fence_advanced",' + where + '"node":"node-a","cluster":"plant-1","epoch":7,'
        '"replica":"cloud-1","old_epoch":-1,"new_epoch":7,"source":"registration"}',
        head + '"event":"master_switched",' + where + '"node":"node-a","cluster":"plant-1","epoch":7,'
        '"replica":"cloud-1","from_node":"node-b","from_epoch":3}',
        head + '"event":"refused",' + where + '"node":"node-c","cluster":null,"epoch":null,"replica":"cloud-1",'
        '"reason":"revoked","serial":"0a1b"}',
    ]
    assert audit.tunnel_written == 5 and audit.written == 0  # refusals of requests are counted apart
    assert [r["event"] for r in audit.tunnel_records()] == [
        "registered", "refused", "fence_advanced", "master_switched", "refused"]


async def test_a_refusal_needs_a_known_reason() -> None:
    audit, stream = _audit()
    with pytest.raises(ValueError, match="unknown tunnel refusal reason 'nope'"):
        audit.tunnel_refused(subaccount="acme", location="", node="n", cluster=None, reason="nope")
    assert stream.getvalue() == "" and audit.tunnel_written == 0
    assert {"stale_epoch", "wrong_cluster", "fence_unknown", "revoked"} == REFUSAL_REASONS


async def test_identical_refusals_are_written_once_per_window_with_the_count_left_out(autojump_clock) -> None:
    audit, stream = _audit()

    def refuse(epoch: int = 0) -> dict | None:
        return audit.tunnel_refused(subaccount="acme", location="", node="a", cluster="c", reason="stale_epoch",
                                    epoch=epoch)

    assert refuse() is not None
    assert [refuse() for _ in range(500)] == [None] * 500  # a node re-registering in a loop
    assert refuse(epoch=1) is not None  # another refusal is written at once
    await trio.sleep(REFUSAL_REPEAT_SECONDS - 0.001)
    assert refuse() is None
    await trio.sleep(0.001)
    record = refuse()
    assert record is not None and record["repeated"] == 501 and "repeated" not in audit.tunnel_records()[0]
    assert refuse() is None
    assert len(stream.getvalue().splitlines()) == audit.tunnel_written == 3


async def test_identical_refusals_remembered_are_bounded() -> None:
    audit, _ = _audit()

    def refuse(node: int) -> dict | None:
        return audit.tunnel_refused(subaccount="acme", location="", node=f"n{node}", cluster="c", reason="revoked")

    assert all(refuse(n) is not None for n in range(REFUSALS_TRACKED + 1))
    assert refuse(REFUSALS_TRACKED) is None  # remembered
    assert refuse(0) is not None  # the least recently written was forgotten: written again


async def test_wait_tunnel_records_returns_once_the_nth_is_written(nursery) -> None:
    audit, _ = _audit()
    got: list[list[dict]] = []

    async def waiter() -> None:
        got.append(await audit.wait_tunnel_records(2))

    nursery.start_soon(waiter)
    await trio.testing.wait_all_tasks_blocked()
    audit.tunnel_registered(subaccount="acme", location="", node="a", cluster="c", epoch=1)
    await trio.testing.wait_all_tasks_blocked()
    assert got == []
    audit.tunnel_registered(subaccount="acme", location="", node="a", cluster="c", epoch=1)
    await trio.testing.wait_all_tasks_blocked()
    assert len(got) == 1 and len(got[0]) == 2


def _handle(node: str, cluster: str = "plant-1", location: str = "") -> TunnelHandle:
    return TunnelHandle(FakeSession(node), "acme", location, node, cluster=cluster)  # type: ignore[arg-type]


def _events(audit: CloudAudit) -> list[tuple]:
    """(event, node, epoch, and what the event adds) of every tunnel record so far."""
    out = []
    for record in audit.tunnel_records():
        extra = {k: v for k, v in record.items() if k not in ("ts", "kind", *TUNNEL_FIELDS)}
        out.append((record["event"], record["node"], record["epoch"], extra))
    return out


@pytest.fixture
async def audited(nursery) -> tuple[Registry, CloudAudit]:
    audit, _ = _audit()
    registry = Registry(known_locations=[("acme", "")], audit=audit)
    await nursery.start(registry.run)
    return registry, audit


async def test_registry_audits_registrations_switches_fence_and_refusals(audited) -> None:
    registry, audit = audited
    a, b, stranger = _handle("a"), _handle("b"), _handle("x", cluster="plant-2")
    for h in (a, b):
        registry.add(h)
    assert registry.register(a, 3).accepted
    assert not registry.register(b, 2).accepted
    assert registry.register(b, 4).accepted
    again = _handle("b")  # the same master reconnecting after a blip: no switch, no fence advance
    registry.add(again)
    assert registry.register(again, 4).accepted
    assert registry.admit(stranger).reason == "wrong_cluster"
    assert _events(audit) == [
        ("fence_advanced", "a", 3, {"old_epoch": -1, "new_epoch": 3, "source": "registration"}),
        ("registered", "a", 3, {}),
        ("master_switched", "a", 3, {"from_node": None, "from_epoch": None}),
        ("refused", "b", 2, {"reason": "stale_epoch", "highest_epoch": 3, "owner": "plant-1"}),
        ("fence_advanced", "b", 4, {"old_epoch": 3, "new_epoch": 4, "source": "registration"}),
        ("registered", "b", 4, {}),
        ("master_switched", "b", 4, {"from_node": "a", "from_epoch": 3}),
        ("registered", "b", 4, {}),
        ("refused", "x", None, {"reason": "wrong_cluster", "highest_epoch": 4, "owner": "plant-1"}),
    ]


async def test_a_failover_after_the_master_dropped_still_names_the_old_master(audited) -> None:
    registry, audit = audited
    a, b = _handle("a"), _handle("b")
    for h in (a, b):
        registry.add(h)
    registry.register(a, 3)
    registry.remove(a)  # the master's tunnel dropped: nobody is master until b registers
    registry.register(b, 5)
    assert _events(audit)[-1] == ("master_switched", "b", 5, {"from_node": "a", "from_epoch": 3})


async def test_a_fence_raised_by_another_replica_is_audited_as_shared(audited) -> None:
    registry, audit = audited
    a = _handle("a")
    registry.add(a)
    registry.register(a, 3)
    registry.apply_shared_fence(("acme", ""), Fence(8, "plant-1"))
    registry.apply_shared_fence(("acme", ""), Fence(8, "plant-1"))  # nothing new: no record
    assert _events(audit)[3:] == [
        ("fence_advanced", None, 8, {"old_epoch": 3, "new_epoch": 8, "source": "shared"}),
        ("refused", "a", 3, {"reason": "stale_epoch", "highest_epoch": 8, "owner": "plant-1"}),
    ]


async def test_a_master_registering_again_on_its_tunnel_is_not_written_again(audited) -> None:
    """A node may send `register` as often as it likes; only a change is an event."""
    registry, audit = audited
    a = _handle("a")
    registry.add(a)
    for _ in range(100):
        assert registry.register(a, 3).accepted
    assert [event for event, *_ in _events(audit)] == ["fence_advanced", "registered", "master_switched"]
    assert registry.register(a, 4).accepted  # a new term of the same node is
    assert [event for event, *_ in _events(audit)][3:] == ["fence_advanced", "registered", "master_switched"]
