"""The cloud's audit log records the fence's decisions about a real node, as JSON lines in its file.

A real cloud side (its `[proxy] audit_log` set) and a real standalone node (epoch 0; cluster
`node:node-a`, a standalone node being a cluster of its own) on loopback (tests/support/stack.py);
a second master of that cluster, a bare tunnel with node-b's real certificate, registers a higher
epoch: node-a is fenced, reconnects, registers its epoch 0 again and is refused
(stale_epoch). The file must then hold, in order: node-a's registration (fence -1 -> 0, registered,
master switched from nobody), node-b's (fence 0 -> 5, registered, switched from node-a at 0), and
node-a's refusal, each with the tunnel fields and this replica's id; and the node's own audit log
is the same format (JSON lines with `ts` and `kind`), so one query reads both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from connector.cloud.audit import TUNNEL_FIELDS, CloudAudit
from tests.integration.test_end_to_end import _raw_tunnel
from tests.support.stack import SUBACCOUNT, start_stack

TEST_TIMEOUT = 15.0
CLUSTER = "node:node-a"  # a standalone node is a cluster of its own



async def _wait_tunnel_record(audit: CloudAudit, **match: Any) -> dict[str, Any]:
    """The first tunnel record whose fields include `match`, waiting for it if need be."""
    seen = 0
    while True:
        for record in audit.tunnel_records():
            if match.items() <= record.items():
                return record
        seen = audit.tunnel_written
        await audit.wait_tunnel_records(seen + 1)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_registrations_switches_fence_and_stale_refusal_are_audit_lines(nursery, tmp_path: Path) -> None:
    audit_file = tmp_path / "cloud-audit.jsonl"
    with trio.fail_after(TEST_TIMEOUT):
        stack = await start_stack(nursery, tmp_path, audit_log=audit_file)
        audit = stack.cloud.audit
        replica = stack.cloud.replicas.me.id
        await _wait_tunnel_record(audit, event="master_switched", node="node-a")

        second, second_wait = await _raw_tunnel(nursery, stack, "node-b", cluster=CLUSTER)
        await second.send_control("register", {"epoch": 5})
        assert (await second_wait("registered"))["epoch"] == 5
        refusal = await _wait_tunnel_record(audit, event="refused", node="node-a")

    lines = [line for line in _lines(audit_file) if line["kind"] == "tunnel"]
    assert all(list(line)[:2 + len(TUNNEL_FIELDS)] == ["ts", "kind", *TUNNEL_FIELDS] for line in lines), lines
    where = {"subaccount": SUBACCOUNT, "location": "", "cluster": CLUSTER, "replica": replica}
    expected = [
        {"event": "fence_advanced", "node": "node-a", "epoch": 0, "old_epoch": -1, "new_epoch": 0, "source": "registration"},
        {"event": "registered", "node": "node-a", "epoch": 0},
        {"event": "master_switched", "node": "node-a", "epoch": 0, "from_node": None, "from_epoch": None},
        {"event": "fence_advanced", "node": "node-b", "epoch": 5, "old_epoch": 0, "new_epoch": 5, "source": "registration"},
        {"event": "registered", "node": "node-b", "epoch": 5},
        {"event": "master_switched", "node": "node-b", "epoch": 5, "from_node": "node-a", "from_epoch": 0},
        {"event": "refused", "node": "node-a", "epoch": 0, "reason": "stale_epoch", "highest_epoch": 5,
         "owner": CLUSTER},
    ]
    assert [{k: v for k, v in line.items() if k not in ("ts", "kind")} for line in lines[:len(expected)]] == [
        {**dict.fromkeys(TUNNEL_FIELDS), **where, **fields} for fields in expected]
    assert refusal == lines[len(expected) - 1]

    node_log = tmp_path / "node-a-audit.jsonl"
    node_lines = _lines(node_log) if node_log.exists() else []
    for line in node_lines:  # the node's log: the same JSON lines, ts and kind first
        assert list(line)[:2] == ["ts", "kind"], line
